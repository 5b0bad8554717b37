"""Linear mixed models at every element: lme4's ``lmer`` numbers with lmerTest's Satterthwaite
tests, for the whole brain at once.

ModelArray users fit these through ``ModelArray.wrap`` and ``lmerTest::lmer``, one element at a
time (50-100 ms each). Here the formula is read once (``stats/formula.py``, ``stats/design.py``:
fixed effects with R's contrasts, lme4's random-effect blocks), elements are grouped by their
set of valid observations, and each group is fitted by ``stats/lmm_fit.py`` for many elements
at once. The rules are fit-lm's (ModelArray's):

- an element is fitted only if its number of observations with a finite value is strictly
  greater than max(``lthr_abs``, ``lthr_rel`` x number of observations); otherwise every
  output but ``element_id`` is NaN;
- a non-finite value makes that observation missing for that element; rows with a missing
  phenotype (grouping factors included) are dropped, as ``lmer``'s model frame drops them;
- lme4's checks are made per element as ``lmer`` makes them (a grouping factor with fewer than
  2 levels, as many levels as observations, no more observations than random effects in a
  term; a rank-deficient fixed design, as fit-lm): an element failing one is NaN.

Columns: ``element_id``; per fixed term ``<term>.estimate``, ``.std.error``, ``.df``
(Satterthwaite), ``.statistic`` (t), ``.p.value``; per random term, named as lme4's ``VarCorr``
names its group, ``<group>.sd.<coef>`` and ``<group>.cor.<coef1>.<coef2>``; ``residual.sd``;
``model.logLik``, ``model.AIC``, ``model.BIC`` (REML criterion under REML, as lme4's
``logLik``), ``model.nobs``, ``model.ngroups.<factor>``, ``model.singular`` (lme4's
``isSingular``), ``model.converged``; then ``<term>.p.value.fdr``.
"""

from __future__ import annotations

import itertools
import keyword
import logging
import re
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from greyarray.errors import DataError, UsageError
from greyarray.io.names import check_name
from greyarray.io.threads import thread_pool
from greyarray.stats import lmm_fit
from greyarray.stats.design import (
    Design,
    RandomBlock,
    build_design,
    parse_formula,
    random_effects,
    single_subject_levels,
    threshold_rule,
)
from greyarray.stats.formula import all_names, deparse, model_formula, subbars, terms
from greyarray.stats.linalg import column_norms
from greyarray.stats.results import (
    element_blocks,
    fit_inputs,
    p_adjust_fdr,
    perfect_fits,
    write_results,
)

log = logging.getLogger(__name__)

TERM_STATS = ("estimate", "std.error", "df", "statistic", "p.value")
BATCH_BYTES = 48 * 2**20  # working memory of one batch of elements (per thread)
PATTERN_CACHE = 16  # structures kept for sets of valid observations
RANK_DEFICIENT = (  # lme4 would drop columns there and fit another model: left NaN
    "cannot be fitted: the fixed-effects design is rank deficient there (e.g. a factor level "
    "without values; lme4 would drop a column and fit another model)"
)


def clean(name: str) -> str:
    """ModelArray's term names: ``(Intercept)`` -> ``Intercept``."""
    return "Intercept" if name == "(Intercept)" else name


def r_make_names(names: list[str]) -> list[str]:
    """R's ``make.names(names, unique = TRUE)`` (what lme4's VarCorr does to duplicated group
    names: ``g``, ``g`` -> ``g``, ``g.1``)."""
    out = []
    for name in names:
        text = re.sub(r"[^A-Za-z0-9._]", ".", name)
        if not re.match(r"[A-Za-z]|\.(?![0-9])", text):
            text = "X" + text
        if text in keyword.kwlist or text in ("TRUE", "FALSE", "NULL", "NA", "Inf", "NaN"):
            text += "."
        out.append(text)
    seen: dict[str, int] = {}
    unique = []
    taken = set(out)
    for text in out:
        if text not in seen:
            seen[text] = 0
            unique.append(text)
            continue
        while True:
            seen[text] += 1
            candidate = f"{text}.{seen[text]}"
            if candidate not in taken:
                break
        taken.add(candidate)
        unique.append(candidate)
    return unique


