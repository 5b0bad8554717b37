"""Mass-univariate GAMs, as ModelArray.gam fits them (mgcv::gam once per element), vectorised.

The rules are ModelArray's (see stats/lm.py): an element is fitted only with more valid
subjects than max(``lthr_abs``, ``lthr_rel`` x N); non-finite values are missing subjects;
subjects with a missing phenotype are dropped as ``gam`` drops them. mgcv builds the smooth
bases from the data of each fit, so elements are grouped by their set of valid subjects and each
group gets its own basis (most elements share the complete set).

Columns (ModelArray.gam's current ``analyseOneElement.gam``): ``element_id``; per smooth term
(``s(age)`` -> ``s_age``) its statistics; per parametric term its statistics; ``model.*``; with a
changed-R-squared term ``<term>.delta.adj.rsq``, ``<term>.partial.rsq`` (and GreyArray's signed
versions); then the FDR columns ``<term>.p.value.fdr`` of the smooth terms and of the
parametric terms.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from greyarray.errors import DataError, UsageError
from greyarray.io.names import check_name
from greyarray.stats import formula as rf
from greyarray.stats import gam_fit
from greyarray.stats.design import (
    Factor,
    Numeric,
    build_design,
    is_text,
    repeated_measures,
    single_subject_levels,
    threshold_rule,
    variable,
)
from greyarray.stats.results import (
    element_blocks,
    fit_inputs,
    p_adjust_fdr,
    perfect_fits,
    write_results,
)
from greyarray.stats.smooths import BASES, MAX_KNOTS, Smooth, smooth_term, tensor_term

log = logging.getLogger(__name__)

METHODS = ("GCV.Cp", "REML")
SMOOTH_STATS = ("edf", "ref.df", "statistic", "p.value")
PARAM_STATS = ("estimate", "std.error", "statistic", "p.value")
MODEL_STATS = (
    "adj.r.squared",
    "dev.expl",
    "sp.criterion",
    "scale",
    "df",
    "logLik",
    "AIC",
    "BIC",
    "deviance",
    "df.residual",
    "nobs",
)
DEFAULT_SMOOTH_STATS = ("statistic", "p.value")
DEFAULT_PARAM_STATS = ("estimate", "statistic", "p.value")
DEFAULT_MODEL_STATS = ("dev.expl",)
PATTERN_CACHE = 32  # designs kept for sets of valid subjects (each is small)
SMOOTH_KINDS = ("s", "te", "ti")
UNFITTED = (  # why an element above ModelArray's threshold has no fit (results.result_notes)
    "cannot be fitted with the subjects they have (a rank-deficient design, too few distinct "
    "covariate values for a smooth, or mgcv's iterations fail there)"
)


@dataclass(frozen=True)
class SmoothSpec:
    """One smooth term: ``s(x, k=, fx=, bs=, by=)``, ``te(x, z, ...)`` or ``ti(...)``."""

    term: str  # mgcv's term label (R's deparse of the call)
    kind: str  # s, te or ti
    variables: tuple[str, ...]
    k: tuple[int, ...]  # per margin (s: one)
    fx: bool
    bs: tuple[str, ...]  # per margin
    by: str | None = None  # a factor: one smooth per level (an ordered factor's first: none)

    @property
    def label(self) -> str:
        """mgcv's label, e.g. ``s(age)``, ``ti(age,edu)`` (a factor ``by`` appends
        ``:<by><level>`` to each level's smooth)."""
        return f"{self.kind}({','.join(self.variables)})"

    @property
    def name(self) -> str:
        """ModelArray's name of the term (its changed-R-squared prefix): ``s_age``,
        ``ti_age_edu``, ``s_age_BYosex``."""
        name = f"{self.kind}_{'_'.join(self.variables)}"
        return f"{name}_BY{self.by}" if self.by else name


def smooth_column(label: str) -> str:
    """ModelArray.gam's column prefix of a smooth (``analyseOneElement.gam``): ``s(age)`` ->
    ``s_age``, ``s(age):osexM`` -> ``s_age_BYosexM``, ``ti(age,edu)`` -> ``ti_age_edu``."""
    parts = re.split(r"[()]", label)
    if parts[-1] == "":  # R's strsplit drops one empty string at the end
        parts.pop()
    name = f"{parts[0]}_{parts[1]}"
    if len(parts) > 2:
        name += "_" + "".join(parts[2:])
    return name.replace(":", "BY").replace(",", "_")


