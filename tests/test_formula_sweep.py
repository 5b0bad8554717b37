"""The formula sweep: formulas as ModelArray users write them, fitted by fit-lm and by R's lm with
ModelArray.lm's naming (tests/r/formula_sweep.R, one R process) on one cohort with mixed-case
factor levels, logicals, an ordered factor, missing phenotypes and missing values. Each formula
gives R's column names and values (within 1e-8 of the column's scale; p-values 1e-10), or is
refused in one line that says what R would do."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import r_environment, require
from test_lm import make_h5, read_results

from greyarray.errors import GreyArrayError
from greyarray.stats import lm

R_SCRIPT = Path(__file__).parent / "r" / "formula_sweep.R"
ORDERED = {"ograde": "high"}  # as ModelArray's gen_gamFormula_fxSmooth(reference.group = "high")

FITTED = [
    "age",
    "age + sex",
    "age * sex",
    "age + sex + site + age:sex",
    "group + age",  # mixed-case levels: R orders ctl < Pat < sib
    "0 + group + age",
    "age - 1 + sex",
    "age + sex:site",  # interaction without its main effects: indicator columns for sex
    "sex:site",
    "age:sex",
    "age + sex + sex:site",
    "(age + edu + sex)^2",
    "age * sex * site",
    "site/age",
    "age %in% site",
    "age + sex - sex",
    "log(age) + sex",
    "exp(edu/10)",
    "sqrt(edu) + log2(age) + log10(age) + log1p(edu) + abs(age - 40)",
    "I(age^2) + age",
    "I((age - 40)^2) + I(age ** 3)",
    "I(age > 40)",  # a logical: I(age > 40)TRUE
    "I(age > 40) * sex",
    "flag + age",  # a logical column
    "poly(age, 2)",
    "poly(age, 3) + sex",
    "poly(age, 2, raw = TRUE)",
    "poly(age, 2):sex",
    "splines::ns(age, 3)",
    "ns(age, df = 4) + sex",
    "ns(age, knots = c(30, 45))",
    "bs(age, df = 5)",
    "splines::bs(age, degree = 2, knots = c(40))",
    "bs(age, df = 4, intercept = TRUE) - 1",
    "factor(cnt) + age",
    "as.factor(cnt) * age",
    'relevel(factor(site), ref = "SiteB")',
    'factor(sex, levels = c("M", "F")) + age',
    "ograde + age",  # an ordered factor (--ordered-factor ograde=high): ograde.L, ograde.Q
    "ograde * age",
    "ordered(grade)",
    "ordered(edu) + sex",  # 13 levels: .L .Q .C ^4 ... ^12
    "0 + sex:site",
    "age * group - 1",
    "offset(edu) + age",
    "age + offset(log(edu)) + sex",
    "scale(age) + sex",
    "log(age) * scale(edu)",
    "agemiss + sexmiss",  # missing phenotypes drop subjects
    "poly(age, 2) + agemiss",  # poly sees every subject, as in ModelArray
    'as.numeric(sex == "M") + age',
    "`odd name` + age",
    "age + I(2 * age)",  # aliased: NA in R, no column in ModelArray
    "1",
    "0 + age",
    'I(site %in% c("siteA", "siteC")) + age',
    "sex:age + age:group",
    "age + I(age < 30 | age > 60)",  # '|' inside I() is R's "or", not a random effect
    "log(edu, base = exp(1)) + log(age, 2)",
    "bs(age, df = 4.5)",  # a fractional df: R puts a knot on the boundary (a zero column)
]
REFUSED = {  # formula: (exit code, what the line says; R's outcome in the comment)
    "poly(agemiss, 2)": (65, "R's poly() stops on a missing value"),  # R: error
    'relevel(site, ref = "SiteB")': (65, "R's relevel() needs an unordered factor"),  # R: error
    "log(agee)": (65, "unknown column 'agee'"),  # R: object 'agee' not found
    "age + exp(age * 30)": (65, "R's lm stops (NA/NaN/Inf in 'x')"),  # R: error
    "cut(age, 3)": (64, "function cut() is not one GreyArray evaluates (R would call it"),
    "ns(age, 3, Boundary.knots = c(10, 80))": (64, "Boundary.knots = is not supported"),
    "age + (1 | site)": (64, "random-effect terms"),  # lm: an error; it is lme4's syntax
    "s(age) + sex": (64, "smooth terms"),  # lm: no function s; it is mgcv's syntax
    "ns(age, df = 2.7)": (65, "R stops: a knot lies on the boundary"),  # R: NA/NaN/Inf
}
R_FAILS = {  # R's lm stops on these too
    "poly(agemiss, 2)",
    'relevel(site, ref = "SiteB")',
    "log(agee)",
    "age + exp(age * 30)",
    "age + (1 | site)",
    "s(age) + sex",
    "ns(age, df = 2.7)",
}


def cohort(n: int = 60, seed: int = 5) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 70, n).round(2)
    sex = rng.choice(["F", "M"], n)
    table = pd.DataFrame(
        {
            "source_file": [f"sub-{i:02d}.dscalar.nii" for i in range(n)],
            "age": age,
            "agemiss": np.where(np.arange(n) % 17 == 3, np.nan, age + rng.normal(0, 3, n)),
            "sex": sex,
            "sexmiss": np.where(np.arange(n) % 23 == 5, None, sex),
            "site": rng.choice(["siteA", "SiteB", "siteC"], n),
            "group": rng.choice(["ctl", "Pat", "sib"], n),
            "grade": rng.choice(["low", "mid", "high"], n),
            "edu": rng.integers(8, 21, n),
            "cnt": rng.integers(1, 5, n),
            "flag": rng.choice(["TRUE", "FALSE"], n),
            "odd name": rng.normal(size=n),
        }
    )
    table["ograde"] = table["grade"]
    values = (0.02 * age[:, None] + 0.3 * (sex == "M")[:, None] + rng.normal(0, 1, (n, 6))).astype(
        np.float32
    )
    values[rng.uniform(size=values.shape) < 0.08] = np.nan
    return table, values


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The HDF5 and cohort, and R's results (or error) for every formula."""
    require("Rscript")
    folder = tmp_path_factory.mktemp("sweep")
    table, values = cohort()
    h5 = make_h5(folder, table, values)
    table.to_csv(folder / "p.csv", index=False, na_rep="NA")
    pd.DataFrame(values.astype(float)).to_csv(
        folder / "v.csv", index=False, na_rep="NA", float_format="%.17g"
    )
    formulas = FITTED + list(REFUSED)
    (folder / "formulas.txt").write_text("\n".join(formulas) + "\n")
    out = folder / "r"
    out.mkdir()
    inputs = [folder / "p.csv", folder / "v.csv", folder / "formulas.txt"]
    subprocess.run(
        ["Rscript", str(R_SCRIPT), *inputs, out],
        check=True,
        capture_output=True,
        env=r_environment(),
    )
    return h5, out, formulas


