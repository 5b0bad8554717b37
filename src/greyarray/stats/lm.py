"""Mass-univariate linear models, as ModelArray.lm fits them, for all elements at once.

ModelArray.lm fits one ``stats::lm`` per element (~45 ms each). Here the design matrix is built
once (stats/design.py: R's model matrix and column names) and every element sharing a pattern of
missing values is fitted in one QR solve. An ``offset()`` is subtracted from the response before
the solve; R's fitted values keep it, and so do summary.lm's R-squared and F statistic. The rules
are ModelArray's:

- an element is fitted only if its number of subjects with a finite value is strictly greater
  than max(``lthr_abs``, ``lthr_rel`` x number of subjects); otherwise every output but
  ``element_id`` is NaN;
- a non-finite value makes that subject missing for that element; subjects with a missing
  phenotype are dropped, as ``lm`` drops them;
- columns: ``element_id``, then per term ``<term>.<statistic>`` (``Intercept`` for the
  intercept), then ``model.<statistic>``, then the FDR columns ``<term>.p.value.fdr`` and
  ``model.p.value.fdr`` (Benjamini-Hochberg over elements, as R's ``p.adjust(method="fdr")``).

Results are written where ModelArray's ``writeResults`` writes them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import special

from greyarray.errors import OutputError, UsageError
from greyarray.io.cohort import read_csv_table
from greyarray.io.fileio import check_writable
from greyarray.io.h5read import read_scalar
from greyarray.io.inputs import check_present, open_hdf5
from greyarray.io.names import check_name
from greyarray.stats import formula as rf
from greyarray.stats.design import (
    Design,
    build_design,
    match_cohort,
    parse_formula,
    repeated_measures,
    single_subject_levels,
    threshold_rule,
)
from greyarray.stats.linalg import column_norms
from greyarray.stats.names import (
    DEFAULT_MODEL_STATS,
    DEFAULT_TERM_STATS,
    MODEL_STATS,
    TERM_STATS,
)
from greyarray.stats.results import element_blocks, p_adjust_fdr, perfect_fits, write_results

if TYPE_CHECKING:  # numba is imported only when permutations are asked for
    from greyarray.stats.permutation import PermutationOptions

log = logging.getLogger(__name__)


def output_columns(
    design: Design, term_stats=DEFAULT_TERM_STATS, model_stats=DEFAULT_MODEL_STATS
) -> list[str]:
    """ModelArray.lm's columns, in its order (aliased coefficients too: broom::tidy lists them,
    with NA)."""
    names = ["element_id"]
    names += [f"{term}.{stat}" for term in design.coefficients for stat in term_stats]
    names += [f"model.{stat}" for stat in model_stats]
    if "p.value" in term_stats:
        names += [f"{term}.p.value.fdr" for term in design.coefficients]
    if "p.value" in model_stats:
        names.append("model.p.value.fdr")
    return names


class Fitter:
    """Fits blocks of elements; keeps every statistic for every element.

    Elements whose subjects are all valid share one QR of the design. The others are solved as a
    batch of QRs of the design with the rows of their missing subjects zeroed (a zero row changes
    neither the fit nor the residuals), so scattered missing values stay vectorised.
    """

    BATCH = 256  # masked elements solved together (memory: BATCH x subjects x columns floats)

    def __init__(
        self,
        design: Design,
        n_subjects: int,
        n_elements: int,
        lthr_abs: float = 10,
        lthr_rel: float = 0.2,
    ):
        self.design = design
        self.threshold = max(n_subjects * lthr_rel, lthr_abs)
        self.terms = {
            stat: np.full((len(design.columns), n_elements), np.nan) for stat in TERM_STATS
        }
        self.model = {stat: np.full(n_elements, np.nan) for stat in MODEL_STATS}
        self.perfect = np.zeros(n_elements, bool)  # fitted exactly (results.perfect_fits)

    def fit_block(self, start: int, values: np.ndarray) -> None:
        """``values``: (n_subjects, block) of the response for elements start, start+1, ..."""
        finite = np.isfinite(values)
        enough = finite.sum(axis=0) > self.threshold  # ModelArray counts all subjects
        used = finite[self.design.rows]  # among subjects with phenotypes
        y = values[self.design.rows].astype(np.float64)
        if self.design.offset is not None:
            y -= self.design.offset[:, None]
        y = np.where(used, y, 0)
        complete = used.all(axis=0) & enough
        if complete.any():
            self._fit(
                start + np.flatnonzero(complete),
                self.design.matrix[None],
                y[:, complete].T[..., None],
                None,
            )
        partial = np.flatnonzero(enough & ~complete)
        for i in range(0, partial.size, self.BATCH):
            batch = partial[i : i + self.BATCH]
            mask = used[:, batch].T.astype(np.float64)  # (k, n)
            self._fit(
                start + batch,
                self.design.matrix[None] * mask[..., None],
                y[:, batch].T[..., None],
                mask,
            )

    def _fit(self, elements, x, y, mask) -> None:
        """x: (1 or k, n, p) designs; y: (k, n, 1) responses (0 where missing); mask: (k, n)."""
        n = np.full(len(elements), x.shape[1], float) if mask is None else mask.sum(axis=1)
        p = x.shape[2]
        q, r = np.linalg.qr(x)
        diag = np.abs(np.diagonal(r, axis1=1, axis2=2))
        norms = column_norms(x)
        ok = (diag > 1e-7 * norms).all(axis=1) & (n > p)  # R's lm: tolerance 1e-7
        if x.shape[0] == 1:
            ok = np.broadcast_to(ok, n.shape)
        else:
            x, q, r = x[ok], q[ok], r[ok]
        y, n, elements = y[ok], n[ok], elements[ok]
        if not elements.size:
            return
        beta = np.linalg.solve(r, np.swapaxes(q, 1, 2) @ y)  # (k, p, 1)
        fitted = x @ beta  # (k, n, 1); zero on missing rows
        resid = y - fitted
        rss = np.einsum("kni,kni->k", resid, resid)  # no (k, n) temporaries of squares
        self.perfect[elements] = perfect_fits(rss, np.einsum("kni,kni->k", y, y))
        df = n - p
        resvar = rss / df
        r_inv = np.linalg.inv(r)
        se = np.sqrt((r_inv**2).sum(axis=2) * resvar[:, None])  # (k, p)
        beta = beta[..., 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = beta / se
        self.terms["estimate"][:, elements] = beta.T
        self.terms["std.error"][:, elements] = se.T
        self.terms["statistic"][:, elements] = t.T
        self.terms["p.value"][:, elements] = 2 * special.stdtr(df[:, None], -np.abs(t)).T
        fitted = fitted[..., 0]
        if self.design.offset is not None:  # R's fitted values (summary.lm keeps the offset)
            offset = self.design.offset[None]
            fitted = fitted + (offset if mask is None else offset * mask[ok])
        if self.design.intercept:  # summary.lm: spread of the fitted values around their mean
            mean = fitted.sum(axis=1) / n
            centred = fitted - mean[:, None]
            if mask is not None:
                centred = centred * mask[ok]
            mss = (centred**2).sum(axis=1)
        else:
            mss = (fitted**2).sum(axis=1)
        self._model_stats(elements, mss, rss, n, p)

    def _model_stats(self, elements, mss, rss, n, p) -> None:
        """summary.lm, glance.lm and logLik.lm, formula for formula."""
        df_int = 1 if self.design.intercept else 0
        rdf = n - p
        resvar = rss / rdf
        numdf = p - df_int
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = mss / (mss + rss)
            adj = 1 - (1 - r2) * ((n - df_int) / rdf)
            fstat = (mss / numdf) / resvar
            pval = special.fdtrc(numdf, rdf, fstat)
            loglik = 0.5 * (-n * (np.log(2 * np.pi) + 1 - np.log(n) + np.log(rss)))
        if p == df_int:  # summary.lm: an intercept-only model explains nothing
            r2, adj = np.zeros_like(rss), np.zeros_like(rss)
        if p == 1:  # broom::glance: no F test for a model of one coefficient
            fstat, pval = np.full_like(rss, np.nan), np.full_like(rss, np.nan)
        stats = {
            "r.squared": r2,
            "adj.r.squared": adj,
            "sigma": np.sqrt(resvar),
            "statistic": fstat,
            "p.value": pval,
            "df": np.full_like(rss, numdf if p > 1 else np.nan),
            "logLik": loglik,
            "AIC": -2 * loglik + 2 * (p + 1),
            "BIC": -2 * loglik + np.log(n) * (p + 1),
            "deviance": rss,
            "df.residual": rdf,
            "nobs": n,
        }
        for name, values in stats.items():
            self.model[name][elements] = values

    def table(self, term_stats=DEFAULT_TERM_STATS, model_stats=DEFAULT_MODEL_STATS) -> np.ndarray:
        """(n_columns, n_elements) in ``output_columns`` order."""
        n = self.model["nobs"].size
        fitted = {name: i for i, name in enumerate(self.design.columns)}
        missing = np.full(n, np.nan)  # an aliased coefficient: NA in R's lm

        def term(stat: str, name: str) -> np.ndarray:
            return self.terms[stat][fitted[name]] if name in fitted else missing

        names = self.design.coefficients
        rows = [np.arange(n, dtype=np.float64)]
        rows += [term(stat, name) for name in names for stat in term_stats]
        rows += [self.model[stat] for stat in model_stats]
        if "p.value" in term_stats:
            rows += [p_adjust_fdr(term("p.value", name)) for name in names]
        if "p.value" in model_stats:
            rows.append(p_adjust_fdr(self.model["p.value"]))
        return np.vstack(rows)


def check_model(formula: str) -> None:
    """fit-lm fits R's lm: mgcv's smooths and lme4's random-effect terms belong to other
    commands (R's lm would stop on them: there is no function s(), and '|' is not a term)."""
    model = rf.model_formula(formula)
    if model.smooths:
        raise UsageError(
            f"formula {formula!r}: smooth terms ({', '.join(s.label for s in model.smooths)}) "
            "are mgcv's: fit them with fit-gam (R's lm has no s())"
        )
    if model.bars:
        raise UsageError(
            f"formula {formula!r}: random-effect terms ({', '.join(map(rf.deparse, model.bars))}) "
            "are lme4's: fit them with fit-lmm (R's lm cannot read them)"
        )


def fit_lm(
    h5_path: Path,
    cohort_path: Path,
    formula: str,
    analysis: str,
    *,
    scalar: str | None = None,
    term_stats: Sequence[str] = DEFAULT_TERM_STATS,
    model_stats: Sequence[str] = DEFAULT_MODEL_STATS,
    lthr_abs: float = 10,
    lthr_rel: float = 0.2,
    overwrite: bool = False,
    reference_levels: dict[str, str] | None = None,
    ordered_factors: dict[str, str] | None = None,
    permutations: PermutationOptions | None = None,
) -> list[str]:
    """Fit ``formula`` at every element of ``h5_path`` and write results/<analysis>.

    ``term_stats`` and ``model_stats`` are ModelArray.lm's ``var.terms`` and ``var.model``.
    ``permutations`` appends permutation inference columns (stats/permutation.py); with a
    shard, only that shard's null distribution is written (beside the HDF5), and no results.
    """
    check_name("analysis", analysis)
    check_model(formula)
    response, _ = parse_formula(formula)
    scalar = scalar or response
    cohort = read_csv_table(cohort_path, "cohort file")
    shard = permutations is not None and permutations.shard is not None
    if permutations is not None and permutations.merge:
        check_present(permutations.merge, "permutation shard")
    if not shard:  # results go into the HDF5: refuse a read-only one before fitting
        check_writable(h5_path)
    with open_hdf5(h5_path) as h5:
        stored = read_scalar(h5, scalar)
        if f"results/{analysis}" in h5 and not overwrite and not shard:
            raise OutputError(f"{h5_path}: results/{analysis} exists; use --overwrite")
        names, values = stored.names, stored.values
        phenotypes = match_cohort(cohort, names, scalar, cohort_path)
        design = build_design(formula, phenotypes, reference_levels, ordered_factors)
        if not design.coefficients:
            raise UsageError(
                f"formula {formula!r} has no column (R's lm would fit an empty model, with "
                "no term to report)"
            )
        repeated = repeated_measures(formula, phenotypes, design.rows)  # a note of the results
        if permutations is not None and design.offset is not None:
            raise UsageError(
                f"formula {formula!r}: --permutations with an offset() is not supported "
                "(R's lm would fit it; fit without --permutations)"
            )
        fitter = Fitter(design, len(names), values.shape[1], lthr_abs, lthr_rel)
        if permutations is not None:  # numba: imported only when asked for
            from greyarray.stats import permutation

            path = permutation.shard_path(h5_path, analysis, permutations.shard)
            if shard and path.exists() and not overwrite:
                raise OutputError(f"{path} exists; use --overwrite")
            prepared = permutation.prepare(
                h5, stored, phenotypes, design, permutations, fitter.threshold, cohort_path
            )
            if shard:
                permutation.write_shard(prepared, permutations.shard, path)
                return []
        log.info(
            "Fitting %s at %d elements (%d subjects, %d columns)",
            formula,
            values.shape[1],
            len(design.rows),
            len(design.columns),
        )
        for start, block in element_blocks(values, analysis):
            fitter.fit_block(start, block)
        extra = (
            permutation.permutation_columns(prepared, permutations.merge)
            if permutations is not None
            else ([], np.empty((0, values.shape[1])))
        )
    columns = output_columns(design, term_stats, model_stats) + extra[0]
    about = {
        "method": "lm",
        "formula": formula,
        "reference_levels": design.references,
        "ordered_factors": dict(ordered_factors or {}),
        "offset": [design.model.fixed.names[i] for i in design.model.fixed.offsets],
        "aliased_columns_left_out": design.aliased,
        "notes": [repeated] if repeated else [],
        "n_subjects": len(names),
        "n_with_phenotypes": len(design.rows),
        "threshold": threshold_rule(lthr_abs, lthr_rel, len(names)),
        "cohort_file": str(cohort_path),
        "scalar": scalar,
        "threshold_abs": lthr_abs,
        "threshold_rel": lthr_rel,
        "single_subject_levels": single_subject_levels(formula, phenotypes, design.rows),
    }
    if permutations is not None:
        about["permutations"] = {
            "n": permutations.permutations,
            "tfce": permutations.tfce,
            "tfce_connectivity": permutations.connectivity,
            "exchangeability_blocks": permutations.blocks,
            "seed": permutations.seed,
        }
    table = np.vstack([fitter.table(term_stats, model_stats), extra[1]])
    write_results(h5_path, analysis, columns, table, about, overwrite, fitter.perfect)
    return columns