@dataclass(frozen=True)
class GamFormula:
    response: str  # the response as R writes it (back-quoted if it must be)
    smooths: tuple[SmoothSpec, ...]
    parametric: tuple[str, ...]  # the other right-hand-side terms (R's term labels)
    terms: tuple[str, ...]  # every right-hand-side term in R's order (ModelArray's term index)
    intercept: bool = True
    scalar: str = ""  # the response as a scalar name

    @property
    def parametric_rhs(self) -> str:
        return " + ".join(self.parametric) if self.parametric else "1"

    @property
    def text(self) -> str:
        """The formula written again from its terms (as mgcv rebuilds its parts)."""
        rhs = " + ".join(self.terms) if self.terms else "1"
        return f"{self.response} ~ {rhs}" + ("" if self.intercept else " - 1")

    def without(self, term: str) -> GamFormula:
        """The reduced model of ModelArray's changed.rsq.term.index (term dropped)."""
        return replace(
            self,
            smooths=tuple(s for s in self.smooths if s.term != term),
            parametric=tuple(t for t in self.parametric if t != term),
            terms=tuple(t for t in self.terms if t != term),
        )


def is_gam_formula(formula: str) -> bool:
    """True when the formula has a smooth term ``s(...)``, ``te(...)`` or ``ti(...)`` (route it
    to fit-gam)."""
    return bool(rf.model_formula(formula).smooths)


def _constant(node: rf.Node, formula: str, term: str):
    """A constant argument: a number, string, TRUE/FALSE (T/F), NA (None), a bare word (as
    the name of a basis), or R's ``c(...)`` of them (a list)."""
    if isinstance(node, rf.Num):
        return int(node.value) if node.value == int(node.value) else node.value
    if isinstance(node, rf.Call) and node.fn == "-" and len(node.args) == 1:
        value = _constant(node.args[0], formula, term)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value
    if isinstance(node, rf.Str):
        return node.value
    if isinstance(node, rf.Const):
        return None if node.value == "NA" else node.value
    if isinstance(node, rf.Name):
        return {"T": True, "F": False}.get(node.id, node.id)
    if isinstance(node, rf.Call) and node.fn == "c" and not any(node.names):
        return [_constant(arg, formula, term) for arg in node.args]
    raise UsageError(f"formula {formula!r}: {term!r}: '{rf.deparse(node)}' is not a constant")


def _per_margin(value, n: int, default, what: str, term: str) -> tuple:
    """One value per margin: a single value is repeated; for te/ti, a vector of the wrong
    length is replaced by the default, as mgcv does (with a warning)."""
    values = value if isinstance(value, list) else [value]
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        log.warning(
            "%s: %s has %d values for %d margins; mgcv uses %r", term, what, len(values), n, default
        )
        values = [default] * n
    return tuple(default if v is None else v for v in values)


