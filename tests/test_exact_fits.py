"""Elements a model fits exactly (a constant response: coverage of 1 for every subject, an
all-zero map) are never significant: fit-lm, fit-gam, fit-lmm and the permutations keep their
estimates and nothing else, the other elements' FDR and FWE ignore them, and the note says so.

R's lm fits such an element with residuals of rounding size and divides rounding noise by
rounding noise (t of order 1, F p-values of 1e-7: "essentially perfect fit: summary may be
unreliable"); lme4 stops ("not a positive definite matrix"). GreyArray decides once
(``results.perfect_fits``): residuals below 1e-10 of the response are zero.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import run_greyarray
from test_lm import make_h5, read_results

from greyarray.stats.results import p_adjust_fdr

MAGNITUDES = (0.1, 0.3, 1.0, 7.7, 1000.0, 0.0)
PER_MAGNITUDE = 6
N_RANDOM = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40 rows of 20 participants (2 sessions); 36 constant elements (6 of each magnitude,
    0 included), then 12 random ones; and the random ones alone in another HDF5."""
    rng = np.random.default_rng(5)
    n = 40
    phenotypes = pd.DataFrame(
        {
            "participant_id": [f"sub-{i // 2:02d}" for i in range(n)],
            "source_file": [f"f{i}.nii" for i in range(n)],
            "age": rng.uniform(8, 22, n).round(2),
            "sex": rng.choice(["F", "M"], n),
        }
    )
    constant = np.repeat(np.repeat(np.array(MAGNITUDES)[None], n, 0), PER_MAGNITUDE, 1)
    noise = rng.normal(size=(n, N_RANDOM)) + 0.15 * phenotypes["age"].to_numpy()[:, None]
    both = tmp_path_factory.mktemp("both")
    alone = tmp_path_factory.mktemp("alone")
    return make_h5(both, phenotypes, np.hstack([constant, noise])), make_h5(
        alone, phenotypes, noise
    )


def fit(command: str, h5, formula: str, *extra) -> tuple[pd.DataFrame, str]:
    args = [command, "--input-hdf5", h5, "--cohort-file", h5.parent / "cohort.csv"]
    args += ["--formula", formula, "--analysis-name", "a", "--overwrite", *extra]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = run_greyarray(*args)
    assert done.returncode == 0, done.stderr
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], caught
    return read_results(h5, "a"), done.stderr


def check(table: pd.DataFrame, stderr: str, random_alone: pd.DataFrame | None = None) -> None:
    """Constant elements: estimates (the value itself, zero slopes) and counts, NaN elsewhere;
    the random elements as fitted without them (FDR over them only)."""
    n_constant = len(MAGNITUDES) * PER_MAGNITUDE
    constant, rest = table.iloc[:n_constant], table.iloc[n_constant:]
    value = np.repeat(np.float32(MAGNITUDES), PER_MAGNITUDE).astype(float)  # as stored
    kept = [c for c in table if c.endswith(".estimate") or c in ("element_id", "model.nobs")]
    kept += [c for c in table if c.startswith("model.ngroups.")]
    assert constant.drop(columns=kept).isna().all().all()
    assert np.allclose(constant["Intercept.estimate"], value, rtol=1e-12, atol=1e-12)
    for column in kept:
        if column.endswith(".estimate") and column != "Intercept.estimate":
            assert (np.abs(constant[column]) <= 1e-10 * np.maximum(value, 1)).all(), column
    assert rest.drop(columns=["element_id"]).notna().all().all()
    p_values = [c for c in table if c.endswith(".p.value")]
    for column in p_values:  # FDR over the elements with a test only
        assert np.allclose(rest[f"{column}.fdr"], p_adjust_fdr(rest[column].to_numpy()))
    if random_alone is not None:
        for column in random_alone:
            if column != "element_id":
                assert np.allclose(rest[column], random_alone[column], rtol=1e-9), column
    assert f"{n_constant} of {len(table)} elements are fitted exactly (a constant response" in (
        stderr
    )


def test_fit_lm_and_permutations(data):
    both, alone = data
    options = ("--permutations", 49, "--seed", 3, "--var-model", "r.squared", "p.value", "AIC")
    table, stderr = fit("fit-lm", both, "y ~ age + sex", *options)
    check(table, stderr, fit("fit-lm", alone, "y ~ age + sex", *options)[0])
    assert (table.filter(like=".p.value.fwe").iloc[36:] < 0.05).any().any()  # tested


def test_fit_gam(data):
    both, alone = data
    for method in ("GCV.Cp", "REML"):
        args = ("y ~ s(age, k = 4) + sex", "--method", method, "--full-outputs")
        table, stderr = fit("fit-gam", both, *args)
        check(table, stderr, fit("fit-gam", alone, *args)[0])


def test_fit_lmm(data):
    both, alone = data
    args = ("y ~ age + sex + (1 | participant_id)",)
    table, stderr = fit("fit-lmm", both, *args)
    check(table, stderr, fit("fit-lmm", alone, *args)[0])
