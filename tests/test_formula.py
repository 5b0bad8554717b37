"""The formula layer read as R reads it: deparse (term labels, column names), terms.formula (the
expansion of + - * / : ^ %in%, term order, factor coding, offsets) and lme4's random-effect
blocks (findbars, grouping factors, model matrices), against one live R run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import r_environment, require

from greyarray.errors import UsageError
from greyarray.stats import design
from greyarray.stats import formula as rf

R_SCRIPT = Path(__file__).parent / "r" / "formula_terms.R"

DEPARSE = [
    "a/b*c^d-e:f+g%in%h > 2 & !x | y == 1",
    "exp(edu/10)",
    "poly(age,2,raw=T)",
    "relevel(factor(site), ref='siteB')",
    "-a^2",
    "(-a)^2",
    "-1:3",
    "!a == b",
    "a %% b + a %/% b",
    'f(x, 2L, 1e-3, TRUE, T, NA, "a\\"b\\n")',
    "splines::ns(age, 3)",
    "I(x^-1)",
    "a-(-b)",
    "`my var` + log(`my var`) + `_x`",
    "I(age ** 2)",
    "c(100000, 123456, 0.0001, 0.001, 1e-20, 1/3, 2.50, 1e15, 123456789012345678, -0.5)",
    "x %in% c('a', 'b') && y >= 2 || z != 3",
    "s(age, by = osex, k = 4, fx = TRUE) + ti(age, edu, k = c(4, 5))",
    "(1 + age | participant_id) + (1 | site/participant_id)",
    "a ~ b ~ c",
    "0x1F + 1e5L + .5",
]
TERMS = [
    "y ~ b:a + a + c %in% a + (a+b)^2 + d/e",
    "y ~ a*b - a - 1",
    "y ~ a + offset(z) + b:offset(z)",
    "y ~ age + sex:site",
    "y ~ (a+b+c)^2 - a:b",
    "y ~ 0 + a:b + c",
    "y ~ a*b*c - a:b:c + 0",
    "y ~ (a + b)/c + d %in% (e + f)",
    "y ~ a + b - 0",
    "y ~ -1 + a",
    "y ~ 1",
    "y ~ log(x) + log( x ) + I(x^2):a",
    "y ~ a + b + a:b + b:a + a",
]
BARS = [
    "y ~ age + (1|pid)",
    "y ~ age + (age|pid)",
    "y ~ (0+age|pid)",
    "y ~ sex + (1|fam/pid)",
    "y ~ (age||pid)",
    "y ~ (1|fam:pid) + (sex|num)",
    "y ~ (0 + sex | fam)",
    "y ~ age + (1 + sex | pid) + (1 | fam)",
]


@pytest.fixture(scope="module")
def r_reading(tmp_path_factory):
    """R's deparse, terms and lme4 blocks of every case (one R process), and the cohort."""
    require("Rscript")
    folder = tmp_path_factory.mktemp("formula")
    rng = np.random.default_rng(3)
    n = 40
    table = pd.DataFrame(
        {
            "y": rng.normal(size=n),
            "age": rng.uniform(20, 60, n).round(1),
            "sex": rng.choice(["F", "M"], n),
            "fam": rng.choice(["f1", "F2", "f3", "f10"], n),
            "pid": rng.choice([f"p{i}" for i in range(9)], n),
            "num": rng.choice([3, 1, 2], n).astype(float),
        }
    )
    table.loc[3, "age"] = np.nan
    table.loc[5, "fam"] = np.nan
    table.to_csv(folder / "d.csv", index=False, na_rep="NA")
    cases = {"deparse": DEPARSE, "terms": TERMS, "bars": BARS}
    (folder / "cases.json").write_text(json.dumps(cases))
    subprocess.run(
        ["Rscript", str(R_SCRIPT), folder / "cases.json", folder / "d.csv", folder / "out.json"],
        check=True,
        capture_output=True,
        env=r_environment(),
    )
    return json.loads((folder / "out.json").read_text()), table.drop(columns="y")


def test_deparse_is_rs(r_reading):
    expected = [lines[0] for lines in r_reading[0]["deparse"]]
    assert [rf.deparse(rf.parse(text)) for text in DEPARSE] == expected


def test_terms_are_rs(r_reading):
    for formula, r in zip(TERMS, r_reading[0]["terms"], strict=True):
        node = rf.parse(formula)
        trms = rf.terms(*node.args)
        assert trms.labels == r["labels"], formula
        assert trms.intercept == bool(r["intercept"][0]), formula
        assert trms.offsets == r["offset"], formula
        factors = [[code.get(i, 0) for i in range(len(trms.variables))] for code in trms.codes]
        assert factors == r["factors"], formula