def _smooth_spec(smooth: rf.SmoothCall, formula: str) -> SmoothSpec:
    term, kind = smooth.label, smooth.kind
    if kind not in SMOOTH_KINDS:
        raise UsageError(f"formula {formula!r}: {term!r}: {kind}() is not supported (s, te, ti)")
    if not smooth.variables or not all(isinstance(v, rf.Name) for v in smooth.variables):
        raise UsageError(f"formula {formula!r}: {term!r} must smooth columns, e.g. {kind}(age)")
    variables = tuple(v.id for v in smooth.variables)
    if kind == "s" and len(variables) > 1:
        raise UsageError(
            f"formula {formula!r}: {term!r}: a smooth of several variables (thin plate) is not "
            "supported; use a tensor product, te(...) or ti(...)"
        )
    if len(set(variables)) < len(variables):
        raise UsageError(f"formula {formula!r}: {term!r} repeats a variable")
    args: dict = {"k": None, "fx": False, "bs": None, "by": None}
    for name, node in smooth.arguments.items():
        if name not in args:
            raise UsageError(
                f"formula {formula!r}: {term!r}: only k=, fx=, bs= and by= are supported"
            )
        if name != "by":
            args[name] = _constant(node, formula, term)
        elif isinstance(node, rf.Name):
            args["by"] = node.id
        elif not (isinstance(node, rf.Const) and node.value == "NA"):  # NA: mgcv's default
            raise UsageError(f"formula {formula!r}: {term!r}: by= must name a column")
    if args["by"] is not None and kind != "s":
        raise UsageError(f"formula {formula!r}: {term!r}: by= is supported in s() only")
    if not isinstance(args["fx"], bool):
        raise UsageError(f"formula {formula!r}: {term!r} needs fx=TRUE or fx=FALSE")
    n = len(variables)
    default_bs, default_k = ("tp", 10) if kind == "s" else ("cr", 5)
    if kind == "s" and any(isinstance(args[a], list) for a in ("k", "bs")):
        raise UsageError(f"formula {formula!r}: {term!r} takes one k and one bs")
    bs = _per_margin(args["bs"], n, default_bs, "bs", term)
    ks = _per_margin(args["k"], n, default_k, "k", term)
    for b in bs:
        if b not in BASES:
            raise UsageError(f"formula {formula!r}: bs={b!r} (supported: {', '.join(BASES)})")
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
        raise UsageError(f"formula {formula!r}: {term!r} needs an integer k")
    if kind == "s":  # mgcv: k < 0 is the default (10); below 3 it is raised to 3 (a warning)
        ks = (default_k if ks[0] < 0 else max(ks[0], 3),)
    elif min(ks) < 3:
        log.warning("%s: k < 3; mgcv resets every margin's k to 5", term)
        ks = (5,) * n
    return SmoothSpec(term, kind, variables, ks, args["fx"], bs, args["by"])


def parse_gam_formula(formula: str) -> GamFormula:
    model = rf.model_formula(formula)
    if model.bars:
        raise UsageError(
            f"formula {formula!r}: random-effect terms (... | ...) are lme4's: use fit-lmm, or "
            's(g, bs = "re") in a GAM'
        )
    smooths = tuple(_smooth_spec(s, formula) for s in model.smooths)
    keys = [(s.label, s.by) for s in smooths]
    if len(set(keys)) < len(keys):
        raise UsageError(
            f"formula {formula!r}: a variable is smoothed twice the same way (mgcv warns and "
            "drops columns by gam.side, which GreyArray does not reproduce)"
        )
    smooth_labels = {s.term for s in smooths}
    labels = model.all_terms.labels
    parametric = tuple(t for t in labels if t not in smooth_labels)
    if not labels and not model.all_terms.intercept:
        raise UsageError(
            f"formula {formula!r} has no term and no intercept: mgcv stops (\"You've got no "
            'model....")'
        )
    offsets = [model.all_terms.names[i] for i in model.all_terms.offsets]
    if offsets:
        raise UsageError(
            f"formula {formula!r}: offset() in a GAM is not supported (mgcv would fit it)"
        )
    return GamFormula(
        rf.deparse(model.response),
        smooths,
        parametric,
        tuple(labels),
        model.all_terms.intercept,
        model.response_name,
    )


# --- one model (full or reduced) -------------------------------------------------------------


def _smooth_variable(name: str, smooth: SmoothSpec, phenotypes, rows, factors):
    """A smooth's covariate (numbers) or its ``by=`` (a factor: codes, levels, ordered) on the
    design's rows, as the design layer reads the cohort (``--ordered-factor`` included)."""
    try:
        value = variable(name, phenotypes, rows, *factors)
        if name == smooth.by and is_text(name, phenotypes, *factors):
            raise DataError(
                f"by={name} is a text column (read.csv reads it as character), and mgcv "
                '1.8-41 stops ("Can\'t find by variable"): make it a factor, '
                f"--reference-level {name}=LEVEL (or --ordered-factor {name}=LEVEL)"
            )
    except (UsageError, DataError) as err:
        raise DataError(f"smooth {smooth.term!r}: {err}") from None
    if name != smooth.by:
        if not isinstance(value, Numeric) or value.values.ndim != 1:
            raise DataError(
                f"smooth {smooth.term!r}: {name!r} is not numeric (mgcv smooths numbers)"
            )
        return value.values
    if not isinstance(value, Factor) or value.levels == ["FALSE", "TRUE"]:
        kind = "logical" if isinstance(value, Factor) else "numeric"
        raise DataError(
            f"smooth {smooth.term!r}: by={name} is {kind}; "
            "mgcv multiplies the smooth by it, which is not supported: only a factor by= (one "
            "smooth per level)"
        )
    return value.codes, value.levels, value.ordered


