"""No result is silently empty; every refused run is on record; the gaps of issues 11 and 12.

- Elements left unfitted are said (how many, why: ModelArray's threshold with its numbers and
  the option that changes it, or a design that cannot be fitted) in the log, the summary, the
  sidecars and the report; loudly when no element is fitted; so are result columns that are
  NaN everywhere and factor levels of a single subject. The shared writer says it, for every
  model.
- A run refused at any stage, its arguments included, leaves its command line, error and exit
  code in an existing OUTPUT_DIR's logs/.
- fit-lm refuses values whose element count differs from the stored geometry before fitting;
  open_hdf5 opens the descriptor it checked (a FIFO swapped in never hangs it); re-exporting
  unchanged maps leaves maps and sidecars (a user's notes) untouched; the live PALM tests skip
  without PALM outside CI.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import PSCALAR, run_greyarray, subject_values, write_cohort
from test_faults import one_error_line

from greyarray.bids import derivatives
from greyarray.io.formats import cifti

NO_ELEMENT = "No element was fitted: results/lm holds only NaN"


def cohort(folder: Path, n: int, site: list[str] | None = None, nan=None) -> tuple[Path, Path]:
    """A pscalar cohort of ``n`` subjects (54 elements) and its HDF5."""
    values = subject_values(n, 54, seed=n)
    if nan is not None:
        nan(values)
    csv = write_cohort(folder, cifti.CiftiWriter(cifti.read_file(PSCALAR).geometry), values)
    if site is not None:
        table = pd.read_csv(csv)
        table["site"] = site
        table.to_csv(csv, index=False)
    h5 = folder / "data.h5"
    assert run_greyarray("to-modelarray", "--cohort-file", csv, "--output", h5).returncode == 0
    return h5, csv


def notes(h5: Path, analysis: str) -> list[str]:
    with h5py.File(h5) as file:
        return json.loads(file[f"results/{analysis}"].attrs["greyarray_about"]).get("notes", [])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- no silently empty result ------------------------------------------------------------------
@pytest.mark.parametrize("command", ["fit-lm --permutations", "fit-gam"])
def test_no_element_fitted_is_said_loudly_with_the_option(tmp_path, command):
    """8 subjects: no element has more than ModelArray's 10. Said as a warning, recorded for
    the sidecars and report, naming the threshold's numbers and the option that changes it."""
    h5, csv = cohort(tmp_path, 8)
    args = ["--input-hdf5", h5, "--cohort-file", csv, "--analysis-name", "lm"]
    if command == "fit-gam":
        done = run_greyarray("fit-gam", *args, "--formula", "thickness ~ s(age, k=4, fx=TRUE)")
    else:
        done = run_greyarray("fit-lm", *args, "--formula", "thickness ~ age", "--permutations", 9)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if NO_ELEMENT in line]
    assert len(said) == 1 and said[0].startswith("WARNING: ")
    for words in ("max(10, 0.2 x 8) = 10 participants", "only 8", "--num-subj-lthr-abs 7"):
        assert words in said[0]
    assert said[0].removeprefix("WARNING: ") in notes(h5, "lm")


def test_unfitted_elements_empty_columns_and_single_subject_levels_are_said(tmp_path):
    """16 subjects: 3 elements have too few finite values, 2 lose every subject of site c
    (a rank-deficient design there); the intercept-only model has no F test (NaN columns);
    site d has one subject. Each is one line, with its count and reason."""

    def holes(values):
        values[:7, :3] = np.nan  # 9 finite values left: not more than 10
        values[[14], 10:12] = np.nan  # site c's only subject

    site = ["a"] * 7 + ["b"] * 7 + ["c", "d"]
    h5, csv = cohort(tmp_path, 16, site, holes)
    fit = ["fit-lm", "--input-hdf5", h5, "--cohort-file", csv]
    done = run_greyarray(*fit, "--formula", "thickness ~ age + site")
    assert done.returncode == 0, done.stderr
    (unfitted, single) = notes(h5, "lm")
    assert unfitted.startswith("5 of 54 elements were not fitted (NaN in results/lm): 3 have ")
    assert "too few participants with a finite value (an element is fitted only where more " in (
        unfitted
    )
    assert "max(10, 0.2 x 16) = 10 participants" in unfitted and "--num-subj-lthr-abs" in unfitted
    assert "2 cannot be fitted with the subjects they have (a rank-deficient design" in unfitted
    assert single.startswith("factor 'site': levels 'c', 'd' each have a single subject")
    assert f"WARNING: {unfitted}" in done.stderr and f"WARNING: {single}" in done.stderr
    done = run_greyarray(*fit, "--formula", "thickness ~ 1", "--analysis-name", "mean")
    assert done.returncode == 0, done.stderr
    (unfitted, empty) = notes(h5, "mean")
    assert unfitted.startswith("3 of 54 elements were not fitted")
    assert empty.startswith("results/mean: model.p.value, model.p.value.fdr are NaN at every")


