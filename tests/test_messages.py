"""Every refusal is one bounded, printable stderr line (exit code by kind, nothing written), and
no NumPy warning text ever reaches stderr: user values (CSV fields, paths, HDF5 column names,
header scale factors) may hold newlines, NULs, escape sequences, megabytes or 1e308.

Families: one-line messages; wide cohorts; repeated header names; XML-invalid map names; numeric
overflow. Inputs are the real 32k pscalar (small) with cohorts and results written here.
"""

from __future__ import annotations

import csv
import logging
import warnings
from pathlib import Path

import h5py
import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from conftest import PSCALAR, subject_values, write_cohort
from test_hostile import build, field

from greyarray import cli
from greyarray.errors import LINE_LIMIT, one_line
from greyarray.io import store
from greyarray.io.cohort import load_cohort
from greyarray.io.formats import cifti

PREFIX = "greyarray: error: "


@pytest.fixture(scope="module")
def writer() -> cifti.CiftiWriter:
    return cifti.CiftiWriter(cifti.read_file(PSCALAR).geometry)


@pytest.fixture(scope="module")
def study(tmp_path_factory, writer) -> Path:
    """A converted 6-subject pscalar cohort (study/cohort.csv, study/data.h5)."""
    folder = tmp_path_factory.mktemp("study")
    values = subject_values(6, writer.geometry.n_elements)
    csv = write_cohort(folder, writer, values, scalar="thick")
    store.to_modelarray(load_cohort(csv), folder / "data.h5", store.StoreOptions())
    return folder


def study_elements(study: Path) -> int:
    with h5py.File(study / "data.h5") as stored:
        return stored["scalars/thick/values"].shape[1]


def run_quiet(run_cli, *args) -> tuple[int, str]:
    """(exit code, stderr) with every warning an error: one that escapes its np.errstate ends
    the run as a crash (exit 1) instead of slipping a line onto stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, _, err = run_cli(*args, "--log-level", "ERROR")
    return code, err


def check_refused(code: int, err: str, expected: int, text: str, out: Path) -> str:
    """Exit ``expected``, exactly one printable error line containing ``text``, nothing in out."""
    assert code == expected, err
    assert err.endswith("\n") and err.count("\n") == 1 and len(err.splitlines()) == 1, err
    line = err.rstrip("\n")
    assert line.startswith(PREFIX) and line.isprintable(), repr(line[:300])
    assert len(line) <= len(PREFIX) + LINE_LIMIT, len(line)
    assert text in line, line
    assert not out.exists() or not list(out.iterdir()), list(out.iterdir())
    return line


def long_cohort(folder: Path, source_files: list[str]) -> Path:
    """A long cohort CSV, every field quoted (so a field may hold a newline or a CR)."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"scalar_name": "thick", "source_file": source_files})
    table["age"] = range(len(table))
    path = folder / "cohort.csv"
    table.to_csv(path, index=False, quoting=csv.QUOTE_ALL)
    return path


# ---------------------------------------------------------------- 1. one line, escaped, bounded

SOURCE_CASES = {  # source_file in the cohort's 2nd row: (value, text the line must show)
    "quoted-newline": ("sub-01.pscalar.nii\n", "sub-01.pscalar.nii\\n"),
    "carriage-return": ("sub\r01.pscalar.nii", "sub\\r01.pscalar.nii"),
    "nul": ("sub\x0003.pscalar.nii", "sub\\x0003.pscalar.nii"),
    "escape-sequence": ("\x1b[2J\x1b[31mred.pscalar.nii", "\\x1b[2J\\x1b[31mred"),
    "line-separator": ("a\u2028b.pscalar.nii", "a\\u2028b"),
    "huge-field": ("a" * 5_000_000 + ".pscalar.nii", "\u2026"),
}


@pytest.mark.parametrize("command", ["to-modelarray", "export-results"])
@pytest.mark.parametrize("case", sorted(SOURCE_CASES))
def test_source_file_shown_on_one_line(run_cli, tmp_path, study, case, command):
    value, shown = SOURCE_CASES[case]
    first = [value] if command == "export-results" else []  # export reads the first row only
    good = str(study / "maps/sub-001_thick.pscalar.nii")
    table = long_cohort(tmp_path / "in", [*first, good, value])
    out = tmp_path / "out"
    export = ["--analysis-name", "lm", "--input-hdf5", study / "data.h5", "--output-dir", out]
    args = {
        "to-modelarray": ["--cohort-file", table, "--output", out / "o.h5"],
        "export-results": [*export, "--cohort-file", table],
    }[command]
    code, err = run_quiet(run_cli, command, *args)
    line = check_refused(code, err, 66, shown, out)
    assert f"{table}: source_file " in line


