"""Mass-univariate linear models, as ModelArray.lm fits them, for all elements at once.

ModelArray.lm fits one ``stats::lm`` per element (~45 ms each). Here the design matrix is built
once (formulaic, R's treatment contrasts and column names) and every element sharing a pattern of
missing values is fitted in one QR solve. The rules are ModelArray's:

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
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import pandas as pd
from scipy import special
from tqdm import tqdm

from greyarray.errors import DataError, OutputError, UsageError
from greyarray.io.cohort import read_csv_table
from greyarray.io.fileio import check_free_space, check_writable
from greyarray.io.h5read import read_scalar
from greyarray.io.inputs import check_present, open_hdf5
from greyarray.io.names import check_name
from greyarray.stats.linalg import column_norms
from greyarray.stats.names import (
    DEFAULT_MODEL_STATS,
    DEFAULT_TERM_STATS,
    MODEL_STATS,
    TERM_STATS,
)

if TYPE_CHECKING:  # numba is imported only when permutations are asked for
    from greyarray.stats.permutation import PermutationOptions

log = logging.getLogger(__name__)

BLOCK_BYTES = 32 * 2**20  # float64 values of one block of elements, all subjects


@dataclass(frozen=True)
class Design:
    """The model matrix of the subjects with complete phenotypes, with R's column names."""

    matrix: np.ndarray  # (n_complete, p)
    columns: list[str]  # R names: (Intercept) -> Intercept, sexM, age:sexM, I(age^2)
    rows: np.ndarray  # indices (in HDF5 subject order) of the subjects in ``matrix``
    intercept: bool
    references: dict[str, str] = field(default_factory=dict)  # factor -> reference level


# What a formula may call besides its columns and formulaic's own transforms (C, I, poly,
# center, scale, bs, ...): nothing of GreyArray's namespace (a constant, its logger) resolves.
FORMULA_FUNCTIONS = {
    "log": np.log,
    "log2": np.log2,
    "log10": np.log10,
    "log1p": np.log1p,
    "exp": np.exp,
    "sqrt": np.sqrt,
    "abs": np.abs,
    "TRUE": True,  # R's logical constants, as in poly(age, 2, raw = TRUE)
    "FALSE": False,
}


def parse_formula(formula: str) -> tuple[str, str]:
    """(response, right-hand side) of an R formula; the response may be `back-quoted`.

    Names with a double underscore (``__import__``, ``__class__``) are refused: formulaic
    evaluates terms as Python, and no column or R function needs them."""
    if "__" in formula:
        raise UsageError(
            f"formula {formula!r}: names with a double underscore ('__') are not allowed"
        )
    if formula.count("~") != 1:
        raise UsageError(
            f"formula {formula!r} needs exactly one '~' (e.g. 'thickness ~ age + sex')"
        )
    left, right = (part.strip() for part in formula.split("~"))
    if not left or not right:
        raise UsageError(f"formula {formula!r} needs a response and predictors")
    if "%in%" in right:  # formulaic nests as b + b:a; R's terms make a:b: another model
        raise UsageError(
            f"formula {formula!r}: '%in%' is not supported (it would fit another model than "
            "R's); write the interaction, e.g. 'age:sex'"
        )
    return left.strip("`"), right


def _to_formulaic(rhs: str) -> str:
    """R spellings formulaic reads differently: ``factor(x)`` is ``C(x)``, ``^`` inside ``I()``
    is a power."""
    rhs = re.sub(r"\bfactor\(", "C(", rhs)
    return re.sub(
        r"\bI\(([^()]*(?:\([^()]*\)[^()]*)*)\)",
        lambda m: "I(" + m.group(1).replace("^", "**") + ")",
        rhs,
    )


def r_name(column: str) -> str:
    """formulaic's column name in R's spelling: ``sex[T.M]`` -> ``sexM``, ``C(site)[T.b]`` ->
    ``factor(site)b``, ``I(age ** 2)`` -> ``I(age^2)``, ``Intercept`` stays (ModelArray renames
    R's ``(Intercept)`` to ``Intercept``)."""
    parts = []
    for part in column.split(":"):
        match = re.fullmatch(r"(.*)\[(?:T\.)?(.*)\]", part)
        name = match.group(1) + match.group(2) if match else part
        name = re.sub(r"^C\(", "factor(", name).replace(" ** ", "^")
        parts.append(name)
    return ":".join(parts)


