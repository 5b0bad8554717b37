"""The design layer every model shares: R's formula, R's factors and the model matrix.

lm, gam, lmm and harmonize all read a formula against the cohort's phenotypes (rows in the HDF5's
subject order, as ModelArray aligns them). Here: the formula's parts, factors with R's level order
(ICU collation) and treatment contrasts, the model matrix with R's column names, and the checks R's
model functions make before fitting (no complete subject, too few subjects, one-level factors,
aliased columns).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from greyarray.errors import DataError, UsageError
from greyarray.stats.linalg import column_norms

log = logging.getLogger(__name__)


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


def threshold_rule(lthr_abs: float, lthr_rel: float, n: int) -> str:
    """ModelArray's element threshold, in words (for sidecars and the methods text)."""
    return (
        f"an element is fitted only where more than max({lthr_abs:g}, {lthr_rel:g} x {n}) = "
        f"{max(lthr_abs, lthr_rel * n):g} participants have a finite value"
    )


def single_subject_levels(
    formula: str, phenotypes: pd.DataFrame, rows: np.ndarray
) -> dict[str, list[str]]:
    """The formula's factors (text columns, and any column inside ``factor()``/``C()``) with
    levels that only one of the subjects used (``rows``) has, in R's level order: such a
    level's coefficient rests on one subject. The results writer says so."""
    _, rhs = parse_formula(formula)
    used = phenotypes.iloc[rows]
    found = {}
    for column in used.columns:
        name = re.escape(str(column))
        mentioned = re.search(rf"(?<![\w.]){name}(?![\w.])", rhs)
        wrapped = re.search(rf"\b(?:factor|C)\(\s*`?{name}`?\s*[,)]", rhs)
        if not mentioned or not (wrapped or not pd.api.types.is_numeric_dtype(used[column])):
            continue
        counts = used[column].dropna().astype(str).value_counts()
        if single := sorted(counts.index[counts == 1], key=r_sort_key):
            found[str(column)] = single
    return found