@pytest.mark.parametrize(
    "name, shown",
    [("no\nsuch.csv", "no\\nsuch.csv"), ("bell\x07.csv", "bell\\x07.csv"), ("x" * 9000, "\u2026")],
)
def test_cohort_path_shown_on_one_line(run_cli, tmp_path, name, shown):
    out = tmp_path / "out"
    code, err = run_quiet(run_cli, "to-modelarray", "--cohort-file", name, "--output", out / "o.h5")
    check_refused(code, err, 66, shown, out)


def test_one_line_cuts_each_long_value_and_bounds_the_line():
    message = f"{'/d/' * 400}end.csv: field {'b' * 10_000!r} and {'c' * 10_000!r}\x00\n"
    line = one_line(message)
    assert line.isprintable() and len(line) <= LINE_LIMIT
    assert line.count("\u2026") == 3 and "end.csv: field 'bbb" in line
    assert line.endswith("'\\x00\\n")
    assert one_line("plain 'text' stays, caf\u00e9 too") == "plain 'text' stays, caf\u00e9 too"


def test_log_file_keeps_the_whole_message(tmp_path, capsys):
    log = tmp_path / "run.log"
    logging.getLogger().addHandler(logging.FileHandler(log))  # as the BIDS-App's run log
    message = "c.csv: source_file 'x\ny" + "z" * 5000 + "' not found"
    assert cli.fail(message, 66) == 66
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert message in log.read_text()


# ---------------------------------------------------------------- 2. wide cohorts

WIDE_CASES = {  # extra header column, --scalar-columns, exit code, text
    "repeated-scalar-column": ("", ["thick", "thick"], 64, "--scalar-columns names 'thick' twice"),
    "source_file-column": ("source_file", ["thick", "area"], 65, "'source_file'"),
    "scalar_name-column": ("scalar_name", ["thick", "area"], 65, "'scalar_name'"),
    "scalar-column-is-source_file": ("", ["thick", "source_file"], 65, "'source_file'"),
}


@pytest.mark.parametrize("case", sorted(WIDE_CASES))
def test_wide_cohort_refused(run_cli, tmp_path, study, case):
    extra, columns, expected, text = WIDE_CASES[case]
    maps = [str(p) for p in sorted((study / "maps").iterdir())]
    table = pd.DataFrame({"sub": ["a", "b", "c"], "thick": maps[:3], "area": maps[3:6]})
    if extra:
        table[extra] = "x"
    if "source_file" in columns:
        table = table.rename(columns={"area": "source_file"})
    csv = tmp_path / "wide.csv"
    table.to_csv(csv, index=False)
    out = tmp_path / "out"
    code, err = run_quiet(
        run_cli, "to-modelarray", "--cohort-file", csv, "--output", out / "o.h5",
        "--scalar-columns", *columns,
    )  # fmt: skip
    line = check_refused(code, err, expected, text, out)
    assert expected == 64 or str(csv) in line


# ---------------------------------------------------------------- 3. a header naming a column twice

HEADERS = {
    "source_file-twice": ("scalar_name,source_file,source_file", "source_file", "2 and 3"),
    "age-twice": ("scalar_name,source_file,age,age", "age", "3 and 4"),
}


@pytest.mark.parametrize("command", ["to-modelarray", "export-results", "fit-lm"])
@pytest.mark.parametrize("case", sorted(HEADERS))
def test_repeated_header_name_refused(run_cli, tmp_path, study, case, command):
    header, column, where = HEADERS[case]
    maps = [str(p) for p in sorted((study / "maps").iterdir())]
    rows = [f"thick,{m},{m}" + (",1" if header.count(",") == 3 else "") for m in maps]
    csv = tmp_path / "cohort.csv"
    csv.write_text("\n".join([header, *rows]) + "\n")
    out = tmp_path / "out"
    h5 = tmp_path / "data.h5"
    h5.write_bytes((study / "data.h5").read_bytes())
    args = {
        "to-modelarray": ["--output", out / "o.h5"],
        "export-results": ["--analysis-name", "lm", "--input-hdf5", h5, "--output-dir", out],
        "fit-lm": ["--input-hdf5", h5, "--formula", "thick ~ 1", "--analysis-name", "lm"],
    }[command]
    code, err = run_quiet(run_cli, command, "--cohort-file", csv, *args)
    line = check_refused(code, err, 65, f"column {column!r} appears twice", out)
    assert f"{csv}: " in line and f"columns {where}" in line
    with h5py.File(h5) as stored:
        assert "results" not in stored