# ICU's root collation (what R's sort() uses in UTF-8 locales) for ASCII punctuation and symbols
_ICU_PUNCTUATION = "\t\n\v\f\r _-,;:!?.'\"()[]{}@*/\\&#%`^+<=>|~$"


def r_sort_key(text: str) -> tuple:
    """A sort key ordering strings as R does in UTF-8 locales (ICU collation): punctuation, then
    digits, then letters compared ignoring case and accents; then accents; then lowercase before
    uppercase. So ``female`` < ``Male`` in R, where Python's sort puts ``Male`` first."""
    primary, secondary, tertiary = [], [], []
    for char in unicodedata.normalize("NFD", str(text)):
        if unicodedata.combining(char):
            if secondary:
                secondary[-1] += char
            continue
        base = char.casefold()
        if char.isalpha():
            weight = (3, base)
        elif char.isdigit():
            weight = (2, base)
        elif char in _ICU_PUNCTUATION:
            weight = (0, str(_ICU_PUNCTUATION.index(char)).zfill(3))
        else:
            weight = (1, char)
        primary.append(weight)
        secondary.append("")
        tertiary.append(char != base)
    return primary, secondary, tertiary


def r_factors(
    formula: str, phenotypes: pd.DataFrame, references: dict[str, str] | None = None
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Text columns as factors with R's level order (the first level is the reference unless
    ``references`` names another); returns the table and {factor used in formula: reference}."""
    references = dict(references or {})
    unknown = sorted(set(references) - set(phenotypes.columns))
    if unknown:
        raise UsageError(
            f"--reference-level: no column {', '.join(map(repr, unknown))} in the cohort "
            f"(columns: {', '.join(phenotypes.columns)})"
        )
    table, chosen = phenotypes.copy(), {}
    _, rhs = parse_formula(formula)
    for column in phenotypes.columns:
        values = phenotypes[column]
        if pd.api.types.is_numeric_dtype(values) and column not in references:
            continue
        levels = sorted({str(v) for v in values.dropna()}, key=r_sort_key)
        if column in references:
            reference = references[column]
            if reference not in levels:
                raise UsageError(
                    f"--reference-level {column}={reference}: no such level "
                    f"(levels: {', '.join(levels)})"
                )
            levels = [reference] + [level for level in levels if level != reference]
        table[column] = pd.Categorical(values.map(lambda v: v if pd.isna(v) else str(v)), levels)
        if levels and re.search(rf"(?<![\w.]){re.escape(column)}(?![\w.])", rhs):
            chosen[column] = levels[0]
    return table, chosen


def build_design(
    formula: str, phenotypes: pd.DataFrame, references: dict[str, str] | None = None
) -> Design:
    """The design matrix of ``formula`` on ``phenotypes`` (rows in HDF5 subject order), factors
    with R's levels and treatment contrasts."""
    from formulaic import model_matrix
    from formulaic.errors import FormulaicError

    _, rhs = parse_formula(formula)
    table, chosen = r_factors(formula, phenotypes, references)
    try:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # NaN: missing
            matrix = model_matrix(
                _to_formulaic(rhs), table, na_action="drop", context=FORMULA_FUNCTIONS
            )
    except (FormulaicError, NameError, KeyError, SyntaxError, ValueError, TypeError) as err:
        raise DataError(f"formula {formula!r}: {_formula_problem(err, phenotypes)}") from None
    rows = np.asarray(matrix.index, dtype=np.int64)
    columns = [r_name(c) for c in matrix.columns]
    check_design(formula, table.iloc[rows], chosen, len(columns))
    if aliased := aliased_columns(np.asarray(matrix, dtype=np.float64), columns):
        raise DataError(
            f"formula {formula!r}: {', '.join(map(repr, aliased))} "
            f"{'is a linear combination' if len(aliased) == 1 else 'are linear combinations'} "
            "of the columns before (R's lm reports NA for such a column); leave it out"
        )
    if len(rows) < len(phenotypes):
        log.warning(
            "%d of %d subjects have a missing phenotype in %r and are left out, as lm "
            "leaves them out",
            len(phenotypes) - len(rows),
            len(phenotypes),
            rhs,
        )
    for factor, level in chosen.items():
        log.info("Factor %s: reference level %r (R's order)", factor, level)
    return Design(
        np.asarray(matrix, dtype=np.float64), columns, rows, "Intercept" in columns, chosen
    )


