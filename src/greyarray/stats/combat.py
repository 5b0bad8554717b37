"""ComBat harmonization at every element, as neuroCombat 0.2.12 computes it, streamed in stripes.

ComBat (Johnson et al. 2007; for imaging Fortin et al. 2017, 2018) removes batch (site, scanner)
effects in location and scale while keeping the covariates' effects. Per element v, with
subjects i in batches b and covariate columns X (GreyArray's formula language: factors with R's
treatment contrasts, no intercept: the batch columns hold it):

1. y_iv = sum_b B_bv [i in b] + X_i B_v + e_iv by least squares (one-hot batch columns; with a
   reference batch its column is all ones); the grand mean is sum_b (n_b / n) B_bv (or B_ref,v),
   the pooled variance the mean squared residual (over the reference batch's subjects only);
2. standardised data s_iv = (y_iv - grand_v - X_i B_v) / sqrt(var_v); per batch the location
   gamma_hat (batch mean of s; with a reference, the difference from the reference's) and the
   scale delta_hat (variance of s, ddof 1; 1 with --mean-only; a zero becomes 1);
3. empirical Bayes over elements: per batch, gamma_hat ~ N(gamma_bar, t2) and delta_hat ~
   InvGamma(a, b) by the method of moments; parametric posteriors by neuroCombat's ``it_sol``
   (all elements iterated together until the largest relative change is below 1e-4), or
   non-parametric ones (``int_eprior``: every other element's estimates weighted by the
   likelihood of this element's data), or none (--no-eb); with --mean-only the parametric
   posterior is neuroCombat's postmean(gamma_hat, gamma_bar, 1, 1, t2);
4. harmonised y*_iv = (s_iv - gamma*_bv) / sqrt(delta*_bv) sqrt(var_v) + grand_v + X_i B_v
   (the reference batch's data are returned unchanged).

Formula for formula neuroCombat's, but the data are read twice in stripes of elements: the first
pass keeps per element only the coefficients, grand mean, pooled variance and per batch the count,
mean and centred sum of squares of s (the empirical Bayes steps need nothing else); the second
pass standardises, adjusts and writes. Memory does not grow with the number of elements beyond
those few numbers per element, nor with subjects beyond one stripe.

A smooth term ``s(x)`` gives ComBat-GAM as neuroHarmonize 2.5.2 fits it (combat_gam.py).

Missing values (GreyArray's rules; neuroCombat has none): a subject without a batch or with a
missing covariate is not harmonised (its row is NaN) and left out of every estimate; a subject's
non-finite value at an element stays NaN and is left out of that element's estimates. A batch
with fewer subjects with a value at an element than ComBat needs (2; 1 with --mean-only) is left
out of that element: its subjects are NaN there, the other batches are harmonised, and the count
is reported per batch. A batch with fewer such subjects in the whole cohort is an error naming it.
Elements whose residual variance is zero (every subject the same value) are left as they are and
out of the priors (neuroCombat replaces their variance by a boolean median and shifts them).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from greyarray.errors import DataError, UsageError
from greyarray.stats.combat_gam import Spline, cross_validate, folds, penalty_grid
from greyarray.stats.compiled import compiled
from greyarray.stats.design import aliased_columns, build_design, r_sort_key
from greyarray.stats.linalg import column_norms

log = logging.getLogger(__name__)

BLOCK_BYTES = 32 * 2**20  # float64 values of one stripe of elements, all subjects
BATCH = 256  # elements with missing values solved together
CONVERGENCE = 1e-4  # neuroCombat's it_sol
HARMONISED, UNCHANGED, NOT_HARMONISED = 0, 1, 2  # element status
SHOWN = 10  # batches named in a message


@dataclass(frozen=True)
class Options:
    """ComBat's choices (neuroCombat's eb, parametric, mean_only, ref_batch); ``seed`` draws
    ComBat-GAM's cross-validation folds."""

    eb: bool = True
    parametric: bool = True
    mean_only: bool = False
    reference: str | None = None
    seed: int = 0

    @property
    def minimum(self) -> int:
        """Subjects a batch needs: a location needs 1, a variance 2."""
        return 1 if self.mean_only else 2

    def describe(self) -> str:
        """In words, e.g. 'parametric empirical Bayes, location and scale'."""
        if not self.eb:
            how = "no empirical Bayes (each element's own estimates)"
        else:
            how = f"{'parametric' if self.parametric else 'non-parametric'} empirical Bayes"
        what = "location only (--mean-only)" if self.mean_only else "location and scale"
        reference = f", reference batch {self.reference}" if self.reference is not None else ""
        return f"{how}, {what}{reference}"


