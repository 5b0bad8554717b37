"""Cohort statistics streamed over ``scalars/<s>/values``, one block of elements at a time.

The HDF5 chunks hold all subjects for a run of elements, so reading whole chunks column-block by
column-block decompresses every chunk once and keeps memory bounded (``BLOCK_BYTES``) whatever
the cohort size. Per element, a block has every subject: valid counts, mean, SD and median are
exact per block. Per subject, the block's sums over elements are merged into running totals with
Chan et al.'s pairwise update of centred moments (no cancellation, unlike raw sums of squares);
the correlation of each subject with the median map needs only the block's part of that map, so
a single pass is enough. The carpet is a running mean over fixed bins of elements.
"""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np

BLOCK_BYTES = 32 * 2**20  # float32 values read per block
CARPET_BINS = 1000


@dataclass
class Moments:
    """Per-subject running count, means and centred (co)moments of (x, median map) pairs."""

    n: np.ndarray
    mean_x: np.ndarray
    mean_m: np.ndarray
    m2_x: np.ndarray
    m2_m: np.ndarray
    c_xm: np.ndarray

    @classmethod
    def zeros(cls, n_subjects: int) -> Moments:
        return cls(*(np.zeros(n_subjects) for _ in range(6)))

    @classmethod
    def of_block(cls, x: np.ndarray, finite: np.ndarray | None, median: np.ndarray) -> Moments:
        """Moments of one block: ``x`` (subjects, elements) float64, zero where not ``finite``
        (None: all finite). Sums are taken about a constant near the data (the block's median
        value), so the sums-of-squares shortcut loses no precision within a block; blocks are
        then merged exactly."""
        known = median[np.isfinite(median)]
        shift = float(np.median(known)) if known.size else 0.0
        m = np.nan_to_num(median - shift)  # zero where no subject has a value
        xs = x - shift
        if finite is None:
            n = np.full(x.shape[0], float(x.shape[1]))
            sum_m, sum_mm = np.full_like(n, m.sum()), np.full_like(n, m @ m)
        else:
            xs[~finite] = 0.0
            weights = finite.astype(np.float64)
            n, sum_m, sum_mm = weights.sum(axis=1), weights @ m, weights @ (m * m)
        sum_x, sum_xx, sum_xm = xs.sum(axis=1), np.einsum("ij,ij->i", xs, xs), xs @ m
        safe = np.maximum(n, 1)
        mean_x, mean_m = sum_x / safe, sum_m / safe
        return cls(
            n,
            mean_x + shift,
            mean_m + shift,
            sum_xx - sum_x * mean_x,
            sum_mm - sum_m * mean_m,
            sum_xm - sum_x * mean_m,
        )

    def merge(self, other: Moments) -> Moments:
        """Moments of the union of both element sets (Chan, Golub & LeVeque 1979)."""
        n = self.n + other.n
        safe = np.maximum(n, 1)
        dx, dm = other.mean_x - self.mean_x, other.mean_m - self.mean_m
        weight = self.n * other.n / safe
        return Moments(
            n,
            self.mean_x + dx * other.n / safe,
            self.mean_m + dm * other.n / safe,
            self.m2_x + other.m2_x + dx * dx * weight,
            self.m2_m + other.m2_m + dm * dm * weight,
            self.c_xm + other.c_xm + dx * dm * weight,
        )


@dataclass(frozen=True)
class CohortStats:
    """Everything the group report shows about one scalar, from one pass over its values."""

    valid: np.ndarray  # (elements,) number of subjects with a finite value
    mean: np.ndarray  # (elements,) over valid subjects; NaN without any
    sd: np.ndarray  # (elements,) sample SD (n - 1); NaN with fewer than 2
    median: np.ndarray  # (elements,) over valid subjects
    subject_mean: np.ndarray  # (subjects,) over the subject's finite elements
    subject_sd: np.ndarray  # (subjects,)
    nonfinite: np.ndarray  # (subjects,) count of non-finite elements
    correlation: np.ndarray  # (subjects,) Pearson r with the median map
    carpet: np.ndarray  # (subjects, bins) mean of each bin of elements (float32)
    carpet_edges: np.ndarray  # (bins + 1,) element index where each bin starts


