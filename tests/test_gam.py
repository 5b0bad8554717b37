"""fit-gam: equal to mgcv::gam run element by element as ModelArray.gam runs it (stored fixtures
made by tests/r/gam_reference.R with R 4.2 / mgcv 1.8-41, one live R run), and the chain to
export-results."""

from __future__ import annotations

import subprocess
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import PSCALAR, require, write_cohort

from greyarray import cli
from greyarray.io.formats import cifti
from greyarray.stats import gam

GAM_DATA = Path(__file__).parent / "data" / "gam"
R_SCRIPT = Path(__file__).parent / "r" / "gam_reference.R"

CASES = {  # name: (formula, method, full outputs, changed-R-squared term[, factor options])
    "fx_reml": ("y ~ s(age, k = 4, fx = TRUE) + sex", "REML", True, None),
    "tp_reml_rsq": ("y ~ s(age) + sex", "REML", False, "s(age)"),
    "tp_reml_full": ("y ~ s(age) + sex", "REML", True, None),
    "cr_gcv": ('y ~ s(age, bs = "cr") + s(x2)', "GCV.Cp", True, None),
    "shrink_reml": ('y ~ s(age, bs = "ts") + s(x2, k = 6) + sex', "REML", True, None),
    # ModelArray's gen_gamFormula_contIx(k = 4) formula (fx = TRUE), GCV.Cp as ModelArray.gam
    "contix_gcv": (
        "y ~ ti(age, k = 4, fx = TRUE) + ti(x2, k = 4, fx = TRUE) + ti(age, x2, k = 4, fx = TRUE)",
        "GCV.Cp",
        True,
        "3",
    ),
    "ti_reml": ("y ~ ti(age) + ti(x2) + ti(age, x2)", "REML", True, None),
    "te_reml": ("y ~ te(age, x2) + sex", "REML", True, None),
    "te_gcv": ('y ~ te(age, x2, k = c(4, 6), bs = c("tp", "cr"))', "GCV.Cp", True, None),
    # a by= must be a factor (mgcv stops on text): --reference-level makes sex one
    "by_gcv": (
        'y ~ sex + s(age, by = sex, bs = "cr")',
        "GCV.Cp",
        True,
        "2",
        {"reference_levels": {"sex": "F"}},
    ),
    # ModelArray's gen_gamFormula_fxSmooth(k = 4) formula: osex an ordered factor, F first
    "fxsmooth_reml": (
        "y ~ osex + s(age, k = 4, fx = TRUE) + s(age, k = 4, by = osex, fx = TRUE)",
        "REML",
        True,
        "3",
        {"ordered_factors": {"osex": "F"}},
    ),
    "by_reml": (
        "y ~ osex + s(age) + s(age, by = osex)",
        "REML",
        True,
        "3",
        {"ordered_factors": {"osex": "F"}},
    ),
}


def make_h5(folder: Path, phenotypes: pd.DataFrame, values: np.ndarray) -> Path:
    """ModelArray's layout, subjects stored in reverse order (matching by name is exercised)."""
    path = folder / "data.h5"
    order = np.arange(len(phenotypes))[::-1]
    with h5py.File(path, "w") as h5:
        h5.create_dataset("scalars/y/values", data=values[order].astype(np.float32))
        h5.create_dataset(
            "scalars/y/column_names",
            data=list(phenotypes["source_file"].iloc[order]),
            dtype=h5py.string_dtype(),
        )
    phenotypes.assign(scalar_name="y").to_csv(folder / "cohort.csv", index=False)
    return path


def read_results(path: Path, analysis: str) -> pd.DataFrame:
    with h5py.File(path, "r") as h5:
        group = h5[f"results/{analysis}"]
        return pd.DataFrame(
            group["results_matrix"][()].T, columns=list(group["column_names"].asstr()[()])
        )


def expected_csv(path: Path) -> pd.DataFrame:
    """R's output: numbers written with 17 significant digits (NaN for skipped elements)."""
    return pd.read_csv(path, skipinitialspace=True).astype(float)


def differences(ours: pd.DataFrame, expected: pd.DataFrame) -> dict[str, float]:
    """Largest difference per column: absolute for p-values, relative otherwise."""
    assert list(ours.columns) == list(expected.columns)
    out = {}
    for column in expected.columns:
        a, b = ours[column].to_numpy(), expected[column].to_numpy(float)
        assert np.array_equal(np.isnan(a), np.isnan(b)), column
        ok = ~np.isnan(b)
        diff = np.abs(a[ok] - b[ok])
        if "p.value" not in column:
            diff = diff / np.maximum(np.abs(b[ok]), 1e-12)
        out[column] = float(diff.max()) if diff.size else 0.0
    return out


