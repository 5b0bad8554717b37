"""The design layer every model shares: R's model frame and model matrix, and lme4's random-effect
blocks, from a formula read by ``stats/formula.py``.

lm, gam, lmm and harmonize all read a formula against the cohort's phenotypes (rows in the HDF5's
subject order, as ModelArray aligns them). As R does (``model.frame`` then ``model.matrix``):

1. every variable of the formula is evaluated on all the cohort's rows (so ``poly``, ``ns``,
   ``bs`` and ``scale`` see every subject, as they do in ModelArray, where the phenotypes table
   holds every subject and a missing response only drops rows afterwards);
2. rows with a missing value in any variable are left out (``na.omit``), smooth covariates and
   random-effect grouping factors included;
3. text becomes a factor with R's level order among the rows kept (ICU collation, what R uses in
   UTF-8 locales), factors lose their unused levels (``drop.unused.levels``), logicals are
   factors with levels FALSE, TRUE (``I(age > 15)`` gives ``I(age > 15)TRUE``);
4. columns per term, as R's C ``modelmatrix``: treatment contrasts for factors, ``contr.poly``
   for ordered factors (``.L .Q .C ^4``), indicator columns where R's rule says so (a factor in
   a term whose margin is absent, the first factor of a model without intercept), interactions
   with the first variable varying fastest, R's column names.

Then the checks R's model functions make before fitting. Columns that are linear combinations
of the ones before are left out of the matrix with a warning; R's ``lm`` reports NA for them, and
ModelArray, reading ``broom::tidy``, writes their columns filled with NaN (``Design.coefficients``
keeps every name, ``Design.columns`` the fitted ones).
"""

from __future__ import annotations

import logging
import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from greyarray.errors import DataError, GreyArrayError, UsageError
from greyarray.stats import formula as rf
from greyarray.stats.linalg import column_norms

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Design:
    """The model matrix of the subjects with complete phenotypes, with R's column names."""

    matrix: np.ndarray  # (n_complete, p)
    columns: list[str]  # ModelArray's names: (Intercept) -> Intercept, sexM, age:sexM, ...
    rows: np.ndarray  # indices (in HDF5 subject order) of the subjects in ``matrix``
    intercept: bool
    references: dict[str, str] = field(default_factory=dict)  # factor -> reference level
    offset: np.ndarray | None = None  # (n_complete,): offset() terms, summed
    assign: list[int] = field(default_factory=list)  # per column: its term (0: intercept)
    labels: list[str] = field(default_factory=list)  # R's term labels
    aliased: list[str] = field(default_factory=list)  # columns left out (NA in R's lm)
    model: rf.ModelFormula | None = None  # the formula as read
    coefficients: list[str] = field(default_factory=list)  # every column, the aliased too

    def __post_init__(self):
        if not self.coefficients:
            object.__setattr__(self, "coefficients", list(self.columns))


# --- values of the model frame ---------------------------------------------------------------


@dataclass
class Numeric:
    """A numeric vector (n,) or matrix (n, k); NaN is R's NA (and NaN)."""

    values: np.ndarray
    colnames: list[str] | None = None

    @property
    def matrix(self) -> np.ndarray:
        return self.values if self.values.ndim == 2 else self.values[:, None]


@dataclass
class Logical:
    values: np.ndarray  # 0.0, 1.0 or NaN


@dataclass
class Text:
    values: np.ndarray  # object: str or None


@dataclass
class Factor:
    codes: np.ndarray  # int, -1 for NA
    levels: list[str]
    ordered: bool = False


@dataclass
class Constants:
    """``c(...)`` of constants (for levels = and %in%)."""

    values: list


Value = Numeric | Logical | Text | Factor | Constants

_LOGICAL_TEXT = {"T": 1.0, "TRUE": 1.0, "F": 0.0, "FALSE": 0.0}  # read.csv's (not true/True)


def _missing(value: Value) -> np.ndarray:
    """R's is.na per row."""
    if isinstance(value, Numeric):
        return np.isnan(value.matrix).any(axis=1)
    if isinstance(value, Logical):
        return np.isnan(value.values)
    if isinstance(value, Text):
        return np.array([v is None for v in value.values], bool)
    if isinstance(value, Factor):
        return value.codes < 0
    raise TypeError(type(value))


def _take(value: Value, rows: np.ndarray) -> Value:
    if isinstance(value, Numeric):
        return Numeric(value.values[rows], value.colnames)
    if isinstance(value, Logical):
        return Logical(value.values[rows])
    if isinstance(value, Text):
        return Text(value.values[rows])
    if isinstance(value, Factor):
        return Factor(value.codes[rows], value.levels, value.ordered)
    return value


# --- R's level order -------------------------------------------------------------------------

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


def _factor(value: Value, levels: list[str] | None = None, ordered: bool = False) -> Factor:
    """R's ``factor(x)``: levels sorted as R sorts them (numbers numerically, printed as R
    prints them; text in the locale's collation; logicals FALSE < TRUE), or as given."""
    if isinstance(value, Factor):
        present = sorted(set(value.codes[value.codes >= 0].tolist()))
        labels = [value.levels[i] for i in present]
        text = np.array([value.levels[c] if c >= 0 else None for c in value.codes], object)
        return _factor(Text(text), levels or labels, ordered)
    if isinstance(value, Numeric):
        if value.values.ndim != 1:
            raise _NotR("factor() of a matrix")
        x = value.values
        distinct = np.unique(x[~np.isnan(x)])
        names = [rf.r_number(v) for v in distinct]
        text = np.array([None if np.isnan(v) else rf.r_number(v) for v in x], object)
        return _factor(Text(text), levels if levels is not None else names, ordered)
    if isinstance(value, Logical):
        x = value.values
        text = np.array([None if np.isnan(v) else ("TRUE" if v else "FALSE") for v in x], object)
        present = [name for name, v in (("FALSE", 0.0), ("TRUE", 1.0)) if (x == v).any()]
        return _factor(Text(text), levels if levels is not None else present, ordered)
    if isinstance(value, Text):
        if levels is None:
            levels = sorted({v for v in value.values if v is not None}, key=r_sort_key)
        index = {level: i for i, level in enumerate(levels)}
        codes = np.array([index.get(v, -1) if v is not None else -1 for v in value.values])
        return Factor(codes.astype(np.int64), list(levels), ordered)
    raise _NotR("factor() of this value")


def _drop_unused(value: Factor) -> Factor:
    used = np.unique(value.codes[value.codes >= 0])
    if used.size == len(value.levels):
        return value
    remap = np.full(len(value.levels) + 1, -1)
    remap[used] = np.arange(used.size)
    return Factor(remap[value.codes], [value.levels[i] for i in used], value.ordered)


# --- the cohort's columns as R's read.csv gives them -----------------------------------------


class _NotR(Exception):
    """A formula GreyArray does not evaluate (a usage error, said with the formula)."""


