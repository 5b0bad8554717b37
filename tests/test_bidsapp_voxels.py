"""The BIDS-App on NIfTI derivatives: QSIRecon, ASLPrep and volumetric XCP-D maps in a standard
space, their subject masks, the group mask, --model, and NIfTI statistical maps."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from bids_datasets import description
from conftest import run_greyarray

SHAPE = (8, 9, 7)
MNI = np.array([[2.0, 0, 0, -8], [0, 2.0, 0, -9], [0, 0, 2.0, -7], [0, 0, 0, 1]])
SUBJECTS = [f"{i:02d}" for i in range(1, 13)]


def save(path: Path, data: np.ndarray, affine=MNI) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nb.save(nb.Nifti1Image(data, affine), path)


def brain(rng, shrink: float = 0.0) -> np.ndarray:
    grid = np.indices(SHAPE).astype(float)
    centre = (np.array(SHAPE)[:, None, None, None] - 1) / 2
    radius = np.sqrt((((grid - centre) / (centre * 0.9)) ** 2).sum(axis=0))
    return (radius + rng.normal(0, 0.05, SHAPE) < 1 - shrink).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A raw dataset (participants.tsv with age) and three derivatives: QSIRecon FA and MD
    (MNI152NLin2009cAsym, masks from QSIPrep; FA also in space-T1w, which is left out), ASLPrep
    CBF with sessions (masks beside the maps), XCP-D ALFF in two standard spaces."""
    root = tmp_path_factory.mktemp("bids") / "study"
    description(root)
    rng = np.random.default_rng(0)
    ages = rng.uniform(20, 70, len(SUBJECTS)).round(1)
    pd.DataFrame({"participant_id": [f"sub-{s}" for s in SUBJECTS], "age": ages}).to_csv(
        root / "participants.tsv", sep="\t", index=False
    )
    qsiprep, qsirecon = root / "derivatives" / "qsiprep", root / "derivatives" / "qsirecon"
    aslprep, xcpd = root / "derivatives" / "aslprep", root / "derivatives" / "xcp_d"
    for folder, name in (
        (qsiprep, "QSIPrep"),
        (qsirecon, "QSIRecon"),
        (aslprep, "ASLPrep"),
        (xcpd, "XCP-D"),
    ):
        description(folder, name)
    space = "space-MNI152NLin2009cAsym"
    for subject, age in zip(SUBJECTS, ages, strict=True):
        sub = f"sub-{subject}"
        mask = brain(rng)
        save(qsiprep / sub / "dwi" / f"{sub}_{space}_desc-brain_mask.nii.gz", mask)
        save(qsiprep / sub / "anat" / f"{sub}_space-T1w_desc-brain_mask.nii.gz", mask)
        for param, base in (("fa", 0.5), ("md", 0.8)):
            data = (base - 0.003 * age + rng.normal(0, 0.02, SHAPE)).astype(np.float32)
            folder = qsirecon / sub / "dwi"
            save(folder / f"{sub}_{space}_model-tensor_param-{param}_dwimap.nii.gz", data * mask)
        save(
            qsirecon / sub / "dwi" / f"{sub}_space-T1w_model-tensor_param-fa_dwimap.nii.gz",
            np.ones(SHAPE, np.float32),
        )
        for ses in ("1", "2"):
            perf = aslprep / sub / f"ses-{ses}" / "perf"
            own = brain(rng, 0.05)
            save(perf / f"{sub}_ses-{ses}_{space}_desc-brain_mask.nii.gz", own)
            cbf = (50 + rng.normal(0, 5, SHAPE)).astype(np.float32)
            save(perf / f"{sub}_ses-{ses}_{space}_cbf.nii.gz", cbf)
        func = xcpd / sub / "func"
        for space_ in ("MNI152NLin2009cAsym", "MNI152NLin6Asym"):
            alff = rng.normal(1, 0.1, SHAPE).astype(np.float32)
            save(func / f"{sub}_task-rest_space-{space_}_stat-alff_boldmap.nii.gz", alff)
    return root


