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
# An element whose residuals are below this share of its response (|r| <= 1e-10 |y|) is fitted
# exactly: what is left is rounding (1e-16 |y| per value: ~1e-13 at 40,000 subjects), far below
# anything float32 data can hold (a one-ulp difference in one subject is 6e-8 / sqrt(n) of |y|).
PERFECT_FIT = 1e-10


def perfect_fits(rss: np.ndarray, response_ss: np.ndarray) -> np.ndarray:
    """Which elements the model fits exactly (e.g. a constant response: coverage of 1 for every
    subject): residual sum of squares ``rss`` at most PERFECT_FIT^2 of the response's own sum
    of squares ``response_ss`` (uncentred; an all-zero response is fitted exactly). Their
    residual variance is zero up to rounding, so every test would divide rounding noise by
    rounding noise (R's lm computes t anyway and warns 'essentially perfect fit: summary may be
    unreliable'; lme4 stops): every model writes their estimates and nothing else
    (``blank_perfect_fits``)."""
    return rss <= PERFECT_FIT**2 * response_ss


def kept_at_perfect_fit(column: str) -> bool:
    """The columns an exact fit keeps: its estimates and counts."""
    return (
        column in ("element_id", "model.nobs")
        or column.endswith(".estimate")
        or column.startswith("model.ngroups.")
    )


def blank_perfect_fits(columns: list[str], table: np.ndarray, perfect: np.ndarray) -> None:
    """NaN at the elements fitted exactly (``perfect``, see ``perfect_fits``) in every column
    but their estimates and counts; then each ``<x>.p.value.fdr`` column is the FDR of its
    ``<x>.p.value`` over the elements left (in place)."""
    if not perfect.any():
        return
    index = {name: i for i, name in enumerate(columns)}
    for i, name in enumerate(columns):
        if not kept_at_perfect_fit(name):
            table[i, perfect] = np.nan
    for name, i in index.items():
        if name.endswith(".p.value.fdr") and name[: -len(".fdr")] in index:
            table[i] = p_adjust_fdr(table[index[name[: -len(".fdr")]]])


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
    perfect: np.ndarray | None = None,
) -> list[str]:
    """results/<analysis>/results_matrix (columns x elements, float64) and column_names, as
    ModelArray's writeResults stores them, replacing an earlier one as a whole. ``about``
    (model, counts) is kept as the JSON attribute ``greyarray_about``, which R ignores.
    ``perfect``: the elements the model fits exactly (``perfect_fits``): only their estimates
    and counts are written (``blank_perfect_fits``), and a note says how many.

    The file is updated through ``updating_hdf5``: a crash at any moment leaves it as it was.
    What a user must know about the result (the model's own notes given in ``about["notes"]``,
    e.g. repeated sessions fitted as independent subjects; elements left unfitted and why,
    columns that are NaN everywhere, factor levels of one subject: ``result_notes``) is logged
    as warnings and recorded in ``about["notes"]``, where sidecars, summaries and reports read
    it. ``about`` keys read for it: ``scalar``, ``n_subjects``, ``threshold_abs``,
    ``threshold_rel``, ``single_subject_levels``, ``unfitted_reasons`` (the model's own reasons
    for elements it could not fit, with counts). Returns the notes."""
    about = dict(about or {})
    if perfect is not None and perfect.any():
        blank_perfect_fits(columns, table, perfect)
        about["perfect_fits"] = int(perfect.sum())
    with updating_hdf5(h5_path, table.nbytes + 2**20, f"results/{analysis}") as h5:
        if f"results/{analysis}" in h5 and not overwrite:  # written meanwhile by another run
            raise OutputError(f"{h5_path}: results/{analysis} exists; use --overwrite")
        notes = list(about.get("notes") or []) + result_notes(
            h5, analysis, columns, table, about, perfect
        )
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
    h5: h5py.File,
    analysis: str,
    columns: list[str],
    table: np.ndarray,
    about: dict,
    perfect: np.ndarray | None = None,
) -> list[str]:
    """One line for each thing about a result that must not go unsaid: elements left unfitted
    (how many, and why: ModelArray's threshold with its numbers and the option that changes
    it, or a design that cannot be fitted there), elements fitted exactly (``perfect``: only
    their estimates written), result columns that are NaN at every other fitted element,
    factor levels that a single subject has. Every model's writer calls this."""
    stats = [i for i, name in enumerate(columns) if name != "element_id"]
    notes = []
    exact = np.zeros(table.shape[1], bool) if perfect is None else perfect
    if stats and table.shape[1]:
        finite = np.isfinite(table[stats])
        fitted = finite.any(axis=0) | exact
        if not fitted.all():
            notes.append(_unfitted(h5, analysis, fitted, about))
        if exact.any():
            notes.append(_exact(analysis, int(exact.sum()), table.shape[1]))
        tested = fitted & ~exact
        if tested.any():
            rows = zip(stats, finite[:, tested], strict=True)
            empty = [columns[i] for i, row in rows if not row.any()]
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


def _exact(analysis: str, count: int, n: int) -> str:
    return (
        f"{count:,} of {n:,} elements {'is' if count == 1 else 'are'} fitted exactly (a "
        "constant response, e.g. coverage of 1 for every subject, or one the model reproduces "
        f"to rounding: residuals below {PERFECT_FIT:g} of the response): results/{analysis} "
        "holds their estimates only; standard errors, statistics and p-values are NaN there, "
        "as nothing is left to test (R's lm would divide rounding noise by rounding noise and "
        "warn 'essentially perfect fit'; lme4 stops)"
    )


def _unfitted(h5: h5py.File, analysis: str, fitted: np.ndarray, about: dict) -> str:
    """How many elements are NaN, and why."""
    n, missing = fitted.size, int((~fitted).sum())
    head = (
        f"No element was fitted: results/{analysis} holds only NaN"
        if missing == n
        else f"{missing:,} of {n:,} elements {_were(missing)} not fitted "
        f"(NaN in results/{analysis})"
    )
    reasons = {str(k): int(v) for k, v in (about.get("unfitted_reasons") or {}).items() if v}
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
    parts = []
    if below:
        parts.append(
            f"{below:,} {'has' if below == 1 else 'have'} too few participants with a finite "
            f"value ({rule}; "
            f"{THRESHOLD_OPTIONS} set it)"
        )
    if other:
        said = {reason: count for reason, count in reasons.items() if count <= other}
        if said and sum(said.values()) == other:
            parts += [f"{count:,} {reason}" for reason, count in said.items()]
        else:
            parts.append(
                f"{other:,} cannot be fitted with the subjects they have (a rank-deficient "
                "design, e.g. a factor level without values there)"
            )
    return f"{head}: {'; '.join(parts)}"


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
