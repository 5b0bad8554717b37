"""What every model writes: results/<analysis> as ModelArray's writeResults stores it, and FDR."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from greyarray.errors import OutputError
from greyarray.io.fileio import check_free_space
from greyarray.io.inputs import open_hdf5


def p_adjust_fdr(p: np.ndarray) -> np.ndarray:
    """R's ``p.adjust(p, method = "fdr")`` (Benjamini-Hochberg); NaN stays NaN, not counted."""
    out = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    if valid.size == 0:
        return out
    order = valid[np.argsort(p[valid], kind="stable")[::-1]]  # decreasing p
    n = valid.size
    ranks = np.arange(n, 0, -1)
    out[order] = np.minimum(1, np.minimum.accumulate(n / ranks * p[order]))
    return out


def write_results(
    h5_path: Path,
    analysis: str,
    columns: list[str],
    table: np.ndarray,
    about: dict | None = None,
    overwrite: bool = True,
) -> None:
    """results/<analysis>/results_matrix (columns x elements, float64) and column_names, as
    ModelArray's writeResults stores them; replaced as a whole (written, then renamed). ``about``
    (model, counts) is kept as the JSON attribute ``greyarray_about``, which R ignores."""
    import json

    check_free_space(h5_path, table.nbytes + 2**20, f"results/{analysis}")
    with open_hdf5(h5_path, "a") as h5:
        if f"results/{analysis}" in h5 and not overwrite:  # written meanwhile by another run
            raise OutputError(f"{h5_path}: results/{analysis} exists; use --overwrite")
        results = h5.require_group("results")
        staging = f".{analysis}.incomplete"
        if staging in results:
            del results[staging]
        group = results.create_group(staging)
        group.create_dataset(
            "results_matrix",
            data=table,
            chunks=(len(columns), min(table.shape[1], 4096)),
            maxshape=(None, None),
            compression="gzip",
            compression_opts=4,
            shuffle=True,
        )
        group.create_dataset("column_names", data=columns, dtype=h5py.string_dtype())
        if about:
            group.attrs["greyarray_about"] = json.dumps(about)
        if analysis in results:
            del results[analysis]
        results.move(staging, analysis)
