"""harmonize: ComBat as neuroCombat 0.2.12 computes it, ComBat-GAM as neuroHarmonize 2.5.2 does,
streamed into a new scalar of the HDF5; --apply-from; missing values; one-line refusals.

Fixtures: tests/combat/make_fixtures.py (the references in their own environment, see
tests/combat_reference.py); one live run of both references in CI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from combat_reference import (
    cohort_data,
    neurocombat_calls,
    neuroharmonize_calls,
)

from greyarray.stats import combat
from greyarray.stats.combat import Options, harmonize_array

FIXTURES = Path(__file__).parent / "data" / "combat"
COMBAT_TOLERANCE, GAM_TOLERANCE = 1e-6, 1e-4  # relative, the issue's
OPTIONS = {
    "parametric": Options(),
    "nonparametric": Options(parametric=False),
    "mean_only": Options(mean_only=True),
    "mean_only_nonparametric": Options(mean_only=True, parametric=False),
    "no_eb": Options(eb=False),
    "reference": Options(reference="siteB"),
    "reference_nonparametric": Options(reference="siteB", parametric=False),
    "reference_mean_only": Options(reference="siteB", mean_only=True),
}
FLAGS = {
    "parametric": [],
    "nonparametric": ["--nonparametric"],
    "mean_only": ["--mean-only"],
    "no_eb": ["--no-eb"],
    "reference": ["--reference-batch", "siteB"],
}


@pytest.fixture(scope="module")
def fixture():
    with np.load(FIXTURES / "expected.npz") as data:
        expected = dict(data)
    return expected, pd.read_csv(FIXTURES / "cohort.csv")


def relative(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert np.array_equal(np.isnan(ours), np.isnan(theirs))
    return float(np.nanmax(np.abs(ours - theirs) / np.abs(theirs)))


def write_h5(path: Path, values: np.ndarray, names, scalar: str = "thickness", chunk: int = 16):
    with h5py.File(path, "a", libver=("earliest", "v110")) as h5:
        group = h5.create_group(f"scalars/{scalar}")
        group.create_dataset(
            "values",
            data=values.astype(np.float32),
            chunks=(len(values), min(chunk, values.shape[1])),
            compression="gzip",
            shuffle=True,
        )
        group.create_dataset("column_names", data=list(names), dtype=h5py.string_dtype())
    return path


def read(path: Path, scalar: str) -> np.ndarray:
    with h5py.File(path, "r") as h5:
        return h5[f"scalars/{scalar}/values"][()]


def objects(path: Path) -> list[str]:
    names: list[str] = []
    with h5py.File(path, "r") as h5:
        h5.visit(names.append)
    return names


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("greyarray: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---- the same numbers as the references ---------------------------------------------------------
@pytest.mark.parametrize("variant", list(OPTIONS))
def test_neurocombat_options(fixture, variant):
    """Every neuroCombat option, in stripes of 7 elements (the priors and the global stopping
    rule of the parametric iteration see all elements, whatever the stripes)."""
    expected, cohort = fixture
    ours, _ = harmonize_array(
        expected["values"], cohort, "site", "age + sex", OPTIONS[variant], width=7
    )
    assert relative(ours, expected[variant]) < COMBAT_TOLERANCE
    assert relative(ours, expected["values"]) > 1e-3  # it did change the data


def test_combat_gam(fixture):
    """s(age): neuroHarmonize's harmonizationLearn(..., smooth_terms=['age'], seed=0)."""
    expected, cohort = fixture
    train = np.setdiff1d(np.arange(len(cohort)), expected["held_out"])
    ours, estimates = harmonize_array(
        expected["values"][train],
        cohort.iloc[train].reset_index(drop=True),
        "site",
        "s(age) + sexnum",
        width=33,
    )
    assert relative(ours, expected["gam"]) < GAM_TOLERANCE
    assert len(np.unique(estimates.alpha)) > 3  # the penalty was chosen per element


