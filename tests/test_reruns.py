"""Never lose a user's work: re-runs keep ModelArray's results, names do not depend on unrelated
files, nothing is created by a run that fails its checks, every run's log and methods text are
complete; ModelArrayIO's cohorts and flags work unchanged; factors are ordered as R orders them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from bids_datasets import Dataset, description, xcpd
from conftest import (
    PSCALAR,
    r_environment,
    require,
    run_greyarray,
    subject_values,
    write_cohort,
)
from test_export import fake_results, write_results

from greyarray import cli
from greyarray.io.formats import cifti

GREYARRAY = [sys.executable, "-m", "greyarray"]
XCPD = (
    "sub-{s}/ses-1/func/sub-{s}_ses-1_task-rest_space-fsLR_den-{d}_stat-alff{desc}"
    "_boldmap.dscalar.nii"
)


run = run_greyarray


def app(*args, **kwargs) -> subprocess.CompletedProcess:
    """The BIDS-App without HTML reports (tests/test_bidsapp_reports.py looks at those)."""
    return run(*args, "--no-report", **kwargs)


def alff_dataset(
    root: Path, template: Path, stray: int = 0, extension: str = ".dscalar.nii"
) -> Dataset:
    """12 participants with ALFF (plain and smoothed) on den-91k; ``stray`` of them also have a
    den-32k ALFF map (on the same 91k geometry, as a mislabelled file would be)."""
    description(root, "XCP-D")
    data = Dataset(root)
    subjects = [f"{i:02d}" for i in range(1, 13)]
    for s in subjects:
        for desc in ("", "_desc-smooth"):
            name = XCPD.format(s=s, d="91k", desc=desc).replace(".dscalar.nii", extension)
            data.write(name, template)
    for s in subjects[:stray]:
        data.write(XCPD.format(s=s, d="32k", desc=""), template)
    ages = np.linspace(20, 70, len(subjects))
    sexes = ["female", "Male"] * (len(subjects) // 2)
    pd.DataFrame(
        {"participant_id": [f"sub-{s}" for s in subjects], "age": ages, "sex": sexes}
    ).to_csv(root / "participants.tsv", sep="\t", index=False)
    return data


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, template):
    return alff_dataset(tmp_path_factory.mktemp("alff") / "xcp_d", template)


def names_of(out: Path) -> set[str]:
    return {json.loads(p.read_text())["Scalar"] for p in (out / "group").glob("*_modelarray.json")}


# ---- re-runs keep ModelArray's results -------------------------------------------------------
def test_rerun_keeps_results_refuses_changed_inputs_and_discards_on_request(tmp_path, template):
    data = alff_dataset(tmp_path / "xcp_d", template)
    out = tmp_path / "out"
    assert app(data.root, out, "group", "--scalar", "alff").returncode == 0
    h5 = out / "group" / "desc-alff_modelarray.h5"
    write_results(h5, "lm", fake_results(91282), "writeResults")  # ModelArray's hours of work
    assert app(data.root, out, "group", "--analysis-name", "lm").returncode == 0
    statmaps = sorted((out / "group").glob("*_statmap.*"))
    assert len(statmaps) > 20
    stamp = h5.stat().st_mtime_ns

    done = app(data.root, out, "group", "--scalar", "alff", "--overwrite")  # inputs unchanged
    assert done.returncode == 0, done.stderr
    assert "inputs unchanged; kept as it is, with its results (lm)" in done.stderr
    assert h5.stat().st_mtime_ns == stamp

    changed = data.root / XCPD.format(s="03", d="91k", desc="")
    cifti.CiftiWriter(cifti.read_file(changed).geometry).write(
        changed, data.values[changed] * 2, "changed"
    )
    done = app(data.root, out, "group", "--scalar", "alff", "--overwrite")
    assert done.returncode == 73
    assert "holds ModelArray results (lm) and its inputs changed (1 of 12 files changed)" in (
        done.stderr
    )
    assert h5.stat().st_mtime_ns == stamp and sorted((out / "group").glob("*_statmap.*")) == (
        statmaps
    )

    done = app(data.root, out, "group", "--scalar", "alff", "--discard-results")
    assert done.returncode == 0, done.stderr
    with h5py.File(h5, "r") as file:
        assert "results" not in file
        assert np.array_equal(file["scalars/alff/values"][2], data.values[changed] * 2)
    assert not list((out / "group").glob("*_statmap.*"))  # exported from discarded results
    assert '#### Analysis "lm"' not in (out / "logs" / "CITATION.md").read_text()


def statmaps_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (out / "group").glob("*_statmap.*")}


def test_exported_maps_are_never_silently_replaced(tmp_path, template):
    data = alff_dataset(tmp_path / "xcp_d", template)
    out = tmp_path / "out"
    done = app(data.root, out, "group", "--model", "alff ~ age + sex")
    assert done.returncode == 0, done.stderr
    assert "Factor age" not in done.stderr  # a number in participants.tsv is not a factor
    first = statmaps_of(out)
    h5 = out / "group" / "desc-alff_modelarray.h5"

    # another analysis whose maps would get the same names (desc-alffLm)
    done = app(data.root, out, "group", "--model", "alff ~ age", "--analysis-name", "Lm")
    assert done.returncode == 73
    assert "analysis 'Lm' would export to the file names of its analysis 'lm'" in done.stderr
    with h5py.File(h5, "r") as file:
        assert set(file["results"]) == {"lm"}
    write_results(h5, "Lm", fake_results(91282), "writeResults")  # as R would
    done = app(data.root, out, "group", "--analysis-name", "Lm")
    assert done.returncode == 73 and "from analysis 'lm' of desc-alff_modelarray.h5" in done.stderr
    assert statmaps_of(out) == first
    refused = [p.read_text() for p in (out / "logs").glob("greyarray-*.log")]
    assert sum("(exit code 73)" in text for text in refused) == 2  # refused runs are logged too
    with h5py.File(h5, "a") as file:
        del file["results/Lm"]

    # the same analysis exported again: nothing changes; results rewritten in R: refused
    assert app(data.root, out, "group", "--analysis-name", "lm").returncode == 0
    assert statmaps_of(out) == first
    with h5py.File(h5, "a") as file:
        file["results/lm/results_matrix"][1] *= 2
    done = app(data.root, out, "group", "--analysis-name", "lm")
    assert done.returncode == 73 and "differ from its results now" in done.stderr
    assert statmaps_of(out) == first
    done = app(data.root, out, "group", "--analysis-name", "lm", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert statmaps_of(out) != first and statmaps_of(out).keys() == first.keys()

    # refitted with another model: the maps of the terms it no longer has go
    done = app(data.root, out, "group", "--model", "alff ~ age", "--overwrite")
    assert done.returncode == 0, done.stderr
    names = statmaps_of(out)
    assert not [n for n in names if "contrast-sex" in n]
    assert f"Exported {len([n for n in names if n.endswith('.nii')])} statistical maps" in (
        done.stdout
    )

    done = app(data.root, out, "group", "--analysis-name", "lm", "--scalar", "nothere")
    assert done.returncode == 64 and "no scalar nothere (scalars converted: alff)" in done.stderr


def test_a_racing_group_run_never_replaces_the_file_of_another(tmp_path, template, monkeypatch):
    """Two group runs decide 'new file' together: the one that publishes second fails (73)
    when the first one's file is not what it would write, and leaves it as it is (the check is
    at the final rename)."""
    from greyarray.bids import group

    data = alff_dataset(tmp_path / "xcp_d", template)
    out = tmp_path / "out"
    decide = group._decide

    def other_run_publishes_meanwhile(settings, plan, options):
        decide(settings, plan, options)
        plan.h5.parent.mkdir(parents=True, exist_ok=True)
        plan.h5.write_bytes(b"the other run's file")

    monkeypatch.setattr(group, "_decide", other_run_publishes_meanwhile)
    done = app(data.root, out, "group", "--scalar", "alff")
    assert done.returncode == 73, done.stderr
    assert "desc-alff_modelarray.h5: exists but is not a GreyArray HDF5 of scalar" in done.stderr
    assert (out / "group" / "desc-alff_modelarray.h5").read_bytes() == b"the other run's file"


def test_a_racing_group_run_keeps_the_same_file_of_another(tmp_path, template, monkeypatch):
    """Two group runs of the same inputs on one OUTPUT_DIR (two SLURM chains): the one that
    publishes second finds the other's HDF5 made from the same inputs and keeps it (exit 0)."""
    from greyarray.bids import group

    data = alff_dataset(tmp_path / "xcp_d", template)
    first, out = tmp_path / "first", tmp_path / "out"
    assert app(data.root, first, "group", "--scalar", "alff").returncode == 0
    theirs = (first / "group" / "desc-alff_modelarray.h5").read_bytes()
    decide = group._decide

    def other_run_publishes_meanwhile(settings, plan, options):
        decide(settings, plan, options)
        plan.h5.parent.mkdir(parents=True, exist_ok=True)
        plan.h5.write_bytes(theirs)

    monkeypatch.setattr(group, "_decide", other_run_publishes_meanwhile)
    done = app(data.root, out, "group", "--scalar", "alff")
    assert done.returncode == 0, done.stderr
    assert "written meanwhile by another run from the same inputs; kept" in done.stderr
    assert (out / "group" / "desc-alff_modelarray.h5").read_bytes() == theirs
    assert "HDF5 kept (inputs unchanged)" in done.stdout
    assert not list(out.rglob(".greyarray-tmp*"))