@dataclass(frozen=True)
class Term:
    """A random term in lme4's order: its block, VarCorr group name and coefficient names."""

    block: RandomBlock
    group: str  # VarCorr's name (participant_id, participant_id.1, participant_id:family_id)
    coefs: list[str]  # Intercept, age
    tmap: np.ndarray  # (q, q) index into theta
    standard: np.ndarray  # (q, q) the optimiser's column transformation (lmm_fit.standardiser)

    @property
    def factor(self) -> str:
        return self.block.group


class MixedModel:
    """A formula with random effects on the cohort: fixed design, random terms in lme4's
    order (``mkReTrms``: by decreasing number of levels when they are not already), theta's
    layout and bounds, and the structure of each set of valid observations."""

    def __init__(
        self,
        formula: str,
        phenotypes: pd.DataFrame,
        reml: bool = True,
        references: dict[str, str] | None = None,
        ordered: dict[str, str] | None = None,
    ):
        self.formula, self.reml = formula, reml
        read = model_formula(formula)
        if read.hidden_bars:
            bar = read.hidden_bars[0]
            group = bar.args[1]
            frame = set(terms(read.response, subbars(read.rhs)).names)
            unseen = [n.id for n in all_names(group) if n.id not in frame]
            stops = (
                f" and stops (couldn't evaluate grouping factor {deparse(group)} within model "
                f"frame: object '{unseen[0]}' not found)"
                if unseen
                else ", not as R's 'or'"
            )
            raise UsageError(
                f"formula {formula!r}: lme4 reads the '|' in '{deparse(bar)}' as a random-effect "
                f"term even inside a function call{stops}; compute that column in the cohort "
                "CSV"
            )
        if read.smooths:
            raise UsageError(
                f"formula {formula!r}: smooth terms s(...) with random effects (gamm4's models) "
                "are not supported; use linear terms, or fit-gam without random effects"
            )
        self.design: Design = build_design(formula, phenotypes, references, ordered)
        blocks = random_effects(formula, phenotypes, self.design.rows, references, ordered)
        if not blocks:
            raise UsageError(
                f"formula {formula!r} has no random-effect term such as (1 | participant_id); "
                "fit it with fit-lm"
            )
        nl = [len(np.unique(b.codes)) for b in blocks]
        if any(b > a for a, b in itertools.pairwise(nl)):  # lme4: rev(order(nl))
            order = np.argsort(nl, kind="stable")[::-1]
            blocks = [blocks[i] for i in order]
        names = [b.group for b in blocks]
        if len(set(names)) < len(names):
            names = r_make_names(names)
        maps, self.lower = lmm_fit.theta_layout([b.matrix.shape[1] for b in blocks])
        self.terms = [
            Term(b, name, [clean(c) for c in b.columns], m, lmm_fit.standardiser(b.matrix))
            for b, name, m in zip(blocks, names, maps, strict=True)
        ]
        self.factors = list(dict.fromkeys(t.factor for t in self.terms))  # lme4's flist
        if len(self.factors) > 2:
            raise UsageError(
                f"formula {formula!r}: random effects on {len(self.factors)} grouping factors "
                f"({', '.join(self.factors)}); fit-lmm fits one or two (crossed or nested)"
            )
        self.n_theta = self.lower.size
        self.reflect = lmm_fit.reflections([t.tmap for t in self.terms])
        self.intercepts_only = all(t.coefs == ["Intercept"] for t in self.terms) and len(
            self.factors
        ) == len(self.terms)
        problem = self.problem(np.arange(len(self.design.rows)))
        if problem:
            raise DataError(f"formula {formula!r}: {problem[1]} (lme4's lmer stops)")

    @property
    def n_params(self) -> int:
        return len(self.design.columns) + self.n_theta + 1

    def codes(self, factor: str) -> np.ndarray:
        return next(t.block.codes for t in self.terms if t.factor == factor)

    def problem(self, rows: np.ndarray) -> tuple[str, str] | None:
        """What lme4's ``lmer`` (with lmerTest's fit) would stop on, for these design rows:
        (the reason in general words, for a count of elements; the reason with its numbers)."""
        n = rows.size
        for factor in self.factors:
            levels = np.unique(self.codes(factor)[rows]).size
            if levels < 2:
                return (
                    f"grouping factor {factor!r} has fewer than 2 levels",
                    f"grouping factor {factor!r} has {levels} sampled level (needs > 1)",
                )
            if levels >= n:
                return (
                    f"grouping factor {factor!r} has as many levels as observations",
                    f"grouping factor {factor!r} has {levels} levels for {n} observations "
                    "(the number of levels must be < the number of observations)",
                )
        for term in self.terms:
            levels = np.unique(term.block.codes[rows]).size
            effects = levels * len(term.coefs)
            if n <= effects:
                return (
                    f"no more observations than random effects in term ({term.block.term})",
                    f"number of observations (={n}) <= number of random effects (={effects}) "
                    f"for term ({term.block.term}); the random-effects parameters and the "
                    "residual variance are probably unidentifiable",
                )
        x = self.design.matrix[rows]
        if n <= x.shape[1]:
            few = "no more observations than fixed-effect columns"
            return few, f"{few} ({n} observations, {x.shape[1]} columns)"
        diag = np.abs(np.diagonal(np.linalg.qr(x)[1]))
        if not (diag > 1e-7 * column_norms(x)).all():
            return RANK_DEFICIENT, "the fixed-effects design is rank deficient"
        return None

    def structure(self, rows: np.ndarray):
        """The engine (lmm_fit.OneFactor or TwoFactors) for these design rows, in the
        optimiser's coordinates (each term's columns times its ``standard``)."""
        factors = []
        for factor in self.factors:
            terms = [t for t in self.terms if t.factor == factor]
            z = np.hstack([t.block.matrix[rows] @ t.standard for t in terms])
            tmap = lmm_fit.merge_terms([t.tmap for t in terms])
            factors.append(lmm_fit.Factor.lower_triangle(terms[0].block.codes[rows], z, tmap))
        return lmm_fit.engine(self.design.matrix[rows], factors)

    def lme4_coordinates(self) -> list[np.ndarray]:
        """Per factor, the transform taking the optimiser's T to lme4's (C^-1 per term)."""
        out = []
        for factor in self.factors:
            blocks = [np.linalg.inv(t.standard) for t in self.terms if t.factor == factor]
            size = sum(b.shape[0] for b in blocks)
            full, at = np.zeros((size, size)), 0
            for b in blocks:
                full[at : at + b.shape[0], at : at + b.shape[0]] = b
                at += b.shape[0]
            out.append(full)
        return out

    def starts(self, y: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
        """Starting values (E, k) in the optimiser's coordinates: lme4's own start (diagonal
        1, or for random intercepts only, sqrt(var(ave(y, g)) / residual variance)), and the
        identity in the standardised coordinates."""
        n_el = y.shape[1]
        ones = np.tile(np.where(self.lower == 0, 1.0, 0.0), (n_el, 1))
        lme4 = ones.copy()
        if self.intercepts_only:
            total = y.var(axis=0, ddof=1)
            between = []
            for factor in self.factors:
                groups, inverse = lmm_fit.indicator(self.codes(factor)[rows])
                means = (groups @ y) / np.asarray(groups.sum(axis=1))
                between.append(means[inverse].var(axis=0, ddof=1))
            rest = total - np.sum(between, axis=0)
            good = rest > 0
            for j, v in enumerate(between):
                lme4[good, j] = np.sqrt(v[good] / rest[good])
        else:  # lme4 starts at T = I in its coordinates: T~ = chol(C^-1 C^-T) in ours
            for term in self.terms:
                inverse = np.linalg.inv(term.standard)
                t = np.linalg.cholesky(inverse @ inverse.T)
                rows_, cols_ = np.nonzero(term.tmap >= 0)
                lme4[:, term.tmap[rows_, cols_]] = t[rows_, cols_]
        return [lme4, ones]

    def columns(self) -> list[str]:
        names = ["element_id"]
        names += [f"{c}.{s}" for c in self.design.columns for s in TERM_STATS]
        for term in self.terms:
            names += [f"{term.group}.sd.{c}" for c in term.coefs]
            names += [
                f"{term.group}.cor.{a}.{b}"
                for j, a in enumerate(term.coefs)
                for b in term.coefs[j + 1 :]
            ]
        names += ["residual.sd", "model.logLik", "model.AIC", "model.BIC", "model.nobs"]
        names += [f"model.ngroups.{f}" for f in self.factors]
        names += ["model.singular", "model.converged"]
        names += [f"{c}.p.value.fdr" for c in self.design.columns]
        return names


class Fitter:
    """Fits blocks of elements grouped by their valid observations; keeps every column."""

    def __init__(self, model: MixedModel, n_subjects: int, n_elements: int, lthr_abs, lthr_rel):
        self.model = model
        self.threshold = max(n_subjects * lthr_rel, lthr_abs)
        self.columns = model.columns()
        self.index = {name: i for i, name in enumerate(self.columns)}
        self.table = np.full((len(self.columns), n_elements), np.nan)
        self.table[0] = np.arange(n_elements)
        self.cache: dict[bytes, object] = {}
        self.problems: dict[str, int] = {}
        self.warm: np.ndarray | None = None  # a typical optimum (optimiser's coordinates)
        self.perfect = np.zeros(n_elements, bool)  # fitted exactly (results.perfect_fits)

    def jobs(self, start: int, values: np.ndarray):
        """(rows, elements, responses) per set of valid observations in a block of elements
        ``values`` (n_subjects, block)."""
        design = self.model.design
        finite = np.isfinite(values)
        enough = finite.sum(axis=0) > self.threshold
        used = finite[design.rows]
        y = values[design.rows]
        candidates = np.flatnonzero(enough)
        if not candidates.size:
            return
        keys = np.packbits(used[:, candidates], axis=0).T
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        for g, f in enumerate(first):
            members = candidates[inverse.ravel() == g]
            rows = np.flatnonzero(used[:, candidates[f]])
            problem = self.model.problem(rows)
            if problem:
                reason = problem[0]
                if reason != RANK_DEFICIENT:
                    reason = f"cannot be fitted: lme4's lmer stops there ({reason})"
                self.problems[reason] = self.problems.get(reason, 0) + members.size
                continue
            response = y[np.ix_(rows, members)].astype(np.float64)
            if design.offset is not None:
                response -= design.offset[rows, None]
            yield rows, start + members, response

    def engine(self, rows: np.ndarray):
        key = np.packbits(np.isin(np.arange(len(self.model.design.rows)), rows)).tobytes()
        if key not in self.cache:
            if len(self.cache) >= PATTERN_CACHE:
                self.cache.pop(next(iter(self.cache)))
            self.cache[key] = self.model.structure(rows)
        return self.cache[key]

    def fit(self, rows: np.ndarray, elements: np.ndarray, y: np.ndarray, engine) -> None:
        """Fit one batch of elements sharing ``rows`` (y: (n_rows, E)). Elements that the
        fixed effects fit exactly (a constant response: the criterion has no minimum, lme4
        stops) keep their estimates only (results.perfect_fits). Rounding at the edges of the
        parameter space (an infinite criterion far out on a line search) is handled as such
        and never printed."""
        model = self.model
        rest, beta = lmm_fit.residualise(model.design.matrix[rows], y)
        exact = perfect_fits((rest**2).sum(axis=0), (y**2).sum(axis=0))
        if exact.any():
            self._store_exact(elements[exact], rows, beta[exact])
            elements, y = elements[~exact], y[:, ~exact]
            if not elements.size:
                return
        with np.errstate(all="ignore"):
            self._optimise(rows, elements, y, engine)

    def _optimise(self, rows: np.ndarray, elements: np.ndarray, y: np.ndarray, engine) -> None:
        model = self.model
        stats = engine.stats(y)
        criterion = lmm_fit.Criterion(
            engine, stats, rows.size, len(model.design.columns), model.n_theta, model.reml
        )
        everyone = np.arange(y.shape[1])
        starts = model.starts(y, rows)
        if self.warm is not None:  # elements are alike: the last batch's typical optimum
            starts.append(np.tile(self.warm, (y.shape[1], 1)))
        devs = [criterion(s, everyone, grad=False)["dev"] for s in starts]
        best = np.argmin(np.where(np.isfinite(devs), devs, np.inf), axis=0)
        theta0 = np.choose(best[:, None], starts)
        optimum = lmm_fit.minimise(criterion, theta0, model.lower, model.reflect)
        if optimum.converged.any():
            self.warm = np.median(optimum.theta[optimum.converged], axis=0)
        theta = lmm_fit.lme4_theta(
            optimum.theta, [t.tmap for t in model.terms], [t.standard for t in model.terms]
        )
        lme4 = lmm_fit.Criterion(  # lmerTest differentiates in lme4's coordinates
            engine.transformed(model.lme4_coordinates()), stats, rows.size,
            len(model.design.columns), model.n_theta, model.reml,
        )  # fmt: skip
        out = lmm_fit.summarise(lme4, lmm_fit.Optimum(theta, optimum.dev, optimum.converged))
        self._store(elements, rows, theta, optimum.converged, out)

    def _store_exact(self, elements, rows, beta) -> None:
        for i, name in enumerate(self.model.design.columns):
            self._put(f"{name}.estimate", elements, beta[:, i])
        self._counts(elements, rows)
        self.perfect[elements] = True

    def _counts(self, elements, rows) -> None:
        self._put("model.nobs", elements, np.full(elements.size, rows.size, float))
        for factor in self.model.factors:
            count = np.unique(self.model.codes(factor)[rows]).size
            self._put(f"model.ngroups.{factor}", elements, np.full(elements.size, count, float))

    def _store(self, elements, rows, theta, converged, out) -> None:
        model, put = self.model, self._put
        for i, name in enumerate(model.design.columns):
            for stat, key in zip(TERM_STATS, ("beta", "se", "df", "t", "p"), strict=True):
                put(f"{name}.{stat}", elements, out[key][:, i])
        for term in model.terms:
            sd, cor = lmm_fit.varcorr(theta, out["sigma"], term.tmap)
            for j, coef in enumerate(term.coefs):
                put(f"{term.group}.sd.{coef}", elements, sd[:, j])
                for k in range(j + 1, len(term.coefs)):
                    put(f"{term.group}.cor.{coef}.{term.coefs[k]}", elements, cor[:, k, j])
        put("residual.sd", elements, out["sigma"])
        for key in ("logLik", "AIC", "BIC"):
            put(f"model.{key}", elements, out[key])
        self._counts(elements, rows)
        put("model.singular", elements, lmm_fit.singular(theta, model.lower).astype(float))
        put("model.converged", elements, converged.astype(float))

    def _put(self, name: str, elements: np.ndarray, values: np.ndarray) -> None:
        self.table[self.index[name], elements] = values

    def finish(self) -> np.ndarray:
        for name in self.model.design.columns:
            self.table[self.index[f"{name}.p.value.fdr"]] = p_adjust_fdr(
                self.table[self.index[f"{name}.p.value"]]
            )
        return self.table


def batches(engine, rows: np.ndarray, elements: np.ndarray, y: np.ndarray):
    """Split a set of elements so a batch's working memory stays near BATCH_BYTES."""
    size = max(8, int(BATCH_BYTES // max(1, engine.bytes_per_element())))
    for i in range(0, elements.size, size):
        yield rows, elements[i : i + size], y[:, i : i + size]


def fit_lmm(
    h5_path: Path,
    cohort_path: Path,
    formula: str,
    analysis: str,
    *,
    scalar: str | None = None,
    reml: bool = True,
    lthr_abs: float = 10,
    lthr_rel: float = 0.2,
    overwrite: bool = False,
    reference_levels: dict[str, str] | None = None,
    ordered_factors: dict[str, str] | None = None,
    nprocs: int = 1,
) -> list[str]:
    """Fit the mixed model ``formula`` at every element of ``h5_path`` (REML unless ``reml`` is
    False) and write results/<analysis>; returns the column names."""
    check_name("analysis", analysis)
    response, _ = parse_formula(formula)
    scalar = scalar or response
    with fit_inputs(h5_path, cohort_path, scalar, analysis, overwrite) as (stored, phenotypes):
        names, values = stored.names, stored.values
        model = MixedModel(formula, phenotypes, reml, reference_levels, ordered_factors)
        fitter = Fitter(model, len(names), values.shape[1], lthr_abs, lthr_rel)
        groups = ", ".join(f"{f} ({np.unique(model.codes(f)).size} levels)" for f in model.factors)
        log.info(
            "Fitting %s (%s) at %d elements: %d observations, %d fixed-effect columns, %s",
            formula, "REML" if reml else "ML", values.shape[1], len(model.design.rows),
            len(model.design.columns), groups,
        )  # fmt: skip
        with thread_pool(nprocs) as pool, threadpool_limits(limits=1, user_api="blas"):
            pending: list[Future] = []
            for start, block in element_blocks(values, analysis):
                for rows, elements, y in fitter.jobs(start, block):
                    engine = fitter.engine(rows)
                    for job in batches(engine, rows, elements, y):
                        pending.append(pool.submit(fitter.fit, *job, engine))
                while len(pending) > 2 * nprocs:  # bounded memory: wait for the oldest
                    pending.pop(0).result()
            for future in pending:
                future.result()
    _report(fitter)
    table = fitter.finish()
    columns = fitter.columns
    about = {
        "method": "lmm",
        "formula": formula,
        "criterion": "REML" if reml else "ML",
        "random_effects": [
            {"term": t.block.term, "group": t.group, "coefficients": t.coefs} for t in model.terms
        ],
        "groups": {f: int(np.unique(model.codes(f)).size) for f in model.factors},
        "reference_levels": model.design.references,
        "ordered_factors": dict(ordered_factors or {}),
        "aliased_columns_left_out": model.design.aliased,
        "n_subjects": len(names),
        "n_with_phenotypes": len(model.design.rows),
        "threshold": threshold_rule(lthr_abs, lthr_rel, len(names)),
        "cohort_file": str(cohort_path),
        "scalar": scalar,
        "threshold_abs": lthr_abs,
        "threshold_rel": lthr_rel,
        "single_subject_levels": single_subject_levels(formula, phenotypes, model.design.rows),
        "unfitted_reasons": dict(fitter.problems),
    }
    write_results(h5_path, analysis, columns, table, about, overwrite, fitter.perfect)
    return columns


def _report(fitter: Fitter) -> None:
    table, index = fitter.table, fitter.index
    fitted = np.isfinite(table[index["model.logLik"]])
    singular = int((table[index["model.singular"]] == 1).sum())
    failed = int((table[index["model.converged"]] == 0).sum())
    if singular:
        log.info(
            "%d of %d fitted elements have a singular fit (a variance at zero, or correlation "
            "+-1: lme4's isSingular); their estimates are still the optimum",
            singular, int(fitted.sum()),
        )  # fmt: skip
    if failed:
        log.warning(
            "%d %s not converge (model.converged = 0): %s numbers are the best criterion "
            "found", failed, "element did" if failed == 1 else "elements did",
            "its" if failed == 1 else "their",
        )  # fmt: skip
