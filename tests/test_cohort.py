"""Cohort CSVs: formats, path resolution, and the exact source_file strings."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from greyarray.errors import DataError
from greyarray.io.cohort import load_cohort


def test_long_cohort_keeps_strings_and_resolves_against_csv_folder(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    pd.DataFrame(
        {
            "age": ["30", "NA"],  # other columns are free and kept as text (NA is not dropped)
            "source_file": ["maps/a.dscalar.nii", "/abs/b.dscalar.nii"],
            "scalar_name": ["FA", "FA"],
        }
    ).to_csv(folder / "c.csv", index=False)
    cohort = load_cohort(folder / "c.csv")
    assert list(cohort.table.columns) == ["scalar_name", "source_file", "age"]
    assert cohort.scalars == {"FA": ["maps/a.dscalar.nii", "/abs/b.dscalar.nii"]}
    assert cohort.resolve("maps/a.dscalar.nii") == folder / "maps/a.dscalar.nii"
    assert cohort.resolve("/abs/b.dscalar.nii") == Path("/abs/b.dscalar.nii")
    assert list(cohort.table["age"]) == ["30", "NA"]


def test_values_are_case_sensitive_and_order_is_kept(tmp_path):
    pd.DataFrame(
        {"scalar_name": ["fa", "FA", "fa"], "source_file": ["x.nii", "x.nii", "y.nii"]}
    ).to_csv(tmp_path / "c.csv", index=False)
    assert load_cohort(tmp_path / "c.csv").scalars == {"fa": ["x.nii", "y.nii"], "FA": ["x.nii"]}


def test_wide_cohort_is_melted(tmp_path):
    pd.DataFrame({"subject": ["s1", "s2"], "FA": ["f1", "f2"], "MD": ["m1", "m2"]}).to_csv(
        tmp_path / "w.csv", index=False
    )
    cohort = load_cohort(tmp_path / "w.csv", ["FA", "MD"])
    assert cohort.scalars == {"FA": ["f1", "f2"], "MD": ["m1", "m2"]}
    assert list(cohort.table["subject"]) == ["s1", "s2", "s1", "s2"]
    pd.DataFrame({"subject": ["s1"], "FA": [""]}).to_csv(tmp_path / "e.csv", index=False)
    with pytest.raises(DataError, match="line 2 has an empty source_file"):
        load_cohort(tmp_path / "e.csv", ["FA"])


def test_unreadable_csv(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty.csv: cannot read as CSV"):
        load_cohort(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("scalar_name,source_file\n")
    with pytest.raises(DataError, match="header.csv: cohort has no rows"):
        load_cohort(tmp_path / "header.csv")