def scaled_differences(ours: pd.DataFrame, expected: pd.DataFrame) -> dict[str, float]:
    """Per column: the largest difference over elements, divided by the column's largest
    magnitude (absolute for p-values); NaN where R has NaN must be NaN here too."""
    out = {}
    for column in expected.columns:
        a, b = ours[column].to_numpy(float), expected[column].to_numpy(float)
        assert np.array_equal(np.isnan(a), np.isnan(b)), column
        ok = ~np.isnan(b)
        if not ok.any():
            continue
        diff = np.abs(a[ok] - b[ok]).max()
        scale = np.abs(b[ok]).max()
        scale = 1.0 if ".p.value" in column or scale == 0 else scale
        out[column] = diff / scale
    return out


def test_sweep_covers_forty_formulas():
    assert len(FITTED) + len(REFUSED) >= 40


@pytest.mark.parametrize("formula", FITTED)
def test_fitted_formula_equals_r(sweep, formula):
    h5, out, formulas = sweep
    i = formulas.index(formula) + 1
    error = out / f"{i}.error"
    assert not error.exists(), f"R refuses {formula!r}"
    analysis = f"f{i}"
    lm.fit_lm(
        h5,
        h5.parent / "cohort.csv",
        f"y ~ {formula}",
        analysis,
        term_stats=lm.TERM_STATS,
        model_stats=lm.MODEL_STATS,
        ordered_factors=ORDERED,
    )
    ours = read_results(h5, analysis)
    expected = pd.read_csv(out / f"{i}.csv", skipinitialspace=True).astype(float)
    assert list(ours.columns) == list(expected.columns)
    worst = scaled_differences(ours, expected)
    assert max(worst.values()) <= 1e-8, sorted(worst.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.parametrize("formula", list(REFUSED))
def test_refused_formula_says_what_r_does(sweep, formula, run_cli):
    h5, out, formulas = sweep
    i = formulas.index(formula) + 1
    assert (out / f"{i}.error").exists() == (formula in R_FAILS)
    code, expected = REFUSED[formula]
    args = ["fit-lm", "--input-hdf5", h5, "--cohort-file", h5.parent / "cohort.csv"]
    got, _, err = run_cli(*args, "--formula", f"y ~ {formula}", "--analysis-name", f"x{i}")
    lines = err.strip().splitlines()
    assert got == code and len(lines) == 1 and lines[0].startswith("greyarray: error: "), err
    assert expected in lines[0] and f"'y ~ {formula}'" in lines[0]
    assert "formulaic" not in err.lower() and "Traceback" not in err


def test_errors_are_greyarrays():
    """Every refusal is one of GreyArray's errors (never a third-party library's)."""
    table, _ = cohort()
    from greyarray.stats.design import build_design

    for formula in REFUSED:
        with pytest.raises(GreyArrayError):
            lm.check_model(f"y ~ {formula}")
            build_design(f"y ~ {formula}", table)
