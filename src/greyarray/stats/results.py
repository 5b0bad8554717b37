"""What every model writes: results/<analysis> as ModelArray's writeResults stores it, and FDR."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from greyarray.errors import OutputError
from greyarray.io.cohort import read_csv_table
from greyarray.io.fileio import check_free_space, check_writable
from greyarray.io.h5read import read_scalar
from greyarray.io.inputs import open_hdf5

BLOCK_BYTES = 32 * 2**20  # float64 values of one block of elements, all subjects


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


@contextmanager
def fit_inputs(h5_path: Path, cohort_path: Path, scalar: str, analysis: str, overwrite: bool):
    """What a fit opens first (fit-gam, fit-lmm): the HDF5, checked writable and without
    results/<analysis> unless ``overwrite``; its scalar; the cohort rows in the HDF5's subject
    order. Yields (scalar as read, phenotypes); the file stays open while the values are read."""
    from greyarray.stats.design import match_cohort

    cohort = read_csv_table(cohort_path, "cohort file")
    check_writable(h5_path)  # results go into the HDF5: refuse a read-only one before fitting
    with open_hdf5(h5_path) as h5:
        stored = read_scalar(h5, scalar)
        if f"results/{analysis}" in h5 and not overwrite:
            raise OutputError(f"{h5_path}: results/{analysis} exists; use --overwrite")
        yield stored, match_cohort(cohort, stored.names, scalar, cohort_path)


def element_blocks(values, analysis: str) -> Iterator:
    """(start, values of elements start...) in blocks of all subjects x at most BLOCK_BYTES of
    float64, with a progress bar on a terminal."""
    from tqdm import tqdm

    step = max(64, BLOCK_BYTES // (8 * values.shape[0]))
    for start in tqdm(
        range(0, values.shape[1], step),
        desc=f"Fitting {analysis}",
        unit="block",
        disable=None,
        leave=False,
    ):
        yield start, values[:, start : start + step]