class GamModel:
    """A formula on the cohort: its subjects, parametric design and per-pattern designs."""

    def __init__(
        self,
        formula: GamFormula,
        phenotypes: pd.DataFrame,
        method: str,
        references: dict[str, str] | None = None,
        ordered: dict[str, str] | None = None,
    ):
        self.formula = formula
        self.method = method
        design = build_design(formula.text, phenotypes, references, ordered)
        self.param_columns = design.columns
        self.intercept = design.intercept
        self.references = design.references
        rows = design.rows
        keep = np.ones(rows.size, bool)
        covariates, factors = {}, {}
        for smooth in formula.smooths:
            for var in smooth.variables:
                covariates[var] = _smooth_variable(
                    var, smooth, phenotypes, rows, (references, ordered)
                )
                keep &= np.isfinite(covariates[var])
            if smooth.by:
                factors[smooth.by] = _smooth_variable(
                    smooth.by, smooth, phenotypes, rows, (references, ordered)
                )
                keep &= factors[smooth.by][0] >= 0
        if not keep.all():
            log.warning(
                "%d subjects have a missing smooth covariate and are left out, as gam leaves "
                "them out",
                int((~keep).sum()),
            )
        self.rows = rows[keep]  # subjects (HDF5 order) this model can use
        self.param_matrix = design.matrix[keep]
        self.covariates = {var: values[keep] for var, values in covariates.items()}
        self.factors = {by: (f[0][keep], *f[1:]) for by, f in factors.items()}
        self.blocks: list[tuple[SmoothSpec, str]] = []  # (term, mgcv's label of each smooth)
        for smooth in formula.smooths:
            for bs, var in zip(smooth.bs, smooth.variables, strict=True):
                distinct = np.unique(self.covariates[var]).size
                if bs in ("tp", "ts") and distinct > MAX_KNOTS:
                    raise DataError(
                        f"smooth {smooth.term!r}: {distinct} distinct values of {var!r}; mgcv "
                        f"then draws {MAX_KNOTS} random knots with R's generator, which "
                        "GreyArray does not reproduce: use bs='cr' (or round the covariate)"
                    )
            if smooth.by is None:
                self.blocks.append((smooth, smooth.label))
                continue
            _, levels, ordered = self.factors[smooth.by]
            for level in levels[1:] if ordered and len(levels) > 1 else levels:
                self.blocks.append((smooth, f"{smooth.label}:{smooth.by}{level}"))
        self._designs: OrderedDict[bytes, gam_fit.Design | None] = OrderedDict()

    def design(self, used: np.ndarray) -> gam_fit.Design | None:
        """The design of the subjects ``used`` (bool over self.rows); None if unusable."""
        key = np.packbits(used).tobytes()
        if key in self._designs:
            self._designs.move_to_end(key)
            return self._designs[key]
        design = self._build(used)
        self._designs[key] = design
        if len(self._designs) > PATTERN_CACHE:
            self._designs.popitem(last=False)
        return design

    def _build(self, used: np.ndarray) -> gam_fit.Design | None:
        parts = [self.param_matrix[used]]
        blocks, start = [], parts[0].shape[1]
        labels = iter(label for _, label in self.blocks)
        for spec in self.formula.smooths:
            try:
                smooths = self._smooths(spec, used)
            except DataError as err:
                log.debug("pattern skipped: %s", err)
                return None
            for smooth in smooths:
                k = smooth.X.shape[1]
                retest = bool(smooth.S) and smooth.null_space_dim == 0
                cols = slice(start, start + k)
                blocks.append(
                    gam_fit.SmoothBlock(next(labels), cols, smooth.S, retest, smooth.deriv)
                )
                parts.append(smooth.X)
                start += k
        design = gam_fit.Design(
            np.hstack(parts), slice(0, parts[0].shape[1]), blocks, self.intercept
        )
        return design if design.ok else None

    def _smooths(self, spec: SmoothSpec, used: np.ndarray) -> list[Smooth]:
        """The smooths of one term on the subjects ``used``."""
        xs = [self.covariates[var][used] for var in spec.variables]
        if spec.kind != "s":
            return [tensor_term(xs, list(spec.bs), list(spec.k), spec.fx, spec.kind == "ti")]
        if spec.by is None:
            return smooth_term(xs[0], spec.bs[0], spec.k[0], spec.fx)
        codes, levels, ordered = self.factors[spec.by]
        codes = codes[used]
        if np.unique(codes).size < len(levels):  # gam drops unused levels: other columns
            raise DataError(f"a level of {spec.by!r} has no subject")
        return smooth_term(xs[0], spec.bs[0], spec.k[0], spec.fx, (codes, levels, ordered))

    def fit(self, y: np.ndarray, used: np.ndarray):
        """Fit elements (columns of ``y``, rows = self.rows) sharing the subjects ``used``:
        (which elements were fitted, their results, which were fitted exactly and their
        parametric estimates), or None when the design is unusable. A response the
        unpenalised model reproduces (a constant one: mgcv's scale search starts at log(0))
        is fitted exactly (results.perfect_fits): its parametric estimates are the exact
        fit's, for every smoothing parameter. Fits whose iterations fail are left out."""
        design = self.design(used)
        if design is None:
            return None
        y = y[used]
        n = y.shape[0]
        yt = (design.Q.T @ y).T  # (b, p)
        resid0 = y - design.Q @ yt.T
        rss0 = (resid0**2).sum(axis=0)
        exact = perfect_fits(rss0, (y**2).sum(axis=0))
        estimates = (yt[exact] @ design.Rinv.T)[:, design.param_cols]
        ok = ~exact
        y, yt, rss0 = y[:, ok], yt[ok], rss0[ok]
        ysum = y.sum(axis=0)
        yss_c = ((y - ysum / n) ** 2).sum(axis=0)
        nulldev = yss_c if self.intercept else (y**2).sum(axis=0)
        rho, scores, hess = gam_fit.fit_smoothing(design, yt, rss0, yss_c / n, n, self.method)
        fitted = np.isfinite(rho).all(axis=1)
        ok[ok] = fitted
        if hess is not None:
            hess = hess[fitted]
        result = gam_fit.summarise(
            design, rho[fitted], scores[fitted], hess, yt[fitted], rss0[fitted], ysum[fitted],
            yss_c[fitted], nulldev[fitted], n, self.method,
        )  # fmt: skip
        return ok, result, exact, estimates