def test_random_effect_blocks_are_lme4s(r_reading):
    """lme4's expansion (|| and /), grouping factors (a:b as lme4's %i%), level order, the
    block model matrices and names, and the rows of its model frame (NA in a grouping factor
    drops the row)."""
    expected, table = r_reading
    for formula, r in zip(BARS, expected["bars"], strict=True):
        fixed = design.build_design(formula, table)
        assert fixed.rows.tolist() == r["rows"], formula
        assert ["(Intercept)" if c == "Intercept" else c for c in fixed.columns] == r["fixed"]
        blocks = design.random_effects(formula, table, fixed.rows)
        assert len(blocks) == len(r["blocks"]), formula
        for ours, theirs in zip(blocks, r["blocks"], strict=True):
            assert ours.term == theirs["term"][0] and ours.group == theirs["group"][0], formula
            assert ours.levels == theirs["levels"], formula
            assert ours.codes.tolist() == theirs["codes"], formula
            assert ours.columns == theirs["columns"], formula
            np.testing.assert_allclose(ours.matrix, np.array(theirs["matrix"]), atol=1e-12)


def test_smooth_calls_and_mgcv_parametric_part():
    """mgcv's split: smooth calls with their arguments out of the parametric terms; the
    parametric formula written again from its labels (so b:a is read as a:b, as mgcv does)."""
    model = rf.model_formula("y ~ b:a + s(age, by = osex, k = 4) + a + ti(age, edu) - 1")
    assert [s.label for s in model.smooths] == ["s(age, by = osex, k = 4)", "ti(age, edu)"]
    assert [s.kind for s in model.smooths] == ["s", "ti"]
    assert [rf.deparse(v) for v in model.smooths[1].variables] == ["age", "edu"]
    assert rf.deparse(model.smooths[0].arguments["by"]) == "osex"
    assert model.fixed.labels == ["a", "a:b"] and not model.fixed.intercept
    assert model.all_terms.labels == ["s(age, by = osex, k = 4)", "a", "ti(age, edu)", "b:a"]


@pytest.mark.parametrize(
    "formula, reason",
    [
        ("y ~ age +", "R cannot parse it"),
        ("y ~ age[1]", "indexing"),
        ("y ~ a < b < c", "cannot be chained"),
        ("y ~ (a + b)^x", "invalid power"),
        ("y ~ .", "'.' (every other column)"),
        ("y ~ s(age):sex", "a smooth in an interaction"),
        ("y ~ x; z", "';'"),
        ("y ~ age # comment", "comment"),
    ],
)
def test_unreadable_formulas_are_one_usage_line(formula, reason):
    with pytest.raises(UsageError) as caught:
        rf.model_formula(formula)
    message = str(caught.value)
    assert reason in message and message.startswith(f"formula {formula!r}") and "\n" not in message


HOSTILE = [
    "log(sex)", "sex + 2", "I(2)", "exp(1) + age", "(age + sex)^age", "poly(age, 'a')",
    "poly(age, 30)", "bs(age, degree = 0)", "factor(age, levels = 1)",
    "relevel(factor(sex), ref = 3)", "relevel(factor(sex), ref = 'X')", "scale(sex)",
    "scale(age, center = 'a')", "offset(sex)", "sex == 1", "!sex", "c(1, 2)", "pi", "NA",
    "NULL", "exp(exp(exp(age)))", "log(age, base = 'x')", "ns(age, knots = 'a')",
    "poly(age, degree = 2, raw = 'x')", "poly(sex, 2)", "log(-age)", "f(age)",
    "foo::poly(age, 2)", "mgcv::s(age)", "interaction(sex, age)", "1e400 * age",
    "relevel(ordered(sex), ref = 'F')", "factor(sex, labels = c('a', 'b'))", "age[1]",
    "function(x) x", "if (age) 1", "age <- 2", "`` + age", "'unclosed",
]  # fmt: skip


@pytest.mark.parametrize("rhs", HOSTILE)
def test_formulas_r_would_not_fit_are_greyarrays_refusals(rhs):
    """Whatever the formula, the design layer answers with one of GreyArray's own one-line
    errors (never a traceback, never a third-party message)."""
    from greyarray.errors import GreyArrayError

    rng = np.random.default_rng(0)
    table = pd.DataFrame({"age": rng.uniform(20, 60, 30), "sex": rng.choice(["F", "M"], 30)})
    with pytest.raises(GreyArrayError) as caught:
        design.build_design(f"y ~ {rhs}", table)
    message = str(caught.value)
    assert message.startswith("formula ") and "\n" not in message
