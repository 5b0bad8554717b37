"""Permutation inference for fit-lm: family-wise error by the maximum statistic, and TFCE.

The conventions are PALM's (Winkler et al. 2014), so that its results are reproduced:

- Freedman-Lane: each coefficient (a column of the design, R's name) is tested by a t contrast
  with the other columns as nuisance; the residuals of the nuisance-only model are permuted and
  the full model is refitted. The Intercept is not tested: permutations cannot move a mean (PALM
  would need sign-flips for it).
- the permutations are those of PALM (``palm_shuffree``/``palm_shuftree``): rearrangements of
  the tested column, ties counted once; all of them (enumerated lexicographically, Knuth's
  algorithm L, the identity first) when there are at most the number asked for, otherwise the
  identity and distinct random ones. With exchangeability blocks (PALM ``-eb -whole``), whole
  blocks (a participant's sessions) move together, members matched by their order.
- two-sided: the statistic is |z|, z being t turned into a normal quantile with its own degrees
  of freedom (PALM's ``palm_gtoz``); the FWE p-value of an element is the share of permutations
  whose maximum over elements reaches the element's observed statistic. TFCE is computed on the
  |z| map (stats/tfce.py) and corrected the same way.

Elements are grouped by their pattern of missing subjects; each pattern is fitted with its own
design rows, and its permutations are the full permutations restricted to its subjects (their
relative order), so every element is exact and all share one permutation set. For one batch of
permutations and all elements of a pattern, the statistics come from one matrix product: with Q
an orthonormal basis of the nuisance, x the tested column orthogonal to it and u = y - Q Q'y,
permutation P gives a = (P x)'u, b = (P Q)'u and t = a / |x| / sqrt((|u|^2 - |b|^2 - a^2/|x|^2)
/ df); rows P x and P Q of all permutations of a batch are stacked against u.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from scipy import special
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from greyarray.errors import DataError, MissingInputError, OutputError, UsageError
from greyarray.io.fileio import replacing
from greyarray.io.h5read import Scalar
from greyarray.stats import tfce as tfce_module
from greyarray.stats.compiled import compiled
from greyarray.stats.linalg import column_norms
from greyarray.stats.results import perfect_fits

log = logging.getLogger(__name__)

BATCH = 256  # permutations per batch; fixed, so that shards and one run do the same arithmetic
TIE = 1e-10  # relative: statistics closer than this are equal (round-off, not data)
BLOCK_BYTES = 32 * 2**20  # per element block: the response, and the batch's products
READ_BYTES = 64 * 2**20  # per block read from the HDF5
SMALLEST_P = np.nextafter(0.0, 1.0)  # |z| stays finite (about 38.5) when p underflows
FORMAT = "greyarray-permutation-shard-1"


@dataclass(frozen=True)
class PermutationOptions:
    """What ``fit-lm --permutations`` asks for."""

    permutations: int
    tfce: bool = False
    connectivity: int = 6  # voxel neighbourhood of TFCE (PALM's -tfce_C; its default 6)
    blocks: str | None = None  # cohort column of exchangeability blocks (whole-block)
    seed: int = 0
    shard: tuple[int, int] | None = None  # (i, k): compute shard i of k (1-based) only
    merge: tuple[Path, ...] = ()  # shard files to merge
    nprocs: int = 1


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/K"`` -> (I, K), 1 <= I <= K."""
    try:
        i, k = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--permutation-shard {text!r}: expected I/K, e.g. 3/10") from None
    if not 1 <= i <= k:
        raise UsageError(f"--permutation-shard {text!r}: I must be between 1 and K")
    return i, k


def shard_path(h5_path: Path, analysis: str, shard: tuple[int, int] | None) -> Path | None:
    """Where shard I of K writes its null distribution: beside the HDF5."""
    if shard is None:
        return None
    i, k = shard
    return h5_path.with_name(f"{h5_path.stem}.{analysis}.perm-shard-{i}-of-{k}.npz")