# ---- names do not depend on unrelated files --------------------------------------------------
def test_a_stray_variant_renames_nothing(tmp_path, template):
    data = alff_dataset(tmp_path / "xcp_d", template, stray=1)
    out = tmp_path / "out"
    assert app(data.root, out, "participant").returncode == 0
    manifests = [json.loads(p.read_text()) for p in out.glob("sub-*/*_greyarray.json")]
    assert {f["scalar"] for m in manifests for f in m["files"]} == {"alff", "alff_desc-smooth"}
    done = app(data.root, out, "group")
    assert done.returncode == 0, done.stderr
    assert names_of(out) == {"alff", "alff_desc-smooth"}
    assert "Skipped scalar alff_den-32k: a rare variant (1 participant(s): sub-01)" in done.stderr
    assert "ask for it with --scalar alff_den-32k" in done.stderr
    done = app(data.root, out, "group", "--scalar", "alff_den-32k")
    assert done.returncode == 0, done.stderr
    assert names_of(out) == {"alff", "alff_desc-smooth", "alff_den-32k"}


def test_names_given_earlier_are_kept(tmp_path, template):
    """Once converted, a scalar keeps its name, even when a new variant would now be primary
    (as many participants, fewer entities)."""
    data = alff_dataset(tmp_path / "xcp_d", template)
    out = tmp_path / "out"
    assert app(data.root, out, "group").returncode == 0
    for s in [f"{i:02d}" for i in range(1, 13)]:
        data.write(
            f"sub-{s}/ses-1/func/sub-{s}_ses-1_task-rest_stat-alff_boldmap.dscalar.nii", template
        )
    done = app(data.root, out, "group")
    assert done.returncode == 0, done.stderr
    assert names_of(out) == {"alff", "alff_desc-smooth", "alff_task-rest"}
    meta = json.loads((out / "group" / "desc-alff_modelarray.json").read_text())
    assert ["den", "91k"] in meta["Key"]