@pytest.fixture(scope="module")
def fixture_results(tmp_path_factory):
    """Every stored case fitted once on the stored data."""
    folder = tmp_path_factory.mktemp("gam")
    phenotypes = pd.read_csv(GAM_DATA / "phenotypes.csv")
    values = pd.read_csv(GAM_DATA / "values.csv").to_numpy(np.float32)
    h5 = make_h5(folder, phenotypes, values)
    for name, (formula, method, full, changed, *factors) in CASES.items():
        gam.fit_gam(
            h5,
            folder / "cohort.csv",
            formula,
            name,
            method=method,
            full_outputs=full,
            changed_rsq_term=changed,
            **(factors[0] if factors else {}),
        )
    return h5


@pytest.mark.parametrize("name", ["fx_reml", "fxsmooth_reml"])
def test_fixed_df_smooth_equals_r(fixture_results, name):
    """fx=TRUE: a linear model in mgcv's basis; statistics 1e-8 relative, p-values 1e-10. With
    ModelArray's factor-smooth helper: s(age, by = osex) for an ordered factor is one smooth,
    for the level after the reference (s_age_BYosexM), beside osex's polynomial contrast
    (osex.L)."""
    ours = read_results(fixture_results, name)
    worst = differences(ours, expected_csv(GAM_DATA / f"expected_{name}.csv"))
    for column, diff in worst.items():
        assert diff <= (1e-10 if "p.value" in column else 1e-8), (column, diff)
    assert ours.iloc[7, 1:].isna().all()  # 14 valid subjects: not more than max(10, 0.2 x 80)
    assert ours["model.nobs"].iloc[8] == 73  # the Inf and the NaNs are missing subjects
    assert ours["s_age.ref.df"].iloc[0] == 3
    if name == "fxsmooth_reml":
        assert {"s_age_BYosexM.statistic", "osex.L.estimate", "s_age_BYosex.partial.rsq"} <= set(
            ours.columns
        )


PENALISED = ["tp_reml_rsq", "tp_reml_full", "cr_gcv", "shrink_reml", "ti_reml", "te_reml"]


@pytest.mark.parametrize("name", [*PENALISED, "te_gcv", "by_gcv", "by_reml"])
def test_penalised_smooths_equal_r(fixture_results, name):
    """Penalised smooths (REML and GCV.Cp): s(), factor by= (one smooth per level), ti()
    (marginal-removal constraints, a smoothing parameter per margin), te() (a penalty per
    margin, tp margins re-parameterised): edf and statistics 1e-5 relative, p-values 1e-6."""
    ours = read_results(fixture_results, name)
    expected = expected_csv(GAM_DATA / f"expected_{name}.csv")
    if name == "te_reml":
        # where te's edf is a hair above its 3-dimensional null space (3.00007), testStat's
        # rank 3 + 1.5e-4 enters its statistic through sqrt(nu (1 - nu)): the 1e-13 that
        # separates the two edf becomes 5e-5 in the statistic (the p-values agree to 1e-10)
        near = (expected["te_age_x2.edf"] - 3).abs() < 1e-3
        assert 0 < near.sum() < 5
        column = "te_age_x2.statistic"
        assert np.abs(ours[column][near] / expected[column][near] - 1).max() < 1e-4
        ours.loc[near, column] = expected.loc[near, column]
    if name == "te_gcv":
        # elements 8 and 18: GCV.Cp pushes the second smoothing parameter to 6e10 and 7e11,
        # where mgcv's magic loses digits (mgcv refitted at a fixed sp of 1e10, 1e12 is 2e-8,
        # 4e-5 off the limit in edf; GreyArray's evaluation stays within 1e-9 up to 1e14):
        # there the two agree to 1e-4
        for column, diff in differences(ours.iloc[[8, 18]], expected.iloc[[8, 18]]).items():
            assert diff < 1e-4, (column, diff)
        ours, expected = ours.drop(index=[8, 18]), expected.drop(index=[8, 18])
    if name == "shrink_reml":
        # where the ts smooth is shrunk away (edf < 0.01) the REML score is flat towards
        # lambda = infinity: mgcv's Newton stops where its rounding lets it and its reTest
        # counts the rank (Ref.df) in rounding noise; those terms agree only loosely
        gone = expected["s_age.edf"].to_numpy() < 0.01
        assert 0 < gone.sum() < 10
        loose = {"s_age.edf": 1e-4, "s_age.p.value": 5e-2, "s_age.statistic": 1e-4}
        for column, tol in loose.items():
            assert np.abs(ours[column][gone] - expected[column][gone]).max() < tol, column
            ours.loc[gone, column] = expected.loc[gone, column] = np.nan
        ours.loc[gone, "s_age.ref.df"] = expected.loc[gone, "s_age.ref.df"] = np.nan
        ours.loc[gone, "s_age.p.value.fdr"] = expected.loc[gone, "s_age.p.value.fdr"] = np.nan
    worst = differences(ours, expected)
    for column, diff in worst.items():
        assert diff <= (1e-6 if "p.value" in column else 1e-5), (column, diff)