def test_the_report_says_what_the_writer_said(tmp_path):
    from greyarray.report.html import Text
    from greyarray.report.results import results_section

    h5, csv = cohort(tmp_path, 8)
    fit = ["fit-lm", "--input-hdf5", h5, "--cohort-file", csv, "--formula", "thickness ~ age"]
    assert run_greyarray(*fit).returncode == 0
    with h5py.File(h5, "a") as file:  # results as ModelArray in R writes them: no record
        file.copy(file["results/lm"], "results/fromR")
        del file["results/fromR"].attrs["greyarray_about"]
    with h5py.File(h5) as file:
        for analysis, expected in [("lm", NO_ELEMENT), ("fromR", "54 of 54 elements have no")]:
            section = results_section(file, analysis)
            warnings = [
                b.text for b in section.blocks if isinstance(b, Text) and b.level == "warning"
            ]
            assert len(warnings) == 1 and warnings[0].startswith(expected), warnings


@pytest.fixture(scope="module")
def bids_run(tmp_path_factory, template):
    """group --model on 3 participants' parcellated coverage: nothing can be fitted."""
    from bids_datasets import xcpd

    folder = tmp_path_factory.mktemp("bids")
    data = xcpd(folder / "xcpd", template, subjects=("01", "02", "03"), sessions=("1",))
    pd.DataFrame({"participant_id": ["sub-01", "sub-02", "sub-03"], "age": [20, 30, 40]}).to_csv(
        data.root / "participants.tsv", sep="\t", index=False
    )
    out = folder / "out"
    done = run_greyarray(data.root, out, "group", "--model", "coverage ~ age", "--no-report")
    assert done.returncode == 0, done.stderr
    return data.root, out, done


def test_the_bids_app_says_it_in_summary_log_and_sidecars(bids_run):
    _, out, done = bids_run
    summary = [line for line in done.stdout.splitlines() if NO_ELEMENT in line]
    assert len(summary) == 1 and summary[0].startswith("  WARNING: ")
    (log,) = (out / "logs").glob("greyarray-group-*.log")
    assert NO_ELEMENT in log.read_text()
    sidecars = sorted((out / "group").glob("*_statmap.json"))
    assert sidecars
    for sidecar in sidecars:
        (warning,) = json.loads(sidecar.read_text())["Warnings"]
        assert warning.startswith(NO_ELEMENT) and "--num-subj-lthr-abs" in warning


def test_reexporting_unchanged_maps_leaves_maps_and_sidecars_alone(bids_run):
    """A user's note in a sidecar survives a re-export; the maps are not rewritten."""
    root, out, _ = bids_run
    sidecar = sorted((out / "group").glob("*_statmap.json"))[0]
    noted = {**json.loads(sidecar.read_text()), "Notes": "checked by hand"}
    sidecar.write_text(json.dumps(noted, indent=1))
    files = sorted(p for p in (out / "group").iterdir() if "_statmap" in p.name)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns, sha256(p)) for p in files}
    done = run_greyarray(root, out, "group", "--analysis-name", "lm", "--no-report")
    assert done.returncode == 0, done.stderr
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns, sha256(p)) for p in files} == before
    assert json.loads(sidecar.read_text())["Notes"] == "checked by hand"


# ---- every refused run is on record ------------------------------------------------------------
REFUSALS = {
    "participants file": (["--participants-file", "missing.tsv"], 66, "participants file not"),
    "argument": (["--nprocs", "0"], 64, "argument --nprocs/--n-cpus/--n_cpus: 0 is less than 1"),
    "level": (["grop"], 17, "unknown analysis level 'grop'"),
    "reference level": (["--reference-level", "sex"], 64, "expected COLUMN=LEVEL"),
    "config": (["--config", "missing.yaml"], 66, "config file not found"),
}