# ---- clear messages, no skeleton -------------------------------------------------------------
def test_missing_session_is_named(dataset, tmp_path):
    done = app(dataset.root, tmp_path / "out", "group", "--session-label", "3")
    assert done.returncode == 18 and "session 3 was not found" in done.stderr
    done = app(
        dataset.root, tmp_path / "out", "group", "--session-label", "3", "--participant-label", "01"
    )
    assert done.returncode == 18 and "participant 01 has no maps in session(s) 3" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        (["--participants-file", "missing.tsv"], 66),
        (["--config", "missing.yaml"], 66),
        (["--scalar", "nothing"], 18),
        (["--participant-label", "99"], 18),
        (["--model", "alff ~ s(age)", "--changed-rsq-term", "s(nope)"], 64),
        (["--model", "alff ~ age", "--permutations", "9", "--exchangeability-blocks", "x"], 65),
    ],
)
def test_failed_checks_leave_no_skeleton(dataset, tmp_path, extra, code):
    done = app(dataset.root, tmp_path / "out", "group", *extra)
    assert done.returncode == code, done.stderr
    assert not (tmp_path / "out").exists()


def test_demo_checks_up_front(tmp_path):
    (tmp_path / "demo" / "output").mkdir(parents=True)
    done = run("demo", tmp_path / "demo")
    assert done.returncode == 73
    assert "holds an earlier demo; use --overwrite" in done.stderr
    assert not (tmp_path / "demo" / "bids").exists()