def test_fixed_tensor_interaction_under_gcv_equals_r(fixture_results):
    """ModelArray's continuous-interaction helper, ti(x) + ti(z) + ti(x, z) with fx = TRUE,
    under GCV.Cp: statistics 2e-7 relative, p-values 3e-6. Not 1e-8/1e-10 as under REML: mgcv's
    edf of an unpenalised term comes out of its GCV path as 3 - 2e-15 (rounding), so its
    testStat takes the fractional-rank branch (sqrt(2e-15) ~ 6e-8 in the statistic, the p-value
    by Davies' numerical inversion), where GreyArray uses the exact integer rank."""
    ours = read_results(fixture_results, "contix_gcv")
    worst = differences(ours, expected_csv(GAM_DATA / "expected_contix_gcv.csv"))
    for column, diff in worst.items():
        assert diff <= (3e-6 if "p.value" in column else 2e-7), (column, diff)
    assert list(ours.columns[-8:-4]) == [
        "ti_age_x2.delta.adj.rsq",
        "ti_age_x2.partial.rsq",
        "ti_age_x2.delta.adj.rsq.signed",
        "ti_age_x2.partial.rsq.signed",
    ]
    assert ours["ti_age_x2.partial.rsq.signed"].isna().all()  # no slope for a 2-D term


def test_default_and_changed_rsq_columns(fixture_results):
    """ModelArray.gam's default columns in its order, then GreyArray's additions."""
    assert list(read_results(fixture_results, "tp_reml_rsq").columns) == [
        "element_id",
        "s_age.statistic",
        "s_age.p.value",
        "Intercept.estimate",
        "Intercept.statistic",
        "Intercept.p.value",
        "sexM.estimate",
        "sexM.statistic",
        "sexM.p.value",
        "model.dev.expl",
        "s_age.delta.adj.rsq",
        "s_age.partial.rsq",
        "s_age.delta.adj.rsq.signed",
        "s_age.partial.rsq.signed",
        "s_age.p.value.fdr",
        "Intercept.p.value.fdr",
        "sexM.p.value.fdr",
    ]


