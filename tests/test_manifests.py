"""Participant manifests and the group level: the group converts the BIDS_DIR it is given,
whatever the participant level's --scalar filter, and a scalar name means one kind of map in
an OUTPUT_DIR however many participant jobs wrote it; inputs that cannot be used are named."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pandas as pd
from bids_datasets import Dataset, description
from conftest import PSCALAR, run_greyarray

from greyarray.bids.derivatives import label

NAME = (
    "sub-{s}/ses-{ses}/func/sub-{s}_ses-{ses}_task-rest_seg-4S156Parcels_{stat}_boldmap.pscalar.nii"
)


def app(*args):
    return run_greyarray(*args, "--no-report")


def maps(root: Path, subjects, stats=("stat-alff",), sessions=("1",)) -> Dataset:
    """An XCP-D-like dataset of small parcellated maps."""
    if not (root / "dataset_description.json").exists():
        description(root, "XCP-D")
    data = Dataset(root)
    for s in subjects:
        for ses in sessions:
            for stat in stats:
                data.write(NAME.format(s=s, ses=ses, stat=stat), PSCALAR)
    return data


def cohort(out: Path, scalar: str) -> pd.DataFrame:
    return pd.read_csv(out / "group" / f"desc-{label(scalar)}_cohort.csv")


def names_of(out: Path) -> set[str]:
    return {json.loads(p.read_text())["Scalar"] for p in (out / "group").glob("*_modelarray.json")}


def recorded(out: Path, subject: str) -> set[str]:
    manifest = json.loads((out / f"sub-{subject}" / f"sub-{subject}_greyarray.json").read_text())
    return {entry["scalar"] for entry in manifest["files"]}


def test_group_converts_its_own_bids_dir_not_the_participant_levels(tmp_path):
    first = maps(tmp_path / "a" / "xcp_d", ["01", "02", "03"]).root
    copy = tmp_path / "b" / "xcp_d"
    shutil.copytree(first, copy)
    out = tmp_path / "out"
    assert app(first, out, "participant").returncode == 0
    done = app(copy, out, "group")
    assert done.returncode == 0, done.stderr
    assert f"were made from {first}, not from BIDS_DIR {copy}" in done.stderr
    assert "Using the manifests" not in done.stderr
    sources = [(out / "group" / f).resolve() for f in cohort(out, "alff")["source_file"]]
    assert len(sources) == 3 and all(p.is_relative_to(copy) for p in sources)


def test_participant_scalar_filter_does_not_restrict_the_group(tmp_path):
    data = maps(tmp_path / "xcp_d", ["01", "02"], ("stat-alff", "stat-reho"))
    out = tmp_path / "out"
    assert app(data.root, out, "participant", "--scalar", "reho").returncode == 0
    assert json.loads((out / "sub-01" / "sub-01_greyarray.json").read_text())["scalar_filter"] == [
        "reho"
    ]
    done = app(data.root, out, "group", "--scalar", "reho")  # covered by the manifests
    assert done.returncode == 0 and "Using the manifests of 2 participants" in done.stderr
    done = app(data.root, out, "group")
    assert done.returncode == 0, done.stderr
    assert "covers only --scalar reho: discovering again" in done.stderr
    assert names_of(out) == {"alff", "reho"} and len(cohort(out, "alff")) == 2


def test_later_participant_jobs_keep_the_names_of_earlier_ones(tmp_path):
    root, out = tmp_path / "xcp_d", tmp_path / "out"
    early = [f"{i:02d}" for i in range(1, 5)]
    late = [f"{i:02d}" for i in range(5, 11)]
    maps(root, early, ("stat-alff", "stat-alff_desc-smooth"))
    assert app(root, out, "participant", "--participant-label", *early).returncode == 0
    maps(root, late, ("stat-alff_desc-smooth",))  # smooth maps now cover most participants
    done = app(root, out, "participant", "--participant-label", *late)
    assert done.returncode == 0, done.stderr
    assert recorded(out, "01") == {"alff", "alff_desc-smooth"}
    assert recorded(out, "05") == {"alff_desc-smooth"}
    done = app(root, out, "group")
    assert done.returncode == 0, done.stderr
    assert names_of(out) == {"alff", "alff_desc-smooth"}
    assert len(cohort(out, "alff")) == 4 and len(cohort(out, "alff_desc-smooth")) == 10

    # a manifest that gives alff the other meaning (as older versions wrote) is named
    path = out / "sub-05" / "sub-05_greyarray.json"
    manifest = json.loads(path.read_text())
    manifest["files"][0]["scalar"] = "alff"
    path.write_text(json.dumps(manifest))
    done = app(root, out, "participant", "--participant-label", "06")
    assert done.returncode == 0, done.stderr
    assert "Scalar alff names two kinds of maps in OUTPUT_DIR" in done.stderr
    assert recorded(out, "06") == {"alff_desc-smooth"}


def gzip_file(path: Path) -> Path:
    target = path.with_name(path.name + ".gz")
    target.write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()
    return target


def test_gzipped_maps_are_named(tmp_path):
    data = maps(tmp_path / "xcp_d", ["01", "02", "03"])
    gzip_file(data.root / NAME.format(s="03", ses="1", stat="stat-alff"))
    out = tmp_path / "out"
    done = app(data.root, out, "group")
    assert done.returncode == 0, done.stderr
    assert "Left out 1 gzipped CIFTI file(s) (.nii.gz)" in done.stderr
    assert "gzipped NIfTI is not CIFTI-2, whose files are never compressed" in done.stderr
    assert "participant(s): sub-03" in done.stderr
    assert list(cohort(out, "alff")["participant_id"]) == ["sub-01", "sub-02"]

    for s in ("01", "02"):
        gzip_file(data.root / NAME.format(s=s, ses="1", stat="stat-alff"))
    done = app(data.root, tmp_path / "out2", "participant")
    assert done.returncode == 65, done.stderr
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "found only 3 gzipped CIFTI file(s) (.nii.gz)" in lines[0]
    assert not (tmp_path / "out2").exists()


def test_every_missing_label_is_named(tmp_path):
    data = maps(tmp_path / "xcp_d", ["01", "02"], sessions=("1", "2"))
    out = tmp_path / "out"
    done = app(data.root, out, "group", "--participant-label", "01", "98", "99")
    assert done.returncode == 18 and "2 participants (98, 99) were not found in" in done.stderr
    done = app(data.root, out, "group", "--session-label", "3", "4", "1")
    assert done.returncode == 18 and "2 sessions (3, 4) were not found in" in done.stderr
    labels = [f"{i}" for i in range(90, 97)]
    done = app(data.root, out, "group", "--participant-label", *labels)
    assert "7 participants (90, 91, 92, 93, 94 and 2 more) were not found" in done.stderr
    assert not out.exists()


def test_an_input_dataset_is_not_an_output_and_the_database_is_outside(tmp_path):
    raw = tmp_path / "raw"
    description(raw)
    deriv = maps(raw / "derivatives" / "xcpd", ["01", "02"]).root
    done = app(raw, deriv, "group")
    assert done.returncode == 64, done.stderr
    assert f"{deriv}: OUTPUT_DIR must not be an input dataset" in done.stderr
    done = app(raw, tmp_path / "out", "group", "--derivatives", str(tmp_path / "out"))
    assert done.returncode in (64, 66)  # --derivatives must exist first
    done = app(raw, tmp_path / "out", "group", "--bids-database-dir", str(raw / "db"))
    assert done.returncode == 64
    assert f"{raw / 'db'}: the pybids database folder must not be inside BIDS_DIR" in done.stderr
    assert not (raw / "db").exists() and not (tmp_path / "out").exists()