# --- all elements ----------------------------------------------------------------------------


class Results:
    """Per-element arrays of every statistic, filled block by block."""

    def __init__(self, model: GamModel, n_elements: int):
        n_s, n_p = len(model.blocks), len(model.param_columns)
        self.smooth = {s: np.full((n_elements, n_s), np.nan) for s in SMOOTH_STATS}
        self.param = {s: np.full((n_elements, n_p), np.nan) for s in PARAM_STATS}
        self.model = {s: np.full(n_elements, np.nan) for s in (*MODEL_STATS, "sse")}
        self.sign = np.full((n_elements, n_s), np.nan)
        self.perfect = np.zeros(n_elements, bool)  # fitted exactly (results.perfect_fits)

    def store(self, elements: np.ndarray, result: gam_fit.BatchResult) -> None:
        for name, values in result.smooth.items():
            self.smooth[name][elements] = values
        for name, values in result.param.items():
            self.param[name][elements] = values
        for name, values in result.model.items():
            self.model[name][elements] = values
        self.sign[elements] = result.slope_sign

    def store_exact(self, elements: np.ndarray, estimates: np.ndarray, n: int) -> None:
        self.param["estimate"][elements] = estimates
        self.model["nobs"][elements] = n
        self.perfect[elements] = True


def fit_block(model: GamModel, results: Results, start: int, values, threshold) -> int:
    """Fit one block of elements (values: all subjects x block); returns elements skipped for
    a design that cannot be fitted (rank deficient or too few distinct covariate values)."""
    finite = np.isfinite(values)
    enough = finite.sum(axis=0) > threshold  # ModelArray counts all subjects
    used = finite[model.rows]
    y = np.where(used, values[model.rows], 0).astype(np.float64)
    columns = np.flatnonzero(enough)
    if not columns.size:
        return 0
    keys = np.packbits(used[:, columns], axis=0).T
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    skipped = 0
    for group in range(first.size):
        members = columns[inverse.ravel() == group]
        fitted = model.fit(y[:, members], used[:, members[0]])
        if fitted is None:
            skipped += members.size
            continue
        ok, result, exact, estimates = fitted
        skipped += int((~ok & ~exact).sum())
        results.store(start + members[ok], result)
        results.store_exact(start + members[exact], estimates, int(used[:, members[0]].sum()))
    return skipped