# ---- logs, configuration and methods text ----------------------------------------------------
def test_logs_configs_and_methods_text_of_every_mode(tmp_path, template):
    data = alff_dataset(tmp_path / "xcp_d", template)
    out = tmp_path / "out"
    assert app(data.root, out, "participant").returncode == 0
    assert app(data.root, out, "group").returncode == 0
    done = app(data.root, out, "group", "--model", "alff ~ age + sex")
    assert done.returncode == 0, done.stderr
    write_results(
        out / "group" / "desc-alffDescSmooth_modelarray.h5",
        "r",
        fake_results(91282),
        "writeResults",
    )
    assert app(data.root, out, "group", "--analysis-name", "r").returncode == 0
    bad = app(data.root, out, "group", "--model", "alff ~ nope", "--analysis-name", "x")
    assert bad.returncode == 65

    modes = sorted(
        __import__("yaml").safe_load(p.read_text())["mode"]
        for p in (out / "logs").glob("config-*.yaml")
    )
    assert modes == ["export", "group", "model", "model", "participant"]
    logs = {p: p.read_text() for p in (out / "logs").glob("greyarray-*.log")}
    assert len(logs) == 5
    assert all("Done in" in text or "(exit code 65)" in text for text in logs.values())
    failed = next(text for text in logs.values() if "exit code 65" in text)
    assert "formula 'alff ~ nope'" in failed and "Traceback" in failed
    group_log = next(text for text in logs.values() if "GreyArray group level done" in text)
    assert "alff: 12 participants, 1 session(s), 12 files; HDF5 written" in group_log

    citation = (out / "logs" / "CITATION.md").read_text()
    assert '#### Analysis "lm" of alff' in citation and '#### Analysis "r" of alff_desc-smooth' in (
        citation
    )
    assert "the linear model `alff ~ age + sex` was fitted" in citation
    assert "reference levels sex = female" in citation  # R's order: female < Male
    assert "one row per session of each participant" in citation  # sessions are rows
    assert "(BIDS 1.10.0 [@bids])" in citation  # the input's BIDS version, not the output's
    assert "- [@modelarray] Zhao et al. (2023). ModelArray: An R package" in citation
    assert "$" not in citation
    html = (out / "logs" / "CITATION.html").read_text()
    assert (
        "<h4>Analysis &quot;lm&quot; of alff</h4>" in html
        or '<h4>Analysis "lm" of alff</h4>' in html
    )

    sidecar = json.loads(
        (
            out
            / "group"
            / "task-rest_space-fsLR_den-91k_desc-alffLm_contrast-sexMale_stat-effect_statmap.json"
        ).read_text()
    )
    assert sidecar["Model"] == "alff ~ age + sex" and sidecar["FittedBy"] == "GreyArray"
    assert sidecar["NumberOfRows"] == 12 and sidecar["ReferenceLevels"] == {"sex": "female"}
    assert sidecar["CohortFile"] == "desc-alff_cohort.csv"
    assert "more than max(10, 0.2 x 12) = 10 participants" in sidecar["ElementThreshold"]


def test_methods_text_describes_every_scalar_converted(dataset, tmp_path):
    """A later group run of another scalar adds to the methods text; it never forgets the
    scalars (and analyses) an earlier run left in OUTPUT_DIR."""
    out = tmp_path / "out"
    assert app(dataset.root, out, "group", "--model", "alff ~ age").returncode == 0
    assert app(dataset.root, out, "group", "--scalar", "alff_desc-smooth").returncode == 0
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "grouped into 2 scalar(s): alff, alff_desc-smooth." in citation
    assert "24 CIFTI-2 [@cifti2] maps of 12 participants" in citation
    assert "(24 rows in all)" in citation and '#### Analysis "lm" of alff' in citation


def test_sessions_in_methods_text_and_r_hint(tmp_path, template):
    data = xcpd(tmp_path / "xcpd", template, subjects=("01", "02"), sessions=("1", "2"))
    done = app(data.root, tmp_path / "out", "group", "--scalar", "reho")
    assert done.returncode == 0, done.stderr
    citation = (tmp_path / "out" / "logs" / "CITATION.md").read_text()
    assert "one row per session of each participant" in citation
    assert "participants-by-elements" not in citation
    assert 's(participant_id, bs = "re")' in done.stdout
    assert 'group --model "reho ~ age + sex + (1 | participant_id)"' not in done.stdout  # no age
    assert '+ (1 | participant_id)"' in done.stdout  # the mixed model, fitted here


