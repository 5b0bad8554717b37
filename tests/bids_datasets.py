"""Synthetic BIDS datasets on the real CIFTI geometries, named as XCP-D, fMRIPrep and HCP name them.

Every map holds distinct known values, recorded in ``Dataset.values`` by path, so tests can check
that each subject's file ended in the right row of the right HDF5.
"""

from __future__ import annotations

import json
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import PCONN, PSCALAR, WRONG_TYPES

from greyarray.io.formats import cifti


@dataclass
class Dataset:
    root: Path
    values: dict[Path, np.ndarray] = field(default_factory=dict)
    writers: dict[str, cifti.CiftiWriter] = field(default_factory=dict)

    def write(self, relative: str, kind_path: Path | None = None) -> Path:
        """A map at ``root/relative`` with values unique to this file."""
        key = str(kind_path)
        if key not in self.writers:
            self.writers[key] = cifti.CiftiWriter(cifti.read_file(kind_path).geometry)
        writer = self.writers[key]
        seed = zlib.crc32(relative.encode())
        values = np.random.default_rng(seed).normal(size=writer.geometry.n_elements)
        values = values.astype(np.float32) + np.float32(len(self.values))
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        writer.write(path, values, Path(relative).name)
        self.values[path] = values
        return path


def description(root: Path, derivative: str | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    info = {"Name": root.name, "BIDSVersion": "1.10.0"}
    if derivative:
        info |= {"DatasetType": "derivative", "GeneratedBy": [{"Name": derivative}]}
    (root / "dataset_description.json").write_text(json.dumps(info))


def xcpd(root: Path, template: Path, subjects=("01", "02", "03"), sessions=("1", "2")) -> Dataset:
    """An XCP-D derivatives dataset: ALFF (plain, smoothed), ReHo, parcellated coverage, decoys."""
    description(root, "XCP-D")
    data = Dataset(root)
    for sub in subjects:
        for ses in sessions:
            func = f"sub-{sub}/ses-{ses}/func/sub-{sub}_ses-{ses}_task-rest"
            for stat in ("stat-alff", "stat-alff_desc-smooth", "stat-reho"):
                data.write(f"{func}_space-fsLR_den-91k_{stat}_boldmap.dscalar.nii", template)
            data.write(f"{func}_seg-4S156Parcels_stat-coverage_boldmap.pscalar.nii", PSCALAR)
            data.write(f"{func}_seg-4S156Parcels_stat-coverage_boldmap.pconn.nii", PCONN)
            # decoys: other CIFTI types, figures, a dataset-level map
            shutil.copy(
                WRONG_TYPES["dtseries"],
                root / f"{func}_space-fsLR_den-91k_desc-denoised_bold.dtseries.nii",
            )
            shutil.copy(
                WRONG_TYPES["dlabel"], root / f"{func}_space-fsLR_seg-4S156Parcels_dseg.dlabel.nii"
            )
    (root / "figures").mkdir()
    (root / "figures" / "sub-01_ses-1_task-rest_stat-alff_boldmap.svg").write_text("<svg/>")
    shutil.copy(template, root / "atlases_space-fsLR_den-91k_stat-alff_boldmap.dscalar.nii")
    return data


def raw_with_fmriprep(root: Path, template: Path) -> Dataset:
    """A raw dataset (participants.tsv with extra columns, one subject without a row, one row
    without maps) and an fMRIPrep derivative with anatomical maps in two densities."""
    description(root)
    pd.DataFrame(
        {
            "participant_id": ["sub-01", "sub-02", "sub-04"],
            "age": ["31", "n/a", "40"],
            "sex": ["F", "M", "F"],
            "handedness": ["R", "L", "R"],
        }
    ).to_csv(root / "participants.tsv", sep="\t", index=False)
    (root / "sub-01" / "anat").mkdir(parents=True)
    (root / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(b"")
    deriv = root / "derivatives" / "fmriprep"
    description(deriv, "fMRIPrep")
    data = Dataset(deriv)
    for sub in ("01", "02", "03"):
        for suffix in ("thickness", "curv", "sulc", "myelinw"):
            data.write(
                f"sub-{sub}/anat/sub-{sub}_space-fsLR_den-91k_{suffix}.dscalar.nii", template
            )
        data.write(
            f"sub-{sub}/anat/sub-{sub}_space-fsLR_den-32k_desc-preproc_thickness.dscalar.nii",
            template,
        )
    return data


def hcp(root: Path, template: Path) -> Dataset:
    """HCP pipeline layout: not BIDS, found by regex patterns from the config."""
    data = Dataset(root)
    for sub in ("100307", "100408"):
        data.write(
            f"{sub}/MNINonLinear/fsaverage_LR32k/{sub}.thickness.32k_fs_LR.dscalar.nii", template
        )
    return data