@pytest.mark.parametrize("model", ["linear", "gam"])
def test_apply_from_equals_harmonization_apply(tmp_path, fixture, run_cli, model):
    """Fit on the training subjects (CLI, float32 in the HDF5), then --apply-from to the held-out
    ones: neuroHarmonize's harmonizationLearn and harmonizationApply."""
    expected, cohort = fixture
    held = np.zeros(len(cohort), bool)
    held[expected["held_out"]] = True
    for name, rows in (("train", ~held), ("new", held)):
        cohort[rows].to_csv(tmp_path / f"{name}.csv", index=False)
        write_h5(tmp_path / f"{name}.h5", expected["values"][rows], cohort["source_file"][rows])
    covariates = "s(age) + sexnum" if model == "gam" else "age + sexnum"
    tolerance = GAM_TOLERANCE if model == "gam" else COMBAT_TOLERANCE
    code, _, err = run_cli(
        "harmonize", "--input-hdf5", tmp_path / "train.h5", "--cohort-file", tmp_path /
        "train.csv", "--scalar", "thickness", "--batch", "site", "--covariates", covariates
    )  # fmt: skip
    assert code == 0, err
    assert relative(read(tmp_path / "train.h5", "thickness_combat"), expected[model]) < tolerance
    code, _, err = run_cli(
        "harmonize", "--input-hdf5", tmp_path / "new.h5", "--cohort-file", tmp_path / "new.csv",
        "--scalar", "thickness", "--apply-from", f"{tmp_path / 'train.h5'}:thickness_combat"
    )  # fmt: skip
    assert code == 0, err
    ours = read(tmp_path / "new.h5", "thickness_combat")
    assert relative(ours, expected[f"{model}.apply"]) < tolerance
    with h5py.File(tmp_path / "new.h5") as h5:
        group = h5["greyarray/harmonization/thickness_combat"]
        assert group.attrs["applied_from"].endswith("train.h5:thickness_combat")
        assert list(group["batch"][()]) == [
            ["siteA", "siteB", "siteC", "siteD"].index(s) for s in cohort["site"][held]
        ]


def test_live_references(tmp_path):
    """One live run of neuroCombat (parametric; reference batch, whose path needs np.int) and
    neuroHarmonize (ComBat-GAM) on a cohort the fixtures never saw."""
    from combat_reference import python, run

    interpreter = python()
    values, cohort = cohort_data(7, 20, {"s1": 9, "s2": 11, "s3": 10})
    variants = {"parametric": {}, "reference_nonparametric": OPTIONS_REF_NP}
    calls = neurocombat_calls(variants) + neuroharmonize_calls([], seed=3)[:1]
    theirs = run(interpreter, tmp_path, values, cohort, calls)
    for name, options in (("parametric", Options()), ("reference_nonparametric", REF_NP)):
        ours, _ = harmonize_array(values, cohort, "site", "age + sex", options)
        assert relative(ours, theirs[name]) < COMBAT_TOLERANCE
    ours, _ = harmonize_array(values, cohort, "site", "s(age) + sexnum", Options(seed=3))
    assert relative(ours, theirs["gam"]) < GAM_TOLERANCE


OPTIONS_REF_NP = {"ref_batch": "s2", "parametric": False}
REF_NP = Options(reference="s2", parametric=False)


# ---- the command -------------------------------------------------------------------------------
@pytest.fixture
def cohort_h5(tmp_path, fixture):
    expected, cohort = fixture
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    write_h5(tmp_path / "data.h5", expected["values"], cohort["source_file"])
    return tmp_path / "data.h5", tmp_path / "cohort.csv", expected, cohort


def harmonize(run_cli, h5, csv, *extra):
    return run_cli(
        "harmonize", "--input-hdf5", h5, "--cohort-file", csv, "--scalar", "thickness",
        "--batch", "site", "--covariates", "age + sex", *extra,
    )  # fmt: skip


@pytest.mark.parametrize("variant", list(FLAGS))
def test_command_writes_a_scalar_beside_the_input(cohort_h5, run_cli, variant):
    """In place: the input scalar untouched, the new one float32 with the same subjects, its
    estimates kept; the same numbers as neuroCombat before float32 storage."""
    h5, csv, expected, cohort = cohort_h5
    before = read(h5, "thickness")
    code, _, err = harmonize(run_cli, h5, csv, *FLAGS[variant])
    assert code == 0, err
    assert np.array_equal(read(h5, "thickness"), before)
    with h5py.File(h5) as file:
        values = file["scalars/thickness_combat/values"]
        assert values.dtype == np.float32 and values.chunks[0] == len(cohort)
        assert list(file["scalars/thickness_combat/column_names"].asstr()[()]) == list(
            cohort["source_file"]
        )
        group = file["greyarray/harmonization/thickness_combat"]
        about = json.loads(group.attrs["about"])
        assert about["method"] == "ComBat" and about["batch_column"] == "site"
        assert about["columns"] == [
            "sitesiteA",
            "sitesiteB",
            "sitesiteC",
            "sitesiteD",
            "age",
            "sexM",
        ]
        assert group["gamma_star"].shape == (4, 100)
    assert relative(read(h5, "thickness_combat"), expected[variant]) < COMBAT_TOLERANCE
    assert not [o for o in objects(h5) if "incomplete" in o]