@dataclass
class Request:
    """What to compute and write (ModelArray.gam's arguments)."""

    formula: GamFormula
    method: str
    full_outputs: bool
    changed_term: str | None

    @property
    def smooth_stats(self) -> tuple[str, ...]:
        return SMOOTH_STATS if self.full_outputs else DEFAULT_SMOOTH_STATS

    @property
    def param_stats(self) -> tuple[str, ...]:
        return PARAM_STATS if self.full_outputs else DEFAULT_PARAM_STATS

    @property
    def model_stats(self) -> tuple[str, ...]:
        return MODEL_STATS if self.full_outputs else DEFAULT_MODEL_STATS


def changed_term_name(formula: GamFormula, term: str) -> tuple[str, str]:
    """(term as written in the formula, ModelArray's column prefix) for --changed-rsq-term,
    given as written, as mgcv's label (``s(age)``), as ModelArray's name (``s_age``) or as
    ModelArray's changed.rsq.term.index (1-based position on the right-hand side)."""
    if term.strip().isdigit() and 1 <= int(term) <= len(formula.terms):
        term = formula.terms[int(term) - 1]
    try:  # written as R would deparse it: spacing and quotes do not matter
        written = rf.deparse(rf.parse(term))
    except SyntaxError:
        written = term
    for smooth in formula.smooths:
        if written in (smooth.term, smooth.label) or term.strip() == smooth.name:
            return smooth.term, smooth.name
    for param in formula.parametric:
        if written == param:
            return param, param
    raise UsageError(
        f"--changed-rsq-term {term!r} is not a term of the formula "
        f"(terms: {', '.join(formula.terms)})"
    )


def table(request: Request, model: GamModel, full: Results, reduced: Results | None):
    """(column names, matrix columns x elements) in ModelArray.gam's order."""
    n = full.model["nobs"].size
    names, rows = ["element_id"], [np.arange(n, dtype=np.float64)]
    smooth_names = [smooth_column(label) for _, label in model.blocks]
    for i, name in enumerate(smooth_names):
        for stat in request.smooth_stats:
            names.append(f"{name}.{stat}")
            rows.append(full.smooth[stat][:, i])
    for i, name in enumerate(model.param_columns):
        for stat in request.param_stats:
            names.append(f"{name}.{stat}")
            rows.append(full.param[stat][:, i])
    for stat in request.model_stats:
        names.append(f"model.{stat}")
        rows.append(full.model[stat])
    if reduced is not None:
        written, prefix = changed_term_name(request.formula, request.changed_term)
        delta = full.model["adj.r.squared"] - reduced.model["adj.r.squared"]
        with np.errstate(divide="ignore", invalid="ignore"):
            partial = (reduced.model["sse"] - full.model["sse"]) / reduced.model["sse"]
        sign = _changed_term_sign(request.formula, model, full, written)
        names += [
            f"{prefix}.delta.adj.rsq",
            f"{prefix}.partial.rsq",
            f"{prefix}.delta.adj.rsq.signed",
            f"{prefix}.partial.rsq.signed",
        ]
        rows += [delta, partial, sign * delta, sign * partial]
    if "p.value" in request.smooth_stats:
        for i, name in enumerate(smooth_names):
            names.append(f"{name}.p.value.fdr")
            rows.append(p_adjust_fdr(full.smooth["p.value"][:, i]))
    if "p.value" in request.param_stats:
        for i, name in enumerate(model.param_columns):
            names.append(f"{name}.p.value.fdr")
            rows.append(p_adjust_fdr(full.param["p.value"][:, i]))
    return names, np.vstack(rows)