def _formula_problem(err: Exception, phenotypes: pd.DataFrame) -> str:
    """formulaic's error in a line: an unknown name is said as such, with the columns."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    unknown = re.search(r"`([^`]+)` is not present in the dataset", text)
    if unknown:
        text = f"unknown column {unknown.group(1)!r}"
    return f"{text} (cohort columns: {', '.join(map(str, phenotypes.columns))})"


def check_design(formula: str, used: pd.DataFrame, factors: dict[str, str], p: int) -> None:
    """Refuse a model lm could not fit (R stops on each): no complete subject, more columns
    than subjects, a factor with one level among the subjects used."""
    if used.empty:
        raise DataError(
            f"formula {formula!r}: no subject has every value of the formula's columns "
            "(a column is empty, or the missing values leave nobody)"
        )
    if p > len(used):
        raise DataError(
            f"formula {formula!r}: the design has {p} columns but only {len(used)} subjects"
        )
    for factor in factors:
        levels = used[factor].dropna().unique()
        if len(levels) < 2:
            raise DataError(
                f"formula {formula!r}: factor {factor!r} has only one level "
                f"({', '.join(map(repr, map(str, levels)))}) among the subjects used; contrasts "
                "need 2 or more levels (as R's lm)"
            )


def aliased_columns(x: np.ndarray, columns: list[str], tol: float = 1e-7) -> list[str]:
    """The design columns R's lm calls aliased: what is left of each after removing its
    projection on the earlier (kept) columns is below ``tol`` of its norm (R's QR tolerance)."""
    kept: list[int] = []
    aliased = []
    for j, name in enumerate(columns):
        rest = x[:, j]
        if kept:
            q, _ = np.linalg.qr(x[:, kept])
            rest = rest - q @ (q.T @ rest)
        norm = column_norms(x[:, [j]])[0]
        if column_norms(rest[:, None])[0] <= tol * norm or norm == 0:
            aliased.append(name)
        else:
            kept.append(j)
    return aliased


def output_columns(
    design: Design, term_stats=DEFAULT_TERM_STATS, model_stats=DEFAULT_MODEL_STATS
) -> list[str]:
    """ModelArray.lm's columns, in its order."""
    names = ["element_id"]
    names += [f"{term}.{stat}" for term in design.columns for stat in term_stats]
    names += [f"model.{stat}" for stat in model_stats]
    if "p.value" in term_stats:
        names += [f"{term}.p.value.fdr" for term in design.columns]
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
        self.rank_deficient = 0

    def fit_block(self, start: int, values: np.ndarray) -> None:
        """``values``: (n_subjects, block) of the response for elements start, start+1, ..."""
        finite = np.isfinite(values)
        enough = finite.sum(axis=0) > self.threshold  # ModelArray counts all subjects
        used = finite[self.design.rows]  # among subjects with phenotypes
        y = np.where(used, values[self.design.rows], 0).astype(np.float64)
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
        self.rank_deficient += int((~ok).sum())
        y, n, elements = y[ok], n[ok], elements[ok]
        if not elements.size:
            return
        beta = np.linalg.solve(r, np.swapaxes(q, 1, 2) @ y)  # (k, p, 1)
        fitted = x @ beta  # (k, n, 1); zero on missing rows
        rss = ((y - fitted) ** 2).sum(axis=(1, 2))
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
            fstat = (mss / numdf) / resvar if numdf > 0 else np.full_like(rss, np.nan)
            pval = special.fdtrc(numdf, rdf, fstat) if numdf > 0 else np.full_like(rss, np.nan)
            loglik = 0.5 * (-n * (np.log(2 * np.pi) + 1 - np.log(n) + np.log(rss)))
        stats = {
            "r.squared": r2,
            "adj.r.squared": adj,
            "sigma": np.sqrt(resvar),
            "statistic": fstat,
            "p.value": pval,
            "df": np.full_like(rss, numdf),
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
        rows = [np.arange(n, dtype=np.float64)]
        rows += [
            self.terms[stat][i] for i in range(len(self.design.columns)) for stat in term_stats
        ]
        rows += [self.model[stat] for stat in model_stats]
        if "p.value" in term_stats:
            rows += [
                p_adjust_fdr(self.terms["p.value"][i]) for i in range(len(self.design.columns))
            ]
        if "p.value" in model_stats:
            rows.append(p_adjust_fdr(self.model["p.value"]))
        return np.vstack(rows)


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


def match_cohort(cohort: pd.DataFrame, names: list[str], scalar: str, path: Path) -> pd.DataFrame:
    """The cohort rows of ``scalar`` in the HDF5's subject order (as ModelArray aligns them)."""
    if "scalar_name" in cohort.columns and (cohort["scalar_name"] == scalar).any():
        cohort = cohort[cohort["scalar_name"] == scalar]
    if "source_file" not in cohort.columns:
        raise DataError(f"{path}: no source_file column to match the HDF5's subjects")
    sources = cohort["source_file"].astype(str)
    if sources.duplicated().any():
        raise DataError(
            f"{path}: source_file {sources[sources.duplicated()].iloc[0]!r} is "
            f"listed twice for scalar {scalar!r}"
        )
    missing = sorted(set(names) - set(sources))
    extra = sorted(set(sources) - set(names))
    if missing or extra:
        what = (
            f"{len(missing)} HDF5 subjects have no cohort row (e.g. {missing[0]!r})"
            if missing
            else f"{len(extra)} cohort rows are not in the HDF5 (e.g. {extra[0]!r})"
        )
        raise DataError(f"{path}: cohort does not match scalars/{scalar}/column_names: {what}")
    return cohort.set_index(sources).loc[names].reset_index(drop=True)


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
    permutations: PermutationOptions | None = None,
) -> list[str]:
    """Fit ``formula`` at every element of ``h5_path`` and write results/<analysis>.

    ``term_stats`` and ``model_stats`` are ModelArray.lm's ``var.terms`` and ``var.model``.
    ``permutations`` appends permutation inference columns (stats/permutation.py); with a
    shard, only that shard's null distribution is written (beside the HDF5), and no results.
    """
    check_name("analysis", analysis)
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
        design = build_design(formula, phenotypes, reference_levels)
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
        step = max(64, BLOCK_BYTES // (8 * len(names)))
        for start in tqdm(
            range(0, values.shape[1], step),
            desc=f"Fitting {analysis}",
            unit="block",
            disable=None,
            leave=False,
        ):
            fitter.fit_block(start, values[:, start : start + step])
        extra = (
            permutation.permutation_columns(prepared, permutations.merge)
            if permutations is not None
            else ([], np.empty((0, values.shape[1])))
        )
    if fitter.rank_deficient:
        log.warning(
            "%d elements have a rank-deficient design (e.g. a factor level with no "
            "finite values): their results are NaN",
            fitter.rank_deficient,
        )
    columns = output_columns(design, term_stats, model_stats) + extra[0]
    about = {
        "method": "lm",
        "formula": formula,
        "reference_levels": design.references,
        "n_subjects": len(names),
        "n_with_phenotypes": len(design.rows),
        "threshold": threshold_rule(lthr_abs, lthr_rel, len(names)),
        "cohort_file": str(cohort_path),
    }
    if permutations is not None:
        about["permutations"] = {
            "n": permutations.permutations,
            "tfce": permutations.tfce,
            "exchangeability_blocks": permutations.blocks,
            "seed": permutations.seed,
        }
    table = np.vstack([fitter.table(term_stats, model_stats), extra[1]])
    write_results(h5_path, analysis, columns, table, about, overwrite=overwrite)
    return columns


def threshold_rule(lthr_abs: float, lthr_rel: float, n: int) -> str:
    """ModelArray's element threshold, in words (for sidecars and the methods text)."""
    return (
        f"an element is fitted only where more than max({lthr_abs:g}, {lthr_rel:g} x {n}) = "
        f"{max(lthr_abs, lthr_rel * n):g} participants have a finite value"
    )


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
