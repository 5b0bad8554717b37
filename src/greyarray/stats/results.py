"""What every model writes: results/<analysis> as ModelArray's writeResults stores it, and FDR."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from greyarray.errors import DataError, OutputError
from greyarray.io.cohort import read_csv_table
from greyarray.io.fileio import check_writable
from greyarray.io.h5read import read_scalar
from greyarray.io.h5update import updating_hdf5
from greyarray.io.inputs import open_hdf5
from greyarray.stats.design import threshold_rule

log = logging.getLogger(__name__)

BLOCK_BYTES = 32 * 2**20  # values read at once: a block of elements, all subjects


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
) -> list[str]:
    """results/<analysis>/results_matrix (columns x elements, float64) and column_names, as
    ModelArray's writeResults stores them, replacing an earlier one as a whole. ``about``
    (model, counts) is kept as the JSON attribute ``greyarray_about``, which R ignores.

    The file is updated through ``updating_hdf5``: a crash at any moment leaves it as it was.
    What a user must know about the result (the model's own notes given in ``about["notes"]``,
    e.g. repeated sessions fitted as independent subjects; elements left unfitted and why,
    columns that are NaN everywhere, factor levels of one subject: ``result_notes``) is logged
    as warnings and recorded in ``about["notes"]``, where sidecars, summaries and reports read
    it. ``about`` keys read for it: ``scalar``, ``n_subjects``, ``threshold_abs``,
    ``threshold_rel``, ``single_subject_levels``. Returns the notes."""
    about = dict(about or {})
    with updating_hdf5(h5_path, table.nbytes + 2**20, f"results/{analysis}") as h5:
        if f"results/{analysis}" in h5 and not overwrite:  # written meanwhile by another run
            raise OutputError(f"{h5_path}: results/{analysis} exists; use --overwrite")
        notes = list(about.get("notes") or []) + result_notes(h5, analysis, columns, table, about)
        if notes:
            about["notes"] = notes
        results = h5.require_group("results")
        if analysis in results:
            del results[analysis]
        group = results.create_group(analysis)
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
    for note in notes:
        log.warning("%s", note)
    return notes


def fit_record(group: h5py.Group) -> dict:
    """What GreyArray recorded about the fit of results/<analysis> (``greyarray_about``); {}
    for results it did not fit (ModelArray's writeResults)."""
    try:
        record = json.loads(group.attrs["greyarray_about"])
    except (KeyError, TypeError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def fitted_to(h5: h5py.File, scalar: str) -> tuple[list[str], list[str]]:
    """(the results/ analyses GreyArray fitted to ``scalar``, those without a record of the
    scalar they were fitted to: ModelArray's)."""
    results = h5.get("results")
    fitted, unknown = [], []
    for name, group in sorted(results.items()) if isinstance(results, h5py.Group) else []:
        if name.startswith("."):  # a writer's staging group
            continue
        record = fit_record(group) if isinstance(group, h5py.Group) else {}
        if record.get("scalar") == scalar:
            fitted.append(name)
        elif "scalar" not in record:
            unknown.append(name)
    return fitted, unknown


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


# ---- results a user must hear about ----------------------------------------------------------
THRESHOLD_OPTIONS = "--num-subj-lthr-abs and --num-subj-lthr-rel"  # ModelArray's num.subj.lthr.*


def result_notes(
    h5: h5py.File, analysis: str, columns: list[str], table: np.ndarray, about: dict
) -> list[str]:
    """One line for each thing about a result that must not go unsaid: elements left unfitted
    (how many, and why: ModelArray's threshold with its numbers and the option that changes
    it, or a design that cannot be fitted there), result columns that are NaN at every fitted
    element, factor levels that a single subject has. Every model's writer calls this."""
    stats = [i for i, name in enumerate(columns) if name != "element_id"]
    notes = []
    if stats and table.shape[1]:
        finite = np.isfinite(table[stats])
        fitted = finite.any(axis=0)
        if not fitted.all():
            notes.append(_unfitted(h5, analysis, fitted, about))
        if fitted.any():
            empty = [columns[i] for i, row in zip(stats, finite, strict=True) if not row.any()]
            if empty:
                notes.append(
                    f"results/{analysis}: {_names(empty)} {'is' if len(empty) == 1 else 'are'} "
                    "NaN at every element (a statistic this model cannot give, e.g. a test "
                    "without predictors or a term that is constant)"
                )
    for factor, levels in (about.get("single_subject_levels") or {}).items():
        notes.append(
            f"factor {factor!r}: {_few('level', levels)} a single subject among those "
            "used: its coefficient rests on that one subject (consider merging levels)"
        )
    return notes


def _unfitted(h5: h5py.File, analysis: str, fitted: np.ndarray, about: dict) -> str:
    """How many elements are NaN, and why."""
    n, missing = fitted.size, int((~fitted).sum())
    head = (
        f"No element was fitted: results/{analysis} holds only NaN"
        if missing == n
        else f"{missing:,} of {n:,} elements {_were(missing)} not fitted "
        f"(NaN in results/{analysis})"
    )
    try:
        lthr_abs, lthr_rel = float(about["threshold_abs"]), float(about["threshold_rel"])
        subjects = int(about["n_subjects"])
    except (KeyError, TypeError, ValueError):  # a writer that does not say its threshold
        return (
            f"{head}: too few subjects with a finite value there, or a design that cannot be fitted"
        )
    threshold = max(lthr_abs, lthr_rel * subjects)
    rule = threshold_rule(lthr_abs, lthr_rel, subjects)
    if subjects <= threshold:
        return (
            f"{head}. {rule[0].upper()}{rule[1:]}, and there are only {subjects}: "
            f"lower the threshold ({THRESHOLD_OPTIONS}), e.g. --num-subj-lthr-abs "
            f"{max(0, subjects - 1)}"
        )
    below = _below_threshold(h5, about.get("scalar"), ~fitted, threshold)
    if below is None:
        return f"{head}: {rule} ({THRESHOLD_OPTIONS} set it), or the design cannot be fitted"
    other = missing - below
    reasons = []
    if below:
        reasons.append(
            f"{below:,} {'has' if below == 1 else 'have'} too few participants with a finite "
            f"value ({rule}; "
            f"{THRESHOLD_OPTIONS} set it)"
        )
    if other:
        reasons.append(
            f"{other:,} cannot be fitted with the subjects they have (a rank-deficient design, "
            "e.g. a factor level without values there, or a constant response)"
        )
    return f"{head}: {'; '.join(reasons)}"


def _were(count: int) -> str:
    return "was" if count == 1 else "were"


def _below_threshold(h5, scalar, unfitted: np.ndarray, threshold: float) -> int | None:
    """How many of the ``unfitted`` elements have no more than ``threshold`` subjects with a
    finite value (ModelArray counts every subject), read block by block; None if unknown."""
    if not scalar:
        return None
    try:
        values = read_scalar(h5, scalar).values
    except DataError:
        return None
    if values.shape[1] != unfitted.size:
        return None
    step = max(64, BLOCK_BYTES // max(1, values.dtype.itemsize * values.shape[0]))
    below = 0
    for start in range(0, unfitted.size, step):
        wanted = unfitted[start : start + step]
        if wanted.any():
            valid = np.isfinite(values[:, start : start + step]).sum(axis=0)
            below += int((wanted & (valid <= threshold)).sum())
    return below


def _names(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _few(noun: str, items: list[str]) -> str:
    quoted = [repr(str(item)) for item in items]
    return f"{noun} {quoted[0]} has" if len(items) == 1 else f"{noun}s {_names(quoted)} each have"