def blocks(dset: h5py.Dataset, block_bytes: int = BLOCK_BYTES):
    """Yield (start, stop) column ranges: whole chunks, about ``block_bytes`` each."""
    n, g = dset.shape
    width = dset.chunks[1] if dset.chunks else 1
    step = width * max(1, block_bytes // (n * width * dset.dtype.itemsize))
    for start in range(0, g, step):
        yield start, min(start + step, g)


def block_median(x: np.ndarray, finite: np.ndarray | None, valid: np.ndarray) -> np.ndarray:
    """Median over subjects of each element's finite values (``x`` is (subjects, elements)).

    One partition puts the upper middle value in place and every smaller value before it (the
    lower middle value is their maximum); float32 stays float32 (half the memory traffic) and
    the two are averaged in float64: the exact median of the stored values."""
    n = x.shape[0]
    out = np.full(x.shape[1], np.nan)
    full = np.ones(x.shape[1], bool) if finite is None else valid == n
    if full.any():
        part = np.partition(x[:, full], n // 2, axis=0)
        upper = part[n // 2].astype(np.float64)
        lower = upper if n % 2 else part[: n // 2].max(axis=0)
        out[full] = (lower + upper) / 2
    partial = np.flatnonzero(~full & (valid > 0))
    if partial.size:  # non-finite values sort last as +inf; take the middle of the finite ones
        part = np.sort(np.where(finite[:, partial], x[:, partial], np.inf).T, axis=1)
        k, rows = valid[partial], np.arange(partial.size)
        out[partial] = (part[rows, (k - 1) // 2].astype(np.float64) + part[rows, k // 2]) / 2
    return out


def scan(dset: h5py.Dataset, bins: int = CARPET_BINS, block_bytes: int = BLOCK_BYTES):
    """One pass over a (subjects, elements) dataset: the cohort's statistics."""
    n, g = dset.shape
    edges = np.unique(np.linspace(0, g, min(bins, g) + 1).round().astype(np.int64))
    valid, mean, sd, median = (np.empty(g) for _ in range(4))
    carpet_sum = np.zeros((n, len(edges) - 1))
    carpet_n = np.zeros((n, len(edges) - 1))
    moments = Moments.zeros(n)
    for start, stop in blocks(dset, block_bytes):
        raw = dset[:, start:stop]
        finite = np.isfinite(raw)
        count = finite.sum(axis=0)
        if count.min() == n:
            finite = None  # the usual case: no masks needed
        block = slice(start, stop)
        x = raw.astype(np.float64)
        if finite is not None:
            x[~finite] = 0.0
        valid[block] = count
        mean[block], sd[block] = _mean_sd(x, finite, count)
        median[block] = block_median(raw, finite, count)
        moments = moments.merge(Moments.of_block(x, finite, median[block]))
        _add_to_carpet(carpet_sum, carpet_n, x, finite, edges, start, stop)
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = moments.c_xm / np.sqrt(moments.m2_x * moments.m2_m)
        subject_sd = np.sqrt(moments.m2_x / (moments.n - 1))
        carpet = (carpet_sum / carpet_n).astype(np.float32)
    return CohortStats(
        valid.astype(np.int64),
        mean,
        sd,
        median,
        np.where(moments.n > 0, moments.mean_x, np.nan),
        np.where(moments.n > 1, subject_sd, np.nan),
        g - moments.n.astype(np.int64),
        correlation,
        carpet,
        edges,
    )


def _mean_sd(x: np.ndarray, finite: np.ndarray | None, count: np.ndarray):
    """Per-element mean and sample SD over finite subjects (two-pass: exact)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = x.sum(axis=0) / count
        dev = x - mean
        if finite is not None:
            dev[~finite] = 0.0
        sd = np.sqrt(np.einsum("ij,ij->j", dev, dev) / (count - 1))
    sd[count < 2] = np.nan
    return mean, sd


def _add_to_carpet(total, count, x, finite, edges, start: int, stop: int) -> None:
    """Add the block's elements to the sums of the bins they fall in (bins are contiguous)."""
    first = np.searchsorted(edges, start, side="right") - 1
    last = np.searchsorted(edges, stop - 1, side="right") - 1
    cuts = np.clip(edges[first : last + 1], start, stop) - start
    total[:, first : last + 1] += np.add.reduceat(x, cuts, axis=1)
    if finite is None:
        count[:, first : last + 1] += np.diff(np.r_[cuts, stop - start])
    else:
        count[:, first : last + 1] += np.add.reduceat(finite, cuts, axis=1)
