"""Synthetic cohorts on the real fsLR 91k geometry: for the demo, the tests and the benchmark.

The bundled ``ones.dscalar.nii`` (CIFTI-2 reference data, public domain) supplies the header; each
subject gets a thickness-like map (smooth spatial pattern + an age effect + noise), float32, with
its own map name. The BIDS demo adds a small voxel derivative (QSIRecon-style FA maps in MNI
space on a coarse 6 mm grid, with each participant's brain mask).
"""

from __future__ import annotations

import json
import logging
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd

from greyarray.io.formats import cifti

log = logging.getLogger(__name__)


def template_path() -> Path:
    """The bundled 91k dscalar template."""
    return Path(str(files("greyarray") / "data" / "ones.dscalar.nii"))


def phenotypes(n: int, seed: int = 0) -> pd.DataFrame:
    """Ages and sexes for ``n`` subjects, labelled sub-001, sub-002, ..."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "participant_id": [f"sub-{i + 1:03d}" for i in range(n)],
            "age": np.round(rng.uniform(8, 80, n), 1),
            "sex": rng.choice(["F", "M"], n),
        }
    )


def thickness_maps(n_elements: int, table: pd.DataFrame, seed: int = 0):
    """Yield one float32 map per row of ``table``: 2.5 mm +- pattern, thinning with age, noise."""
    rng = np.random.default_rng(seed + 1)
    index = np.arange(n_elements)
    pattern = 0.4 * np.sin(index / 900.0) + 0.2 * np.cos(index / 131.0)
    ageing = -0.004 * (1 + np.sin(index / 5000.0))  # mm per year, varies over the brain
    for age in table["age"]:
        noise = rng.normal(0.0, 0.15, n_elements)
        yield (2.5 + pattern + ageing * (age - 40) + noise).astype(np.float32)


def write_cohort(folder: Path, n: int, seed: int = 0, template: Path | None = None) -> Path:
    """Write ``n`` subject dscalars and a cohort CSV (relative paths) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    geometry = cifti.read_file(template or template_path()).geometry
    writer = cifti.CiftiWriter(geometry)
    table = phenotypes(n, seed)
    sources = []
    maps = thickness_maps(geometry.n_elements, table, seed)
    for subject, values in zip(table["participant_id"], maps, strict=True):
        name = f"{subject}_thickness.dscalar.nii"
        writer.write(folder / name, values, f"{subject}_thickness")
        sources.append(name)
    cohort = table.assign(scalar_name="thickness", source_file=sources)
    path = folder / "cohort.csv"
    cohort[["scalar_name", "source_file", "participant_id", "age", "sex"]].to_csv(path, index=False)
    return path


