"""The BIDS-App: discovery with pybids, cohort CSVs, both levels, derivatives, exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from bids_datasets import description, hcp, raw_with_fmriprep, xcpd
from conftest import CONTE32K, run_greyarray
from test_export import NAMES, fake_results, write_results

from greyarray.io.formats import cifti

GREYARRAY = [sys.executable, "-m", "greyarray"]


@pytest.fixture(scope="module")
def xcpd_data(tmp_path_factory, template):
    return xcpd(tmp_path_factory.mktemp("xcpd") / "xcp_d", template)


@pytest.fixture(scope="module")
def xcpd_group(xcpd_data, tmp_path_factory):
    """XCP-D dataset through participant then group (the common case), run once."""
    from greyarray import cli

    out = tmp_path_factory.mktemp("out") / "greyarray"
    assert cli.main([str(xcpd_data.root), str(out), "participant", "--no-report"]) == 0
    assert cli.main([str(xcpd_data.root), str(out), "group", "--no-report"]) == 0
    return out


def snapshot(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


def test_xcpd_scalars_are_named_and_never_merge(xcpd_group):
    names = sorted(p.name for p in (xcpd_group / "group").glob("*_modelarray.h5"))
    assert names == [
        "desc-alffDescSmooth_modelarray.h5",
        "desc-alff_modelarray.h5",
        "desc-coveragePconn_modelarray.h5",
        "desc-coverage_modelarray.h5",
        "desc-reho_modelarray.h5",
    ]
    scalars = {
        json.loads(p.read_text())["Scalar"]
        for p in (xcpd_group / "group").glob("*_modelarray.json")
    }
    # the primary variant of a name (most participants, dense before parcellated) keeps it plain
    assert scalars == {"alff", "alff_desc-smooth", "reho", "coverage", "coverage_pconn"}


def test_every_file_lands_in_its_row(xcpd_group, xcpd_data):
    """Each HDF5 row is exactly the file its column name points to; no decoy is taken."""
    group = xcpd_group / "group"
    seen = set()
    for h5_path in group.glob("*_modelarray.h5"):
        cohort = pd.read_csv(
            h5_path.with_name(h5_path.name.replace("_modelarray.h5", "_cohort.csv"))
        )
        with h5py.File(h5_path, "r") as h5:
            (scalar,) = h5["scalars"]
            names = list(h5[f"scalars/{scalar}/column_names"].asstr()[()])
            values = h5[f"scalars/{scalar}/values"][()]
        assert names == list(cohort["source_file"])
        for name, row in zip(names, values, strict=True):
            path = (group / name).resolve()
            assert np.array_equal(row, xcpd_data.values[path])
            seen.add(path)
    assert seen == set(xcpd_data.values)  # 3 subjects x 2 sessions x 5 maps, nothing else
    assert len(seen) == 30


def test_cohort_rows_with_sessions(xcpd_group, xcpd_data):
    table = pd.read_csv(xcpd_group / "group" / "desc-reho_cohort.csv")
    assert list(table.columns) == ["scalar_name", "source_file", "participant_id", "session_id"]
    assert list(zip(table["participant_id"], table["session_id"], strict=True)) == [
        (f"sub-{s}", f"ses-{t}") for s in ("01", "02", "03") for t in ("1", "2")
    ]
    assert (table["scalar_name"] == "reho").all()
    first = table["source_file"][0]
    assert first.startswith("../") and (xcpd_group / "group" / first).resolve() == (
        xcpd_data.root / "sub-01/ses-1/func/sub-01_ses-1_task-rest_space-fsLR_den-91k_stat-reho"
        "_boldmap.dscalar.nii"
    )


def test_dataset_description_and_logs(xcpd_group, xcpd_data):
    info = json.loads((xcpd_group / "dataset_description.json").read_text())
    assert info["Name"] and info["BIDSVersion"] == "1.11.1"
    assert info["DatasetType"] == "derivative"
    generated = info["GeneratedBy"][0]
    assert generated["Name"] == "greyarray" and generated["Version"]
    assert generated["CodeURL"].startswith("https://") and "Container" not in generated
    assert info["SourceDatasets"] == [{"URL": xcpd_data.root.as_uri()}]
    assert "ModelArray" in info["HowToAcknowledge"]
    assert "greyarray" in xcpd_group.name  # GeneratedBy.Name is a substring of the folder name
    ignore = (xcpd_group / ".bidsignore").read_text().split()
    assert {"logs/", "*.h5", "*_cohort.csv", ".greyarray.lock"} <= set(ignore)
    assert "group/" not in ignore  # it would hide the BIDS statistical maps
    citation = (xcpd_group / "logs" / "CITATION.md").read_text()
    assert (
        "$" not in citation
        and "30 CIFTI-2" in citation
        and "3 participants (6 sessions)" in citation
    )
    assert (
        "[@modelarray]" in citation
        and "non-finite values were\ncounted (none were found)" in citation
    )
    bib = (xcpd_group / "logs" / "CITATION.bib").read_text()
    assert "10.1016/j.neuroimage.2023.120037" in bib
    (config,) = (xcpd_group / "logs").glob("config-group-*.yaml")
    assert "scalars:" in config.read_text()
    manifest = json.loads((xcpd_group / "sub-02" / "sub-02_greyarray.json").read_text())
    assert len(manifest["files"]) == 10 and manifest["files"][0]["nonfinite_count"] == 0


def test_export_statmaps(xcpd_group, xcpd_data, tmp_path, wb_command):
    from greyarray import cli

    out = tmp_path / "greyarray"
    shutil.copytree(xcpd_group, out)
    h5 = out / "group" / "desc-alff_modelarray.h5"
    data = fake_results(91282)
    write_results(h5, "lm", data, "writeResults")
    args = [str(xcpd_data.root), str(out), "group", "--analysis-name", "lm", "--no-report"]
    assert cli.main(args) == 0
    name = "task-rest_space-fsLR_den-91k_desc-alffLm_contrast-age_stat-p_statmap"
    image = nb.load(out / "group" / f"{name}.dscalar.nii")
    expected = data[NAMES.index("age.p.value")].astype(np.float32)
    assert np.array_equal(np.asarray(image.dataobj)[0], expected, equal_nan=True)
    sidecar = json.loads((out / "group" / f"{name}.json").read_text())
    assert sidecar == {
        "ModelArrayColumn": "age.p.value",
        "Description": "p-value (uncorrected)",
        "Scalar": "alff",
        "Analysis": "lm",
        "SourceHDF5": "desc-alff_modelarray.h5",
        "CohortFile": "desc-alff_cohort.csv",
        "Model": "not recorded (fitted outside GreyArray, e.g. by ModelArray in R)",
        "FittedBy": "not recorded",
        "NumberOfRows": 6,
        "ElementThreshold": "ModelArray's default: an element is fitted only where more than "
        "max(10, 0.2 x 6) participants have a finite value",
    }
    maps = sorted(p.name.split("_desc-")[1] for p in (out / "group").glob("*_statmap.dscalar.nii"))
    assert "alffLm_contrast-age_stat-1mpfdr_statmap.dscalar.nii" in maps
    assert "alffLm_contrast-model_stat-nobs_statmap.dscalar.nii" in maps
    assert "alffLm_contrast-Intercept_stat-effect_statmap.dscalar.nii" in maps
    assert not any("elementid" in m or "element_id" in m for m in maps)
    assert len(maps) == len(NAMES) - 1 + 3
    citation = (out / "logs" / "CITATION.md").read_text()
    assert 'analysis "lm" of alff were exported back to CIFTI-2' in citation
    assert "$" not in citation
    info = wb_command("-file-information", out / "group" / f"{name}.dscalar.nii", "-only-map-names")
    assert info.split() == ["age.p.value"]


def test_fmriprep_in_raw_dataset_with_phenotypes(tmp_path, template, capsys):
    from greyarray import cli

    data = raw_with_fmriprep(tmp_path / "bids", template)
    out = tmp_path / "derivatives_out"
    before = snapshot(tmp_path / "bids")
    assert cli.main([str(tmp_path / "bids"), str(out), "group", "--no-report"]) == 0
    assert snapshot(tmp_path / "bids") == before  # nothing written into the input
    names = {json.loads(p.read_text())["Scalar"] for p in (out / "group").glob("*.json")}
    assert names == {  # equal coverage: the variant with fewer entities keeps the plain name
        "thickness",
        "thickness_den-32k_desc-preproc",
        "curv",
        "sulc",
        "myelinw",
    }
    table = pd.read_csv(out / "group" / "desc-curv_cohort.csv", keep_default_na=False)
    assert list(table.columns) == [
        "scalar_name",
        "source_file",
        "participant_id",
        "age",
        "sex",
        "handedness",
    ]
    assert table.to_dict("records")[1] == {
        "scalar_name": "curv",
        "source_file": "../../bids/derivatives/fmriprep/sub-02/anat/"
        "sub-02_space-fsLR_den-91k_curv.dscalar.nii",
        "participant_id": "sub-02",
        "age": "NA",
        "sex": "M",
        "handedness": "L",
    }
    assert table.loc[2, ["participant_id", "age", "sex"]].tolist() == ["sub-03", "NA", "NA"]
    err = capsys.readouterr().err
    assert err.count("1 participants have maps but no row in participants.tsv") == 1
    assert "(their phenotype columns are empty): sub-03" in err
    assert "participants.tsv have no maps: sub-04" in err
    with h5py.File(out / "group" / "desc-myelinw_modelarray.h5", "r") as h5:
        row = h5["scalars/myelinw/values"][2]
    path = data.root / "sub-03/anat/sub-03_space-fsLR_den-91k_myelinw.dscalar.nii"
    assert np.array_equal(row, data.values[path])


def test_sessions_tsv_columns(tmp_path, template):
    from greyarray import cli

    xcpd(tmp_path / "xcpd", template, subjects=("01",), sessions=("1", "2"))
    pd.DataFrame({"session_id": ["ses-1", "ses-2"], "age": ["30", "32"]}).to_csv(
        tmp_path / "xcpd" / "sub-01" / "sub-01_sessions.tsv", sep="\t", index=False
    )
    pd.DataFrame({"participant_id": ["sub-01"], "age": ["29"], "group": ["ctl"]}).to_csv(
        tmp_path / "xcpd" / "participants.tsv", sep="\t", index=False
    )
    args = [str(tmp_path / "xcpd"), str(tmp_path / "out"), "group", "--scalar", "reho"]
    assert cli.main([*args, "--no-report"]) == 0
    table = pd.read_csv(tmp_path / "out" / "group" / "desc-reho_cohort.csv")
    assert table[["session_id", "age", "group"]].values.tolist() == [
        ["ses-1", 30, "ctl"],
        ["ses-2", 32, "ctl"],
    ]
    assert [p.name for p in (tmp_path / "out" / "group").glob("*.h5")] == [
        "desc-reho_modelarray.h5"
    ]


def test_filters_labels_and_queries(tmp_path, xcpd_data):
    from greyarray import cli

    labels = tmp_path / "labels.txt"
    labels.write_text("sub-01\n03\n")
    filters = tmp_path / "filter.json"
    filters.write_text(
        json.dumps(
            {
                "alffraw": {"stat": "alff", "desc": None, "extension": ".dscalar.nii"},
                "anystat": {"stat": "*", "desc": "smooth"},
            }
        )
    )
    out = tmp_path / "out"
    assert (
        cli.main(
            [
                str(xcpd_data.root),
                str(out),
                "group",
                "--participant_label",
                str(labels),
                "--session-label",
                "ses-2",
                "--bids-filter-file",
                str(filters),
                "--no-report",
            ]
        )
        == 0
    )
    table = pd.read_csv(out / "group" / "desc-alffraw_cohort.csv")
    assert list(table["participant_id"]) == ["sub-01", "sub-03"]
    assert list(table["session_id"]) == ["ses-2", "ses-2"]
    assert all("stat-alff_boldmap" in f for f in table["source_file"])
    smooth = pd.read_csv(out / "group" / "desc-anystat_cohort.csv")
    assert all("desc-smooth" in f for f in smooth["source_file"]) and len(smooth) == 2


def test_config_patterns_for_hcp_names(tmp_path, template):
    from greyarray import cli

    data = hcp(tmp_path / "hcp", template)
    config = tmp_path / "config.yaml"
    config.write_text(
        "patterns:\n  thickness: '(?P<subject>\\d+)/MNINonLinear/fsaverage_LR32k/"
        "\\d+\\.thickness\\.32k_fs_LR\\.dscalar\\.nii$'\n"
    )
    args = [str(tmp_path / "hcp"), str(tmp_path / "out"), "group", "--config", str(config)]
    assert cli.main([*args, "--no-report"]) == 0
    with h5py.File(tmp_path / "out" / "group" / "desc-thickness_modelarray.h5", "r") as h5:
        assert np.array_equal(
            h5["scalars/thickness/values"][1], data.values[sorted(data.values)[1]]
        )
    table = pd.read_csv(tmp_path / "out" / "group" / "desc-thickness_cohort.csv")
    assert list(table["participant_id"]) == ["sub-100307", "sub-100408"]


def test_database_dir_is_reused_and_refreshed(tmp_path, template):
    from greyarray import cli

    data = xcpd(tmp_path / "xcpd", template, subjects=("01",), sessions=("1",))
    db = tmp_path / "db"
    args = [
        str(data.root),
        str(tmp_path / "out"),
        "group",
        "--bids-database-dir",
        str(db),
        "--scalar",
        "reho",
        "--overwrite",
        "--no-report",
    ]
    assert cli.main(args) == 0
    assert any(db.rglob("*.sqlite"))
    data.write(
        "sub-02/ses-1/func/sub-02_ses-1_task-rest_space-fsLR_den-91k_stat-reho_boldmap.dscalar.nii",
        template,
    )
    assert cli.main(args) == 0  # the new subject is seen: the stale index was rebuilt
    table = pd.read_csv(tmp_path / "out" / "group" / "desc-reho_cohort.csv")
    assert list(table["participant_id"]) == ["sub-01", "sub-02"]


def test_participant_jobs_in_parallel(tmp_path, template):
    """Four participant jobs start together on one OUTPUT_DIR, then group uses their manifests."""
    data = xcpd(tmp_path / "xcpd", template, subjects=("01", "02", "03", "04"), sessions=("1",))
    out = tmp_path / "out"
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "greyarray",
                str(data.root),
                str(out),
                "participant",
                "--participant-label",
                label,
                "--scalar",
                "reho",
                "--no-report",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for label in ("01", "sub-02", "03", "04")
    ]
    for job in jobs:
        assert job.wait() == 0, job.stderr.read()
    assert sorted(p.name for p in out.glob("sub-*/*_greyarray.json")) == [
        f"sub-0{i}_greyarray.json" for i in range(1, 5)
    ]
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    assert len(list((out / "logs").glob("greyarray-participant-*.log"))) == 4
    done = subprocess.run(
        [*GREYARRAY, str(data.root), str(out), "group", "--scalar", "reho", "--no-report"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "Using the manifests of 4 participants" in done.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["{bids}", "{out}", "session"], 17, "unknown analysis level 'session'"),
        (
            ["{bids}", "{out}", "group", "--participant-label", "07"],
            18,
            "participant 07 was not found in",
        ),
        (
            ["{bids}", "{out}", "group", "--bids-filter-file", "{filters}"],
            18,
            "filters matched no files",
        ),
        (["{bids}", "{out}", "group", "--scalar", "falff"], 18, "no scalar 'falff' (found: alff,"),
        (["{bids}", "{bids}", "group"], 64, "OUTPUT_DIR must not be BIDS_DIR"),
        (["{bids}", "{out}", "group", "--nope"], 64, "unrecognized arguments: --nope"),
        (["{bids}/missing", "{out}", "group"], 66, "BIDS dataset folder not found"),
        (["{empty}", "{out}", "group"], 16, "not a BIDS dataset (no dataset_description.json)"),
        (["{bids}", "{file}/out", "group"], 73, "cannot create output"),
    ],
)
def test_exit_codes(tmp_path, xcpd_data, args, code, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("")
    (tmp_path / "filters.json").write_text(json.dumps({"x": {"stat": "nothing"}}))
    values = {
        "bids": xcpd_data.root,
        "out": tmp_path / "out",
        "empty": tmp_path / "empty",
        "file": tmp_path / "file",
        "filters": tmp_path / "filters.json",
    }
    done = run_greyarray(*[a.format(**values) for a in args])
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_mismatched_greyordinates_exit_65(tmp_path, template):
    data = xcpd(tmp_path / "xcpd", template, subjects=("01", "02"), sessions=("1",))
    bad = data.root / (
        "sub-02/ses-1/func/sub-02_ses-1_task-rest_space-fsLR_den-91k_stat-reho_boldmap.dscalar.nii"
    )
    cifti.CiftiWriter(cifti.read_file(CONTE32K).geometry).write(bad, np.zeros(60951))
    done = run_greyarray(data.root, tmp_path / "o", "group", "--scalar", "reho")
    assert done.returncode == 65
    assert (
        "sub-02_ses-1_task-rest_space-fsLR_den-91k_stat-reho_boldmap.dscalar.nii: does not "
        "match the first file" in done.stderr
    )
    assert not list((tmp_path / "o" / "group").glob("*.h5"))


def test_group_rerun_keeps_unchanged_outputs_and_refuses_changed_ones(
    xcpd_group, xcpd_data, tmp_path
):
    out = tmp_path / "out"
    shutil.copytree(xcpd_group, out)
    before = {p: p.stat().st_mtime_ns for p in (out / "group").glob("*.h5")}
    command = [xcpd_data.root, out, "group", "--no-report"]
    done = run_greyarray(*command)
    assert done.returncode == 0, done.stderr
    assert "inputs unchanged; kept as it is" in done.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before
    changed = next(p for p in xcpd_data.values if "stat-reho" in p.name)
    data = xcpd_data.values[changed] + np.float32(1)
    cifti.CiftiWriter(cifti.read_file(changed).geometry).write(changed, data, "changed")
    try:
        done = run_greyarray(*command, "--scalar", "reho")
        assert done.returncode == 73 and "inputs changed (1 of 6 files changed)" in done.stderr
        assert "use --overwrite" in done.stderr
        done = run_greyarray(*command, "--scalar", "reho", "--overwrite")
        assert done.returncode == 0, done.stderr
    finally:
        cifti.CiftiWriter(cifti.read_file(changed).geometry).write(
            changed, xcpd_data.values[changed], changed.name
        )


def test_two_files_for_one_visit(tmp_path, template):
    from greyarray import cli

    data = xcpd(tmp_path / "xcpd", template, subjects=("01",), sessions=("1",))
    data.write(
        "sub-01/ses-1/func/sub-01_ses-1_task-rest_run-2_space-fsLR_den-91k_stat-reho"
        "_boldmap.dscalar.nii",
        template,
    )
    assert cli.main([str(data.root), str(tmp_path / "o"), "group"]) == 65


def test_container_field(tmp_path, xcpd_data, monkeypatch):
    from greyarray import cli

    monkeypatch.setenv("GREYARRAY_CONTAINER_TYPE", "docker")
    monkeypatch.setenv("GREYARRAY_CONTAINER_TAG", "greyarray:0.1.0")
    args = [str(xcpd_data.root), str(tmp_path / "out"), "participant", "--participant-label"]
    assert cli.main([*args, "01", "--no-report"]) == 0
    info = json.loads((tmp_path / "out" / "dataset_description.json").read_text())
    assert info["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": "greyarray:0.1.0"}


def test_raw_dataset_without_derivatives_folder_names_no_files(tmp_path):
    description(tmp_path / "raw")
    done = run_greyarray(tmp_path / "raw", tmp_path / "out", "participant")
    assert done.returncode == 18 and "filters matched no files" in done.stderr


def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    """The README's first command: BIDS demo -> participant -> group -> lm -> BIDS statmaps, and
    the reports of both levels."""
    from greyarray import cli

    assert cli.main(["demo", str(tmp_path / "demo"), "--subjects", "12"]) == 0
    out = capsys.readouterr().out
    assert "GreyArray group level done" in out and "Model thickness ~ age + sex" in out
    group = tmp_path / "demo" / "output" / "group"
    stem = "space-fsLR_den-91k_desc-thicknessLm_contrast-age_stat-effect_statmap"
    slope = np.asarray(nb.load(group / f"{stem}.dscalar.nii").dataobj)[0]
    with h5py.File(group / "desc-thickness_modelarray.h5", "r") as h5:
        names = list(h5["results/lm/column_names"].asstr()[()])
        table = h5["results/lm/results_matrix"][()]
    assert np.array_equal(slope, table[names.index("age.estimate")].astype(np.float32))
    assert np.nanmedian(slope) < 0  # the demo's thickness thins with age
    assert json.loads((group / f"{stem}.json").read_text())["ModelArrayColumn"] == "age.estimate"
    citation = (tmp_path / "demo" / "output" / "logs" / "CITATION.md").read_text()
    assert "the linear model `thickness ~ age + sex` was fitted" in citation
    assert "[@bh1995]" in citation and "$" not in citation
    assert "a participants-by-elements matrix" in citation  # no sessions
    assert "`sub-<label>.html` per participant" in citation  # the reports are named
    output = tmp_path / "demo" / "output"
    assert out.rstrip().splitlines()[-1] == f"Report: {output / 'group.html'}"
    page = (output / "group.html").read_text()
    for anchor in ("thickness", "alff", "alff-desc-smooth", "fa", "thickness-analysis-lm"):
        assert f'<section id="{anchor}">' in page, anchor
    assert 'id="thickness-analysis-lm-age"' in page  # the age term's maps
    assert "NIfTI, the group mask&#39;s voxels in a 24 x 28 x 24 grid of 6 x 6 x 6 mm" in page
    assert (group / "desc-fa_mask.nii.gz").exists()  # the voxel derivative, with its group mask
    assert len(list(output.glob("sub-*.html"))) == 12
    page = (output / "sub-001.html").read_text()
    for anchor in ("thickness", "alff", "alff-desc-smooth", "fa"):
        assert f'<section id="{anchor}">' in page, anchor
    assert "voxels within sub-001_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz" in page
    code = cli.main(["demo", str(tmp_path / "demo"), "--subjects", "12"])
    assert code == 73  # outputs exist: --overwrite is needed to redo them


def test_derivatives_and_participants_file_options(tmp_path, template):
    """Derivatives outside BIDS_DIR/derivatives, and phenotypes from another file."""
    from greyarray import cli

    description(tmp_path / "raw")
    data = xcpd(tmp_path / "elsewhere" / "xcpd", template, subjects=("01", "02"), sessions=("1",))
    pd.DataFrame({"participant_id": ["01", "sub-02"], "iq": ["100", "n/a"]}).to_csv(
        tmp_path / "pheno.tsv", sep="\t", index=False
    )
    args = [
        str(tmp_path / "raw"),
        str(tmp_path / "out"),
        "group",
        "--derivatives",
        f"xcpd={data.root}",
        "--participants-file",
        str(tmp_path / "pheno.tsv"),
        "--scalar",
        "reho",
        "--no-report",
    ]
    assert cli.main(args) == 0
    table = pd.read_csv(tmp_path / "out" / "group" / "desc-reho_cohort.csv")
    assert table["participant_id"].tolist() == ["sub-01", "sub-02"]
    assert table["iq"].tolist()[0] == 100 and np.isnan(table["iq"].tolist()[1])
    missing = [
        str(tmp_path / "raw"),
        str(tmp_path / "o2"),
        "group",
        "--derivatives",
        f"x={tmp_path / 'nowhere'}",
    ]
    assert cli.main(missing) == 66


def test_output_inside_derivatives_is_not_an_input(tmp_path, template, capsys):
    """OUTPUT_DIR = BIDS_DIR/derivatives/greyarray, the usual place, is never indexed as input,
    although it is a derivatives dataset after the first run."""
    from greyarray import cli

    raw_with_fmriprep(tmp_path / "bids", template)
    out = tmp_path / "bids" / "derivatives" / "greyarray"
    args = [str(tmp_path / "bids"), str(out), "group", "--scalar", "curv", "--no-report"]
    assert cli.main(args) == 0
    assert cli.main([*args, "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert f"Indexing {tmp_path / 'bids' / 'derivatives' / 'fmriprep'}" in err
    assert f"Indexing {out}" not in err
