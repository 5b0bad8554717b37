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

CASES = {  # fixture name: (formula, method, full outputs, changed-R-squared term)
    "fx_reml": ("y ~ s(age, k = 4, fx = TRUE) + sex", "REML", True, None),
    "tp_reml_rsq": ("y ~ s(age) + sex", "REML", False, "s(age)"),
    "tp_reml_full": ("y ~ s(age) + sex", "REML", True, None),
    "cr_gcv": ('y ~ s(age, bs = "cr") + s(x2)', "GCV.Cp", True, None),
    "shrink_reml": ('y ~ s(age, bs = "ts") + s(x2, k = 6) + sex', "REML", True, None),
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
    for name, (formula, method, full, changed) in CASES.items():
        gam.fit_gam(
            h5,
            folder / "cohort.csv",
            formula,
            name,
            method=method,
            full_outputs=full,
            changed_rsq_term=changed,
        )
    return h5


def test_fixed_df_smooth_equals_r(fixture_results):
    """fx=TRUE: a linear model in mgcv's basis; statistics 1e-8 relative, p-values 1e-10."""
    ours = read_results(fixture_results, "fx_reml")
    worst = differences(ours, expected_csv(GAM_DATA / "expected_fx_reml.csv"))
    for column, diff in worst.items():
        assert diff <= (1e-10 if "p.value" in column else 1e-8), (column, diff)
    assert ours.iloc[7, 1:].isna().all()  # 14 valid subjects: not more than max(10, 0.2 x 80)
    assert ours["model.nobs"].iloc[8] == 73  # the Inf and the NaNs are missing subjects
    assert ours["s_age.ref.df"].iloc[0] == 3


@pytest.mark.parametrize("name", ["tp_reml_rsq", "tp_reml_full", "cr_gcv", "shrink_reml"])
def test_penalised_smooths_equal_r(fixture_results, name):
    """Penalised smooths (REML and GCV.Cp): edf and statistics 1e-5 relative, p-values 1e-6."""
    ours = read_results(fixture_results, name)
    expected = expected_csv(GAM_DATA / f"expected_{name}.csv")
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


def test_equals_live_r(tmp_path):
    """R runs now on fresh data: a factor with three levels, missing values, GCV.Cp."""
    require("Rscript")
    rng = np.random.default_rng(5)
    n = 45
    phenotypes = pd.DataFrame(
        {
            "source_file": [f"s{i}" for i in range(n)],
            "age": rng.uniform(6, 30, n).round(1),
            "site": rng.choice(["a", "b", "c"], n),
        }
    )
    values = np.log(phenotypes["age"].to_numpy())[:, None] * rng.normal(1, 0.5, 4) + rng.normal(
        0, 0.3, (n, 4)
    )
    values[rng.uniform(size=values.shape) < 0.08] = np.nan
    values = values.astype(np.float32)
    phenotypes.to_csv(tmp_path / "p.csv", index=False)
    pd.DataFrame(values.astype(float)).to_csv(
        tmp_path / "v.csv", index=False, na_rep="NA", float_format="%.17g"
    )
    formula = "y ~ s(age, k = 5) + site"
    subprocess.run(
        [
            "Rscript",
            str(R_SCRIPT),
            str(tmp_path / "p.csv"),
            str(tmp_path / "v.csv"),
            formula,
            "GCV.Cp",
            "1",
            "0",
            str(tmp_path / "r.csv"),
        ],
        check=True,
        capture_output=True,
    )
    h5 = make_h5(tmp_path, phenotypes, values)
    gam.fit_gam(h5, tmp_path / "cohort.csv", formula, "gam", full_outputs=True)
    for column, diff in differences(
        read_results(h5, "gam"), expected_csv(tmp_path / "r.csv")
    ).items():
        assert diff <= (1e-6 if "p.value" in column else 1e-5), (column, diff)


def test_formula_parsing():
    assert gam.is_gam_formula("FA ~ s(age, k=4, fx=TRUE) + sex")
    assert not gam.is_gam_formula("FA ~ age + sex")
    parsed = gam.parse_gam_formula("FA ~ s(age, k=4, fx=TRUE, bs='cr') + sex")
    spec = gam.SmoothSpec('s(age, k = 4, fx = TRUE, bs = "cr")', "age", 4, True, "cr")
    assert parsed.smooths[0] == spec
    assert parsed.parametric_rhs == "sex"
    assert gam.parse_gam_formula("FA ~ s(age)").parametric_rhs == "1"
    for given in ("s(age)", "s_age", "1", "s(age, k=4, fx=TRUE, bs='cr')"):
        assert gam.changed_term_name(parsed, given) == (parsed.smooths[0].term, "s_age")
    assert gam.changed_term_name(parsed, "2") == ("sex", "sex")


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
    code, _, err = run_cli(*args, "--formula", "thickness ~ s(age, by=sex)")
    assert code == 64 and "only k=, fx= and bs= are supported" in err
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