def test_equals_live_r(tmp_path, run_cli):
    """Live mgcv on fresh data (missing values, subjects stored in the HDF5 in reverse order),
    through the command line: a penalised smooth beside a three-level factor under GCV.Cp
    (statistics 1e-5, p-values 1e-6), and ModelArray's helpers' formulas as they print them,
    each with the changed R-squared of its interaction (1e-8, p-values 1e-10):
    gen_gamFormula_fxSmooth with a three-level factor made ordered by --ordered-factor (osex.L,
    osex.Q; one smooth per level after the reference; its levels follow the cohort file, M
    before X here, as the helper met them in the user's R session, not the HDF5's order) and
    gen_gamFormula_contIx (ti main effects and interaction)."""
    require("Rscript")
    rng = np.random.default_rng(11)
    n = 70
    age, edu = rng.uniform(8, 22, n).round(2), rng.uniform(8, 20, n).round(1)
    phenotypes = pd.DataFrame({"source_file": [f"s{i}" for i in range(n)], "age": age})
    phenotypes["edu"] = edu
    phenotypes["osex"] = rng.choice(["M", "F", "X"], n)
    phenotypes["site"] = rng.choice(["a", "b", "c"], n)
    values = (
        np.sin(age / 3)[:, None] * rng.normal(1, 0.5, 5)
        + ((age - 15) * (edu - 14) / 30)[:, None]
        + rng.normal(0, 0.4, (n, 5))
    )
    values[rng.uniform(size=values.shape) < 0.05] = np.nan
    values = values.astype(np.float32)
    phenotypes.to_csv(tmp_path / "p.csv", index=False)
    pd.DataFrame(values.astype(float)).to_csv(
        tmp_path / "v.csv", index=False, na_rep="NA", float_format="%.17g"
    )
    h5 = make_h5(tmp_path, phenotypes, values)
    runs = {  # name: formula, method, changed term, --ordered-factor, tolerances
        "site": ("y ~ s(age, k = 5) + site", "GCV.Cp", "0", [], (1e-5, 1e-6)),
        "fxsmooth": (
            "y~osex+s(age,k=4,fx=TRUE)+s(age,k=4,by=osex,fx=TRUE)",
            "REML",
            "3",
            ["osex=F"],
            (1e-8, 1e-10),
        ),
        "contix": (
            "y~ti(age,k=4,fx=TRUE)+ti(edu,k=4,fx=TRUE)+ti(age,edu,k=4,fx=TRUE)",
            "REML",
            "3",
            [],
            (1e-8, 1e-10),
        ),
    }
    for name, (formula, method, changed, ordered, (tol, p_tol)) in runs.items():
        r_csv = tmp_path / f"{name}.csv"
        inputs = [tmp_path / "p.csv", tmp_path / "v.csv"]
        subprocess.run(
            ["Rscript", R_SCRIPT, *inputs, formula, method, "1", changed, r_csv, *ordered],
            check=True,
            capture_output=True,
        )
        args = ["fit-gam", "--input-hdf5", h5, "--cohort-file", tmp_path / "cohort.csv"]
        args += ["--formula", formula, "--method", method, "--full-outputs"]
        args += [
            "--analysis-name",
            name,
            *(["--changed-rsq-term", changed] if changed != "0" else []),
        ]
        code, _, err = run_cli(*args, *(["--ordered-factor", *ordered] if ordered else []))
        assert code == 0, err
        ours = read_results(h5, name)
        for column, diff in differences(ours, expected_csv(r_csv)).items():
            assert diff <= (p_tol if "p.value" in column else tol), (name, column, diff)
    names = set(read_results(h5, "fxsmooth").columns) | set(read_results(h5, "contix").columns)
    assert {"osex.Q.estimate", "s_age_BYosexX.p.value", "s_age_BYosex.delta.adj.rsq"} <= names
    assert {"ti_age.statistic", "ti_age_edu.p.value", "ti_age_edu.partial.rsq"} <= names


def test_formula_parsing():
    assert gam.is_gam_formula("FA ~ s(age, k=4, fx=TRUE) + sex")
    assert not gam.is_gam_formula("FA ~ age + sex")
    parsed = gam.parse_gam_formula("FA ~ s(age, k=4, fx=TRUE, bs='cr') + sex")
    spec = gam.SmoothSpec('s(age, k = 4, fx = TRUE, bs = "cr")', "s", ("age",), (4,), True, ("cr",))
    assert parsed.smooths[0] == spec
    assert parsed.parametric_rhs == "sex"
    assert gam.parse_gam_formula("FA ~ s(age)").parametric_rhs == "1"
    for given in ("s(age)", "s_age", "1", "s(age, k=4, fx=TRUE, bs='cr')"):
        assert gam.changed_term_name(parsed, given) == (parsed.smooths[0].term, "s_age")
    assert gam.changed_term_name(parsed, "2") == ("sex", "sex")
    # ModelArray's helpers' formulas, as they print them
    contix = gam.parse_gam_formula(
        "FA~ti(age,k=4,fx=TRUE)+ti(edu,k=4,fx=TRUE)+ti(age,edu,k=4,fx=TRUE)"
    )
    assert gam.is_gam_formula("FA~ti(age,k=4,fx=TRUE)") and gam.is_gam_formula("FA ~ te(a, b)")
    assert [s.label for s in contix.smooths] == ["ti(age)", "ti(edu)", "ti(age,edu)"]
    assert contix.smooths[2] == gam.SmoothSpec(
        "ti(age, edu, k = 4, fx = TRUE)", "ti", ("age", "edu"), (4, 4), True, ("cr", "cr")
    )
    assert gam.changed_term_name(contix, "3") == ("ti(age, edu, k = 4, fx = TRUE)", "ti_age_edu")
    fx_smooth = gam.parse_gam_formula("FA~osex+s(age,k=4,fx=TRUE)+s(age,k=4,by=osex,fx=TRUE)")
    assert fx_smooth.smooths[1].by == "osex" and fx_smooth.parametric == ("osex",)
    assert gam.changed_term_name(fx_smooth, "3")[1] == "s_age_BYosex"  # ModelArray's prefix
    te = gam.parse_gam_formula('y ~ te(age, edu, k = c(4, 6), bs = c("tp", "cr"))').smooths[0]
    assert (te.k, te.bs, te.fx) == ((4, 6), ("tp", "cr"), False)
    assert gam.parse_gam_formula("y ~ te(a, b, k = c(4, 5, 6))").smooths[0].k == (5, 5)  # mgcv
    assert gam.parse_gam_formula("y ~ s(a, by = NA)").smooths[0].by is None