class _BadData(Exception):
    """The formula cannot be evaluated on this cohort (a data error)."""


def _column(series: pd.Series) -> Value:
    """A cohort column as ``read.csv`` types it (``io.cohort.read_csv_table`` reads it so):
    numbers, logicals (T, F, TRUE, FALSE), text (empty fields are a level ""); factors made by
    --reference-level / --ordered-factor stay factors."""
    if isinstance(series.dtype, pd.CategoricalDtype):
        codes = series.cat.codes.to_numpy().astype(np.int64)
        return Factor(codes, [str(c) for c in series.cat.categories], bool(series.cat.ordered))
    if pd.api.types.is_bool_dtype(series):
        return Logical(series.to_numpy().astype(float))
    if pd.api.types.is_numeric_dtype(series):
        return Numeric(series.to_numpy(dtype=np.float64))
    values = [None if _isna(v) else v for v in series.tolist()]
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, (bool, np.bool_)) or str(v) in _LOGICAL_TEXT for v in present):
        return Logical(
            np.array([np.nan if v is None else float(_LOGICAL_TEXT.get(str(v), v)) for v in values])
        )
    return Text(np.array([None if v is None else str(v) for v in values], object))


def _isna(v) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def prepare_phenotypes(
    phenotypes: pd.DataFrame,
    references: dict[str, str] | None = None,
    ordered: dict[str, str] | None = None,
) -> pd.DataFrame:
    """The cohort as the user's R session would hold it: ``--reference-level COLUMN=LEVEL``
    makes COLUMN a factor with LEVEL first (then R's order); ``--ordered-factor
    COLUMN=REFERENCE`` an ordered factor as ModelArray's ``gen_gamFormula_fxSmooth`` makes one
    (``ordered(x, levels = c(reference, unique(x) without it))``: the other levels in their
    order of first appearance in the cohort)."""
    references, ordered = dict(references or {}), dict(ordered or {})
    for option, chosen in (("--reference-level", references), ("--ordered-factor", ordered)):
        unknown = sorted(set(chosen) - set(phenotypes.columns))
        if unknown:
            raise UsageError(
                f"{option}: no column {', '.join(map(repr, unknown))} in the cohort "
                f"(columns: {', '.join(map(str, phenotypes.columns))})"
            )
    both = sorted(set(references) & set(ordered))
    if both:
        raise UsageError(
            f"{', '.join(both)}: give a column either --reference-level or --ordered-factor"
        )
    table = phenotypes.copy()
    for column, reference in {**references, **ordered}.items():
        values = _column(phenotypes[column])
        labels = _factor(values)
        text = np.array([labels.levels[c] if c >= 0 else None for c in labels.codes], object)
        if reference not in labels.levels:
            option = "--ordered-factor" if column in ordered else "--reference-level"
            raise UsageError(
                f"{option} {column}={reference}: no such level (levels: {', '.join(labels.levels)})"
            )
        if column in ordered:  # in the cohort file's row order (match_cohort keeps it)
            order = phenotypes.attrs.get("cohort_rows", np.arange(len(phenotypes)))
            seen = list(dict.fromkeys(text[i] for i in np.argsort(order) if text[i] is not None))
        else:
            seen = labels.levels
        levels = [reference] + [level for level in seen if level != reference]
        table[column] = pd.Categorical(text, categories=levels, ordered=column in ordered)
    return table


# --- evaluation of a formula's variables -----------------------------------------------------


def _numeric(value: Value, what: str) -> np.ndarray:
    if isinstance(value, Numeric):
        return value.values
    if isinstance(value, Logical):
        return value.values
    if isinstance(value, Constants) and all(isinstance(v, (int, float)) for v in value.values):
        return np.array(value.values, float)
    kind = "text" if isinstance(value, (Text, Constants)) else "a factor"
    raise _BadData(f"{what} needs numbers but gets {kind} (R stops: non-numeric argument)")


def _scalar(node: rf.Node, value: Value, what: str):
    """A constant argument (a number, string or logical of length 1)."""
    if isinstance(value, Constants) and len(value.values) == 1:
        return value.values[0]
    raise _NotR(f"{what}: '{rf.deparse(node)}' must be one constant")


def _number(node: rf.Node, value: Value, what: str) -> float:
    v = _scalar(node, value, what)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _NotR(f"{what}: '{rf.deparse(node)}' must be a number")
    return float(v)


def _flag(node: rf.Node, value: Value, what: str) -> bool:
    v = _scalar(node, value, what)
    if not isinstance(v, bool):
        raise _NotR(f"{what}: '{rf.deparse(node)}' must be TRUE or FALSE")
    return v


def _numbers(node: rf.Node, value: Value, what: str) -> np.ndarray:
    values = _constants(value)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise _NotR(f"{what}: '{rf.deparse(node)}' must be numbers")
    return np.array(values, float)


def _constants(value: Value) -> list:
    if isinstance(value, Constants):
        return value.values
    raise _NotR("expected constants")


_MATH = {
    "log2": np.log2,
    "log10": np.log10,
    "log1p": np.log1p,
    "exp": np.exp,
    "expm1": np.expm1,
    "sqrt": np.sqrt,
    "abs": np.abs,
    "sign": np.sign,
    "floor": np.floor,
    "ceiling": np.ceil,
    "trunc": np.trunc,
    "sin": np.sin,
    "cos": np.cos,
    "tan": np.tan,
}
_ARITHMETIC = {
    "+": np.add,
    "-": np.subtract,
    "*": np.multiply,
    "/": np.divide,
    "^": np.power,
    "%%": lambda a, b: a - np.floor(a / b) * b,
    "%/%": lambda a, b: np.floor(a / b),
}
_COMPARE = {
    "<": np.less,
    ">": np.greater,
    "<=": np.less_equal,
    ">=": np.greater_equal,
    "==": np.equal,
    "!=": np.not_equal,
}
# functions evaluated here, with R's argument names in order (for matching named arguments)
SIGNATURES = {
    "log": ("x", "base"),
    "I": ("x",),
    "offset": ("object",),
    "factor": ("x", "levels", "labels", "exclude", "ordered"),
    "as.factor": ("x",),
    "ordered": ("x", "levels"),
    "as.ordered": ("x",),
    "relevel": ("x", "ref"),
    "as.numeric": ("x",),
    "as.double": ("x",),
    "as.integer": ("x",),
    "as.character": ("x",),
    "scale": ("x", "center", "scale"),
    "poly": ("x", "degree", "coefs", "raw", "simple"),
    "ns": ("x", "df", "knots", "intercept", "Boundary.knots"),
    "bs": ("x", "df", "knots", "degree", "intercept", "Boundary.knots"),
    "c": (),
    **{name: ("x",) for name in _MATH},
}
PACKAGES = {"base", "stats", "splines"}


