"""fit-lm: equal to R's lm element by element (stored fixture, live R, independent numpy OLS)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import r_environment, require
from scipy import stats

from greyarray import cli
from greyarray.stats import lm, results

LM_DATA = Path(__file__).parent / "data" / "lm"
R_SCRIPT = Path(__file__).parent / "r" / "lm_reference.R"
RHS = "age + sex + site + age:sex + I(age^2)"


def make_h5(folder: Path, phenotypes: pd.DataFrame, values: np.ndarray, scalar="y") -> Path:
    """An HDF5 in ModelArray's layout holding ``values`` (subjects x elements), subjects named by
    the cohort's source_file, stored in reverse order so that matching by name is exercised."""
    path = folder / "data.h5"
    order = np.arange(len(phenotypes))[::-1]
    with h5py.File(path, "w") as h5:
        h5.create_dataset(f"scalars/{scalar}/values", data=values[order].astype(np.float32))
        h5.create_dataset(
            f"scalars/{scalar}/column_names",
            data=list(phenotypes["source_file"].iloc[order]),
            dtype=h5py.string_dtype(),
        )
    phenotypes.assign(scalar_name=scalar).to_csv(folder / "cohort.csv", index=False, na_rep="NA")
    return path


def read_results(path: Path, analysis: str = "lm") -> pd.DataFrame:
    with h5py.File(path, "r") as h5:
        group = h5[f"results/{analysis}"]
        names = list(group["column_names"].asstr()[()])
        return pd.DataFrame(group["results_matrix"][()].T, columns=names)


