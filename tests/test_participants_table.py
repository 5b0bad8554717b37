"""participants.tsv merged into the BIDS-App's cohort: reserved columns, long tables with
session_id, duplicate ids, rows with the wrong number of fields, padded ids."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from bids_datasets import Dataset, description, xcpd
from conftest import run_greyarray


@pytest.fixture(scope="module")
def with_sessions(tmp_path_factory, template) -> Path:
    """Two participants with two sessions each (XCP-D layout)."""
    root = tmp_path_factory.mktemp("sessions") / "xcp_d"
    return xcpd(root, template, subjects=("01", "02"), sessions=("1", "2")).root


@pytest.fixture(scope="module")
def without_sessions(tmp_path_factory, template) -> Path:
    """Two participants with one ReHo map each and no ses- entity."""
    root = tmp_path_factory.mktemp("plain") / "xcp_d"
    description(root, "XCP-D")
    data = Dataset(root)
    for sub in ("01", "02"):
        name = f"sub-{sub}_task-rest_space-fsLR_den-91k_stat-reho_boldmap.dscalar.nii"
        data.write(f"sub-{sub}/func/{name}", template)
    return root


def group(bids: Path, out: Path, text: str):
    """The group level on BIDS with phenotypes from a participants.tsv holding TEXT."""
    table = out.parent / "participants.tsv"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_bytes(text.encode())
    args = ["--participants-file", table, "--scalar", "reho", "--no-report"]
    return run_greyarray(bids, out, "group", *args)


def error_line(done) -> str:
    """The one error line (and no traceback) of a failed run."""
    lines = [line for line in done.stderr.splitlines() if line.startswith("greyarray: error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def cohort(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "group" / "desc-reho_cohort.csv", dtype=str, keep_default_na=False)


@pytest.mark.parametrize("column", ["source_file", "scalar_name"])
def test_reserved_column_is_an_error(tmp_path, without_sessions, column):
    done = group(without_sessions, tmp_path / "out", f"participant_id\t{column}\nsub-01\tx\n")
    assert done.returncode == 65
    line = error_line(done)
    assert f"{tmp_path / 'participants.tsv'}: column '{column}' is reserved" in line
    assert "rename it" in line
    assert not (tmp_path / "out" / "group" / "desc-reho_cohort.csv").exists()


def test_long_table_merges_per_session(tmp_path, with_sessions, without_sessions):
    text = (
        "participant_id\tsession_id\tage\n"
        "sub-01\tses-1\t30\n"
        "01\t2\t31\n"  # labels without prefixes, as for participant ids
        "sub-02\tses-2\t41\n"  # sub-02 ses-1 has no row: its age is empty
    )
    done = group(with_sessions, tmp_path / "out", text)
    assert done.returncode == 0, done.stderr
    table = cohort(tmp_path / "out")
    assert list(table.columns) == [
        "scalar_name",
        "source_file",
        "participant_id",
        "session_id",
        "age",
    ]
    assert table[["participant_id", "session_id", "age"]].values.tolist() == [
        ["sub-01", "ses-1", "30"],
        ["sub-01", "ses-2", "31"],
        ["sub-02", "ses-1", "NA"],
        ["sub-02", "ses-2", "41"],
    ]
    # the maps have no sessions: which row describes them is the user's choice
    done = group(without_sessions, tmp_path / "plain" / "out", text)
    assert done.returncode == 65
    line = error_line(done)
    assert f"{tmp_path / 'plain' / 'participants.tsv'}: has a session_id column" in line
    assert "the reho maps have no sessions" in line


def test_duplicate_ids_are_an_error(tmp_path, without_sessions, with_sessions):
    text = "participant_id\tage\nsub-01\t30\nsub-02\t40\n01\t31\n"
    done = group(without_sessions, tmp_path / "out", text)
    assert done.returncode == 65
    line = error_line(done)
    assert f"{tmp_path / 'participants.tsv'}: 2 rows share a participant_id (sub-01)" in line
    text = "participant_id\tsession_id\tage\nsub-01\tses-1\t30\nsub-01\t1\t31\nsub-02\tses-1\t4\n"
    done = group(with_sessions, tmp_path / "s" / "out", text)
    assert done.returncode == 65
    line = error_line(done)
    assert "2 rows share a participant_id and session_id (sub-01 ses-1)" in line
    assert "one row per participant and session" in line


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("participant_id\tage\nsub-01\t20\t5\nsub-02\t30\n", "line 2 has 3 fields"),
        ("participant_id\tage\tsex\nsub-01\t20\tF\nsub-02\t30\n", "line 3 has 2 fields"),
    ],
)
def test_rows_with_the_wrong_number_of_fields(tmp_path, without_sessions, text, message):
    done = group(without_sessions, tmp_path / "out", text)
    assert done.returncode == 65
    line = error_line(done)
    assert f"{tmp_path / 'participants.tsv'}: {message} but the header has" in line


@pytest.mark.parametrize("value", ["n/a", " "])
def test_a_row_without_participant_id_is_an_error(tmp_path, without_sessions, value):
    """It would become sub-nan and match nothing: its phenotypes silently lost."""
    done = group(
        without_sessions, tmp_path / "out", f"participant_id\tage\nsub-01\t20\n{value}\t30\n"
    )
    assert done.returncode == 65
    assert "1 row(s) without a participant_id (the first is data row 2)" in error_line(done)
    assert not (tmp_path / "out").exists()


def test_blank_lines_bom_and_crlf_still_read(tmp_path, without_sessions):
    text = "\ufeffparticipant_id\tage\r\n01\tn/a\r\n\r\nsub-02\t30\r\n"
    done = group(without_sessions, tmp_path / "out", text)
    assert done.returncode == 0, done.stderr
    table = cohort(tmp_path / "out")
    assert table[["participant_id", "age"]].values.tolist() == [["sub-01", "NA"], ["sub-02", "30"]]


def test_padded_id_is_shown_as_written(tmp_path, without_sessions):
    done = group(without_sessions, tmp_path / "out", "participant_id\tage\n sub-01 \t20\n")
    assert done.returncode == 0, done.stderr
    assert "1 participants in participants.tsv have no maps: ' sub-01 '" in done.stderr
    assert "sub- sub-01" not in done.stderr
    assert "(their phenotype columns are empty): sub-01, sub-02" in done.stderr
    assert cohort(tmp_path / "out")["age"].tolist() == ["NA", "NA"]


def test_sessions_tsv_with_a_session_twice_is_named(tmp_path, template):
    root = xcpd(tmp_path / "xcp_d", template, subjects=("01",), sessions=("1", "2")).root
    tsv = root / "sub-01" / "sub-01_sessions.tsv"
    tsv.write_text("session_id\tage\nses-1\t20\n1\t25\nses-2\t21\n")
    done = run_greyarray(root, tmp_path / "out", "group", "--scalar", "reho", "--no-report")
    assert done.returncode == 65
    assert f"{tsv}: 2 rows share a session_id (ses-1)" in error_line(done)
    assert not (tmp_path / "out").exists()


def test_session_labels_that_match_no_map_are_warned_about(tmp_path, with_sessions):
    text = "participant_id\tsession_id\tage\n" + "".join(
        f"sub-{s}\tses-0{k}\t{20 + k}\n" for s in ("01", "02") for k in (1, 2)
    )
    done = group(with_sessions, tmp_path / "out", text)
    assert done.returncode == 0, done.stderr
    assert "4 participant sessions with maps have no row in" in done.stderr
    assert "(session labels there: ses-01, ses-02)" in done.stderr