def test_existing_output_needs_overwrite(cohort_h5, run_cli):
    h5, csv, _, _ = cohort_h5
    assert harmonize(run_cli, h5, csv)[0] == 0
    first = read(h5, "thickness_combat")
    code, _, err = harmonize(run_cli, h5, csv, "--mean-only")
    assert code == 73 and "--overwrite" in one_error(err)
    assert np.array_equal(read(h5, "thickness_combat"), first)
    code, _, err = harmonize(run_cli, h5, csv, "--mean-only", "--overwrite")
    assert code == 0, err
    assert not np.array_equal(read(h5, "thickness_combat"), first)
    assert not [o for o in objects(h5) if "incomplete" in o]


def test_output_hdf5_gets_the_geometry(cohort_h5, run_cli, tmp_path):
    h5, csv, expected, _ = cohort_h5
    with h5py.File(h5, "a") as file:
        file["greyordinates"] = np.arange(200).reshape(2, 100)
    listed = objects(h5)
    out = tmp_path / "out" / "harmonized.h5"
    code, _, err = harmonize(run_cli, h5, csv, "--output-hdf5", out, "--output-scalar", "h")
    assert code == 0, err
    assert objects(h5) == listed  # the input file is not touched
    with h5py.File(out) as file:
        assert np.array_equal(file["greyordinates"][()], np.arange(200).reshape(2, 100))
        assert sorted(file["scalars"]) == ["h"]
    assert relative(read(out, "h"), expected["parametric"]) < COMBAT_TOLERANCE


def voxel_space(offset: int, n: int = 100):
    """A stored voxel space of ``n`` voxels of a 10 x 10 x 10 grid, from voxel ``offset`` on."""
    from greyarray.io.spaces import VoxelGrid

    ijk = np.column_stack(np.unravel_index(np.arange(offset, offset + n), (10, 10, 10)))
    return VoxelGrid((10, 10, 10), np.eye(4), ijk.astype(np.int64), b"", "test")


@pytest.mark.parametrize(
    ("existing", "code", "words"),
    [
        ("fewer elements", 65, "holds 50 elements, scalars/thickness of"),
        ("other voxels", 65, "its elements differ from those of"),
        ("no geometry", 0, "cannot check that they hold the same elements"),
        ("same voxels", 0, ""),
    ],
)
def test_output_hdf5_of_other_elements_is_refused(cohort_h5, run_cli, existing, code, words):
    """An existing --output-hdf5 whose element count or stored element space is not the
    input's: one line (65) before any work, the file as it was; one that stores no space is
    written with a warning that the elements could not be compared."""
    h5, csv, expected, cohort = cohort_h5
    with h5py.File(h5, "a") as file:
        voxel_space(0).to_hdf5(file)
    out = h5.with_name("existing.h5")
    n = 50 if existing == "fewer elements" else 100
    write_h5(out, expected["values"][:, :n], cohort["source_file"], scalar="other")
    if existing in ("other voxels", "same voxels"):
        with h5py.File(out, "a") as file:
            voxel_space(0 if existing == "same voxels" else 300).to_hdf5(file)
    listed = objects(out)
    got, _, err = harmonize(run_cli, h5, csv, "--output-hdf5", out)
    assert got == code, err
    if code:
        assert words in one_error(err) and "Estimating" not in err
        assert objects(out) == listed
    else:
        assert words in err and "scalars/thickness_combat/values" in objects(out)