def batch_label(value: object) -> str:
    """A batch value as text (a site read as 3.0 because of a missing value is '3')."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def covariate_terms(covariates: str | None) -> str:
    """The right-hand side as given (``age + sex``, ``~ age``); '' for none."""
    text = (covariates or "").strip()
    return text[1:].strip() if text.startswith("~") else text


# ---- the location model -------------------------------------------------------------------------
@dataclass
class Model:
    """What ComBat knows of the subjects (rows in HDF5 order): batch, covariate columns and
    smooth terms. The design is [batch one-hot (reference column all ones), covariates, splines]."""

    batch_column: str
    covariates: str  # the right-hand side, as given
    levels: list[str]
    batch: np.ndarray  # (n,) code of each subject's batch; -1: not harmonised
    reference: int | None
    linear: np.ndarray  # (n, q) covariate columns (rows of subjects not harmonised: 0)
    linear_names: list[str]
    splines: list[Spline] = field(default_factory=list)
    smooth_values: np.ndarray | None = None  # (n, n_smooths) the smoothed variables

    @property
    def n_batch(self) -> int:
        return len(self.levels)

    @property
    def used(self) -> np.ndarray:
        return self.batch >= 0

    @property
    def onehot(self) -> np.ndarray:
        """(n, batches) indicators (rows of subjects not harmonised: 0)."""
        out = np.zeros((len(self.batch), self.n_batch))
        out[np.flatnonzero(self.used), self.batch[self.used]] = 1
        return out

    @property
    def columns(self) -> list[str]:
        smooth = [name for spline in self.splines for name in spline.names]
        return [f"{self.batch_column}{level}" for level in self.levels] + [
            *self.linear_names,
            *smooth,
        ]

    def matrix(self) -> np.ndarray:
        """(n, p) the design: batch columns, covariates, spline bases."""
        batch = self.onehot
        if self.reference is not None:
            batch[self.used, self.reference] = 1
        parts = [batch, self.linear]
        for j, spline in enumerate(self.splines):
            basis = np.zeros((len(self.batch), spline.size))
            basis[self.used] = spline.basis(self.smooth_values[self.used, j])
            parts.append(basis)
        return np.hstack(parts)

    def about(self) -> dict:
        return {
            "batch_column": self.batch_column,
            "covariates": self.covariates,
            "levels": self.levels,
            "reference": None if self.reference is None else self.levels[self.reference],
            "columns": self.columns,
            "smooth": [s.variable for s in self.splines],
        }


def parse_covariates(covariates: str, response: str) -> tuple[str, list[str]]:
    """(parametric right-hand side, smoothed variables): ``age + s(bmi) + sex`` ->
    ('age + sex', ['bmi']). Smooths take no arguments: neuroHarmonize's basis is fixed."""
    import re

    from greyarray.stats.gam import parse_gam_formula

    rhs = covariate_terms(covariates)
    if not rhs:
        return "1", []
    formula = parse_gam_formula(f"{response} ~ {rhs}")
    smooths = []
    for smooth in formula.smooths:
        plain = smooth.kind == "s" and len(smooth.variables) == 1 and smooth.by is None
        if not plain or not re.fullmatch(r"s\(\s*[A-Za-z_.][\w.]*\s*\)", smooth.term):
            raise UsageError(
                f"--covariates {rhs!r}: {smooth.term!r}: write s(x) of one variable without "
                "arguments (ComBat-GAM uses neuroHarmonize's smooth: cubic B-splines, df 10, "
                "penalty chosen by 5-fold cross-validation)"
            )
        smooths.append(smooth.variables[0])
    return formula.parametric_rhs, smooths


def build_model(
    table: pd.DataFrame,
    batch_column: str,
    covariates: str | None,
    options: Options,
    response: str,
    where: str,
) -> Model:
    """The model of ``table`` (cohort rows in HDF5 order), refusing what ComBat cannot fit."""
    if batch_column not in table.columns:
        raise UsageError(
            f"{where}: no batch column {batch_column!r} (columns: {', '.join(table.columns)})"
        )
    rhs = covariate_terms(covariates)
    parametric, smooth = parse_covariates(rhs, response)
    design = build_design(f"{response} ~ {parametric}", table)
    keep = [j for j, name in enumerate(design.columns) if name != "Intercept"]
    linear = np.zeros((len(table), len(keep)))
    linear[design.rows] = design.matrix[:, keep]
    has = np.zeros(len(table), bool)
    has[design.rows] = True
    values = np.zeros((len(table), len(smooth)))
    for j, variable in enumerate(smooth):
        if variable not in table.columns:
            raise DataError(f"{where}: s({variable}): no column {variable!r}")
        column = pd.to_numeric(table[variable], errors="coerce")
        if column.isna().sum() > table[variable].isna().sum():
            raise DataError(f"{where}: s({variable}): column {variable!r} is not numeric")
        values[:, j] = column.to_numpy(float)
        has &= np.isfinite(values[:, j])
    labels = table[batch_column]
    has &= labels.notna().to_numpy()
    levels = _levels(labels[has])
    batch = np.full(len(table), -1)
    batch[has] = [levels.index(batch_label(v)) for v in labels[has]]
    _refuse_small(levels, batch, options, batch_column, where)
    reference = None
    if options.reference is not None:
        if options.reference not in levels:
            raise UsageError(
                f"--reference-batch {options.reference!r}: no such {batch_column} "
                f"(batches: {', '.join(levels)})"
            )
        reference = levels.index(options.reference)
    model = Model(
        batch_column,
        rhs,
        levels,
        batch,
        reference,
        linear,
        [design.columns[j] for j in keep],
        [Spline.fit(v, values[has, j]) for j, v in enumerate(smooth)],
        values if smooth else None,
    )
    x = model.matrix()[has]
    if aliased := aliased_columns(x, model.columns):
        raise DataError(
            f"{where}: covariate column(s) {', '.join(map(repr, aliased))} cannot be told from "
            f"the {batch_column} columns and the covariates before them (constant within each "
            f"{batch_column}, or a copy of another column): ComBat would remove or distort it; "
            "leave it out"
        )
    if (left := int((~has).sum())) > 0:
        log.warning(
            "%d of %d subjects have no %s or a missing covariate: they are not harmonised "
            "(their rows of the output are NaN)",
            left,
            len(table),
            batch_column,
        )
    return model


