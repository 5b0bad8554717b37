"""The floor for to-modelarray: read each file's data block raw, write one matrix with h5py.

No checks, no provenance, all values in memory: what any converter must at least spend.
Usage: floor.py COHORT.csv OUT.h5 CHUNK_ELEMENTS
"""

import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

cohort, output, width = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rows = []
for name in pd.read_csv(cohort)["source_file"]:
    with open(cohort.parent / name, "rb") as f:
        offset = int(np.frombuffer(f.read(176)[168:176], "<i8")[0])  # NIfTI-2 vox_offset
        f.seek(offset)
        rows.append(np.frombuffer(f.read(), "<f4"))
matrix = np.stack(rows)
with h5py.File(output, "w") as h5:
    h5.create_dataset(
        "scalars/thickness/values",
        data=matrix,
        chunks=(len(rows), width),
        compression="gzip",
        compression_opts=4,
        shuffle=True,
    )