def test_modelarray_smooth_names():
    """analyseOneElement.gam's renaming of tidy()'s smooth terms."""
    names = {
        "s(age)": "s_age",
        "s(age):osexM": "s_age_BYosexM",
        "ti(age,edu)": "ti_age_edu",
        "te(age,edu)": "te_age_edu",
        "s(age):sexF": "s_age_BYsexF",
    }
    for label, name in names.items():
        assert gam.smooth_column(label) == name


def test_log_determinant_of_overlapping_penalties():
    """log|l1 S1 + l2 S2| (te's two margins on one block) and its derivatives in log l, by
    mgcv's similarity transform: equal to a direct computation where that is accurate, to
    central differences, and still accurate where l2 / l1 = 1e14 (the direct sum's small
    eigenvalues are rounding noise there)."""
    from greyarray.stats.gam_fit import stable_log_det

    rng = np.random.default_rng(4)
    m1, m2 = rng.normal(size=(5, 3)), rng.normal(size=(4, 2))
    S1 = np.kron(m1 @ m1.T, np.eye(4))  # rank 9 of 20, as te's S1 = Sm1 x I
    S2 = np.kron(np.eye(5), m2 @ m2.T)  # rank 10
    values, vectors = np.linalg.eigh(S1 + S2)
    Y = vectors[:, values > values.max() * 1e-10]  # the range of the sum
    roots = []
    for S in (S1, S2):
        v, u = np.linalg.eigh(S)
        keep = v > v.max() * 1e-10
        roots.append(Y.T @ (u[:, keep] * np.sqrt(v[keep])))
    for rho in ([0.3, -1.2], [2.0, 9.0]):
        lam = np.exp(rho)
        det, det1, det2 = stable_log_det(roots, lam, True)
        assert abs(det - np.linalg.slogdet(Y.T @ (lam[0] * S1 + lam[1] * S2) @ Y)[1]) < 1e-9
        h = 1e-5
        for j in range(2):
            step = np.eye(2)[j] * h
            up, down = (stable_log_det(roots, np.exp(rho + s), True) for s in (step, -step))
            assert abs((up[0] - down[0]) / (2 * h) - det1[j]) < 1e-6
            assert np.abs((up[1] - down[1]) / (2 * h) - det2[j]).max() < 1e-6
    # l2 = 1e14 l1: log|.| -> 10 log(1e14) + log|S2|+ + log|S1| on S2's null space (in the
    # range of the sum), within 1e-9; the direct sum's small eigenvalues are rounding noise
    lam = np.array([1.0, 1e14])
    det = stable_log_det(roots, lam, False)[0]
    v2, u2 = np.linalg.eigh(Y.T @ S2 @ Y)
    null = v2 < v2.max() * 1e-10
    S1_null = u2[:, null].T @ Y.T @ S1 @ Y @ u2[:, null]
    expected = 10 * np.log(1e14) + np.log(v2[~null]).sum() + np.linalg.slogdet(S1_null)[1]
    assert abs(det - expected) < 1e-9
    assert abs(np.linalg.slogdet(Y.T @ (S1 + 1e14 * S2) @ Y)[1] - expected) > 1e-6