# -- exchangeable units and permutation sets ------------------------------------------------


def exchangeable_units(phenotypes: pd.DataFrame, rows: np.ndarray, column: str | None, source):
    """(n_units, unit_size) design-row positions of the units that are permuted: every subject
    alone, or whole blocks (ordered by label; members in design order, matched by position)."""
    n = len(rows)
    if column is None:
        return np.arange(n)[:, None]
    if column not in phenotypes.columns:
        raise DataError(f"{source}: no column {column!r} for --exchangeability-blocks")
    labels = phenotypes[column].iloc[rows].reset_index(drop=True)
    if labels.isna().any():
        raise DataError(f"{source}: column {column!r} has missing values (every row needs a block)")
    codes, uniques = pd.factorize(labels, sort=True)
    sizes = np.bincount(codes)
    if (sizes != sizes[0]).any():
        small = int(np.argmin(sizes))
        raise DataError(
            f"{source}: whole-block permutation needs blocks of one size, but blocks of "
            f"{column!r} have {sorted(set(sizes.tolist()))} rows (e.g. {uniques[small]!r}: "
            f"{sizes[small]})"
        )
    order = np.lexsort((np.arange(n), codes))
    return order.reshape(len(uniques), int(sizes[0]))


def unit_signatures(column: np.ndarray, units: np.ndarray) -> np.ndarray:
    """Label of each unit: units whose (sorted) values of the tested column are equal are
    interchangeable, so a rearrangement that only swaps them is the same permutation."""
    _, labels = np.unique(column, return_inverse=True)
    members = np.sort(labels.ravel()[units], axis=1)
    _, signature = np.unique(members, axis=0, return_inverse=True)
    return signature.ravel().astype(np.int64)


@compiled
def _next_arrangements(keys, carry, out):
    """Fill ``out`` with the next rows of ``carry`` by Knuth's algorithm L on ``keys``
    (lexicographic order of the key sequence; equal keys are not rearranged among themselves).
    Returns the number of rows filled: fewer than asked when the last arrangement is passed."""
    n = keys.size
    for row in range(out.shape[0]):
        j = n - 2
        while j >= 0 and keys[j] >= keys[j + 1]:
            j -= 1
        if j < 0:
            return row
        m = n - 1
        while keys[j] >= keys[m]:
            m -= 1
        keys[j], keys[m] = keys[m], keys[j]
        carry[j], carry[m] = carry[m], carry[j]
        lo, hi = j + 1, n - 1
        while lo < hi:
            keys[lo], keys[hi] = keys[hi], keys[lo]
            carry[lo], carry[hi] = carry[hi], carry[lo]
            lo += 1
            hi -= 1
        out[row] = carry
    return out.shape[0]