def _match(node: rf.Call, fn: str) -> dict[str, rf.Node]:
    """R's argument matching (exact names, then positions) for the functions above."""
    formals = SIGNATURES[fn]
    named = {}
    for name in node.named:
        matches = [f for f in formals if f == name] or [f for f in formals if f.startswith(name)]
        if len(matches) != 1:
            raise _NotR(f"{rf.deparse(node)}: {fn}() has no argument {name!r}")
        named[matches[0]] = node.named[name]
    free = [f for f in formals if f not in named]
    positional = node.positional
    if len(positional) > len(free):
        raise _NotR(f"{rf.deparse(node)}: too many arguments for {fn}()")
    named.update(zip(free, positional, strict=False))
    return named


class Evaluator:
    """Evaluates a formula's expressions on the cohort's columns, as R's model.frame would."""

    def __init__(self, table: pd.DataFrame):
        self.table = table
        self.n = len(table)
        self.cache: dict[str, Value] = {}

    def __call__(self, node: rf.Node) -> Value:
        key = rf.deparse(node)
        if key not in self.cache:
            self.cache[key] = self._eval(node)
        return self.cache[key]

    def _eval(self, node: rf.Node) -> Value:
        if isinstance(node, rf.Name):
            if node.id in self.table.columns:
                return _column(self.table[node.id])
            constants = {"T": True, "F": False, "pi": math.pi}
            if node.id in constants:
                return Constants([constants[node.id]])
            raise _BadData(f"unknown column {node.id!r}")
        if isinstance(node, rf.Num):
            return Constants([int(node.value) if node.integer else node.value])
        if isinstance(node, rf.Str):
            return Constants([node.value])
        if isinstance(node, rf.Const):
            if node.value is None:
                raise _NotR("NULL in a formula")
            return Constants([None if node.value == "NA" else node.value])
        return self._call(node)

    def vector(self, value: Value) -> Value:
        """A constant of length 1 recycled to every row."""
        if isinstance(value, Constants):
            if len(value.values) != 1:
                raise _NotR("a vector of constants where one value per subject is needed")
            v = value.values[0]
            if isinstance(v, bool):
                return Logical(np.full(self.n, float(v)))
            if v is None:
                return Logical(np.full(self.n, np.nan))
            if isinstance(v, str):
                return Text(np.full(self.n, v, object))
            return Numeric(np.full(self.n, float(v)))
        return value

    def _call(self, node: rf.Call) -> Value:
        fn, args = node.fn, node.args
        if fn == "(":
            return self(args[0])
        if fn in _ARITHMETIC and len(args) == 2:
            a, b = (self(x) for x in args)
            if all(isinstance(v, Constants) for v in (a, b)):
                x, y = (_numeric(v, f"'{rf.deparse(node)}'") for v in (a, b))
                return Constants(_ARITHMETIC[fn](x, y).tolist())
            a, b = self.vector(a), self.vector(b)
            x, y = (_numeric(v, f"'{rf.deparse(node)}'") for v in (a, b))
            with np.errstate(all="ignore"):
                return Numeric(_ARITHMETIC[fn](x, y))
        if fn in ("-", "+") and len(args) == 1:
            value = self(args[0])
            if isinstance(value, Constants):
                x = _numeric(value, f"'{rf.deparse(node)}'")
                return Constants((-x if fn == "-" else x).tolist())
            x = _numeric(self.vector(value), f"'{rf.deparse(node)}'")
            return Numeric(-x if fn == "-" else +x)
        if fn in _COMPARE and len(args) == 2:
            return self._compare(node)
        if fn in ("&", "|", "&&", "||") and len(args) == 2:
            x, y = (_numeric(self.vector(self(a)), f"'{rf.deparse(node)}'") for a in args)
            known_x, known_y = ~np.isnan(x), ~np.isnan(y)
            if fn in ("&", "&&"):  # R's three-valued logic
                decided = (known_x & (x == 0)) | (known_y & (y == 0))
                out = np.where(decided, 0.0, np.where(known_x & known_y, 1.0, np.nan))
            else:
                decided = (known_x & (x != 0)) | (known_y & (y != 0))
                out = np.where(decided, 1.0, np.where(known_x & known_y, 0.0, np.nan))
            return Logical(out)
        if fn == "!" and len(args) == 1:
            x = _numeric(self.vector(self(args[0])), f"'{rf.deparse(node)}'")
            return Logical(np.where(np.isnan(x), np.nan, (x == 0).astype(float)))
        if fn == "%in%" and len(args) == 2:
            return self._in(node)
        if fn in rf.SMOOTHS:
            raise _NotR(f"{fn}() is a smooth: fit it with fit-gam")
        base = rf.function_name(node)
        package = fn.partition("::")[0] if "::" in fn else None
        if (package is not None and package not in PACKAGES) or base not in SIGNATURES:
            raise _NotR(
                f"function {fn}() is not one GreyArray evaluates (R would call it on the "
                "cohort's columns); compute the column in the cohort CSV, or use "
                f"{', '.join(sorted(set(SIGNATURES) - {'c'}))}"
            )
        return getattr(self, "_" + base.replace(".", "_"), self._math)(node, base)

    def _compare(self, node: rf.Call) -> Value:
        a, b = (self.vector(self(x)) for x in node.args)
        op = node.fn
        if isinstance(a, Factor):
            a = Text(np.array([a.levels[c] if c >= 0 else None for c in a.codes], object))
        if isinstance(b, Factor):
            b = Text(np.array([b.levels[c] if c >= 0 else None for c in b.codes], object))
        if isinstance(a, Text) or isinstance(b, Text):
            if not (isinstance(a, Text) and isinstance(b, Text)) or op not in ("==", "!="):
                raise _NotR(
                    f"'{rf.deparse(node)}': text is compared here only with == or != to text"
                )
            out = np.array(
                [np.nan if x is None or y is None else float((x == y) == (op == "=="))
                 for x, y in zip(a.values, b.values, strict=True)]
            )  # fmt: skip
            return Logical(out)
        x, y = (_numeric(v, f"'{rf.deparse(node)}'") for v in (a, b))
        with np.errstate(invalid="ignore"):
            out = _COMPARE[op](x, y).astype(float)
        return Logical(np.where(np.isnan(x) | np.isnan(y), np.nan, out))

    def _in(self, node: rf.Call) -> Value:
        x = self.vector(self(node.args[0]))
        table = self(node.args[1])
        if not isinstance(table, Constants):
            raise _NotR(f"'{rf.deparse(node)}': the right of %in% must be constants, c(...)")
        if isinstance(x, Factor):
            x = Text(np.array([x.levels[c] if c >= 0 else None for c in x.codes], object))
        if isinstance(x, Text):
            wanted = {v for v in table.values if v is None or isinstance(v, str)}
            return Logical(np.array([float(v in wanted) for v in x.values]))
        values = _numeric(x, f"'{rf.deparse(node)}'")
        numbers = [float(v) for v in table.values if isinstance(v, (int, float))]
        out = np.isin(values, numbers).astype(float)
        if None in table.values:
            out[np.isnan(values)] = 1.0
        return Logical(out)

    # --- functions ---

    def _c(self, node: rf.Call, fn: str) -> Value:
        out = []
        for arg in node.args:
            out += _constants(self(arg))
        return Constants(out)

    def _math(self, node: rf.Call, fn: str) -> Value:
        args = _match(node, fn)
        return self._elementwise(args["x"], _MATH[fn], f"{fn}()")

    def _elementwise(self, node: rf.Node, function, what: str) -> Value:
        """``function`` of a value: constants stay constants (``log(x, base = exp(1))``)."""
        value = self(node)
        with np.errstate(all="ignore"):
            if isinstance(value, Constants):
                return Constants(function(_numeric(value, what)).tolist())
            return Numeric(function(_numeric(self.vector(value), what)))

    def _log(self, node: rf.Call, fn: str) -> Value:
        args = _match(node, fn)
        if "base" not in args:
            return self._elementwise(args["x"], np.log, "log()")
        base = _number(args["base"], self(args["base"]), "log()")
        exact = {10.0: np.log10, 2.0: np.log2}  # R's logbase() uses them for these bases
        function = exact.get(base, lambda x: np.log(x) / np.log(base))
        return self._elementwise(args["x"], function, "log()")

    def _I(self, node: rf.Call, fn: str) -> Value:
        return self.vector(self(_match(node, fn)["x"]))

    def _offset(self, node: rf.Call, fn: str) -> Value:
        x = _numeric(self.vector(self(_match(node, fn)["object"])), "offset()")
        return Numeric(x)

    def _as_numeric(self, node: rf.Call, fn: str) -> Value:
        value = self.vector(self(_match(node, fn)["x"]))
        if isinstance(value, Factor):  # R: the level codes
            return Numeric(np.where(value.codes >= 0, value.codes + 1.0, np.nan))
        if isinstance(value, Text):
            return Numeric(pd.to_numeric(pd.Series(value.values), errors="coerce").to_numpy(float))
        x = _numeric(value, f"{fn}()")
        return Numeric(np.trunc(x) if fn == "as.integer" else x.astype(float))

    _as_double = _as_numeric
    _as_integer = _as_numeric

    def _as_character(self, node: rf.Call, fn: str) -> Value:
        value = self.vector(self(_match(node, fn)["x"]))
        if isinstance(value, Text):
            return value
        labels = _factor(value)
        return Text(np.array([labels.levels[c] if c >= 0 else None for c in labels.codes], object))

    def _factor(self, node: rf.Call, fn: str) -> Value:
        args = _match(node, fn)
        for unsupported in ("labels", "exclude"):
            if unsupported in args:
                raise _NotR(
                    f"{rf.deparse(node)}: factor()'s {unsupported} = is not evaluated by "
                    "GreyArray (R would apply it); recode the column in the cohort CSV"
                )
        x = self.vector(self(args["x"]))
        levels = None
        if "levels" in args:
            levels = [str(v) if not isinstance(v, float) else rf.r_number(v)
                      for v in _constants(self(args["levels"]))]  # fmt: skip
        is_ordered = fn in ("ordered", "as.ordered")
        if "ordered" in args:
            is_ordered = _flag(args["ordered"], self(args["ordered"]), "factor()")
        if fn == "as.factor" and isinstance(x, Factor):
            return x
        if fn == "as.ordered" and isinstance(x, Factor) and x.ordered:
            return x
        return _factor(x, levels, is_ordered)

    _as_factor = _factor
    _ordered = _factor
    _as_ordered = _factor

    def _relevel(self, node: rf.Call, fn: str) -> Value:
        args = _match(node, fn)
        x = self.vector(self(args["x"]))
        if not isinstance(x, Factor) or x.ordered:
            raise _BadData(
                f"{rf.deparse(node)}: R's relevel() needs an unordered factor and stops on "
                f"this column ('relevel' only for (unordered) factors); write "
                f"relevel(factor({rf.deparse(args['x'])}), ref = ...)"
            )
        if "ref" not in args:
            raise _NotR(f"{rf.deparse(node)}: relevel() needs ref =")
        ref = _scalar(args["ref"], self(args["ref"]), "relevel")
        if isinstance(ref, float | int) and not isinstance(ref, bool):
            if not 1 <= ref <= len(x.levels) or ref != int(ref):
                raise _BadData(
                    f"{rf.deparse(node)}: ref = {rf.r_number(float(ref))} is not a level "
                    "number (R stops)"
                )
            ref = x.levels[int(ref) - 1]
        if ref not in x.levels:
            raise _BadData(
                f"{rf.deparse(node)}: {ref!r} is not a level (levels: {', '.join(x.levels)}); "
                "R stops ('ref' must be an existing level)"
            )
        order = [x.levels.index(ref)] + [i for i, v in enumerate(x.levels) if v != ref]
        remap = np.empty(len(order) + 1, np.int64)
        remap[order] = np.arange(len(order))
        remap[-1] = -1
        return Factor(remap[x.codes], [x.levels[i] for i in order], False)

    def _scale(self, node: rf.Call, fn: str) -> Value:
        args = _match(node, fn)
        x = _numeric(self.vector(self(args["x"])), "scale()").astype(float)
        flags = {}
        for name in ("center", "scale"):
            flags[name] = True
            if name in args:
                flags[name] = _flag(args[name], self(args[name]), "scale()")
        ok = ~np.isnan(x)
        if flags["center"]:
            x = x - _r_mean(x[ok])
        if flags["scale"]:
            v = x[ok]
            x = x / math.sqrt(float(np.sum(v * v)) / max(1, v.size - 1))
        return Numeric(x[:, None])

    def _poly(self, node: rf.Call, fn: str) -> Value:
        args = _match(node, fn)
        for unsupported in ("coefs", "simple"):
            if unsupported in args:
                raise _NotR(
                    f"{rf.deparse(node)}: poly()'s {unsupported} = is not supported (R would "
                    "use it); write poly(x, degree) or poly(x, degree, raw = TRUE)"
                )
        values = self(args["x"])
        if isinstance(values, (Factor, Text)):
            raise _NotR(f"{rf.deparse(node)}: poly() of a factor")
        x = _numeric(self.vector(values), "poly()").astype(float)
        degree = 1
        if "degree" in args:
            degree = _scalar(args["degree"], self(args["degree"]), "poly")
            if isinstance(degree, bool) or not isinstance(degree, (int, float)):
                raise _NotR(
                    f"{rf.deparse(node)}: poly() of several variables (R's polym) is not "
                    "supported; the degree must be a number"
                )
            degree = int(degree)
        raw = False
        if "raw" in args:
            raw = _flag(args["raw"], self(args["raw"]), "poly()")
        if degree < 1:
            raise _BadData(f"{rf.deparse(node)}: R stops ('degree' must be at least 1)")
        names = [str(i) for i in range(1, degree + 1)]
        if raw:
            return Numeric(x[:, None] ** np.arange(1, degree + 1), names)
        if np.isnan(x).any():
            raise _BadData(
                f"{rf.deparse(node)}: R's poly() stops on a missing value ('missing values "
                "are not allowed in poly'), and ModelArray passes every subject; give the "
                "missing values or use poly(..., raw = TRUE)"
            )
        if degree >= np.unique(x).size:
            raise _BadData(
                f"{rf.deparse(node)}: R stops ('degree' must be less than number of unique points)"
            )
        xc = x - _r_mean(x)
        q, r = np.linalg.qr(xc[:, None] ** np.arange(degree + 1))
        z = q * np.diagonal(r)
        z = z / np.sqrt((z**2).sum(axis=0))
        return Numeric(z[:, 1:], names)

    def _ns(self, node: rf.Call, fn: str) -> Value:
        return self._spline(node, fn, natural=True)

    def _bs(self, node: rf.Call, fn: str) -> Value:
        return self._spline(node, fn, natural=False)

    def _spline(self, node: rf.Call, fn: str, natural: bool) -> Value:
        args = _match(node, fn)
        if "Boundary.knots" in args:
            raise _NotR(
                f"{rf.deparse(node)}: Boundary.knots = is not supported (R would place the "
                "boundary knots there); leave it out for R's default, the range of the values"
            )
        x = _numeric(self.vector(self(args["x"])), f"{fn}()").astype(float)

        def number(name):
            if name not in args:
                return None
            value = self(args[name])
            if isinstance(value, Constants) and value.values == [None]:
                return None
            return value

        df = number("df")
        knots = number("knots")
        degree = 3
        if not natural and "degree" in args:
            degree = int(_number(args["degree"], self(args["degree"]), f"{fn}()"))
        intercept = False
        if "intercept" in args:
            intercept = _flag(args["intercept"], self(args["intercept"]), f"{fn}()")
        ok = ~np.isnan(x)
        basis = spline_basis(
            x[ok],
            None if df is None else _number(args["df"], df, f"{fn}()"),
            None if knots is None else _numbers(args["knots"], knots, f"{fn}()"),
            degree,
            intercept,
            natural,
        )
        out = np.full((x.size, basis.shape[1]), np.nan)
        out[ok] = basis
        return Numeric(out, [str(i) for i in range(1, basis.shape[1] + 1)])