def _description(path: Path, name: str, generated_by: str | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    info = {"Name": name, "BIDSVersion": "1.10.0"}
    if generated_by:
        info.update(DatasetType="derivative", GeneratedBy=[{"Name": generated_by}])
    (path / "dataset_description.json").write_text(json.dumps(info, indent=2) + "\n")


def write_bids_demo(root: Path, n_subjects: int = 20, seed: int = 0) -> Path:
    """A raw BIDS dataset with participants.tsv and three derivatives: on the fsLR 91k grid,
    fMRIPrep-style cortical thickness and XCP-D-style ALFF (plain and smoothed) maps; in MNI
    space, QSIRecon-style FA maps (NIfTI) with QSIPrep-style brain masks."""
    import nibabel as nb

    geometry = cifti.read_file(template_path()).geometry
    writer = cifti.CiftiWriter(geometry)
    table = phenotypes(n_subjects, seed)
    _description(root, "GreyArray demo (synthetic)")
    table.assign(site=np.where(np.arange(n_subjects) % 2, "A", "B")).to_csv(
        root / "participants.tsv", sep="\t", index=False
    )
    fmriprep, xcpd = root / "derivatives" / "fmriprep", root / "derivatives" / "xcp_d"
    qsirecon = root / "derivatives" / "qsirecon"
    _description(fmriprep, "fMRIPrep (synthetic)", "fMRIPrep")
    _description(xcpd, "XCP-D (synthetic)", "XCP-D")
    _description(qsirecon, "QSIRecon (synthetic)", "QSIRecon")
    space = "space-MNI152NLin2009cAsym"
    for subject, (fa, mask) in zip(table["participant_id"], fa_maps(table, seed), strict=True):
        dwi = qsirecon / subject / "dwi"
        dwi.mkdir(parents=True, exist_ok=True)
        for name, data in (
            (f"{subject}_{space}_model-tensor_param-fa_dwimap.nii.gz", fa),
            (f"{subject}_{space}_desc-brain_mask.nii.gz", mask),
        ):
            image = nb.Nifti1Image(data, VOXEL_AFFINE)
            image.header.set_xyzt_units("mm")
            nb.save(image, dwi / name)
    thickness = thickness_maps(geometry.n_elements, table, seed)
    rng = np.random.default_rng(seed + 2)
    for subject, values in zip(table["participant_id"], thickness, strict=True):
        anat = fmriprep / subject / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        name = f"{subject}_space-fsLR_den-91k_thickness.dscalar.nii"
        writer.write(anat / name, values, name)
        func = xcpd / subject / "func"
        func.mkdir(parents=True, exist_ok=True)
        alff = (values * 40 + rng.normal(0, 8, geometry.n_elements)).astype(np.float32)
        for desc, data in (("", alff), ("_desc-smooth", (alff + values * 10) / 2)):
            name = f"{subject}_task-rest_space-fsLR_den-91k_stat-alff{desc}_boldmap.dscalar.nii"
            writer.write(func / name, data, name)
    return root


VOXEL_SHAPE = (24, 28, 24)  # a coarse 6 mm grid: the demo stays fast
VOXEL_AFFINE = np.array(
    [[6.0, 0, 0, -72], [0, 6.0, 0, -102], [0, 0, 6.0, -66], [0, 0, 0, 1]]
)  # MNI152NLin2009cAsym-like orientation and origin


def fa_maps(table: pd.DataFrame, seed: int = 0):
    """Yield (FA volume, brain mask) per row of ``table``: an ellipsoid brain whose edge varies
    by participant, FA higher in a central "tract", falling with age, noise."""
    rng = np.random.default_rng(seed + 3)
    grid = np.indices(VOXEL_SHAPE).astype(float)
    centre = (np.array(VOXEL_SHAPE)[:, None, None, None] - 1) / 2
    radius = np.sqrt((((grid - centre) / (centre * 0.85)) ** 2).sum(axis=0))
    tract = np.exp(-(((grid[0] - centre[0]) / 2) ** 2 + ((grid[2] - centre[2] - 3) / 3) ** 2))
    for age in table["age"]:
        mask = radius + rng.normal(0, 0.03, VOXEL_SHAPE) < 1
        fa = 0.3 + 0.35 * tract - 0.002 * (age - 40) * (1 + tract)
        fa = fa + rng.normal(0, 0.03, VOXEL_SHAPE)
        yield np.where(mask, fa, 0).astype(np.float32), mask.astype(np.uint8)


def run_demo(
    folder: Path, n_subjects: int = 20, overwrite: bool = False, quiet: bool = False
) -> int:
    """Write a BIDS demo dataset in ``folder/bids`` and run both levels into ``folder/output``
    (manifests, HDF5 files, a fitted model, statistical maps, and the HTML reports)."""
    from greyarray.bids.app import main as bids_app
    from greyarray.errors import OutputError, UsageError

    if n_subjects < 12:
        raise UsageError(
            f"--subjects {n_subjects}: the demo needs at least 12 (ModelArray's "
            "threshold fits an element only with more than 10 participants)"
        )
    bids, output = folder / "bids", folder / "output"
    if output.exists() and not overwrite:
        raise OutputError(f"{folder}: holds an earlier demo; use --overwrite to run it again")
    if not (bids / "dataset_description.json").exists() or overwrite:
        log.info(
            "Writing a synthetic BIDS dataset of %d subjects on fsLR 91k to %s", n_subjects, bids
        )
        write_bids_demo(bids, n_subjects)
    flags = ["--quiet"] if quiet else []
    again = ["--overwrite"] if overwrite else []
    for level in (["participant"], ["group", *again]):
        code = bids_app([str(bids), str(output), *level, *flags])
        if code:
            return code
    model = ["--model", "thickness ~ age + sex"]
    return bids_app([str(bids), str(output), "group", *model, *flags, *again])