@pytest.mark.parametrize("stage", REFUSALS)
def test_a_refused_run_is_on_record_whatever_refused_it(tmp_path, stage):
    from bids_datasets import description

    args, code, error = REFUSALS[stage]
    description(tmp_path / "bids", "XCP-D")
    out = tmp_path / "out"
    derivatives.init_dataset(out, [tmp_path / "bids"])  # an earlier run's output
    level = [] if stage == "level" else ["group"]
    done = run_greyarray(tmp_path / "bids", out, *level, *args)
    assert done.returncode == code, done.stderr
    if stage == "argument":  # argparse prints its usage block first
        assert f"greyarray: error: {error}" in done.stderr
    else:
        assert error in one_error_line(done.stderr)
    (log,) = (out / "logs").glob("greyarray-*.log")
    text = log.read_text()
    assert f"greyarray {tmp_path / 'bids'} {out}" in text  # the command line
    assert f"{error}" in text and f"(exit code {code})" in text
    assert list((out / "logs").glob("config-*.yaml"))


def test_refusals_are_recorded_only_in_a_folder_for_outputs(tmp_path):
    """An empty folder (a container's mount point) gets logs/; a folder that does not exist
    is not created; someone else's folder (a dataset given by mistake) is never written."""
    empty, foreign = tmp_path / "empty", tmp_path / "foreign"
    empty.mkdir()
    (foreign / "sub-01").mkdir(parents=True)
    for out in (empty, foreign, tmp_path / "missing"):
        done = run_greyarray(tmp_path, out, "group", "--participants-file", "x.tsv")
        assert done.returncode == 66
    assert len(list((empty / "logs").glob("greyarray-refused-*.log"))) == 1
    assert [p.name for p in foreign.iterdir()] == ["sub-01"]
    assert not (tmp_path / "missing").exists()


# ---- the gaps of issues 11 and 12 --------------------------------------------------------------
@pytest.mark.parametrize("geometry", ["greyarray", "modelarrayio"])
def test_values_whose_element_count_differs_from_the_geometry_are_refused(tmp_path, geometry):
    h5, csv = cohort(tmp_path, 12)
    with h5py.File(h5, "a") as file:
        values = file["scalars/thickness/values"][()]
        del file["scalars/thickness/values"]
        file["scalars/thickness/values"] = values[:, :50]
        if geometry == "modelarrayio":  # ModelArrayIO's file: parcels/parcel_id only
            del file["greyarray"]
    sha = sha256(h5)
    fit = ["fit-lm", "--input-hdf5", h5, "--cohort-file", csv, "--formula", "thickness ~ age"]
    done = run_greyarray(*fit)
    assert done.returncode == 65
    where = "greyarray/geometry" if geometry == "greyarray" else "parcels/parcel_id"
    assert f"values has 50 elements but the file's geometry ({where}) has 54" in one_error_line(
        done.stderr
    )
    assert "Fitting" not in done.stderr and sha256(h5) == sha


SWAP = """
import os, sys
from pathlib import Path
from greyarray.io import inputs
path = Path(sys.argv[1])
checked = inputs._refuse_irregular

def swap_after_check(where, mode):
    checked(where, mode)
    os.replace(path, path.with_name("moved.h5"))
    os.mkfifo(path)  # a FIFO where the checked file was: opening it by name blocks forever

inputs._refuse_irregular = swap_after_check
try:
    with inputs.open_hdf5(path) as h5:
        print("opened", sorted(h5))
except Exception as err:
    print("refused", err)
"""


def test_open_hdf5_never_opens_a_fifo_swapped_in_after_its_check(tmp_path):
    h5, _ = cohort(tmp_path, 12)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run(
        [sys.executable, "-c", SWAP, str(h5)], capture_output=True, text=True, timeout=30, env=env
    )  # a hang fails the test (TimeoutExpired)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("opened ['greyarray', 'parcels', 'scalars']"), done.stdout
    assert h5.is_fifo()


def test_palm_tests_skip_without_palm_outside_ci(monkeypatch):
    import palm_reference

    monkeypatch.setattr(palm_reference, "PALM", Path("/nonexistent/palm"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="PALM is not in /nonexistent/palm"):
        palm_reference.require_palm()
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI must run this check"):
        palm_reference.require_palm()


def test_the_update_never_writes_the_users_file_in_place(tmp_path):
    """The original file's bytes (seen through a second name) never change: the update is a
    new file renamed over it, whatever HDF5 does inside."""
    from greyarray.io.h5update import updating_hdf5

    h5, _ = cohort(tmp_path, 12)
    other = tmp_path / "other.h5"
    other.hardlink_to(h5)
    sha = sha256(other)
    with updating_hdf5(h5) as file:
        file.create_group("results/x").attrs["a"] = 1
    assert sha256(other) == sha and sha256(h5) != sha