def test_cli_fit_then_export(tmp_path, run_cli):
    """to-modelarray, fit-gam, export-results: results under results/<analysis>, and the
    exported CIFTI maps hold the results matrix."""
    writer = cifti.CiftiWriter(cifti.read_file(PSCALAR).geometry)
    rng = np.random.default_rng(1)
    ages = 20 + np.arange(30)
    values = (np.sin(ages / 6)[:, None] + rng.normal(0, 0.2, (30, 54))).astype(np.float32)
    csv = write_cohort(tmp_path, writer, values)
    h5 = tmp_path / "p.h5"
    assert cli.main(["to-modelarray", "--cohort-file", str(csv), "--output", str(h5)]) == 0
    args = ["fit-gam", "--input-hdf5", h5, "--cohort-file", csv]
    code, _, err = run_cli(*args, "--formula", "thickness ~ s(age, m=2)")
    assert code == 64 and "only k=, fx=, bs= and by= are supported" in err
    formula = "thickness ~ s(age, k=4, fx=TRUE)"
    assert run_cli(*args, "--formula", formula, "--method", "REML")[0] == 0
    results = read_results(h5, "gam")
    assert list(results.columns)[:3] == ["element_id", "s_age.statistic", "s_age.p.value"]
    out = tmp_path / "maps"
    assert (
        run_cli(
            "export-results", "--analysis-name", "gam", "--input-hdf5", h5, "--output-dir", out
        )[0]
        == 0
    )
    import nibabel as nb

    exported = np.asarray(nb.load(out / "gam_s_age.statistic.pscalar.nii").dataobj)[0]
    assert np.allclose(exported, results["s_age.statistic"], rtol=1e-6)


def test_davies_equals_mgcv_psum_chisq():
    """mgcv::psum.chisq(q, lb, df) values printed by R 4.2 / mgcv 1.8-41 (17 digits)."""
    from greyarray.stats.davies import psum_chisq

    cases = [
        (0, [1, 1.3, 0.7, -3.2 / 55], [1, 1, 1, 55], 0.36603498641146792),
        (0, [1, 1.93, 0.07, -40 / 54], [1, 1, 1, 54], 4.6883862611757365e-05),
        (5.5, [1, 1.6, 0.4], None, 0.14473354968209828),
        (0, [2.1, 0.8, 0.3, 0.05, -12 / 30], [1, 1, 1, 1, 30], 0.035575179750844121),
        (0, [1, 1, 1, -0.1 / 900], [1, 1, 1, 900], 0.99183061636708336),
    ]
    for q, lb, df, expected in cases:
        assert abs(psum_chisq(q, lb, df) - expected) < 1e-14


GAM_REFUSALS = {  # formula: (exit code, GreyArray's line, mgcv 1.8-41's error on read.csv's data)
    "y ~ 0": (64, "has no term and no intercept", "You've got no model"),
    "y ~ s(age, by = sex)": (65, "by=sex is a text column", "Can't find by variable"),
    "log(y) ~ s(age)": (64, "the response 'log(y)' is an expression", None),
}


def test_refused_as_mgcv_refuses(tmp_path, run_cli):
    """Formulas mgcv stops on are refused in one line (a by= factor made by --reference-level
    is fitted); mgcv's own errors checked live."""
    rscript = require("Rscript")
    phenotypes = pd.read_csv(GAM_DATA / "phenotypes.csv")
    values = pd.read_csv(GAM_DATA / "values.csv").iloc[:, :2].to_numpy(np.float32)
    h5 = make_h5(tmp_path, phenotypes, values)
    args = ["fit-gam", "--input-hdf5", h5, "--cohort-file", tmp_path / "cohort.csv"]
    script = tmp_path / "m.R"
    script.write_text(
        'suppressMessages(library(mgcv)); d <- read.csv("cohort.csv"); d$y <- rnorm(nrow(d))\n'
        "for (f in commandArgs(TRUE)) cat(tryCatch({gam(as.formula(f), data = d); 'fitted'},\n"
        "  error = function(e) conditionMessage(e)), '\\n')\n"
    )
    said = subprocess.run(
        [rscript, script, *GAM_REFUSALS], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for (formula, (code, line, mgcv)), theirs in zip(GAM_REFUSALS.items(), said, strict=True):
        got, _, err = run_cli(*args, "--formula", formula)
        lines = err.strip().splitlines()
        assert got == code and len(lines) == 1 and line in lines[0], err
        assert mgcv is None or mgcv in theirs, theirs
    ok = run_cli(*args, "--formula", "y ~ sex + s(age, by = sex)", "--reference-level", "sex=F")
    assert ok[0] == 0, ok[2]