def _levels(labels: pd.Series) -> list[str]:
    """Batch levels: numbers in numeric order, text in R's order."""
    if pd.api.types.is_numeric_dtype(labels):
        return [batch_label(v) for v in sorted(labels.unique())]
    return sorted({batch_label(v) for v in labels}, key=r_sort_key)


def _refuse_small(levels, batch, options: Options, column: str, where: str) -> None:
    counts = np.bincount(batch[batch >= 0], minlength=len(levels))
    if len(levels) < 2:
        raise DataError(
            f"{where}: {column} has {len(levels)} batch(es) among the subjects with every "
            "covariate; ComBat needs 2 or more"
        )
    small = [f"{levels[b]!r} ({counts[b]})" for b in np.flatnonzero(counts < options.minimum)]
    if len(small) > SHOWN:  # e.g. a continuous column given as the batch: not every level
        raise DataError(
            f"{where}: {column} has {len(levels):,} levels, {len(small):,} of them with fewer "
            f"than {options.minimum} subjects with every covariate (e.g. {', '.join(small[:3])}):"
            " is it a site column? A batch needs that many to estimate its scale"
        )
    if small:
        raise DataError(
            f"{where}: {column} {', '.join(small)}: a batch needs {options.minimum} or more "
            "subjects with every covariate to estimate its scale (--mean-only needs 1), or "
            "leave it out of the cohort"
        )