def _r_mean(x: np.ndarray) -> float:
    from greyarray.stats.smooths import r_mean

    return r_mean(x)


# --- splines (R's splines::ns and splines::bs) -----------------------------------------------


def _spline_design(knots: np.ndarray, x: np.ndarray, order: int, deriv: int = 0) -> np.ndarray:
    """R's ``splineDesign(knots, x, ord, derivs)`` for x inside the boundary knots (the right
    boundary belongs to the last interval, as in R)."""
    from scipy.interpolate import BSpline

    extra = max(0, int((knots == knots[-1]).sum()) - order)  # a knot on the right boundary:
    knots = knots[: knots.size - extra]  # its B-splines are zero, and x = max stays in the
    n_basis = knots.size - order  # last interval of positive length, as in R
    spline = BSpline(knots, np.eye(n_basis), order - 1, extrapolate=False)
    if deriv:
        spline = spline.derivative(deriv)
    out = np.nan_to_num(spline(x), nan=0.0)
    return np.hstack([out, np.zeros((x.size, extra))])


def linpack_qty(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Q'y for Q of LINPACK's Householder QR of ``a`` (R's ``qr`` then ``qr.qty``, dqrdc2 and
    dqrsl; columns of full rank, so no pivoting)."""
    x = np.array(a, dtype=np.float64)
    y = np.array(y, dtype=np.float64)
    n, p = x.shape
    for col in range(min(n - 1, p)):
        v = x[col:, col]
        norm = math.sqrt(float(v @ v))
        if norm == 0.0:
            continue
        if v[0] != 0.0:
            norm = math.copysign(norm, v[0])
        v = v / norm
        v[0] += 1.0
        rest = x[col:, col + 1 :]
        x[col:, col + 1 :] = rest - np.outer(v, (v @ rest) / v[0])
        y[col:] = y[col:] - np.outer(v, (v @ y[col:]) / v[0])
    return y


def spline_basis(
    x: np.ndarray,
    df: float | None,
    knots: np.ndarray | None,
    degree: int,
    intercept: bool,
    natural: bool,
) -> np.ndarray:
    """R's ``ns(x, df, knots, intercept)`` or ``bs(x, df, knots, degree, intercept)`` on the
    non-missing values: interior knots at R's type-7 quantiles, boundary knots at the range."""
    from greyarray.stats.smooths import r_quantile7, r_seq

    order = 4 if natural else degree + 1
    if order <= 1:
        raise _BadData("R stops ('degree' must be integer >= 1)")
    if x.size == 0:
        raise _BadData("no values to place the knots")
    boundary = np.array([x.min(), x.max()])
    if df is not None and knots is None:
        # R: seq.int(0, 1, length.out = n + 2)[-c(1, n + 2)] with n possibly fractional: the
        # length is rounded up and the index truncated, so a fractional df keeps the last
        # probability, 1: a knot on the boundary (bs: a column of zeros; ns: R stops)
        n_knots = max(df - 1 - int(intercept) if natural else df - order + (1 - intercept), 0)
        probs = r_seq(0.0, 1.0, math.ceil(n_knots + 2)) if n_knots > 0 else np.array([0.0])
        probs = np.delete(probs, sorted({0, int(n_knots + 2) - 1} & set(range(probs.size))))
        knots = r_quantile7(x, probs) if probs.size else np.array([])
    elif knots is None:
        knots = np.array([])
    all_knots = np.sort(np.concatenate([np.repeat(boundary, order), knots]))
    basis = _spline_design(all_knots, x, order)
    if not natural:
        return basis if intercept else basis[:, 1:]
    if knots.size and not (boundary[0] < knots.min() and knots.max() < boundary[1]):
        raise _BadData(
            "R stops: a knot lies on the boundary of the values (with a fractional df R "
            "places one there), and ns() then fails ('NA/NaN/Inf in foreign function call'); "
            "give an integer df"
        )
    const = _spline_design(all_knots, boundary, order, deriv=2)
    if not intercept:
        const, basis = const[:, 1:], basis[:, 1:]
    return linpack_qty(const.T, basis.T).T[:, 2:]


# --- contrasts -------------------------------------------------------------------------------


def contr_poly(n: int) -> np.ndarray:
    """R's ``contr.poly(n)`` (orthonormal polynomials in scores 1..n), all n columns."""
    y = np.arange(1, n + 1) - (n + 1) / 2
    q, r = np.linalg.qr(y[:, None] ** np.arange(n))
    z = q * np.diagonal(r)
    return z / np.sqrt((z**2).sum(axis=0))


def contrasts(factor: Factor, logical: bool, use_contrasts: bool) -> tuple[np.ndarray, list[str]]:
    """R's ``contrasts(x, contrasts)``: (levels x columns, column names)."""
    k = len(factor.levels)
    if not use_contrasts:
        return np.eye(k), list(factor.levels)
    if factor.ordered and not logical:
        names = [".L", ".Q", ".C"] + [f"^{i}" for i in range(4, k)]
        return contr_poly(k)[:, 1:], names[: k - 1]
    return np.eye(k)[:, 1:], list(factor.levels[1:])


# --- model frame and model matrix ------------------------------------------------------------


@dataclass
class _Frame:
    """The evaluated variables on the complete rows."""

    values: dict[int, Value]  # variable index -> value on the complete rows
    logical: dict[int, bool]
    rows: np.ndarray


def _frame_values(evaluate: Evaluator, nodes: list, skip: set[int]) -> dict[int, Value]:
    out = {}
    for i, node in enumerate(nodes):
        if i in skip:
            continue
        columns = [n for n in rf.all_names(node) if n.id in evaluate.table.columns]
        value = evaluate(node)
        if isinstance(value, Constants) or not columns:
            raise _NotR(
                f"'{rf.deparse(node)}' is a constant, not a variable (R stops: variable "
                "lengths differ)"
            )
        out[i] = value
    return out


def _as_model_factor(value: Value) -> tuple[Value, bool]:
    """model.matrix's view: text -> factor (levels among the rows), factors without unused
    levels, logicals -> factor(levels = c(FALSE, TRUE))."""
    if isinstance(value, Text):
        return _factor(value), False
    if isinstance(value, Factor):
        return _drop_unused(value), False
    if isinstance(value, Logical):
        codes = np.where(np.isnan(value.values), -1, value.values).astype(np.int64)
        return Factor(codes, ["FALSE", "TRUE"]), True
    return value, False


def model_matrix(
    trms: rf.Terms, values: dict[int, Value], logical: dict[int, bool], n: int
) -> tuple[np.ndarray, list[str], list[int], dict[str, str]]:
    """R's C ``modelmatrix``: (matrix, R's column names, term of each column, reference level
    of each factor coded by treatment contrasts)."""
    codes = [dict(c) for c in trms.codes]
    if not trms.intercept:  # the first factor met is coded by indicators
        done = False
        for term, code in zip(trms.terms, codes, strict=True):
            for i in trms.members(term):
                if isinstance(values.get(i), Factor) and len(values[i].levels) > 1:
                    code[i] = 2
                    done = True
                    break
            if done:
                break
    blocks = [np.ones((n, 1))] if trms.intercept else []
    names = ["(Intercept)"] if trms.intercept else []
    assign = [0] if trms.intercept else []
    references: dict[str, str] = {}
    for t, (term, code) in enumerate(zip(trms.terms, codes, strict=True), 1):
        block, labels = np.ones((n, 1)), [""]
        for i in trms.members(term):
            value, name = values[i], trms.names[i]
            if isinstance(value, Factor):
                matrix, suffixes = contrasts(value, logical.get(i, False), code[i] == 1)
                if code[i] == 1 and not value.ordered and not logical.get(i, False):
                    references[name] = value.levels[0]
                columns = matrix[value.codes]
                column_names = [name + s for s in suffixes]
            else:
                columns = value.matrix
                k = columns.shape[1]
                suffixes = value.colnames or [str(j) for j in range(1, k + 1)]
                column_names = [name + s for s in suffixes] if k > 1 else [name]
            block = (columns[:, :, None] * block[:, None, :]).reshape(n, -1)
            labels = [
                (f"{left}:{right}" if left else right) for right in column_names for left in labels
            ]
        blocks.append(block)
        names += labels
        assign += [t] * len(labels)
    matrix = np.hstack(blocks) if blocks else np.empty((n, 0))
    return matrix, names, assign, references


def _problem(formula: str, reason: str) -> DataError:
    return DataError(f"formula {formula!r}: {reason}")


def _extra_variables(model: rf.ModelFormula) -> list:
    """Expressions the model frame holds besides the fixed terms: smooth covariates and by=,
    random-effect variables (their missing values drop rows too)."""
    nodes = []
    for smooth in model.smooths:
        nodes += smooth.variables
        if "by" in smooth.arguments:
            nodes.append(smooth.arguments["by"])
    for bar in model.bars:
        lhs = rf.terms(None, bar.args[0])
        nodes += lhs.variables
        nodes += rf.all_names(bar.args[1])
    return nodes


def build_design(
    formula: str,
    phenotypes: pd.DataFrame,
    references: dict[str, str] | None = None,
    ordered: dict[str, str] | None = None,
) -> Design:
    """The fixed-effects (parametric) design of ``formula`` on ``phenotypes`` (rows in HDF5
    subject order), as R's ``lm`` / mgcv's ``gam`` / lme4's ``lmer`` build it."""
    model = rf.model_formula(formula)
    table = prepare_phenotypes(phenotypes, references, ordered)
    evaluate = Evaluator(table)
    trms = model.fixed
    skip = {0} if trms.response else set()
    try:
        values = _frame_values(evaluate, trms.variables, skip)
        extra = [evaluate.vector(evaluate(node)) for node in _extra_variables(model)]
    except (_NotR, SyntaxError) as err:
        raise UsageError(f"formula {formula!r}: {err}") from None
    except _BadData as err:
        columns = ", ".join(map(str, phenotypes.columns))
        raise _problem(formula, f"{err} (cohort columns: {columns})") from None
    complete = np.ones(len(table), bool)
    for value in [*values.values(), *extra]:
        complete &= ~_missing(value)
    rows = np.flatnonzero(complete)
    if rows.size == 0:
        raise _problem(
            formula,
            "no subject has every value of the formula's columns (a column is empty, or the "
            "missing values leave nobody)",
        )
    kept, logical = {}, {}
    for i, value in values.items():
        kept[i], logical[i] = _as_model_factor(_take(value, rows))
        if isinstance(kept[i], Numeric) and np.isinf(kept[i].matrix).any():
            raise _problem(
                formula,
                f"'{trms.names[i]}' is infinite for "
                f"{int(np.isinf(kept[i].matrix).any(axis=1).sum())} subjects; R's lm stops "
                "(NA/NaN/Inf in 'x')",
            )
    for i, value in kept.items():
        if isinstance(value, Factor) and not logical[i] and len(value.levels) < 2:
            if i in trms.offsets:
                continue
            raise _problem(
                formula,
                f"factor {trms.names[i]!r} has only one level "
                f"({', '.join(map(repr, value.levels))}) among the subjects used; contrasts "
                "need 2 or more levels (as R's lm)",
            )
    for i in trms.offsets:
        if not isinstance(kept[i], Numeric):
            raise _problem(formula, f"'{trms.names[i]}' must be numeric (R's offset)")
    matrix, names, assign, chosen = model_matrix(trms, kept, logical, rows.size)
    if matrix.shape[1] > rows.size:
        raise _problem(
            formula, f"the design has {matrix.shape[1]} columns but only {rows.size} subjects"
        )
    aliased = aliased_columns(matrix, names)
    if aliased:
        if len(aliased) == len(names):
            raise _problem(formula, "every column of the design is zero")
        one = len(aliased) == 1
        log.warning(
            "Formula %r: %s %s of the columns before, so %s left out of the fit (fit-lm writes "
            "NaN for %s, as R's lm reports NA and ModelArray NaN; lme4 drops such a column; "
            "fit-gam writes no column for %s, where mgcv pivots and may keep another instead)",
            formula,
            ", ".join(aliased),
            "is a linear combination" if one else "are linear combinations",
            "it is" if one else "they are",
            *(["it"] * 2 if one else ["them"] * 2),
        )
    every = ["Intercept" if c == "(Intercept)" else c for c in names]
    if aliased:
        keep = [j for j, name in enumerate(names) if name not in aliased]
        matrix = matrix[:, keep]
        names = [names[j] for j in keep]
        assign = [assign[j] for j in keep]
    offset = None
    if trms.offsets:
        offset = np.sum([kept[i].matrix[:, 0] for i in trms.offsets], axis=0)
    if rows.size < len(phenotypes):
        log.warning(
            "%d of %d subjects have a missing phenotype in %r and are left out, as R's model "
            "frame leaves them out",
            len(phenotypes) - rows.size,
            len(phenotypes),
            formula,
        )
    for factor, level in chosen.items():
        log.info("Factor %s: reference level %r (R's order)", factor, level)
    columns = ["Intercept" if c == "(Intercept)" else c for c in names]
    return Design(
        matrix,
        columns,
        rows,
        trms.intercept,
        chosen,
        offset,
        assign,
        trms.labels,
        ["Intercept" if c == "(Intercept)" else c for c in aliased],
        model,
        every,
    )


def variable(
    expression: rf.Node | str,
    phenotypes: pd.DataFrame,
    rows: np.ndarray,
    references: dict[str, str] | None = None,
    ordered: dict[str, str] | None = None,
) -> Numeric | Factor:
    """One variable of a formula (e.g. a smooth's covariate or its ``by =``) on ``rows``, as
    model.matrix sees it: numbers as ``Numeric``; text, factors and logicals as a ``Factor``
    (levels in R's order among ``rows``, unused levels dropped, ``ordered`` for an
    --ordered-factor column or ordered(); ``contrasts(factor, logical, True)`` codes it)."""
    node = rf.parse(expression) if isinstance(expression, str) else expression
    evaluate = Evaluator(prepare_phenotypes(phenotypes, references, ordered))
    try:
        value = evaluate.vector(evaluate(node))
    except _NotR as err:
        raise UsageError(f"'{rf.deparse(node)}': {err}") from None
    except _BadData as err:
        raise DataError(f"'{rf.deparse(node)}': {err}") from None
    if isinstance(value, Constants):
        raise UsageError(f"'{rf.deparse(node)}' is a constant, not a variable")
    return _as_model_factor(_take(value, rows))[0]


def is_text(
    expression: str,
    phenotypes: pd.DataFrame,
    references: dict[str, str] | None = None,
    ordered: dict[str, str] | None = None,
) -> bool:
    """Whether ``expression`` is text as R holds the cohort (a character column of read.csv,
    not a factor: --reference-level and --ordered-factor make factors)."""
    evaluate = Evaluator(prepare_phenotypes(phenotypes, references, ordered))
    try:
        return isinstance(evaluate(rf.parse(expression)), Text)
    except (_NotR, _BadData, SyntaxError):
        return False


def parse_formula(formula: str) -> tuple[str, str]:
    """(response, right-hand side as written) of an R formula; the response may be
    `back-quoted`."""
    model = rf.model_formula(formula)
    return model.response_name, rf.deparse(model.rhs)


# --- lme4's random-effect terms --------------------------------------------------------------


@dataclass(frozen=True)
class RandomBlock:
    """One random-effect term ``(lhs | group)`` after lme4's expansion, on the design's rows.

    ``matrix``: the model matrix of ``~ lhs`` (R's rules: ``x`` implies an intercept, ``0 + x``
    removes it) with lme4's column names ``columns`` (``(Intercept)``, ``age``); ``codes``: the
    grouping factor's level (0-based) of every row; ``levels`` its levels; ``group`` its name
    as lme4's VarCorr prints it (``participant_id``, ``family_id:participant_id``)."""

    term: str
    group: str
    matrix: np.ndarray  # (n_rows, q)
    columns: list[str]
    codes: np.ndarray  # (n_rows,)
    levels: list[str]


def _grouping(node: rf.Node, evaluate: Evaluator, rows: np.ndarray, frame: set[str]) -> Factor:
    """lme4's grouping factor: ``factor(g)`` (``makeFac``), ``a:b`` as lme4's ``%i%``
    (levels a:b in the order of a's then b's levels), unused levels dropped. lme4 evaluates
    any other expression within the model frame (``frame``: its variables), so
    ``(1 | factor(site))`` works only where ``site`` itself is a variable of the formula."""
    if isinstance(node, rf.Call) and node.fn == ":" and len(node.args) == 2:
        f1, f2 = (_grouping(a, evaluate, rows, frame) for a in node.args)
        labels = [f"{f1.levels[a]}:{f2.levels[b]}" for a, b in zip(f1.codes, f2.codes, strict=True)]
        first = dict.fromkeys(zip(f1.codes.tolist(), f2.codes.tolist(), strict=True))
        order = sorted(first, key=lambda ab: len(f2.levels) * ab[0] + ab[1])
        levels = [f"{f1.levels[a]}:{f2.levels[b]}" for a, b in order]
        return _factor(Text(np.array(labels, object)), levels)
    if isinstance(node, rf.Call) and node.fn == "(":
        return _grouping(node.args[0], evaluate, rows, frame)
    if isinstance(node, rf.Call):
        unseen = [n.id for n in rf.all_names(node) if rf.deparse(n) not in frame]
        if unseen:
            raise _NotR(
                f"lme4 evaluates the grouping factor '{rf.deparse(node)}' within the model "
                f"frame, which has no {unseen[0]!r} (lmer stops: object '{unseen[0]}' not "
                f"found): write (... | {unseen[0]}), lme4 makes a grouping column a factor"
            )
    value = _take(evaluate.vector(evaluate(node)), rows)
    factor = value if isinstance(value, Factor) else _factor(value)
    return _drop_unused(factor)


def random_effects(
    formula: str,
    phenotypes: pd.DataFrame,
    rows: np.ndarray,
    references: dict[str, str] | None = None,
    ordered: dict[str, str] | None = None,
) -> list[RandomBlock]:
    """The random-effect blocks of ``formula`` on ``rows`` (``build_design(formula, ...).rows``,
    which already leaves out rows missing any variable, grouping factors included), in
    lme4's ``findbars`` order: ``(x || g)`` is ``(1 | g) + (0 + x | g)``, ``(1 | a/b)`` is
    ``(1 | b:a) + (1 | a)``. lme4's ``mkReTrms`` then orders the blocks by decreasing number of
    levels (stably); that is the caller's step."""
    model = rf.model_formula(formula)
    table = prepare_phenotypes(phenotypes, references, ordered)
    evaluate = Evaluator(table)
    blocks = []
    for bar in model.bars:
        lhs, group = bar.args
        try:
            trms = rf.terms(None, lhs)
            values = _frame_values(evaluate, trms.variables, set())
            frame = set(rf.terms(model.response, rf.subbars(model.rhs)).names)
            factor = _grouping(group, evaluate, rows, frame)
        except (_NotR, SyntaxError) as err:
            raise UsageError(f"formula {formula!r}: {err}") from None
        except _BadData as err:
            raise _problem(formula, str(err)) from None
        kept, logical = {}, {}
        for i, value in values.items():
            kept[i], logical[i] = _as_model_factor(_take(value, rows))
        matrix, names, _, _ = model_matrix(trms, kept, logical, rows.size)
        if not names:
            raise UsageError(
                f"formula {formula!r}: the random-effect term ({rf.deparse(bar)}) has no "
                f"coefficient: '{rf.deparse(lhs)}' leaves nothing to vary by "
                f"{rf.deparse(group)} (lme4 stops: length(theta) > 0L is not TRUE); write "
                f"(1 | {rf.deparse(group)}) for a random intercept"
            )
        if factor.codes.min(initial=0) < 0:
            raise _problem(formula, f"the grouping factor {rf.deparse(group)!r} has missing values")
        blocks.append(
            RandomBlock(rf.deparse(bar), rf.deparse(group), matrix, names, factor.codes,
                        factor.levels)
        )  # fmt: skip
    return blocks


PARTICIPANT = "participant_id"  # the cohort column naming participants (BIDS)


def random_effect_terms(formula: str) -> list[str]:
    """lme4's random-effect terms of a formula, as written after expansion ('1 | g')."""
    return [rf.deparse(bar) for bar in rf.model_formula(formula).bars]


def _linear(node: rf.Node) -> rf.Node:
    """The formula's right-hand side with each smooth call replaced by its covariates."""
    if not isinstance(node, rf.Call):
        return node
    if node.fn in rf.SMOOTHS and node.positional:
        out = node.positional[0]
        for variable in node.positional[1:]:
            out = rf.call("+", out, variable)
        return rf.call("(", out) if len(node.positional) > 1 else out
    return rf.Call(node.fn, tuple(_linear(a) for a in node.args), node.names)


def repeated_measures(formula: str, phenotypes: pd.DataFrame, rows: np.ndarray) -> str | None:
    """What to say when a model without random effects is fitted to a cohort where some
    participants have several rows (sessions): the rows are not independent, the p-values are
    too small, and a mixed model with a random intercept per participant is the model to use.
    None when the formula has random effects or every participant has one row."""
    model = rf.model_formula(formula)
    if model.bars or PARTICIPANT not in phenotypes.columns:
        return None
    ids = phenotypes[PARTICIPANT].iloc[rows].astype(str)
    counts = ids.value_counts()
    repeated = int((counts > 1).sum())
    if not repeated:
        return None
    written = formula.strip()
    if model.smooths:  # fit-lmm has no smooths: their covariates enter linearly
        written = rf.deparse(rf.call("~", model.response, _linear(model.rhs)))
    mixed = f"{written} + (1 | {PARTICIPANT})"
    smooth_note = " (with linear terms: fit-lmm has no smooth terms)" if model.smooths else ""
    return (
        f"{len(ids)} rows come from {len(counts)} participants, {repeated} of them with more "
        f"than one session: {formula!r} fits them as {len(ids)} independent subjects, so its "
        "p-values are too small (a participant's sessions are correlated); fit a mixed model "
        f"instead{smooth_note}: {mixed!r}"
    )


# --- checks ----------------------------------------------------------------------------------


def aliased_columns(x: np.ndarray, columns: list[str], tol: float = 1e-7) -> list[str]:
    """The design columns R's lm calls aliased: what is left of each after removing its
    projection on the earlier (kept) columns is below ``tol`` of its norm (R's QR tolerance).
    One pass: each kept column's remainder joins an orthonormal basis (projected out twice,
    as classical Gram-Schmidt needs for accuracy)."""
    basis = np.empty((len(columns), x.shape[0]))  # rows: orthonormal vectors
    norms = column_norms(x)
    kept = 0
    aliased = []
    for j, name in enumerate(columns):
        rest = x[:, j].copy()
        for _ in range(2):
            rest -= basis[:kept].T @ (basis[:kept] @ rest)
        left = column_norms(rest[:, None])[0]
        if norms[j] == 0 or left <= tol * norms[j]:
            aliased.append(name)
        else:
            basis[kept] = rest / left
            kept += 1
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
    matched = cohort.reset_index(drop=True).set_index(sources.to_numpy())
    position = pd.Series(np.arange(len(matched)), index=matched.index)
    out = matched.loc[names].reset_index(drop=True)
    out.attrs["cohort_rows"] = position.loc[names].to_numpy()  # for orders of appearance
    return out


def threshold_rule(lthr_abs: float, lthr_rel: float, n: int) -> str:
    """ModelArray's element threshold, in words (for sidecars and the methods text)."""
    return (
        f"an element is fitted only where more than max({lthr_abs:g}, {lthr_rel:g} x {n}) = "
        f"{max(lthr_abs, lthr_rel * n):g} participants have a finite value"
    )


def single_subject_levels(
    formula: str, phenotypes: pd.DataFrame, rows: np.ndarray
) -> dict[str, list[str]]:
    """The formula's factors (as the model matrix sees them: text, ``factor()``, ordered
    factors; not logicals) with levels that only one of the subjects used (``rows``) has, in
    their level order: such a level's coefficient rests on one subject. The results writer
    says so."""
    trms = rf.model_formula(formula).fixed
    evaluate = Evaluator(prepare_phenotypes(phenotypes))
    found = {}
    for i, node in enumerate(trms.variables):
        if i == 0 and trms.response:
            continue
        try:
            value, logical = _as_model_factor(_take(evaluate(node), rows))
        except (GreyArrayError, _NotR, _BadData, SyntaxError):  # build_design said it already
            continue
        if isinstance(value, Factor) and not logical:
            counts = np.bincount(value.codes[value.codes >= 0], minlength=len(value.levels))
            if single := [level for level, n in zip(value.levels, counts, strict=True) if n == 1]:
                found[trms.names[i]] = single
    return found