def test_similar_header_names_are_distinct(tmp_path):
    csv = tmp_path / "c.csv"
    csv.write_text("scalar_name,source_file,age,age.1\nthick,a.pscalar.nii,1,2\n")
    assert list(load_cohort(csv).table.columns) == ["scalar_name", "source_file", "age", "age.1"]


# ---------------------------------------------------------------- 4. XML-invalid map names


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Intercept\x01est<&>\x0bx", "Intercept\ufffdest<&>\ufffdx"),
        ("a\x1fb\x7fc", "a\ufffdb\x7fc"),  # DEL is allowed in XML 1.0
        ("non\ufffechar", "non\ufffdchar"),
        ("tab\tkept", "tab\tkept"),
    ],
)
def test_map_name_is_valid_xml(run_cli, tmp_path, study, wb_command, name, expected):
    h5 = tmp_path / "data.h5"
    h5.write_bytes((study / "data.h5").read_bytes())
    n = study_elements(study)
    with h5py.File(h5, "a") as stored:
        group = stored.create_group("results/lm")
        group.create_dataset("results_matrix", data=np.stack([np.arange(n), np.ones(n)]))
        group.create_dataset("column_names", data=["element_id", name], dtype=h5py.string_dtype())
    out = tmp_path / "out"
    code, err = run_quiet(
        run_cli, "export-results", "--analysis-name", "lm", "--input-hdf5", h5, "--output-dir", out
    )
    assert code == 0 and err == "", err
    (written,) = list(out.iterdir())
    assert nb.load(written).header.get_axis(0).name[0] == expected
    wb_command("-file-information", written)  # the reference reader accepts it


# ---------------------------------------------------------------- 5. overflow: inf, never a warning


def _results(h5: Path, matrix: np.ndarray) -> None:
    with h5py.File(h5, "a") as stored:
        group = stored.create_group("results/lm")
        group.create_dataset("results_matrix", data=matrix)
        group.create_dataset("column_names", data=["element_id", "x.estimate"][: len(matrix)])


def test_huge_scale_factor_becomes_inf_quietly(run_cli, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        slope = 1e38 if i == 1 else 1.0
        (folder / f"s{i}.pscalar.nii").write_bytes(
            build(edit=field("scl_slope", slope), base=PSCALAR)
        )
    table = long_cohort(folder, [f"s{i}.pscalar.nii" for i in range(3)])
    output = tmp_path / "o.h5"
    args = ["--cohort-file", table, "--output", output, "--map", "2"]
    code, err = run_quiet(run_cli, "to-modelarray", *args)
    assert code == 0 and err == "", err
    with h5py.File(tmp_path / "o.h5") as stored:
        values = stored["scalars/thick/values"][()]
    assert np.isinf(values[1]).any() and np.isfinite(values[[0, 2]]).all()


@pytest.mark.parametrize("case", ["float64-1e300", "uint64-max"])
def test_results_beyond_float32(run_cli, tmp_path, study, case):
    h5 = tmp_path / "data.h5"
    h5.write_bytes((study / "data.h5").read_bytes())
    n = study_elements(study)
    if case == "uint64-max":
        _results(h5, np.full((2, n), 2**64 - 1, np.uint64))
    else:
        _results(h5, np.stack([np.arange(n), np.full(n, 1e300)]))
    out = tmp_path / "out"
    code, err = run_quiet(
        run_cli, "export-results", "--analysis-name", "lm", "--input-hdf5", h5, "--output-dir", out
    )
    if case == "uint64-max":
        check_refused(code, err, 65, "element_id spans 1844674407370955161", out)
        return
    assert code == 0 and err == "", err
    (written,) = list(out.iterdir())
    assert np.isposinf(np.asarray(nb.load(written).dataobj)).all()


def test_huge_phenotype_fits_quietly(run_cli, tmp_path, study):
    h5 = tmp_path / "data.h5"
    h5.write_bytes((study / "data.h5").read_bytes())
    csv = tmp_path / "cohort.csv"
    table = pd.read_csv(study / "cohort.csv")
    table["age"] = table["age"] * 1e300
    table.loc[2, "age"] = 1e308
    table.to_csv(csv, index=False)
    code, err = run_quiet(
        run_cli, "fit-lm", "--input-hdf5", h5, "--cohort-file", csv, "--formula", "thick ~ age",
        "--num-subj-lthr-abs", "3",
    )  # fmt: skip
    assert code == 0 and err == "", err
    with h5py.File(h5) as stored:
        names = list(stored["results/lm/column_names"].asstr()[()])
        estimate = stored["results/lm/results_matrix"][names.index("Intercept.estimate")]
    assert np.isfinite(estimate).all()  # the design is not rank-deficient: columns scaled first