def app(*args) -> str:
    done = run_greyarray(*args)
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.fixture(scope="module")
def group(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "greyarray"
    app(dataset, out, "participant", "--no-report")
    app(dataset, out, "group", "--no-report")
    app(dataset, out, "group", "--model", "fa ~ age", "--no-report")
    return out


def test_scalars_spaces_and_masks(group, dataset):
    """param-fa gives fa; the space is part of a scalar's identity (two ALFF spaces, two
    scalars); space-T1w maps are left out; every map has its subject mask."""
    sidecars = {
        json.loads(p.read_text())["Scalar"]: json.loads(p.read_text())
        for p in (group / "group").glob("desc-*_modelarray.json")
    }
    assert sorted(sidecars) == ["alff", "alff_space-MNI152NLin6Asym", "cbf", "fa", "md"]
    assert sidecars["fa"]["Entities"]["param"] == "fa"
    with h5py.File(group / "group" / "desc-fa_modelarray.h5") as h5:
        masks = h5["greyarray/sources/fa/mask_path"].asstr()[()]
        assert all("qsiprep" in m and "MNI152NLin2009cAsym_desc-brain_mask" in m for m in masks)
        assert h5["scalars/fa/values"].shape == (12, h5["voxels"].shape[1])
    with h5py.File(group / "group" / "desc-cbf_modelarray.h5") as h5:
        masks = list(h5["greyarray/sources/cbf/mask_path"].asstr()[()])
        names = list(h5["scalars/cbf/column_names"].asstr()[()])
        assert all(Path(m).parent.name == "perf" for m in masks) and len(names) == 24
        assert all(
            n.split("_ses-")[1][0] == m.split("_ses-")[1][0]
            for n, m in zip(names, masks, strict=True)
        )
    manifest = json.loads((group / "sub-01" / "sub-01_greyarray.json").read_text())
    assert {e["scalar"]: e.get("mask") is not None for e in manifest["files"]}["fa"]


def test_group_mask_rule(group, dataset):
    """The group mask holds exactly the voxels inside at least half of the subject masks,
    written beside the HDF5 on the maps' grid; its voxels are the HDF5's."""
    masks = [
        nb.load(p).get_fdata() > 0
        for p in sorted(dataset.glob("derivatives/qsiprep/sub-*/dwi/*_desc-brain_mask.nii.gz"))
    ]
    expected = np.mean(masks, axis=0) >= 0.5
    written = nb.load(group / "group" / "desc-fa_mask.nii.gz")
    assert np.array_equal(written.get_fdata() > 0, expected)
    assert np.allclose(written.affine, MNI)
    with h5py.File(group / "group" / "desc-fa_modelarray.h5") as h5:
        ijk = h5["voxels"][1:].T
    assert np.array_equal(ijk, np.argwhere(expected))


def test_model_and_nifti_statmaps(group):
    """--model fits fa ~ age; statistical maps are NIfTI with BIDS names and sidecars, on the
    group mask's grid, and the methods text says so."""
    folder = group / "group"
    name = "space-MNI152NLin2009cAsym_model-tensor_desc-faLm_contrast-age_stat-effect_statmap"
    image = nb.load(folder / f"{name}.nii.gz")
    assert image.shape == SHAPE and np.allclose(image.affine, MNI)
    effect = image.get_fdata()[nb.load(folder / "desc-fa_mask.nii.gz").get_fdata() > 0]
    assert np.nanmean(effect) == pytest.approx(-0.003, abs=0.001)
    sidecar = json.loads((folder / f"{name}.json").read_text())
    assert sidecar["Scalar"] == "fa" and sidecar["ModelArrayColumn"] == "age.estimate"
    citation = (group / "logs" / "CITATION.md").read_text()
    assert "were exported back to NIfTI" in citation and "Every NIfTI map was checked" in citation
    assert "the group mask made of the voxels inside at least half" in citation


def test_given_group_mask_and_grid_errors(dataset, tmp_path):
    """--group-mask replaces the rule; a mask on another grid is one line naming it."""
    given = tmp_path / "mask.nii.gz"
    data = np.zeros(SHAPE, np.uint8)
    data[2:6, 2:7, 2:5] = 1
    save(given, data)
    out = tmp_path / "out"
    app(dataset, out, "group", "--scalar", "md", "--group-mask", given, "--no-report")
    with h5py.File(out / "group" / "desc-md_modelarray.h5") as h5:
        assert h5["voxels"].shape[1] == int(data.sum())
    assert not (out / "group" / "desc-md_mask.nii.gz").exists()
    shifted = tmp_path / "shifted.nii.gz"
    save(shifted, data, MNI + _shift(1.0))
    done = run_greyarray(
        dataset, tmp_path / "o2", "group", "--scalar", "md", "--group-mask", shifted, "--no-report"
    )
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert done.returncode == 65 and len(errors) == 1
    assert "does not match the group mask" in errors[0] and "affine differs" in errors[0]


def _shift(mm: float) -> np.ndarray:
    shift = np.zeros((4, 4))
    shift[0, 3] = mm
    return shift


def test_subject_mask_choice(tmp_path):
    """Among several masks of the map's space: one of the map's task over an anatomical one,
    the map's datatype folder over another; a true tie is an error naming two."""
    from greyarray.bids import discover
    from greyarray.errors import DataError

    root = tmp_path / "fmriprep"
    func, anat = root / "sub-01" / "func", root / "sub-01" / "anat"
    space = "space-MNI152NLin6Asym_res-2"
    for path in (
        func / f"sub-01_task-rest_{space}_desc-brain_mask.nii.gz",
        func / f"sub-01_task-nback_{space}_desc-brain_mask.nii.gz",
        anat / f"sub-01_{space}_desc-brain_mask.nii.gz",
        anat / "sub-01_space-T1w_desc-brain_mask.nii.gz",
    ):
        save(path, np.ones(SHAPE, np.uint8))
    entities = {"task": "rest", "space": "MNI152NLin6Asym", "res": "2", "stat": "alff"}
    boldmap = root / "other" / "x.nii.gz"
    found = [discover.Found(boldmap, tmp_path / "xcpd", "01", None, entities)]
    chosen = discover.subject_masks(found, [root])[boldmap]
    assert chosen.name == f"sub-01_task-rest_{space}_desc-brain_mask.nii.gz"
    entities = {"space": "MNI152NLin6Asym", "res": "2", "param": "fa"}
    dwimap = tmp_path / "qsirecon" / "sub-01" / "anat" / "sub-01_fa.nii.gz"
    found = [discover.Found(dwimap, tmp_path / "qsirecon", "01", None, entities)]
    assert discover.subject_masks(found, [root])[dwimap].parent == anat
    save(root / "sub-01" / "dwi" / f"sub-01_{space}_desc-brain_mask.nii.gz", np.ones(SHAPE, "u1"))
    dwimap = tmp_path / "qsirecon" / "sub-01" / "perf" / "sub-01_fa.nii.gz"
    found = [discover.Found(dwimap, tmp_path / "qsirecon", "01", None, entities)]
    with pytest.raises(DataError, match="2 subject masks match it equally"):
        discover.subject_masks(found, [root])