def test_r_hint_without_sessions_suggests_fitting_here(dataset, tmp_path):
    done = app(dataset.root, tmp_path / "out", "group", "--scalar", "alff")
    assert 'ModelArray.lm(alff ~ age + sex, ma, phen, "alff")' in done.stdout
    assert 'group --model "alff ~ age + sex"' in done.stdout


# ---- ModelArrayIO's cohorts and flags --------------------------------------------------------
@pytest.fixture
def maio_cohort(tmp_path, writer91k):
    """A cohort whose relative paths are relative to the current folder, not the CSV's."""
    write_cohort(tmp_path / "data", writer91k, subject_values(3, 91282))
    (tmp_path / "csvs").mkdir()
    shutil.move(tmp_path / "data" / "cohort.csv", tmp_path / "csvs" / "cohort.csv")
    table = pd.read_csv(tmp_path / "csvs" / "cohort.csv")
    table["source_file"] = "data/" + table["source_file"]
    table.to_csv(tmp_path / "csvs" / "cohort.csv", index=False)
    return tmp_path / "csvs" / "cohort.csv"


def test_relative_paths_fall_back_to_the_current_folder(maio_cohort, tmp_path):
    args = ["to-modelarray", "--cohort-file", maio_cohort, "--output", tmp_path / "o.h5"]
    done = run(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "o.h5") as h5:
        names = list(h5["scalars/thickness/column_names"].asstr()[()])
    assert names[0].startswith("data/")
    (tmp_path / "elsewhere").mkdir()
    done = run(*args, "--overwrite", cwd=tmp_path / "elsewhere")
    assert done.returncode == 66
    assert f"not found (neither {tmp_path / 'csvs' / 'data'}" in done.stderr
    assert f"nor {tmp_path / 'elsewhere' / 'data'}" in done.stderr


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--backend", "tiledb"], 64, "--backend tiledb is not supported yet"),
        (["--mask", "m.nii.gz"], 64, "--mask is for NIfTI data; "),
        (["--workers", "4", "--s3-workers", "2", "--backend", "hdf5"], 0, ""),
    ],
)
def test_modelarrayio_flags(run_cli, tmp_path, writer91k, extra, code, message):
    csv = write_cohort(tmp_path, writer91k, subject_values(2, 91282))
    status, _, err = run_cli(
        "to-modelarray", "--cohort-file", csv, "--output", tmp_path / "o.h5", *extra
    )
    assert status == code and message in err


@pytest.mark.parametrize("url", ["gs://bucket/sub-1.dscalar.nii", "https://host/sub-1.nii"])
def test_remote_paths_are_refused_in_one_line(run_cli, tmp_path, url):
    """Other schemes than s3:// (tests/test_s3.py) are refused."""
    pd.DataFrame({"scalar_name": ["fa"], "source_file": [url]}).to_csv(
        tmp_path / "c.csv", index=False
    )
    status, _, err = run_cli("to-modelarray", "--cohort-file", tmp_path / "c.csv")
    assert status == 64 and "remote path GreyArray cannot read" in err
    assert len(err.splitlines()) == 1 and "s3://bucket/key" in err


