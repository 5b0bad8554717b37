"""The floor for to-modelarray on NIfTI or fixel data: read and inflate every input once (maps and
subject masks: nibabel's gzip, .mif: one read), mask, write one matrix with h5py's gzip.

No checks, no provenance, every value in memory: what any converter must at least spend.
Usage: floor_voxels.py voxels|fixels COHORT.csv OUT.h5 CHUNK_ELEMENTS
"""

import sys
from pathlib import Path

import h5py
import nibabel as nb
import numpy as np
import pandas as pd

kind, cohort, output, width = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
table = pd.read_csv(cohort)
rows = []
if kind == "voxels":
    group = np.asarray(nb.load(cohort.parent / "group_mask.nii.gz").dataobj) > 0
    for name, mask in zip(table["source_file"], table["source_mask_file"], strict=True):
        data = np.asarray(nb.load(cohort.parent / name).dataobj)[group]
        inside = np.asarray(nb.load(cohort.parent / mask).dataobj)[group] > 0
        rows.append(np.where(inside, data, np.nan).astype(np.float32))
else:
    for name in table["source_file"]:
        blob = (cohort.parent / name).read_bytes()
        offset = int(blob.split(b"file: . ", 1)[1].split(b"\n", 1)[0])
        rows.append(np.frombuffer(blob, "<f4", offset=offset))
matrix = np.stack(rows)
with h5py.File(output, "w") as h5:
    h5.create_dataset(
        "scalars/x/values",
        data=matrix,
        chunks=(len(rows), width),
        compression="gzip",
        compression_opts=4,
        shuffle=True,
    )