def assert_like_r(ours: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Columns and order identical; values within 1e-8 relative (p-values 1e-10 absolute)."""
    assert list(ours.columns) == list(expected.columns)
    for column in expected.columns:
        a, b = ours[column].to_numpy(), expected[column].to_numpy(float)
        assert np.array_equal(np.isnan(a), np.isnan(b)), column
        ok = ~np.isnan(b)
        if ".p.value" in column:
            assert np.abs(a[ok] - b[ok]).max() <= 1e-10, column
        else:
            assert np.allclose(a[ok], b[ok], rtol=1e-8, atol=1e-12), column


@pytest.fixture
def fixture_h5(tmp_path):
    phenotypes = pd.read_csv(LM_DATA / "phenotypes.csv")
    values = pd.read_csv(LM_DATA / "values.csv").to_numpy(np.float32)
    return make_h5(tmp_path, phenotypes, values), phenotypes, values


def test_equals_stored_r_output(fixture_h5):
    """tests/data/lm/expected.csv was made once by tests/r/lm_reference.R (R 4.2 lm)."""
    h5, _, _ = fixture_h5
    lm.fit_lm(
        h5,
        h5.parent / "cohort.csv",
        f"y ~ {RHS}",
        "lm",
        term_stats=lm.TERM_STATS,
        model_stats=lm.MODEL_STATS,
    )
    expected = pd.read_csv(LM_DATA / "expected.csv")
    ours = read_results(h5)
    assert_like_r(ours, expected)
    assert ours["model.nobs"].iloc[7] == 36  # infinite values are missing subjects
    assert ours.iloc[5, 1:].isna().all()  # 12 valid subjects: not more than max(10, 0.2 x 60)


def test_default_columns_are_modelarrays(fixture_h5):
    h5, _, _ = fixture_h5
    columns = lm.fit_lm(h5, h5.parent / "cohort.csv", "y ~ age + sex", "lm")
    assert columns == [
        "element_id",
        "Intercept.estimate",
        "Intercept.statistic",
        "Intercept.p.value",
        "age.estimate",
        "age.statistic",
        "age.p.value",
        "sexM.estimate",
        "sexM.statistic",
        "sexM.p.value",
        "model.adj.r.squared",
        "model.p.value",
        "Intercept.p.value.fdr",
        "age.p.value.fdr",
        "sexM.p.value.fdr",
        "model.p.value.fdr",
    ]
    results = read_results(h5)
    assert list(results.columns) == columns
    assert np.array_equal(results["element_id"], np.arange(40))


def test_equals_live_r_on_fresh_data(tmp_path):
    """R runs now, on data with other missing patterns, a 0 + ... model (no intercept) and
    mixed-case factor levels (R, in a UTF-8 locale, orders ctl < Pat < sib: ctl is the
    reference; Python's sort would make it Pat and flip every estimate)."""
    require("Rscript")
    rng = np.random.default_rng(7)
    n = 35
    phenotypes = pd.DataFrame(
        {
            "source_file": [f"s{i}" for i in range(n)],
            "age": rng.uniform(20, 60, n).round(2),
            "group": rng.choice(["ctl", "Pat", "sib"], n),
        }
    )
    values = rng.normal(size=(n, 25)) + phenotypes["age"].to_numpy()[:, None] * 0.03
    values[rng.uniform(size=values.shape) < 0.1] = np.nan
    values = values.astype(np.float32)
    phenotypes.to_csv(tmp_path / "p.csv", index=False)
    # every float32 value written exactly (17 digits of its double), so R reads the same numbers
    pd.DataFrame(values.astype(float)).to_csv(
        tmp_path / "v.csv", index=False, na_rep="NA", float_format="%.17g"
    )
    for rhs in ("0 + group + age", "age * group"):
        subprocess.run(
            [
                "Rscript",
                str(R_SCRIPT),
                str(tmp_path / "p.csv"),
                str(tmp_path / "v.csv"),
                rhs,
                str(tmp_path / "r.csv"),
            ],
            check=True,
            capture_output=True,
            env=r_environment(),
        )
        h5 = make_h5(tmp_path, phenotypes, values)
        lm.fit_lm(
            h5,
            tmp_path / "cohort.csv",
            f"y ~ {rhs}",
            "lm",
            term_stats=lm.TERM_STATS,
            model_stats=lm.MODEL_STATS,
        )
        assert_like_r(read_results(h5), pd.read_csv(tmp_path / "r.csv"))


def test_equals_independent_numpy_ols(tmp_path):
    """Per element: numpy lstsq and scipy's t distribution, no code shared with greyarray."""
    rng = np.random.default_rng(11)
    n, g = 50, 30
    phenotypes = pd.DataFrame(
        {
            "source_file": [f"s{i}" for i in range(n)],
            "age": rng.uniform(20, 60, n),
            "sex": rng.choice(["F", "M"], n),
        }
    )
    values = rng.normal(size=(n, g)).astype(np.float32)
    values[rng.uniform(size=values.shape) < 0.15] = np.nan
    h5 = make_h5(tmp_path, phenotypes, values)
    lm.fit_lm(
        h5,
        tmp_path / "cohort.csv",
        "y ~ age + sex",
        "lm",
        term_stats=lm.TERM_STATS,
        model_stats=lm.MODEL_STATS,
    )
    ours = read_results(h5)
    x_all = np.column_stack([np.ones(n), phenotypes["age"], phenotypes["sex"] == "M"])
    for j in range(g):
        keep = np.isfinite(values[:, j])
        x, y = x_all[keep], values[keep, j].astype(float)
        beta, rss, *_ = np.linalg.lstsq(x, y, rcond=None)
        df = keep.sum() - 3
        cov = rss[0] / df * np.linalg.inv(x.T @ x)
        t = beta / np.sqrt(np.diag(cov))
        for k, term in enumerate(["Intercept", "age", "sexM"]):
            assert np.isclose(ours[f"{term}.estimate"][j], beta[k], rtol=1e-8)
            assert np.isclose(ours[f"{term}.statistic"][j], t[k], rtol=1e-8)
            assert abs(ours[f"{term}.p.value"][j] - 2 * stats.t.sf(abs(t[k]), df)) < 1e-10
        tss = ((y - y.mean()) ** 2).sum()
        assert np.isclose(ours["model.r.squared"][j], 1 - rss[0] / tss, rtol=1e-8)


def test_fdr_is_r_p_adjust():
    p = np.array([0.01, np.nan, 0.04, 0.03, 0.04, 0.9, 0.2])
    # R: p.adjust(c(0.01, NA, 0.04, 0.03, 0.04, 0.9, 0.2), "fdr")
    expected = [0.06, np.nan, 0.06, 0.06, 0.06, 0.9, 0.24]
    assert np.allclose(results.p_adjust_fdr(p), expected, equal_nan=True)


def test_cli_errors(fixture_h5, run_cli):
    h5, _, _ = fixture_h5
    cohort = h5.parent / "cohort.csv"
    args = ["fit-lm", "--input-hdf5", h5, "--cohort-file", cohort]
    code, _, err = run_cli(*args, "--formula", "FA ~ age")
    assert code == 65 and "no scalar 'FA' (scalars: y)" in err
    code, _, err = run_cli(*args, "--formula", "y ~ agee")
    assert code == 65 and "formula 'y ~ agee'" in err and "cohort columns:" in err
    code, _, err = run_cli(*args, "--formula", "y age")
    assert code == 64 and "exactly one '~'" in err
    assert run_cli(*args, "--formula", "y ~ age")[0] == 0
    code, _, err = run_cli(*args, "--formula", "y ~ age")
    assert code == 73 and "results/lm exists; use --overwrite" in err
    pd.read_csv(cohort).iloc[:-1].to_csv(cohort, index=False)
    code, _, err = run_cli(*args, "--formula", "y ~ age", "--overwrite")
    assert code == 65 and "1 HDF5 subjects have no cohort row" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_fit_then_export(tmp_path, writer91k):
    """The whole chain on the real 91k geometry: convert, fit, export CIFTI maps."""
    from conftest import subject_values, write_cohort

    values = subject_values(24, 91282, seed=3)
    csv = write_cohort(tmp_path, writer91k, values)
    h5 = tmp_path / "t.h5"
    assert cli.main(["to-modelarray", "--cohort-file", str(csv), "--output", str(h5)]) == 0
    assert (
        cli.main(
            [
                "fit-lm",
                "--input-hdf5",
                str(h5),
                "--cohort-file",
                str(csv),
                "--formula",
                "thickness ~ age",
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "export-results",
                "--analysis-name",
                "lm",
                "--input-hdf5",
                str(h5),
                "--output-dir",
                str(tmp_path / "maps"),
            ]
        )
        == 0
    )
    import nibabel as nb

    slope = np.asarray(nb.load(tmp_path / "maps" / "lm_age.estimate.dscalar.nii").dataobj)[0]
    age = pd.read_csv(csv)["age"].to_numpy(float)
    expected = np.polyfit(age, values[:, 123].astype(float), 1)[0]
    assert np.isclose(slope[123], expected, rtol=1e-5)


def test_a_covariate_near_floats_limit_is_fitted_by_every_model():
    """R's rank test compares QR pivots with the column norms; squared naively, a covariate of
    1e200 has an infinite norm and every element looked rank-deficient (all NaN)."""
    from greyarray.stats import gam_fit, permutation
    from greyarray.stats.linalg import column_norms

    rng = np.random.default_rng(3)
    x = np.column_stack([np.ones(20), rng.uniform(20, 60, 20)])
    big = x * [1, 1e200]
    assert np.allclose(column_norms(big) / [1, 1e200], np.linalg.norm(x, axis=0))
    assert permutation._full_rank(big)
    design = gam_fit.Design(big, slice(0, 2), [], True)
    assert design.ok