# ---- factors in R's order --------------------------------------------------------------------
def test_factor_levels_in_r_order_against_r(tmp_path):
    rscript = require("Rscript")
    from greyarray.stats.design import r_sort_key

    words = [
        "female",
        "Male",
        "F",
        "m",
        "b-a",
        "ba",
        "B",
        "10",
        "9",
        "_x",
        "éa",
        "Ea",
        "a_b",
        "a.b",
    ]
    (tmp_path / "w.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    env = r_environment()
    done = subprocess.run(
        [
            rscript,
            "-e",
            f'x <- readLines("{tmp_path / "w.txt"}", encoding = "UTF-8"); '
            "writeLines(levels(factor(x)))",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert done.stdout.split() == sorted(words, key=r_sort_key)


def test_reference_level_chosen_as_r_does_and_by_the_user(tmp_path, writer91k, run_cli):
    values = subject_values(14, 91282)
    csv = write_cohort(tmp_path, writer91k, values)
    table = pd.read_csv(csv)
    table["sex"] = ["female", "Male"] * 7
    table.to_csv(csv, index=False)
    h5 = tmp_path / "t.h5"
    assert run_cli("to-modelarray", "--cohort-file", csv, "--output", h5)[0] == 0
    fit = ["fit-lm", "--input-hdf5", h5, "--cohort-file", csv, "--formula", "thickness ~ sex"]
    assert run_cli(*fit)[0] == 0
    assert run_cli(*fit, "--analysis-name", "m", "--reference-level", "sex=Male")[0] == 0
    with h5py.File(h5) as file:
        default = list(file["results/lm/column_names"].asstr()[()])
        chosen = list(file["results/m/column_names"].asstr()[()])
        a = file["results/lm/results_matrix"][default.index("sexMale.estimate")]
        b = file["results/m/results_matrix"][chosen.index("sexfemale.estimate")]
    assert np.allclose(a, -b)
    status, _, err = run_cli(*fit, "--analysis-name", "z", "--reference-level", "sex=X")
    assert status == 64 and "no such level (levels: female, Male)" in err


# ---- help --------------------------------------------------------------------------------------
def all_parsers():
    from greyarray.bids.app import build_parser

    yield "greyarray", build_parser("")
    for name, (make, _, _) in cli.COMMANDS.items():
        yield name, make()


def test_help_describes_every_option_with_its_real_default(capsys):
    for name, parser in all_parsers():
        for action in parser._actions:
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
        text = " ".join(parser.format_help().split())
        assert "(default: None)" not in text and "(default: False)" not in text, name
        for option_help in re.split(r"\s--?\w", text):
            assert option_help.lower().count("default") <= 1, (name, option_help)
    shuffle = " ".join(dict(all_parsers())["to-modelarray"].format_help().split())
    assert "shuffle is on by default" in shuffle
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    top = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert f"  {command} " in top


def test_group_model_with_smooth_terms_fits_a_gam(tmp_path):
    """On parcellated maps (54 parcels), so that the GAM fit takes a moment."""
    data = alff_dataset(tmp_path / "xcp_d", PSCALAR, extension=".pscalar.nii")
    out = tmp_path / "out"
    model = ["--model", "alff ~ s(age, k=4) + sex", "--gam-method", "REML"]
    done = app(data.root, out, "group", *model, "--changed-rsq-term", "s(age)")
    assert done.returncode == 0, done.stderr
    with h5py.File(out / "group" / "desc-alff_modelarray.h5") as h5:
        names = list(h5["results/gam/column_names"].asstr()[()])
        about = json.loads(h5["results/gam"].attrs["greyarray_about"])
    assert {"s_age.statistic", "s_age.p.value", "s_age.delta.adj.rsq"} <= set(names)
    assert about["method"] == "gam" and about["smoothing"] == "REML"
    stem = "task-rest_space-fsLR_den-91k_desc-alffGam_contrast-sAge_stat-"
    assert (out / "group" / f"{stem}statistic_statmap.pscalar.nii").is_file()
    assert (out / "group" / f"{stem}deltaAdjRsq_statmap.pscalar.nii").is_file()
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "the generalized additive model `alff ~ s(age, k=4) + sex`" in citation
    assert "smoothing parameters by REML" in citation and "[@mgcv; @wood2013]" in citation
    assert "- [@wood2013] Wood (2013). On p-values for smooth components" in citation


def test_group_model_with_permutations_and_tfce(tmp_path, template):
    data = alff_dataset(tmp_path / "xcp_d", template)
    out = tmp_path / "out"
    perms = ["--permutations", "20", "--tfce", "--seed", "3"]
    done = app(data.root, out, "group", "--model", "alff ~ age", *perms)
    assert done.returncode == 0, done.stderr
    stem = "task-rest_space-fsLR_den-91k_desc-alffLm_contrast-age_stat-"
    for stat in ("pfwe", "tfce", "tfcepfwe", "1mtfcepfwe"):
        assert (out / "group" / f"{stem}{stat}_statmap.dscalar.nii").is_file(), stat
    sidecar = json.loads((out / "group" / f"{stem}tfcepfwe_statmap.json").read_text())
    assert sidecar["Permutations"] == {
        "n": 20,
        "tfce": True,
        "tfce_connectivity": 6,
        "exchangeability_blocks": None,
        "seed": 3,
    }
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "controlled by 20 permutations of the data (Freedman-Lane [@freedmanlane1983]" in (
        citation
    )
    assert "Threshold-free cluster enhancement [@tfce]" in citation and "$" not in citation
    bad = app(data.root, out, "group", "--model", "alff ~ s(age)", "--permutations", "5")
    assert bad.returncode == 64 and "applies to linear models" in bad.stderr


# ---- round two: names that share a file, kept cohort CSVs, the user's own files ---------------
def test_two_scalars_written_to_one_file_are_refused(tmp_path):
    """alff_desc-smooth and alffDescSmooth share the BIDS label of their HDF5: refused before
    anything is written; an HDF5 of the other one that holds results is never replaced."""
    from test_manifests import maps

    data = maps(tmp_path / "xcp_d", ["01", "02", "03"], stats=("stat-alff", "stat-reho"))
    both = tmp_path / "both.yaml"
    both.write_text(
        "scalars:\n  alff_desc-smooth:\n    stat: alff\n  alffDescSmooth:\n    stat: reho\n"
    )
    out = tmp_path / "out"
    done = app(data.root, out, "group", "--config", both)
    assert done.returncode == 64
    assert "would both be written to desc-alffDescSmooth_modelarray.h5" in done.stderr
    assert not out.exists()

    one = tmp_path / "one.yaml"
    one.write_text("scalars:\n  alffDescSmooth:\n    stat: reho\n")
    assert app(data.root, out, "group", "--config", one).returncode == 0
    h5 = out / "group" / "desc-alffDescSmooth_modelarray.h5"
    with h5py.File(h5, "a") as file:
        n = file["scalars/alffDescSmooth/values"].shape[1]
        file["results/lm/results_matrix"] = np.zeros((1, n))
        file["results/lm/column_names"] = ["x.estimate"]
    stamp = h5.read_bytes()
    other = tmp_path / "other.yaml"
    other.write_text("scalars:\n  alff_desc-smooth:\n    stat: alff\n")
    done = app(data.root, out, "group", "--config", other, "--overwrite")
    assert done.returncode == 73
    assert "holds another scalar with ModelArray results (lm)" in done.stderr
    assert h5.read_bytes() == stamp


def test_a_kept_hdf5_keeps_its_cohort_csv(dataset, tmp_path):
    out = tmp_path / "out"
    assert app(dataset.root, out, "group", "--scalar", "alff").returncode == 0
    csv = out / "group" / "desc-alff_cohort.csv"
    table = pd.read_csv(csv)
    table["group"] = ["a", "b"] * 6  # added by hand for R
    table.to_csv(csv, index=False)
    edited = csv.read_bytes()
    done = app(dataset.root, out, "group", "--scalar", "alff")
    assert done.returncode == 0 and csv.read_bytes() == edited
    assert "desc-alff_cohort.csv differs from what the inputs give now" in done.stderr
    assert app(dataset.root, out, "group", "--scalar", "alff", "--overwrite").returncode == 0
    assert "group" not in pd.read_csv(csv).columns


def test_the_users_own_files_beside_the_maps_are_never_counted_or_removed(tmp_path, template):
    data = alff_dataset(tmp_path / "xcp_d", template)
    out = tmp_path / "out"
    assert app(data.root, out, "group", "--model", "alff ~ age").returncode == 0
    (effect,) = (out / "group").glob("*contrast-age_stat-effect_statmap.dscalar.nii")
    mine = effect.with_name(effect.name.replace(".dscalar.nii", ".mycopy.dscalar.nii"))
    mine.write_bytes(effect.read_bytes())
    (out / "group" / "notes_statmap.json").write_text("[1, 2]\n")
    done = app(data.root, out, "group", "--analysis-name", "lm")
    assert done.returncode == 0, done.stderr  # nothing changed: not "1 map differs"
    with h5py.File(out / "group" / "desc-alff_modelarray.h5", "a") as file:
        file["results/lm/results_matrix"][1] += 1
    done = app(data.root, out, "group", "--analysis-name", "lm", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert mine.exists() and (out / "group" / "notes_statmap.json").exists()


def test_a_manifest_of_another_shape_is_discovered_again(tmp_path):
    from test_manifests import maps

    data = maps(tmp_path / "xcp_d", ["01", "02"])
    out = tmp_path / "out"
    assert app(data.root, out, "participant").returncode == 0
    (out / "sub-01" / "sub-01_greyarray.json").write_text("[]\n")
    done = app(data.root, out, "group")
    assert done.returncode == 0, done.stderr
    assert "sub-01_greyarray.json cannot be read: discovering again" in done.stderr