def _changed_term_sign(formula, model, full: Results, written: str) -> np.ndarray:
    """Sign of the term's effect (ModelArray issue #87): for a smooth of one covariate (one
    level of a factor ``by``), of the mean over the subjects of its first derivative; for a
    one-column parametric term, of its estimate; otherwise NaN."""
    blocks = [i for i, (spec, _) in enumerate(model.blocks) if spec.term == written]
    if len(blocks) == 1:
        return full.sign[:, blocks[0]]
    matching = [i for i, c in enumerate(model.param_columns) if c == written]
    if len(matching) == 1 and not blocks:
        return np.sign(full.param["estimate"][:, matching[0]])
    return np.full(full.sign.shape[0], np.nan)


def fit_gam(
    h5_path: Path,
    cohort_path: Path,
    formula: str,
    analysis: str,
    *,
    scalar: str | None = None,
    method: str = "GCV.Cp",
    changed_rsq_term: str | None = None,
    full_outputs: bool = False,
    lthr_abs: float = 10,
    lthr_rel: float = 0.2,
    overwrite: bool = False,
    reference_levels: dict[str, str] | None = None,
    ordered_factors: dict[str, str] | None = None,
) -> list[str]:
    """Fit ``formula`` (mgcv syntax, gaussian) at every element and write results/<analysis>
    with ModelArray.gam's columns; returns the column names."""
    check_name("analysis", analysis)
    if method not in METHODS:
        raise UsageError(f"method {method!r}: use one of {', '.join(METHODS)}")
    parsed = parse_gam_formula(formula)
    request = Request(parsed, method, full_outputs, changed_rsq_term)
    reduced_formula = None
    if changed_rsq_term is not None:
        written, _ = changed_term_name(parsed, changed_rsq_term)
        reduced_formula = parsed.without(written)
    scalar = scalar or parsed.scalar
    with fit_inputs(h5_path, cohort_path, scalar, analysis, overwrite) as (stored, phenotypes):
        names, values = stored.names, stored.values
        factors = (reference_levels, ordered_factors)
        models = [GamModel(parsed, phenotypes, method, *factors)]
        if reduced_formula is not None:
            models.append(GamModel(reduced_formula, phenotypes, method, *factors))
        repeated = repeated_measures(formula, phenotypes, models[0].rows)  # a note of the results
        n_elements = values.shape[1]
        results = [Results(m, n_elements) for m in models]
        threshold = max(len(names) * lthr_rel, lthr_abs)
        log.info(
            "Fitting %s (%s) at %d elements (%d subjects)",
            formula,
            method,
            n_elements,
            len(models[0].rows),
        )
        skipped = [0] * len(models)
        # the work is thousands of small matrices: BLAS threads only add contention
        with threadpool_limits(limits=1, user_api="blas"):
            for start, block in element_blocks(values, analysis):
                for i, (model, result) in enumerate(zip(models, results, strict=True)):
                    skipped[i] += fit_block(model, result, start, block, threshold)
    if skipped[-1] and len(models) > 1:
        log.warning(
            "The reduced model of --changed-rsq-term cannot be fitted at %d elements (a "
            "rank-deficient design, too few distinct covariate values or a failed fit there): "
            "their changed R-squared is NaN",
            skipped[-1],
        )
    reduced = results[1] if len(results) > 1 else None
    columns, matrix = table(request, models[0], results[0], reduced)
    about = {
        "method": "gam",
        "formula": formula,
        "smoothing": method,
        "changed_rsq_term": changed_rsq_term,
        "reference_levels": models[0].references,
        "ordered_factors": dict(ordered_factors or {}),
        "notes": [repeated] if repeated else [],
        "n_subjects": len(names),
        "n_with_phenotypes": len(models[0].rows),
        "threshold": threshold_rule(lthr_abs, lthr_rel, len(names)),
        "cohort_file": str(cohort_path),
        "scalar": scalar,
        "threshold_abs": lthr_abs,
        "threshold_rel": lthr_rel,
        "single_subject_levels": single_subject_levels(formula, phenotypes, models[0].rows),
        "unfitted_reasons": {UNFITTED: skipped[0]},
    }
    write_results(h5_path, analysis, columns, matrix, about, overwrite, results[0].perfect)
    return columns