@dataclass
class PermutationSet:
    """The permutations of one term, as unit maps: row ``pi`` pairs unit b's data with unit
    pi[b]'s design. Deterministic from (signature, requested, seed), so every shard makes the
    same set."""

    signature: np.ndarray
    requested: int
    seed: int
    possible: int = field(init=False)

    def __post_init__(self):
        counts = np.bincount(self.signature)
        ties = math.prod(math.factorial(int(c)) for c in counts)
        self.possible = math.factorial(self.signature.size) // ties

    @property
    def exhaustive(self) -> bool:
        return self.possible <= self.requested

    @property
    def size(self) -> int:
        return self.possible if self.exhaustive else self.requested

    @property
    def n_batches(self) -> int:
        return -(-self.size // BATCH)

    def batches(self, start: int, stop: int) -> Iterator[np.ndarray]:
        """Batches ``start`` to ``stop - 1``, each (<= BATCH, n_units) int64."""
        make = self._enumerate() if self.exhaustive else self._draw()
        for index, batch in enumerate(make):
            if index >= stop:
                return
            if index >= start:
                yield batch

    def _enumerate(self) -> Iterator[np.ndarray]:
        """PALM's exhaustive order: arrangements of the units sorted by signature, relabelled
        so that the first is the identity."""
        first = np.lexsort((np.arange(self.signature.size), self.signature))
        position = np.argsort(first)
        keys, carry = self.signature[first].copy(), first.copy()
        yield np.concatenate([first[None], self._arrangements(keys, carry, BATCH - 1)])[:, position]
        while True:
            batch = self._arrangements(keys, carry, BATCH)
            if not len(batch):
                return
            yield batch[:, position]

    @staticmethod
    def _arrangements(keys, carry, count) -> np.ndarray:
        out = np.empty((count, carry.size), dtype=np.int64)
        return out[: _next_arrangements(keys, carry, out)]

    def _draw(self) -> Iterator[np.ndarray]:
        """The identity, then distinct random rearrangements (distinct as PALM counts them: in
        the tested column's values)."""
        rng = np.random.default_rng(self.seed)
        n = self.signature.size
        seen = {_digest(self.signature)}
        batch = [np.arange(n)]
        for _ in range(self.size - 1):
            while True:
                pi = rng.permutation(n)
                key = _digest(self.signature[pi])
                if key not in seen:
                    break
            seen.add(key)
            batch.append(pi)
            if len(batch) == BATCH:
                yield np.array(batch)
                batch = []
        if batch:
            yield np.array(batch)


def _digest(values: np.ndarray) -> bytes:
    return hashlib.blake2b(values.tobytes(), digest_size=16).digest()


# -- the data, grouped by pattern of missing subjects ---------------------------------------


@dataclass(frozen=True)
class Pattern:
    """Elements fitted with the same subjects. Only a bit mask of them is kept: scattered
    missing values can make one pattern per element, and rows are derived when needed."""

    mask: np.ndarray  # packed bits: the design rows used
    n_rows: int
    elements: np.ndarray  # element indices
    start: int = 0  # the pattern's elements are columns start, start + 1, ... of the data

    @property
    def rows(self) -> np.ndarray:
        return np.flatnonzero(np.unpackbits(self.mask, count=self.n_rows))


@dataclass(frozen=True)
class Problem:
    """The response at the design's subjects and everything the permutations need."""

    values: np.ndarray  # (n_design_rows, n_fitted_elements), stored dtype, by pattern
    design: np.ndarray  # (n_design_rows, p)
    columns: list[str]
    units: np.ndarray  # (n_units, unit_size)
    patterns: list[Pattern]
    n_elements: int
    fingerprint: str


def load_problem(
    values: h5py.Dataset,
    design,
    units: np.ndarray,
    threshold: float,
    settings: dict,
) -> Problem:
    """Read the response, group the fitted elements by pattern of missing subjects and check
    each pattern's design (ModelArray's threshold, full rank as R's lm). Two passes over the
    HDF5: the patterns, then the values with each pattern's elements side by side (so that a
    block of them is a slice), in the memory of one copy."""
    n_subjects, n_elements = values.shape
    digest = hashlib.sha256()
    step = max(64, READ_BYTES // (values.dtype.itemsize * n_subjects))
    keys = []
    for start in range(0, n_elements, step):
        block = values[:, start : start + step]
        digest.update(np.ascontiguousarray(block))
        finite = np.isfinite(block)
        used = finite[design.rows]
        used &= (finite.sum(axis=0) > threshold)[None]  # ModelArray counts all subjects
        keys.append(np.packbits(_kept_rows(used, units), axis=0).T)
    patterns = _group(np.concatenate(keys), design)
    column = np.full(n_elements, -1)
    for pattern in patterns:
        column[pattern.elements] = pattern.start + np.arange(pattern.elements.size)
    data = np.empty((len(design.rows), int((column >= 0).sum())), dtype=values.dtype)
    every_row = len(design.rows) == n_subjects
    for start in range(0, n_elements, step):
        block = values[:, start : start + step]
        block = block if every_row else block[design.rows]
        target = column[start : start + step]
        if (np.diff(target) == 1).all() and target[0] >= 0:  # no missing values: a slice
            data[:, target[0] : target[-1] + 1] = block
        else:
            data[:, target[target >= 0]] = block[:, target >= 0]
    for name, value in settings.items():
        digest.update(f"{name}={value!r};".encode())
    digest.update(np.ascontiguousarray(design.matrix).tobytes())
    digest.update(np.ascontiguousarray(units).tobytes())
    return Problem(
        data, design.matrix, design.columns, units, patterns, n_elements, digest.hexdigest()
    )


def _kept_rows(used: np.ndarray, units: np.ndarray) -> np.ndarray:
    """(rows, elements) subjects an element is fitted with: used ones whose whole unit is."""
    if units.shape[1] == 1:
        return used
    whole = used[units].all(axis=1)  # (n_units, elements)
    kept = np.zeros_like(used)
    kept[units.ravel()] = np.repeat(whole, units.shape[1], axis=0)
    return kept


def _group(keys: np.ndarray, design) -> list[Pattern]:
    """Patterns from each element's packed mask of rows (full-rank designs only)."""
    n_rows, p = design.matrix.shape
    codes: dict[bytes, int] = {}  # a dict: np.unique(axis=0) sorts 91k rows in seconds
    inverse = np.array([codes.setdefault(key.tobytes(), len(codes)) for key in keys])
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
    patterns = []
    start = 0
    for key, elements in zip(codes, members, strict=True):
        pattern = Pattern(np.frombuffer(key, np.uint8), n_rows, elements, start)
        rows = pattern.rows
        if rows.size > p and _full_rank(design.matrix[rows]):
            patterns.append(pattern)
            start += elements.size
    return patterns


def _full_rank(x: np.ndarray) -> bool:
    """R's lm criterion (QR pivots above 1e-7 of the column norms), as fit-lm uses."""
    r = np.linalg.qr(x, mode="r")
    return bool((np.abs(np.diagonal(r)) > 1e-7 * column_norms(x)).all())


# -- statistics of one batch ----------------------------------------------------------------


@dataclass(frozen=True)
class Basis:
    """One term's Freedman-Lane pieces on one pattern: its rows, its units (numbered among
    those kept, -1 if dropped; members as positions within the rows), x (the tested column
    orthogonal to the nuisance) and Q (orthonormal nuisance). The first ``fixed`` columns of Q
    span nuisance columns that no permutation moves (the intercept; with whole blocks, also
    columns that depend only on the position in the block): P Q = Q there and Q'u = 0, so
    their products are known to be 0 and are not computed (half the work for 'y ~ age').
    Derived again for each batch, so that many small patterns do not fill the memory."""

    rows: np.ndarray  # (m,)
    local: np.ndarray  # (n_units,)
    unit_rows: np.ndarray  # (kept units, unit size)
    x: np.ndarray  # (m,)
    q: np.ndarray  # (m, k)
    fixed: int


def basis(problem: Problem, pattern: Pattern, term: int) -> Basis:
    rows = pattern.rows
    kept = np.isin(problem.units[:, 0], rows)
    position = np.empty(pattern.n_rows, dtype=np.int64)
    position[rows] = np.arange(rows.size)
    unit_rows = position[problem.units[kept]]
    design = problem.design[rows]
    nuisance = np.delete(design, term, axis=1)
    by_position = nuisance[unit_rows]  # (units, unit size, k)
    fixed = (by_position == by_position[:1]).all(axis=(0, 1))
    q = np.linalg.qr(np.concatenate([nuisance[:, fixed], nuisance[:, ~fixed]], axis=1))[0]
    x = design[:, term] - q @ (q.T @ design[:, term])
    local = np.where(kept, np.cumsum(kept) - 1, -1)
    return Basis(rows, local, unit_rows, x, q, int(fixed.sum()))


@dataclass(frozen=True)
class PatternFit:
    """Per element of a pattern: Q'y and |u|^2 (u = y - QQ'y), for one term; and which
    elements the full model fits exactly (results.perfect_fits: never tested, never counted in
    a maximum, as fit-lm writes no statistic there)."""

    pattern: Pattern
    term: int
    df: int
    projection: np.ndarray  # (k, n_elements of the pattern)
    residual_ss: np.ndarray  # (n_elements of the pattern,)
    block: int  # elements per block of products
    exact: np.ndarray  # (n_elements of the pattern,) bool


def fit_term(problem: Problem, term: int) -> list[PatternFit]:
    fits = []
    for pattern in problem.patterns:
        base = basis(problem, pattern, term)
        m, k = base.q.shape
        block = _block_size(m, 1 + k - base.fixed)
        projection = np.empty((k, pattern.elements.size))
        residual_ss = np.empty(pattern.elements.size)
        exact = np.empty(pattern.elements.size, bool)
        xx = base.x @ base.x
        for start in range(0, pattern.elements.size, block):
            part = slice(start, start + block)
            y = _response(problem, pattern, base.rows, part)
            projection[:, part] = base.q.T @ y
            u = y - base.q @ projection[:, part]
            residual_ss[part] = (u**2).sum(axis=0)
            full_rss = residual_ss[part] - (base.x @ u) ** 2 / xx  # the full model's
            exact[part] = perfect_fits(full_rss, (y**2).sum(axis=0))
        df = m - problem.design.shape[1]
        fits.append(PatternFit(pattern, term, df, projection, residual_ss, block, exact))
    return fits


def _block_size(m: int, p: int) -> int:
    return max(256, min(BLOCK_BYTES // (8 * BATCH * p), BLOCK_BYTES // (8 * m)))


def _response(problem: Problem, pattern: Pattern, rows: np.ndarray, part: slice) -> np.ndarray:
    """The response of elements ``part`` of the pattern, at its rows, in float64."""
    start = pattern.start + part.start
    block = problem.values[:, start : pattern.start + min(part.stop, pattern.elements.size)]
    if rows.size < problem.values.shape[0]:
        block = block[rows]
    return block.astype(np.float64)


def t_blocks(problem: Problem, fits: list[PatternFit], perms: np.ndarray) -> Iterator[tuple]:
    """(fit, element indices, |t| of shape (n_perms, n_elements)) for each block of elements of
    each pattern: one matrix product per block for the whole batch of permutations."""
    for fit in fits:
        base = basis(problem, fit.pattern, fit.term)
        moved = np.column_stack([base.x, base.q[:, base.fixed :]])  # (m, p): x, Q that moves
        m, p = moved.shape
        index = np.empty((len(perms), m), dtype=np.int64)
        _restricted_index(perms, base.local, base.unit_rows, index)
        rows = np.swapaxes(moved[index], 1, 2).reshape(-1, m)  # (B p, m)
        xx = base.x @ base.x
        elements = fit.pattern.elements
        for start in range(0, elements.size, fit.block):
            part = slice(start, start + fit.block)
            y = _response(problem, fit.pattern, base.rows, part)
            u = y - base.q @ fit.projection[:, part]
            products = (rows @ u).reshape(len(perms), p, -1)
            a = products[:, 0]
            rss = fit.residual_ss[part] - (products[:, 1:] ** 2).sum(axis=1) - a**2 / xx
            with np.errstate(divide="ignore", invalid="ignore"):
                t = np.abs(a) / np.sqrt(xx * np.maximum(rss, 0) / fit.df)
            t[:, fit.exact[part]] = np.nan
            yield fit, elements[part], np.where(np.isfinite(t), t, np.nan)


def batch_t(problem: Problem, fits: list[PatternFit], perms: np.ndarray) -> np.ndarray:
    """|t| maps of a batch: (n_perms, n_elements), NaN where not fitted."""
    out = np.full((len(perms), problem.n_elements), np.nan)
    for _, elements, t in t_blocks(problem, fits, perms):
        out[:, elements] = t
    return out


@compiled
def _restricted_index(perms, local, unit_rows, out):
    """out[b, r]: the design row paired with data row r by permutation b, restricted to the
    pattern's units: units missing from it are dropped, the others keep their relative order
    (a uniform permutation stays uniform). The i-th kept unit met in perms[b] (number
    ``local[unit]`` among the kept) is paired with kept unit i; members match by position."""
    for b in range(perms.shape[0]):
        i = 0
        for j in range(perms.shape[1]):
            target = local[perms[b, j]]
            if target >= 0:
                for k in range(unit_rows.shape[1]):
                    out[b, unit_rows[i, k]] = unit_rows[target, k]
                i += 1


def to_z(t: np.ndarray, df: np.ndarray | float) -> np.ndarray:
    """|z| of |t| (the normal quantile with the same tail probability, as PALM's palm_gtoz)."""
    return -special.ndtri(np.maximum(special.stdtr(df, -t), SMALLEST_P))


# -- null distributions and p-values --------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One tested column: its fits, permutation set and per-element degrees of freedom."""

    name: str
    fits: list[PatternFit]
    permutations: PermutationSet
    df: np.ndarray  # (n_elements,) NaN where not fitted

    def scores(self, t: np.ndarray) -> np.ndarray:
        """|z| of |t| maps, each element with its degrees of freedom."""
        return to_z(t, self.df)


def tested_terms(problem: Problem, options: PermutationOptions) -> list[Term]:
    terms = []
    for index, name in enumerate(problem.columns):
        if name == "Intercept":
            continue
        fits = fit_term(problem, index)
        df = np.full(problem.n_elements, np.nan)
        for fit in fits:
            df[fit.pattern.elements] = fit.df
        signature = unit_signatures(problem.design[:, index], problem.units)
        terms.append(
            Term(name, fits, PermutationSet(signature, options.permutations, options.seed), df)
        )
    return terms


class Engine:
    """Runs batches of one term on ``nprocs`` threads (BLAS held to one thread each)."""

    def __init__(self, problem: Problem, graph, nprocs: int):
        self.problem, self.graph, self.nprocs = problem, graph, nprocs

    def batch(self, term: Term, perms: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(max |z|, max TFCE or None) of each permutation of the batch. The max |z| is the
        z of the max |t| among elements with the same degrees of freedom (z is monotone)."""
        maps = None if self.graph is None else np.full((len(perms), term.df.size), np.nan)
        best: dict[int, np.ndarray] = {}
        for fit, elements, t in t_blocks(self.problem, term.fits, perms):
            top = np.fmax.reduce(t, axis=1)
            best[fit.df] = np.fmax(best[fit.df], top) if fit.df in best else top
            if maps is not None:
                maps[:, elements] = t
        maxima = np.full(len(perms), np.nan)
        for df, top in best.items():
            maxima = np.fmax(maxima, to_z(top, df))
        if maps is None:
            return maxima, None
        scores = [tfce_module.tfce(to_z(t, term.df), self.graph).max() for t in maps]
        return maxima, np.array(scores)

    def observed(self, term: Term) -> tuple[np.ndarray, np.ndarray | None]:
        """|z| and TFCE maps of the identity, computed in batch 0 as the null distribution's
        first permutation is (the same arithmetic, bit for bit)."""
        with threadpool_limits(limits=1, user_api="blas"):  # as in ``null``
            t = batch_t(self.problem, term.fits, next(term.permutations.batches(0, 1)))[0]
        z = term.scores(t)
        if self.graph is None:
            return z, None
        scores = tfce_module.tfce(z, self.graph)
        scores[np.isnan(z)] = np.nan
        return z, scores

    def null(self, term: Term, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Maxima of batches ``start`` to ``stop - 1`` of the term's permutations."""
        batches = term.permutations.batches(start, stop)
        progress = tqdm(
            total=stop - start,
            desc=f"Permutations {term.name}",
            unit="batch",
            disable=None,
            leave=False,
        )
        results = []
        with threadpool_limits(limits=1, user_api="blas"):  # parallel batches, not threads
            for result in _ordered_map(lambda perms: self.batch(term, perms), batches, self.nprocs):
                results.append(result)
                progress.update()
        progress.close()
        maxima = np.concatenate([r[0] for r in results]) if results else np.empty(0)
        if self.graph is None:
            return maxima, None
        return maxima, np.concatenate([r[1] for r in results]) if results else np.empty(0)


def _ordered_map(function: Callable, items: Iterable, workers: int) -> Iterator:
    """``map`` on ``workers`` threads, in order, with at most 2 x workers items in flight."""
    if workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def fwe_p(observed: np.ndarray, maxima: np.ndarray) -> np.ndarray:
    """Share of permutations whose maximum reaches each observed statistic (NaN stays NaN)."""
    ordered = np.sort(maxima[~np.isnan(maxima)])
    counts = ordered.size - np.searchsorted(ordered, observed * (1 - TIE), side="left")
    return np.where(np.isnan(observed), np.nan, counts / maxima.size)


# -- what fit-lm calls ----------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """A permutation analysis ready to run: the data, the tested terms, the engine."""

    problem: Problem
    terms: list[Term]
    engine: Engine


def prepare(
    h5: h5py.File, stored: Scalar, phenotypes, design, options, threshold: float, source
) -> Prepared:
    """Check the options against the data (TFCE geometry, blocks) and read the response
    (``stored``: the scalar as io.h5read.read_scalar checked it)."""
    graph = tfce_module.element_graph(h5, options.connectivity) if options.tfce else None
    scalar, values = stored.name, stored.values
    if graph is not None and graph.size != values.shape[1]:
        raise DataError(
            f"{h5.filename}: the stored geometry has {graph.size} elements but "
            f"scalars/{scalar} has {values.shape[1]} elements"
        )
    units = exchangeable_units(phenotypes, design.rows, options.blocks, source)
    if not [c for c in design.columns if c != "Intercept"]:
        raise UsageError("--permutations: the model has no term but the Intercept to test")
    settings = {
        "format": FORMAT,
        "scalar": scalar,
        "columns": design.columns,
        "blocks": options.blocks,
        "permutations": options.permutations,
        "seed": options.seed,
        "tfce": options.tfce,
        **({"connectivity": options.connectivity} if options.tfce else {}),
        "threshold": threshold,
        "batch": BATCH,
    }
    problem = load_problem(values, design, units, threshold, settings)
    terms = tested_terms(problem, options)
    for term in terms:
        perms = term.permutations
        possible = perms.possible
        log.info(
            "%s: %d %s permutations of %s possible%s",
            term.name,
            perms.size,
            "(all)" if perms.exhaustive else "random",
            possible if possible < 10**15 else f"about 10^{math.log10(possible):.0f}",
            f" (whole blocks of {options.blocks})" if options.blocks else "",
        )
    return Prepared(problem, terms, Engine(problem, graph, options.nprocs))


def permutation_columns(prepared: Prepared, merge: Iterable[Path] = ()) -> tuple[list, np.ndarray]:
    """The permutation result columns (names, (n_columns, n_elements)): per tested term
    ``<term>.p.value.fwe`` and, with TFCE, ``<term>.tfce`` and ``<term>.tfce.p.value.fwe``;
    from all permutations, or from the shard files ``merge``."""
    terms, engine = prepared.terms, prepared.engine
    if merge:
        nulls = read_shards(merge, prepared.problem, terms)
    else:
        nulls = [engine.null(term, 0, term.permutations.n_batches) for term in terms]
    names, rows = [], []
    for term, (maxima, tfce_maxima) in zip(terms, nulls, strict=True):
        z, scores = engine.observed(term)
        names.append(f"{term.name}.p.value.fwe")
        rows.append(fwe_p(z, maxima))
        if scores is not None:
            names += [f"{term.name}.tfce", f"{term.name}.tfce.p.value.fwe"]
            rows += [scores, fwe_p(scores, tfce_maxima)]
    return names, np.vstack(rows)


def write_shard(prepared: Prepared, shard: tuple[int, int], path: Path) -> Path:
    """Compute shard I of K of every term's permutations and save their maxima to ``path``."""
    i, k = shard
    arrays, described = {}, []
    for n, term in enumerate(prepared.terms):
        count = term.permutations.n_batches
        start, stop = (i - 1) * count // k, i * count // k
        maxima, tfce_maxima = prepared.engine.null(term, start, stop)
        arrays[f"maxima_{n}"] = maxima
        if tfce_maxima is not None:
            arrays[f"tfce_maxima_{n}"] = tfce_maxima
        described.append(
            {"term": term.name, "batches": [start, stop], "permutations": term.permutations.size}
        )
    meta = {
        "format": FORMAT,
        "fingerprint": prepared.problem.fingerprint,
        "shard": [i, k],
        "terms": described,
    }
    try:
        with replacing(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, meta=np.array(json.dumps(meta)), **arrays)
    except OSError as err:
        raise OutputError(f"{path}: cannot write the shard ({err.strerror})") from None
    return path


def read_shards(files, problem: Problem, terms: list[Term]) -> list[tuple]:
    """Each term's null maxima from K shard files made with the same data and options."""
    shards: dict[int, tuple] = {}
    counts = set()
    for path in files:
        try:
            with np.load(path) as npz:
                meta = json.loads(str(npz["meta"]))
                arrays = {name: npz[name] for name in npz.files if name != "meta"}
        except FileNotFoundError:
            raise MissingInputError(f"{path}: permutation shard not found") from None
        except (OSError, ValueError, KeyError):
            raise DataError(f"{path}: not a greyarray permutation shard (.npz)") from None
        if meta.get("format") != FORMAT:
            raise DataError(f"{path}: not a greyarray permutation shard ({FORMAT})")
        if meta["fingerprint"] != problem.fingerprint:
            raise DataError(
                f"{path}: made from other data or options (HDF5 values, cohort, formula, "
                "--permutations, --seed, --tfce and --exchangeability-blocks must be the same)"
            )
        i, k = meta["shard"]
        if i in shards:
            raise DataError(f"{path}: shard {i} of {k} is also {shards[i][0]}")
        shards[i] = (path, arrays)
        counts.add(k)
    (k,) = counts if len(counts) == 1 else (None,)
    if k is None:
        raise DataError(f"shard files from different splits (of {sorted(counts)}) cannot be merged")
    missing = sorted(set(range(1, k + 1)) - set(shards))
    if missing:
        raise DataError(f"shard(s) {missing} of {k} missing from --merge-shards")
    nulls = []
    for n, term in enumerate(terms):
        parts = [shards[i][1] for i in range(1, k + 1)]
        maxima = np.concatenate([part[f"maxima_{n}"] for part in parts])
        tfce_maxima = (
            np.concatenate([part[f"tfce_maxima_{n}"] for part in parts])
            if f"tfce_maxima_{n}" in parts[0]
            else None
        )
        if maxima.size != term.permutations.size:
            raise DataError(
                f"the shards hold {maxima.size} permutations of {term.name}, not "
                f"{term.permutations.size}"
            )
        nulls.append((maxima, tfce_maxima))
    return nulls