@pytest.mark.parametrize("kind", ["voxels", "fixels"])
def test_output_hdf5_of_a_modelarrayio_file_gets_its_element_tables(tmp_path, run_cli, kind):
    """A ModelArrayIO HDF5 (no greyarray/geometry) harmonised into a new file: the new file
    gets every element table the spaces know (voxels; fixels and voxels), bit for bit."""
    folder = Path(__file__).parent / "data" / "modelarrayio" / kind
    source = folder / "modelarrayio" / "maio.h5"
    cohort = pd.read_csv(folder / "cohort.csv")
    cohort["site"] = ["a", "b"] * (len(cohort) // 2)
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    out = tmp_path / "harmonised.h5"
    scalar = cohort["scalar_name"][0]
    code, _, err = run_cli(
        "harmonize", "--input-hdf5", source, "--cohort-file", tmp_path / "cohort.csv",
        "--scalar", scalar, "--batch", "site", "--output-hdf5", out, "--mean-only",
    )  # fmt: skip
    assert code == 0, err
    tables = ["voxels"] if kind == "voxels" else ["fixels", "voxels"]
    with h5py.File(source) as before, h5py.File(out) as after:
        assert sorted(k for k in after if k not in ("scalars", "greyarray")) == tables
        for name in tables:
            assert np.array_equal(before[name][()], after[name][()])
            assert before[name].dtype == after[name].dtype


# ---- missing values -----------------------------------------------------------------------------
def test_missing_value_is_left_out_of_its_element(fixture):
    """Without empirical Bayes every element stands alone: a subject's NaN at an element gives
    that element's harmonisation of the cohort without the subject; the other elements do not
    change."""
    expected, cohort = fixture
    values = expected["values"].copy()
    values[5, 17] = np.nan
    ours, _ = harmonize_array(values, cohort, "site", "age + sex", Options(eb=False))
    assert np.isnan(ours[5, 17]) and np.isfinite(np.delete(ours, 5, axis=0)[:, 17]).all()
    complete, _ = harmonize_array(
        expected["values"], cohort, "site", "age + sex", Options(eb=False)
    )
    assert np.allclose(np.delete(ours, 17, axis=1), np.delete(complete, 17, axis=1), rtol=1e-12)
    rest = np.delete(np.arange(len(cohort)), 5)
    alone, _ = harmonize_array(
        expected["values"][rest][:, [17]], cohort.iloc[rest].reset_index(drop=True), "site",
        "age + sex", Options(eb=False),
    )  # fmt: skip
    assert np.allclose(ours[rest, 17], alone[:, 0], rtol=1e-12)


def test_infinite_value_is_missing(fixture):
    """An Inf is a missing value, as a NaN is: the same numbers as with a NaN there, NaN in the
    output, and no numpy warning."""
    import warnings

    expected, cohort = fixture
    values = expected["values"].copy()
    values[5, 7] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _ = harmonize_array(values, cohort, "site", "age + sex")
    values[5, 7] = np.nan
    same, _ = harmonize_array(values, cohort, "site", "age + sex")
    assert np.isnan(out[5, 7]) and np.array_equal(out, same, equal_nan=True)


def test_no_element_harmonised_is_said(cohort_h5, run_cli):
    h5, csv, expected, cohort = cohort_h5
    empty = write_h5(h5.with_name("empty.h5"), np.full_like(expected["values"], np.nan),
                     cohort["source_file"])  # fmt: skip
    code, _, err = harmonize(run_cli, empty, csv, "--no-eb")
    assert code == 0 and "WARNING: no element was harmonised (of 100)" in err
    assert np.isnan(read(empty, "thickness_combat")).all()


def test_batch_with_too_few_values_is_reported_per_element(fixture):
    """A batch with one subject with a value at an element: its subjects are NaN there, the
    other batches are harmonised as if it were absent, and the count is said per batch."""
    expected, cohort = fixture
    values = expected["values"].copy()
    site_d = np.flatnonzero(cohort["site"] == "siteD")
    values[site_d[1:], 40] = np.nan
    ours, estimates = harmonize_array(values, cohort, "site", "age + sex", Options(eb=False))
    said = " ".join(combat.log_gaps(estimates))
    assert "site 'siteD': 1 elements have fewer than 2 subjects" in said
    assert np.isnan(ours[site_d, 40]).all()
    assert estimates.count[3, 40] == 1 and np.isnan(estimates.gamma_star[3, 40])
    others = np.flatnonzero(cohort["site"] != "siteD")
    alone, _ = harmonize_array(
        expected["values"][others][:, [40]], cohort.iloc[others].reset_index(drop=True), "site",
        "age + sex", Options(eb=False),
    )  # fmt: skip
    assert np.allclose(ours[others, 40], alone[:, 0], rtol=1e-12)


def test_constant_element_is_left_as_it_is(fixture):
    """No variance to scale: the element keeps its values and stays out of the priors."""
    expected, cohort = fixture
    values = expected["values"].copy()
    values[:, 3] = 0.0
    ours, estimates = harmonize_array(values, cohort, "site", "age + sex")
    assert np.array_equal(ours[:, 3], values[:, 3]) and estimates.status[3] == combat.UNCHANGED
    rest = np.delete(np.arange(values.shape[1]), 3)
    without, _ = harmonize_array(values[:, rest], cohort, "site", "age + sex")
    assert np.allclose(ours[:, rest], without, rtol=1e-12)


def test_subject_without_covariate_is_not_harmonised(fixture, caplog, monkeypatch):
    # a library's logging.config call may disable loggers made before it (test order)
    monkeypatch.setattr(logging.getLogger(combat.__name__), "disabled", False)
    expected, cohort = fixture
    cohort = cohort.copy()
    cohort.loc[4, "age"] = np.nan
    with caplog.at_level(logging.WARNING):
        ours, _ = harmonize_array(expected["values"], cohort, "site", "age + sex")
    assert np.isnan(ours[4]).all() and np.isfinite(np.delete(ours, 4, axis=0)).all()
    assert "1 of 48 subjects have no site or a missing covariate" in caplog.text


def test_nonparametric_weights_do_not_underflow():
    """neuroCombat's likelihood products underflow beyond a few hundred subjects per batch
    (0/0); GreyArray's weights are taken in log space."""
    values, cohort = cohort_data(5, 30, {"a": 500, "b": 400})
    ours, estimates = harmonize_array(values, cohort, "site", "age", Options(parametric=False))
    assert np.isfinite(ours).all() and np.isfinite(estimates.gamma_star).all()


# ---- refusals: one line, the right code, nothing written ----------------------------------------
@pytest.mark.parametrize(
    ("change", "extra", "code", "words"),
    [
        (lambda c: c.assign(site=np.where(c.index == 0, "lone", c["site"])), [], 65, "'lone' (1)"),
        (None, ["--reference-batch", "siteX"], 64, "no such site"),
        (lambda c: c.assign(scanner=c["site"].str[-1]), ["--covariates", "age + scanner"], 65,
         "cannot be told from the site"),
        (None, ["--covariates", "s(age, k=5)"], 64, "without arguments"),
        (None, ["--output-scalar", "thickness"], 64, "never replaced"),
        (None, ["--batch", "scanner"], 64, "no batch column 'scanner'"),
        (None, ["--nonparametric", "--no-eb"], 64, "--no-eb has none"),
        (lambda c: c.assign(site=c["age"]), [], 65, "site has 44 levels, 41 of them with fewer"),
    ],
)  # fmt: skip
def test_refusals(cohort_h5, run_cli, change, extra, code, words):
    h5, csv, _, cohort = cohort_h5
    if change is not None:
        change(cohort).to_csv(csv, index=False)
    listed = objects(h5)
    got, _, err = harmonize(run_cli, h5, csv, *extra)
    assert got == code and words in one_error(err)
    assert objects(h5) == listed


def test_lone_subject_batch_is_fine_for_mean_only(cohort_h5, run_cli):
    """A location needs one subject: --mean-only harmonises a batch of one."""
    h5, csv, _, cohort = cohort_h5
    cohort.assign(site=np.where(cohort.index == 0, "lone", cohort["site"])).to_csv(csv, index=False)
    code, _, err = harmonize(run_cli, h5, csv, "--mean-only")
    assert code == 0, err
    assert np.isfinite(read(h5, "thickness_combat")).all()


@pytest.mark.parametrize(
    ("edit", "extra", "code", "words"),
    [
        (lambda c: c.assign(site=c["site"].replace("siteC", "siteE")), [], 65,
         "'siteE' was not in the fit"),
        (lambda c: c.assign(sex=c["sex"].replace("M", "X")), [], 65, "levels the fit"),
        (lambda c: c.assign(age=c["age"] + 100), ["gam"], 65, "outside the range"),
        (None, ["--covariates", "age"], 64, "those of the fitted model"),
        (None, ["--seed", "3"], 64, "those of the fitted model"),
        (None, ["missing"], 65, "no harmonization estimates of 'missing'"),
    ],
)  # fmt: skip
def test_apply_from_refusals(tmp_path, fixture, run_cli, edit, extra, code, words):
    expected, cohort = fixture
    cohort.to_csv(tmp_path / "fit.csv", index=False)
    write_h5(tmp_path / "fit.h5", expected["values"], cohort["source_file"])
    covariates = "s(age) + sex" if "gam" in extra else "age + sex"
    assert harmonize(run_cli, tmp_path / "fit.h5", tmp_path / "fit.csv", "--covariates",
                     covariates)[0] == 0  # fmt: skip
    new = cohort.iloc[:6] if edit is None else edit(cohort.iloc[:6])
    new.to_csv(tmp_path / "new.csv", index=False)
    write_h5(tmp_path / "new.h5", expected["values"][:6], new["source_file"])
    listed = objects(tmp_path / "new.h5")
    model = "missing" if "missing" in extra else "thickness_combat"
    flags = [f for f in extra if f not in ("gam", "missing")]
    got, _, err = run_cli(
        "harmonize", "--input-hdf5", tmp_path / "new.h5", "--cohort-file", tmp_path / "new.csv",
        "--scalar", "thickness", "--apply-from", f"{tmp_path / 'fit.h5'}:{model}", *flags,
    )  # fmt: skip
    assert got == code and words in one_error(err)
    assert objects(tmp_path / "new.h5") == listed


# ---- the BIDS-App, the report, the methods text, R -----------------------------------------------
def test_group_harmonize_then_model(tmp_path):
    """group --harmonize site --model: the HDF5 keeps both scalars, the model is fitted to the
    harmonised one with its covariates kept by default, the report shows the sites before and
    after, the methods text names ComBat; R (hdf5r, rhdf5) reads the harmonised scalar."""
    from conftest import require, run_greyarray
    from test_r_interop import rscript

    from greyarray.demo import write_bids_demo

    bids, out = write_bids_demo(tmp_path / "bids", 12), tmp_path / "out"
    model = ["--model", "thickness ~ age + sex", "--scalar", "thickness"]
    done = run_greyarray(bids, out, "group", "--harmonize", "site", *model)
    assert done.returncode == 0, done.stderr
    assert "model fitted to thickness_combat" in done.stdout
    h5 = out / "group" / "desc-thickness_modelarray.h5"
    with h5py.File(h5) as file:
        assert sorted(file["scalars"]) == ["thickness", "thickness_combat"]
        about = json.loads(file["greyarray/harmonization/thickness_combat"].attrs["about"])
        harmonised = file["scalars/thickness_combat/values"][:, :500].astype(np.float64)
        names = list(file["results/lm/column_names"].asstr()[()])
        slope = file["results/lm/results_matrix"][names.index("age.estimate"), :500]
    assert about["covariates"] == "age + sex" and about["subjects_per_batch"] == {"A": 6, "B": 6}
    cohort = pd.read_csv(out / "group" / "desc-thickness_cohort.csv")
    design = np.column_stack([np.ones(12), cohort["age"], cohort["sex"] == "M"])
    assert np.allclose(np.linalg.lstsq(design, harmonised, rcond=None)[0][1], slope, rtol=1e-9)
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "#### Harmonization of thickness" in citation and "$" not in citation
    assert "- [@johnson2007] Johnson, Li, Rabinovic (2007)" in citation
    assert "neuroCombat 0.2.12" in citation
    page = (out / "group.html").read_text()
    assert 'id="thickness-harmonised-by-site-thickness-combat"' in page
    assert page.count("mean - average of sites") >= 4  # 2 sites, before and after
    require("Rscript")
    dims = rscript("read", h5, "thickness_combat", tmp_path / "v.bin").split()
    assert dims == ["91282", "12"]
    seen = np.fromfile(tmp_path / "v.bin", "<f4").reshape(12, 91282)
    with h5py.File(h5) as file:
        assert np.array_equal(seen, file["scalars/thickness_combat/values"][()])
    again = run_greyarray(bids, out, "group", "--harmonize", "site", "--harmonize-covariates",
                          "age", "--scalar", "thickness", "--no-report")  # fmt: skip
    assert again.returncode == 73 and "--overwrite" in one_error(again.stderr)


def test_a_scalar_results_were_fitted_to_is_replaced_only_with_discard_results(cohort_h5, run_cli):
    """Stand-alone: --overwrite of a harmonised scalar that results/<a> were fitted to is
    refused in one line (73), the file as it was; with --discard-results those results are
    removed with it (said in a warning), results fitted to other scalars kept. A scalar
    converted from files (greyarray/sources/<s>) is never replaced (64)."""
    h5, csv, _, _ = cohort_h5
    assert harmonize(run_cli, h5, csv)[0] == 0
    fit = ["fit-lm", "--input-hdf5", h5, "--cohort-file", csv, "--formula", "thickness ~ age"]
    assert run_cli(*fit, "--scalar", "thickness_combat")[0] == 0
    assert run_cli(*fit, "--analysis-name", "raw")[0] == 0
    listed = objects(h5)
    code, _, err = harmonize(run_cli, h5, csv, "--mean-only", "--overwrite")
    assert code == 73 and "results lm were fitted to scalars/thickness_combat" in one_error(err)
    assert "--discard-results" in one_error(err) and "Estimating" not in err
    assert objects(h5) == listed
    code, _, err = harmonize(run_cli, h5, csv, "--mean-only", "--discard-results")
    assert code == 64 and "needs --overwrite" in one_error(err)
    code, _, err = harmonize(run_cli, h5, csv, "--mean-only", "--overwrite", "--discard-results")
    assert code == 0, err
    assert "results lm, fitted to the scalar replaced, were removed" in err
    with h5py.File(h5) as file:
        assert sorted(file["results"]) == ["raw"]
    with h5py.File(h5, "a") as file:  # as to-modelarray records a converted scalar
        file.create_group("greyarray/sources/thickness")
    listed = objects(h5)
    code, _, err = run_cli(
        "harmonize", "--input-hdf5", h5, "--cohort-file", csv, "--scalar", "thickness_combat",
        "--batch", "site", "--output-scalar", "thickness", "--overwrite", "--discard-results",
    )  # fmt: skip
    assert code == 64 and "never replaces a converted scalar" in one_error(err)
    assert objects(h5) == listed


def test_bids_app_says_which_scalar_results_were_fitted_to(tmp_path):
    """group --model --harmonize: the maps' sidecars name the scalar fitted (the harmonised
    one) and the harmonisation (batch column, covariates, options), the methods text says
    so. Harmonising again with --overwrite would leave those results stale: refused (73)
    without --discard-results, which removes them and their maps. A model fitted to the
    converted scalar says that in its sidecars and methods text."""
    from conftest import run_greyarray

    from greyarray.demo import write_bids_demo

    bids, out = write_bids_demo(tmp_path / "bids", 12), tmp_path / "out"
    group = [bids, out, "group", "--scalar", "fa", "--no-report"]
    first = ["--harmonize", "site", "--harmonize-covariates", "age"]
    done = run_greyarray(*group, *first)  # the next steps name the harmonised scalar
    assert done.returncode == 0, done.stderr
    assert 'scalar_types = "fa_combat")' in done.stdout
    assert 'ModelArray.lm(fa_combat ~ age + sex, ma, phen, "fa_combat")' in done.stdout
    assert '--model "fa ~ age + sex" --harmonize site --harmonize-covariates age' in done.stdout
    done = run_greyarray(*group, "--model", "fa ~ age + site", *first)
    assert done.returncode == 0, done.stderr
    assert "'fa ~ age + site': site has the --harmonize column site" in done.stderr
    h5 = out / "group" / "desc-fa_modelarray.h5"
    (sidecar,) = out.glob("group/*contrast-age_stat-statistic_statmap.json")
    meta = json.loads(sidecar.read_text())
    assert meta["Scalar"] == "fa_combat" and "NotHarmonized" not in meta
    harmonized = meta["Harmonization"]
    assert harmonized["InputScalar"] == "fa" and harmonized["BatchColumn"] == "site"
    assert harmonized["Covariates"] == "age" and harmonized["Options"]["eb"] is True
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "The model was fitted to the harmonized values, `fa_combat`" in citation

    again = [*group, "--harmonize", "site", "--harmonize-covariates", "age + sex", "--overwrite"]
    before = h5.read_bytes()
    done = run_greyarray(*again)
    assert done.returncode == 73 and "--discard-results" in one_error(done.stderr)
    assert "results lm were fitted to scalars/fa_combat" in one_error(done.stderr)
    assert h5.read_bytes() == before and sidecar.exists()
    code, _, err = run_cli_plain(
        "harmonize", "--input-hdf5", h5, "--cohort-file", h5.with_name("desc-fa_cohort.csv"),
        "--scalar", "fa", "--batch", "site", "--overwrite",
    )  # fmt: skip
    assert code == 73 and "--discard-results" in one_error(err) and h5.read_bytes() == before
    done = run_greyarray(*again, "--discard-results")
    assert done.returncode == 0, done.stderr
    assert "results lm discarded, with the 46 statistical map files" in done.stderr
    assert not list(out.glob("group/*statmap*"))
    with h5py.File(h5) as file:
        assert "results" not in file or not list(file["results"])
    assert 'Analysis "lm"' not in (out / "logs" / "CITATION.md").read_text()

    done = run_greyarray(*group, "--model", "fa ~ age")
    assert done.returncode == 0, done.stderr
    meta = json.loads(sidecar.read_text())
    assert meta["Scalar"] == "fa" and "Harmonization" not in meta
    assert "fa_combat, harmonised from it" in meta["NotHarmonized"]
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "fitted to the values of `fa` as converted, not harmonized" in citation
    assert "fitted to the harmonized values" not in citation


def run_cli_plain(*args):
    from conftest import run_greyarray

    done = run_greyarray(*args)
    return done.returncode, done.stdout, done.stderr


def test_failure_midway_leaves_the_file_as_it_was(cohort_h5, run_cli, monkeypatch):
    """A disk that fills while the scalar is written: one line (73), the staging groups gone,
    every object of the user's file as it was."""
    import errno

    from greyarray.io import store

    h5, csv, _, _ = cohort_h5
    listed, before = objects(h5), read(h5, "thickness")

    def full(self, start, block):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.ScalarOutput, "write", full)
    code, _, err = harmonize(run_cli, h5, csv)
    assert code == 73 and "no space left" in one_error(err)
    assert objects(h5) == listed and np.array_equal(read(h5, "thickness"), before)