# ---- pass 1: per element estimates -------------------------------------------------------------
class Estimates:
    """Everything ComBat keeps per element, filled stripe by stripe, then ``finish``ed."""

    def __init__(self, model: Model, n_elements: int, options: Options, nprocs: int = 1):
        b, p = model.n_batch, len(model.columns)
        self.model, self.options, self.nprocs = model, options, nprocs
        self.coef = np.full((p, n_elements), np.nan)
        self.grand_mean = np.full(n_elements, np.nan)
        self.var_pooled = np.full(n_elements, np.nan)
        self.count = np.zeros((b, n_elements), np.int32)  # subjects with a value, per batch
        self.mean = np.full((b, n_elements), np.nan)  # batch means of the standardised data
        self.m2 = np.full((b, n_elements), np.nan)  # centred sums of squares
        self.status = np.zeros(n_elements, np.int8)
        self.alpha = np.full((len(model.splines), n_elements), np.nan)
        self.x = model.matrix()
        self.used = model.used
        self.x_used = np.ascontiguousarray(self.x[self.used])
        self.batch_used = model.batch[self.used]
        self.onehot_used = np.ascontiguousarray(model.onehot[self.used])
        self.sizes = np.bincount(self.batch_used, minlength=b).astype(np.int32)
        self.qr = np.linalg.qr(self.x_used)
        self.rng = np.random.default_rng(options.seed)
        self.grid = (
            penalty_grid(model.splines, b + len(model.linear_names), p) if model.splines else None
        )
        self.gamma_hat = self.delta_hat = self.gamma_star = self.delta_star = None
        self.priors: dict[str, list[float]] = {}

    def add(self, start: int, values: np.ndarray) -> None:
        """Estimate the elements start, start+1, ... from ``values`` (n, width).

        Every moment ComBat needs comes from per-batch sums of the residuals r = y - X B: with
        part_b the fitted batch term, s = (part_b - grand + r) / sd, so the batch mean of s is
        (part_b - grand + mean_b(r)) / sd and its centred sum of squares sum_b (r - mean_b(r))^2
        / var; no standardised copy of the data is made. Linear models: one QR solve for the
        stripe and one compiled sweep over it; elements with a missing value (and ComBat-GAM)
        go through ``_add_general``."""
        y = values if self.used.all() else values[self.used]
        elements = np.arange(start, start + y.shape[1])
        if self.model.splines:
            self._add_general(elements, y)
            return
        q, r = self.qr
        with np.errstate(invalid="ignore", over="ignore"):  # Inf: solved again without it
            coef = np.linalg.solve(r, q.T @ y)
        sum_r, sum_r2, low, high, missing = _residual_sums(
            y, self.x_used, np.nan_to_num(coef), self.batch_used, self.model.n_batch
        )
        whole = ~missing
        count = np.repeat(self.sizes[:, None], whole.sum(), axis=1)
        self._store(
            elements[whole],
            coef[:, whole],
            count,
            np.zeros(whole.sum(), np.int8),
            sum_r[:, whole],
            sum_r2[:, whole],
            low[whole] == high[whole],
        )
        if missing.any():
            self._add_general(elements[missing], y[:, missing])

    def _add_general(self, elements: np.ndarray, y: np.ndarray) -> None:
        """Elements with missing values (each its own subjects; a batch with too few left out)
        and ComBat-GAM's per element fits."""
        ref = self.model.reference
        finite = np.isfinite(y)
        count = np.rint(self.onehot_used.T @ finite).astype(np.int32)
        present = count >= self.options.minimum
        status = np.zeros(y.shape[1], np.int8)
        if ref is not None:
            status[~present[ref]] = NOT_HARMONISED
        ok = finite & present[self.batch_used]
        complete = ok.all(axis=0)
        coef = np.full((self.x.shape[1], y.shape[1]), np.nan)
        if self.model.splines:
            self._fit_smooth(elements, y, ok, present, coef, status)
        else:
            self._fit_linear(y, ok, complete, present, coef, status)
        resid = np.where(ok, y - self.x_used @ np.nan_to_num(coef), 0)
        sum_r = self.onehot_used.T @ resid
        sum_r2 = self.onehot_used.T @ resid**2
        low = np.where(ok, y, np.inf).min(axis=0)
        constant = low == np.where(ok, y, -np.inf).max(axis=0)
        status[(ok.sum(axis=0) == 0) & (status == HARMONISED)] = NOT_HARMONISED
        self._store(elements, coef, count, status, sum_r, sum_r2, constant, present)

    def _store(self, elements, coef, count, status, sum_r, sum_r2, constant, present=None):
        """The per element estimates from the residual sums (see ``add``)."""
        b, ref = self.model.n_batch, self.model.reference
        if present is None:
            present = count >= self.options.minimum
        n_b = np.where(present, count, 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            if ref is None:
                n_ok = n_b.sum(axis=0)
                grand = (n_b * coef[:b]).sum(axis=0) / n_ok
                var = sum_r2.sum(axis=0) / n_ok
                part = coef[:b]
            else:
                grand = coef[ref]
                var = sum_r2[ref] / n_b[ref]
                part = coef[ref] + np.where(np.arange(b)[:, None] == ref, 0, coef[:b])
            mean_r = sum_r / n_b
            m2 = np.maximum(sum_r2 - n_b * mean_r**2, 0) / var
            mean = (part - grand + mean_r) / np.sqrt(var)
        status = status.copy()
        status[(constant | (var == 0)) & (status == HARMONISED)] = UNCHANGED
        good = status == HARMONISED
        keep = present & good
        self.count[:, elements] = count
        self.coef[:, elements] = coef
        self.grand_mean[elements] = np.where(good, grand, np.nan)
        self.var_pooled[elements] = np.where(good, var, np.nan)
        self.mean[:, elements] = np.where(keep, mean, np.nan)
        self.m2[:, elements] = np.where(keep, m2, np.nan)
        self.status[elements] = status

    def _fit_linear(self, y, ok, complete, present, coef, status) -> None:
        """Least squares: one QR for the elements whose subjects are all there, batches of
        QRs of the masked design for the others (a dropped batch's column pinned to 0)."""
        complete = complete & (status == HARMONISED)
        if complete.any():
            q, r = self.qr
            target = y if complete.all() else y[:, complete]
            coef[:, complete] = np.linalg.solve(r, q.T @ target)
        if ok is None:
            return
        partial = np.flatnonzero(~complete & (status == HARMONISED) & ok.any(axis=0))
        b, (n, p) = self.model.n_batch, self.x_used.shape
        step = max(1, min(BATCH, BLOCK_BYTES // (8 * (n + p) * p)))
        for i in range(0, partial.size, step):
            chunk = partial[i : i + step]
            mask = ok[:, chunk].T.astype(np.float64)  # (k, n)
            pinned = np.zeros((chunk.size, p, p))
            for j in range(b):
                if j != self.model.reference:
                    pinned[~present[j, chunk], j, j] = 1
            design = np.concatenate([self.x_used[None] * mask[..., None], pinned], axis=1)
            target = np.concatenate(
                [np.where(mask.T > 0, y[:, chunk], 0).T, np.zeros((chunk.size, p))], axis=1
            )
            q, r = np.linalg.qr(design)
            diag = np.abs(np.diagonal(r, axis1=1, axis2=2))
            full = (diag > 1e-7 * column_norms(design)).all(axis=1)
            status[chunk[~full]] = NOT_HARMONISED
            solved = np.linalg.solve(r[full], np.swapaxes(q[full], 1, 2) @ target[full][..., None])[
                ..., 0
            ]
            coef[:, chunk[full]] = solved.T

    def _fit_smooth(self, elements, y, ok, present, coef, status) -> None:
        """ComBat-GAM: per element, the penalty by cross-validation (folds drawn in element
        order from one generator, as neuroHarmonize draws them), then the penalised fit."""
        alphas, penalties = self.grid
        b, n_used = self.model.n_batch, self.x_used.shape[0]
        for e in range(y.shape[1]):
            rows = np.flatnonzero(ok[:, e])
            fold = folds(self.rng, rows.size, len(alphas))
            if status[e] != HARMONISED or rows.size == 0:
                continue
            keep = np.ones(self.x.shape[1], bool)
            keep[:b] = present[:, e] | (np.arange(b) == self.model.reference)
            if rows.size == n_used and keep.all():
                x, penalty = self.x_used, penalties
            else:
                x = np.ascontiguousarray(self.x_used[np.ix_(rows, np.flatnonzero(keep))])
                penalty = np.ascontiguousarray(penalties[:, keep][:, :, keep])
            try:
                chosen, solved = cross_validate(x, np.ascontiguousarray(y[rows, e]), fold, penalty)
            except np.linalg.LinAlgError:
                status[e] = NOT_HARMONISED
                continue
            coef[keep, e] = solved
            coef[~keep, e] = 0
            self.alpha[:, elements[e]] = alphas[chosen]

    # ---- empirical Bayes ------------------------------------------------------------------------
    def finish(self) -> None:
        """gamma_hat, delta_hat, the priors and gamma*, delta* for every batch."""
        options, ref = self.options, self.model.reference
        valid = np.isfinite(self.mean)
        gamma_hat = self.mean.copy()
        if ref is not None:  # the reference's column is all ones: others are differences
            others = np.arange(len(gamma_hat)) != ref
            gamma_hat[others] = self.mean[others] - self.mean[ref]
        if options.mean_only:
            delta_hat = np.where(valid, 1.0, np.nan)
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                delta_hat = self.m2 / (self.count - 1)
            delta_hat[delta_hat == 0] = 1  # neuroCombat's convert_zeroes
        gamma_star = np.full_like(gamma_hat, np.nan)
        delta_star = np.full_like(gamma_hat, np.nan)
        priors = {"gamma_bar": [], "t2": [], "a": [], "b": []}
        for k in range(len(self.model.levels)):
            on = np.flatnonzero(valid[k])
            g, d = gamma_hat[k, on], delta_hat[k, on]
            if options.eb and on.size < 2:
                raise DataError(
                    f"{self.model.batch_column} {self.model.levels[k]!r}: empirical Bayes "
                    f"needs 2 or more elements with estimates, there are {on.size}; use --no-eb"
                )
            gamma_bar, t2 = (g.mean(), g.var(ddof=1)) if on.size > 1 else (np.nan, np.nan)
            a = b = np.nan
            if not options.mean_only and on.size > 1:
                m, s2 = d.mean(), d.var(ddof=1)
                with np.errstate(divide="ignore", invalid="ignore"):
                    a, b = (2 * s2 + m**2) / s2, (m * s2 + m**3) / s2
            for name, value in zip(priors, (gamma_bar, t2, a, b), strict=True):
                priors[name].append(float(value))
            n, mean, m2 = self.count[k, on].astype(float), self.mean[k, on], self.m2[k, on]
            if not options.eb:
                gs, ds = g, d
            elif options.parametric and options.mean_only:
                gs, ds = _postmean(g, gamma_bar, 1, 1, t2), np.ones_like(g)
            elif options.parametric:
                gs, ds = _it_sol(n, mean, m2, g, d, gamma_bar, t2, a, b)
            else:
                gs, ds = _int_eprior(n, mean, m2, g, d, self.nprocs)
            gamma_star[k, on], delta_star[k, on] = gs, ds
        if ref is not None:
            gamma_star[ref] = np.where(valid[ref], 0, np.nan)
            delta_star[ref] = np.where(valid[ref], 1, np.nan)
        self.gamma_hat, self.delta_hat = gamma_hat, delta_hat
        self.gamma_star, self.delta_star, self.priors = gamma_star, delta_star, priors


def _postmean(g_hat, g_bar, n, d_star, t2):
    return (t2 * n * g_hat + d_star * g_bar) / (t2 * n + d_star)


def _it_sol(n, mean, m2, g_hat, d_hat, g_bar, t2, a, b):
    """neuroCombat's it_sol for one batch, every element at once: the sum of squares about the
    new gamma is m2 + n (mean - gamma)^2; the loop ends when the largest relative change of
    either is at most 1e-4 (a NaN change ends it, as neuroCombat's comparison does)."""
    g_old, d_old, change = g_hat, d_hat, 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        while change > CONVERGENCE:
            g_new = _postmean(g_hat, g_bar, n, d_old, t2)
            sum2 = m2 + n * (mean - g_new) ** 2
            d_new = (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)
            change = max(
                np.max(np.abs(g_new - g_old) / g_old), np.max(np.abs(d_new - d_old) / d_old)
            )
            g_old, d_old = g_new, d_new
    return g_new, d_new


def _int_eprior(n, mean, m2, g_hat, d_hat, nprocs: int = 1):
    """neuroCombat's int_eprior (non-parametric posteriors) for one batch: element i's
    posterior averages the other elements' (gamma_hat, delta_hat), weighted by the likelihood
    of its data under each (every pair of elements: quadratic in their number). Weights are taken
    in log space: neuroCombat's products underflow to 0/0 beyond a few hundred subjects per
    batch; where they do not, the values are the same."""
    from greyarray.io.threads import thread_pool

    arrays = [np.ascontiguousarray(a, dtype=np.float64) for a in (n, mean, m2, g_hat, d_hat)]
    gamma, delta = np.empty(g_hat.size), np.empty(g_hat.size)
    step = max(1, -(-g_hat.size // (8 * nprocs)))
    with thread_pool(nprocs) as pool:  # the kernel releases the GIL
        list(
            pool.map(
                lambda lo: _eprior_kernel(*arrays, lo, min(lo + step, g_hat.size), gamma, delta),
                range(0, g_hat.size, step),
            )
        )
    return gamma, delta


@compiled
def _eprior_kernel(n, mean, m2, g_hat, d_hat, lo, hi, gamma, delta):  # pragma: no cover
    log_d = np.log(2 * np.pi * d_hat)
    for i in range(lo, hi):
        top, total, g_sum, d_sum = -np.inf, 0.0, 0.0, 0.0
        for k in range(g_hat.size):
            if k == i:
                continue
            value = -0.5 * n[i] * log_d[k] - (m2[i] + n[i] * (mean[i] - g_hat[k]) ** 2) / (
                2 * d_hat[k]
            )
            if value > top:  # rescale what was summed to the new largest term
                scale = np.exp(top - value)
                total, g_sum, d_sum, top = total * scale, g_sum * scale, d_sum * scale, value
            w = np.exp(value - top)
            total += w
            g_sum += g_hat[k] * w
            d_sum += d_hat[k] * w
        gamma[i], delta[i] = g_sum / total, d_sum / total


@compiled
def _row_product(x, coef, i, out):  # pragma: no cover - compiled
    """out = x[i] @ coef (skipping zeros: one-hot and spline columns are mostly 0)."""
    out[:] = 0.0
    for c in range(x.shape[1]):
        xc = x[i, c]
        if xc != 0.0:
            for j in range(out.size):
                out[j] += xc * coef[c, j]


@compiled
def _residual_sums(y, x, coef, batch, n_batch):  # pragma: no cover - compiled
    """Per batch sums of the residuals y - x coef and of their squares, each column's least
    and largest value, and which columns hold a non-finite value (left to the general path)."""
    n, w = y.shape
    sum_r = np.zeros((n_batch, w))
    sum_r2 = np.zeros((n_batch, w))
    low = np.full(w, np.inf)
    high = np.full(w, -np.inf)
    missing = np.zeros(w, np.bool_)
    fitted = np.empty(w)
    for i in range(n):
        _row_product(x, coef, i, fitted)
        b = batch[i]
        for j in range(w):
            v = y[i, j]
            if not np.isfinite(v):
                missing[j] = True
                continue
            r = v - fitted[j]
            sum_r[b, j] += r
            sum_r2[b, j] += r * r
            low[j] = min(low[j], v)
            high[j] = max(high[j], v)
    return sum_r, sum_r2, low, high, missing


@compiled
def _adjust_kernel(
    y, cov, coef, a, k, batch, ref, mode, out, sums, counts, subject_sums, subject_counts
):  # pragma: no cover - compiled
    """out = mod + a_b (y - mod) + k_b per subject and element (mode 1: copied, 2: NaN; the
    reference batch and subjects not harmonised as Adjuster says), and the report's sums.
    Each row is one branch-free loop (vectorised), then its few exceptions."""
    n, w = y.shape
    mod = np.empty(w)
    special = np.flatnonzero(mode != 0)
    for i in range(n):
        b = batch[i]
        row, result = y[i], out[i]
        if b < 0:
            result[:] = np.nan
        elif b == ref:
            for j in range(w):
                result[j] = row[j] if k[b, j] == k[b, j] and row[j] - row[j] == 0 else np.nan
        else:
            _row_product(cov, coef, i, mod)
            scale, shift = a[b], k[b]
            for j in range(w):  # + (y - y): 0, or NaN where y is not finite (Inf: missing)
                result[j] = mod[j] + scale[j] * (row[j] - mod[j]) + shift[j] + (row[j] - row[j])
        for j in special:
            result[j] = row[j] if mode[j] == 1 and b >= 0 and row[j] - row[j] == 0 else np.nan
        for side in range(2):
            values = row if side == 0 else result
            total, count = 0.0, 0
            for j in range(w):
                v = np.float64(values[j])
                if v - v == 0.0:  # finite
                    total += v
                    count += 1
                    if b >= 0:
                        sums[side, b, j] += v
                        counts[side, b, j] += 1
            subject_sums[side, i] += total
            subject_counts[side, i] += count


# ---- pass 2: harmonised values -----------------------------------------------------------------
@dataclass
class Adjuster:
    """Harmonises stripes with finished estimates (of this cohort or of an earlier fit)."""

    model: Model  # the subjects to harmonise (batch codes into the estimates' levels)
    coef: np.ndarray
    grand_mean: np.ndarray
    var_pooled: np.ndarray
    gamma_star: np.ndarray
    delta_star: np.ndarray
    status: np.ndarray

    def __post_init__(self):
        self.x = self.model.matrix()
        b = self.model.n_batch
        self.covariates = np.ascontiguousarray(self.x[:, b:])
        self.summary = Summary.zeros(b, len(self.model.batch), self.coef.shape[1])

    def adjust(self, start: int, values: np.ndarray, dtype=np.float64) -> np.ndarray:
        """(n, width) harmonised values of elements start, ... (in ``dtype``); NaN where not
        harmonised and where a value is not finite (NaN, Inf: missing).

        y* = (s - gamma*) / sqrt(delta*) sd + grand + mod with s = (y - grand - mod) / sd is
        mod + a (y - mod) + k, with a = 1 / sqrt(delta*) and k = grand (1 - a) - gamma* sd a per
        batch and element: one compiled sweep, which also adds up the report's means."""
        span = slice(start, start + values.shape[1])
        b = self.model.n_batch
        with np.errstate(invalid="ignore", divide="ignore"):
            sd = np.sqrt(self.var_pooled[span])
            a = 1 / np.sqrt(self.delta_star[:, span])
            k = self.grand_mean[span] * (1 - a) - self.gamma_star[:, span] * sd * a
        out = np.empty(values.shape, dtype)
        s = self.summary
        sums, counts = np.zeros((2, b, out.shape[1])), np.zeros((2, b, out.shape[1]))
        _adjust_kernel(
            values,
            self.covariates,
            np.ascontiguousarray(np.nan_to_num(self.coef[b:, span])),
            np.ascontiguousarray(a),
            np.ascontiguousarray(k),
            self.model.batch,
            -1 if self.model.reference is None else self.model.reference,
            np.ascontiguousarray(self.status[span]),
            out,
            sums,
            counts,
            s.subject_sum,
            s.subject_count,
        )
        s.batch_sum[:, :, span] += sums
        s.batch_count[:, :, span] += counts
        return out


@dataclass
class Summary:
    """Per batch mean maps and per subject means, before and after (for the report)."""

    batch_sum: np.ndarray  # (2, batches, elements): before, after
    batch_count: np.ndarray
    subject_sum: np.ndarray  # (2, subjects)
    subject_count: np.ndarray

    @classmethod
    def zeros(cls, n_batch: int, n_subjects: int, n_elements: int) -> Summary:
        return cls(
            np.zeros((2, n_batch, n_elements)),
            np.zeros((2, n_batch, n_elements)),
            np.zeros((2, n_subjects)),
            np.zeros((2, n_subjects)),
        )

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        """(batch means (2, batches, elements), subject means (2, subjects)); NaN: no value."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.batch_sum / self.batch_count, self.subject_sum / self.subject_count


# ---- streaming ---------------------------------------------------------------------------------
def stripe_width(values, n_subjects: int, unit: int | None = None) -> int:
    """Elements per stripe: whole chunks (of the output, else of the stored dataset), about
    BLOCK_BYTES of float64."""
    if unit is None:
        chunks = getattr(values, "chunks", None)
        unit = chunks[1] if chunks and chunks[0] >= n_subjects else 64
    return unit * max(1, BLOCK_BYTES // (8 * n_subjects * unit))


def stripes(
    values, width: int, desc: str | None = None, read=None, dtype=np.float64
) -> Iterator[tuple[int, np.ndarray]]:
    """(start, block) over the columns of ``values`` (an h5py dataset or an array), as
    ``dtype`` (None: as stored); ``read(values, start, stop)`` reads a stripe (default:
    slicing). The next stripe is read in a background thread while the caller works on this
    one."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    starts = list(range(0, values.shape[1], width))

    def load(start: int) -> np.ndarray:
        stop = min(start + width, values.shape[1])
        block = read(values, start, stop) if read else values[:, start:stop]
        return np.asarray(block, dtype=dtype)

    quiet = None if desc else True
    with ThreadPoolExecutor(1) as ahead:
        future = ahead.submit(load, starts[0]) if starts else None
        for k in tqdm(range(len(starts)), desc=desc, unit="stripe", disable=quiet, leave=False):
            block = future.result()
            if k + 1 < len(starts):
                future = ahead.submit(load, starts[k + 1])
            yield starts[k], block


def estimate(
    model: Model, values, options: Options, width: int | None = None, nprocs: int = 1, read=None
) -> Estimates:
    """Pass 1 over ``values`` (subjects x elements), then the empirical Bayes step."""
    estimates = Estimates(model, values.shape[1], options, nprocs)
    width = width or stripe_width(values, values.shape[0])
    for start, block in stripes(values, width, "Estimating", read):
        estimates.add(start, block)
    estimates.finish()
    return estimates


def adjuster(estimates: Estimates) -> Adjuster:
    return Adjuster(
        estimates.model,
        estimates.coef,
        estimates.grand_mean,
        estimates.var_pooled,
        estimates.gamma_star,
        estimates.delta_star,
        estimates.status,
    )


def harmonize_array(
    values: np.ndarray,
    table: pd.DataFrame,
    batch_column: str,
    covariates: str | None = None,
    options: Options = Options(),
    width: int | None = None,
) -> tuple[np.ndarray, Estimates]:
    """(harmonised values, estimates) of an in-memory (subjects x elements) matrix, stripe by
    stripe exactly as the command streams an HDF5 dataset (for tests and small data)."""
    model = build_model(table, batch_column, covariates, options, "y", "cohort")
    estimates = estimate(model, values, options, width)
    adjust = adjuster(estimates)
    width = width or stripe_width(values, values.shape[0])
    out = np.empty(values.shape)
    for start, block in stripes(values, width):
        out[:, start : start + block.shape[1]] = adjust.adjust(start, block)
    return out, estimates


def log_gaps(estimates: Estimates) -> list[str]:
    """What was not harmonised, in words (logged as warnings, kept in the summary)."""
    model, status = estimates.model, estimates.status
    lines = []
    if not (status == HARMONISED).any():
        lines.append(
            f"no element was harmonised (of {status.size:,}): none has the values ComBat needs "
            "(too few finite values per batch, or no variance); the harmonised scalar holds no "
            "harmonised value"
        )
    if (unchanged := int((status == UNCHANGED).sum())) > 0:
        lines.append(
            f"{unchanged} elements have no variance left after the covariates (e.g. every "
            "subject the same value): left as they are and out of the priors"
        )
    if (failed := int((status == NOT_HARMONISED).sum())) > 0:
        lines.append(
            f"{failed} elements could not be fitted (too few subjects with a value, or the "
            "reference batch without enough): NaN for every subject"
        )
    minimum = estimates.options.minimum
    for k, level in enumerate(model.levels):
        short = int(((estimates.count[k] < minimum) & (status == HARMONISED)).sum())
        if short:
            lines.append(
                f"{model.batch_column} {level!r}: {short} elements have fewer than {minimum} "
                "subjects with a value; its subjects are NaN there (the other batches are "
                "harmonised)"
            )
    for line in lines:
        log.warning("%s", line)
    return lines


def about(estimates: Estimates, method: str, input_scalar: str) -> dict:
    """What the fit was (the JSON kept with the estimates, the methods text, sidecars)."""
    model, options = estimates.model, estimates.options
    counts = np.bincount(model.batch[model.used], minlength=model.n_batch)
    return {
        "method": method,
        "input_scalar": input_scalar,
        "options": asdict(options),
        "options_text": options.describe(),
        "reproduces": "neuroHarmonize 2.5.2" if model.splines else "neuroCombat 0.2.12",
        "subjects_per_batch": dict(zip(model.levels, map(int, counts), strict=True)),
        "n_subjects": len(model.batch),
        "n_harmonised_subjects": int(model.used.sum()),
        "elements": {
            "harmonised": int((estimates.status == HARMONISED).sum()),
            "unchanged": int((estimates.status == UNCHANGED).sum()),
            "not_harmonised": int((estimates.status == NOT_HARMONISED).sum()),
        },
        **model.about(),
    }


def dumps(record: dict) -> str:
    return json.dumps(record, sort_keys=True)


def model_path(text: str) -> tuple[Path, str]:
    """``F.h5:scalar`` -> (F.h5, scalar); the last ':' separates them."""
    path, sep, name = text.rpartition(":")
    if not sep or not path or not name:
        raise UsageError(
            f"--apply-from {text!r}: expected FILE.h5:SCALAR, e.g. data.h5:thickness_combat"
        )
    return Path(path), name