def test_no_room_for_the_estimates_is_refused_before_any_work(tmp_path, run_cli):
    """The free-space check before the passes over the data counts the float64 estimates kept
    beside the values (batches x elements; here more than the values): a disk with room for
    the copy and the values but not for them is refused at once (73), the file as it was."""
    from test_faults import tmpfs

    rng = np.random.default_rng(0)
    cohort = pd.DataFrame({"source_file": [f"s{i}" for i in range(48)], "site": list("abcd") * 12})
    values = rng.normal(2, 0.5, (48, 20_000))
    with tmpfs(tmp_path / "disk", "9m") as disk:
        h5 = write_h5(disk / "data.h5", values, cohort["source_file"], chunk=4096)
        cohort.to_csv(disk / "cohort.csv", index=False)
        before = sha256(h5)
        code, _, err = run_cli(
            "harmonize", "--input-hdf5", h5, "--cohort-file", disk / "cohort.csv",
            "--scalar", "thickness", "--batch", "site",
        )  # fmt: skip
        assert code == 73 and "not enough free space" in one_error(err)
        assert "and its estimates" in one_error(err) and "Estimating" not in err
        assert sha256(h5) == before and sorted(p.name for p in disk.iterdir()) == [
            "cohort.csv",
            "data.h5",
        ]


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "extra",
    [
        ["group", "--harmonize-covariates", "age"],
        ["participant", "--harmonize", "site"],
        ["group", "--harmonize", "site", "--analysis-name", "lm"],
    ],
)
def test_bids_app_refuses_harmonize_where_it_does_not_apply(tmp_path, extra):
    from conftest import run_greyarray

    (tmp_path / "bids").mkdir()
    done = run_greyarray(tmp_path / "bids", tmp_path / "out", *extra)
    assert done.returncode == 64 and "--harmonize" in one_error(done.stderr)
    assert not (tmp_path / "out").exists()
