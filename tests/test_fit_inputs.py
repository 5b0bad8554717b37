"""fit-lm, fit-gam and export-results on inputs that cannot be fitted: a malformed scalar or
result in the HDF5, formulas lm would refuse or that reach beyond the cohort's columns, bad
permutation options, a read-only HDF5. Each ends in one line naming the file and the problem,
the exit code of its kind, and the HDF5 unchanged."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import PSCALAR, subject_values, write_cohort
from test_faults import tmpfs

from greyarray.io.formats import cifti
from greyarray.stats import lm

N_SUBJECTS = 16
S = "scalars/thickness"
QUIET = ["--log-level", "ERROR"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """16 pscalar subjects converted, with results/lm, and a cohort with odd columns."""
    from greyarray import cli

    folder = tmp_path_factory.mktemp("fit_inputs")
    writer = cifti.CiftiWriter(cifti.read_file(PSCALAR).geometry)
    csv = write_cohort(folder, writer, subject_values(N_SUBJECTS, writer.geometry.n_elements))
    table = pd.read_csv(csv)
    rng = np.random.default_rng(1)
    table["sex"] = ["F", "M"] * (N_SUBJECTS // 2)
    table["allnan"] = np.nan
    table["one"] = "x"
    table["logage"] = np.log(table["age"])
    table["flag"] = ["TRUE", "FALSE"] * (N_SUBJECTS // 2)
    for i in range(20):
        table[f"v{i}"] = rng.normal(size=N_SUBJECTS)
    table.to_csv(csv, index=False)
    h5 = folder / "data.h5"
    assert cli.main(["to-modelarray", "--cohort-file", str(csv), "--output", str(h5), *QUIET]) == 0
    fit = ["--input-hdf5", h5, "--cohort-file", csv, "--formula", "thickness ~ age"]
    assert cli.main(["fit-lm", *map(str, fit), *QUIET]) == 0
    return h5, csv


@pytest.fixture
def h5(converted, tmp_path) -> Path:
    """A copy of the converted HDF5 for one test to damage."""
    path = tmp_path / "data.h5"
    path.write_bytes(converted[0].read_bytes())
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(run_cli, code: int, h5: Path, *args) -> str:
    """Run a command that must fail: its exit code, one stderr line, the HDF5 unchanged."""
    before = digest(h5)
    got, _, err = run_cli(*args, *QUIET)
    assert got == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("greyarray: error: "), err
    assert digest(h5) == before
    return lines[0]


def fit_args(h5: Path, cohort: Path, formula: str = "thickness ~ age", command="fit-lm"):
    return [command, "--input-hdf5", h5, "--cohort-file", cohort, "--formula", formula]


def replace(path: str, **dataset):
    """A mutation: ``path`` replaced by a new dataset."""

    def edit(h5: h5py.File) -> None:
        del h5[path]
        h5.create_dataset(path, **dataset)

    return edit


def group_at(path: str):
    def edit(h5: h5py.File) -> None:
        del h5[path]
        h5.create_group(path)

    return edit


def external_link(path: str):
    def edit(h5: h5py.File) -> None:
        del h5[path]
        h5[path] = h5py.ExternalLink("/nonexistent/missing.h5", "/x")

    return edit


def names(n: int) -> list[str]:
    return [f"maps/sub-{i + 1:03d}_thickness.pscalar.nii" for i in range(n)]


MALFORMED_SCALARS = {
    "values 1-D": (replace(f"{S}/values", data=np.zeros(54, "f4")), "values has shape (54,)"),
    "values 3-D": (replace(f"{S}/values", data=np.zeros((16, 54, 2), "f4")), "not subjects x"),
    "values fewer rows": (
        replace(f"{S}/values", data=np.zeros((10, 54), "f4")),
        "column_names has 16 names but values has 10 rows",
    ),
    "values more rows": (
        replace(f"{S}/values", data=np.zeros((20, 54), "f4")),
        "column_names has 16 names but values has 20 rows",
    ),
    "values a group": (group_at(f"{S}/values"), "values is a group"),
    "values strings": (replace(f"{S}/values", data=np.full((16, 54), b"x")), "not numbers"),
    "values compound": (replace(f"{S}/values", data=np.zeros((16, 54), "f8,i4")), "not numbers"),
    "values link to a missing file": (external_link(f"{S}/values"), "values cannot be read"),
    "names missing": (lambda h5: h5.__delitem__(f"{S}/column_names"), "has no column_names"),
    "names integers": (replace(f"{S}/column_names", data=np.arange(16)), "not strings"),
    "names a group": (group_at(f"{S}/column_names"), "column_names is a group"),
    "names 2-D": (
        replace(f"{S}/column_names", data=np.array(names(16), "S").reshape(4, 4)),
        "column_names has shape (4, 4)",
    ),
    "names not UTF-8": (
        replace(f"{S}/column_names", data=np.array([b"\xff\xfe%d" % i for i in range(16)])),
        "not UTF-8",
    ),
    "names twice": (
        replace(f"{S}/column_names", data=np.array(names(15) + names(1), "S")),
        "twice",
    ),
    "scalars a dataset": (replace("scalars", data=[1]), "scalars is a dataset"),
    "scalar a dataset": (replace(S, data=[1]), "scalars/thickness is a dataset"),
}


def damage(h5: Path, case: str) -> str:
    edit, expected = MALFORMED_SCALARS[case]
    with h5py.File(h5, "a") as file:
        edit(file)
    return expected


@pytest.mark.parametrize("case", MALFORMED_SCALARS)
def test_malformed_scalar(run_cli, converted, h5, case):
    expected = damage(h5, case)
    line = refused(run_cli, 65, h5, *fit_args(h5, converted[1]), "--analysis-name", "new")
    assert str(h5) in line and expected in line


@pytest.mark.parametrize(
    "extra",
    [
        ["fit-gam", "--formula", "thickness ~ s(age, k=4)"],
        ["fit-lm", "--formula", "thickness ~ age", "--permutations", "20"],
    ],
    ids=["fit-gam", "permutations"],
)
@pytest.mark.parametrize("case", ["values more rows", "names not UTF-8", "scalars a dataset"])
def test_every_command_reads_scalars_checked(run_cli, converted, h5, case, extra):
    expected = damage(h5, case)
    command, *options = extra
    args = [command, "--input-hdf5", h5, "--cohort-file", converted[1], *options]
    line = refused(run_cli, 65, h5, *args, "--analysis-name", "new")
    assert str(h5) in line and expected in line


def test_export_column_names_link_to_missing_file(run_cli, h5, tmp_path):
    with h5py.File(h5, "a") as file:
        external_link("results/lm/column_names")(file)
    args = ["--analysis-name", "lm", "--input-hdf5", h5, "--output-dir", tmp_path / "out"]
    line = refused(run_cli, 65, h5, "export-results", *args)
    assert f"{h5}: results/lm/column_names cannot be read" in line


@pytest.mark.parametrize(
    "formula, expected",
    [
        ("thickness ~ allnan", "no subject has every value of the formula's columns"),
        (
            "thickness ~ " + " + ".join(f"v{i}" for i in range(20)),
            "the design has 21 columns but only 16 subjects",
        ),
        ("thickness ~ age + one", "factor 'one' has only one level ('x')"),
        ("thickness ~ log(age - 100)", "no subject has every value"),  # all NaN
        ("thickness ~ age + BLOCK_BYTES", "unknown column 'BLOCK_BYTES'"),  # lm.py's constant
        ("thickness ~ agee", "unknown column 'agee'"),
    ],
)
def test_formula_lm_cannot_fit(run_cli, converted, h5, formula, expected):
    line = refused(run_cli, 65, h5, *fit_args(h5, converted[1], formula), "--analysis-name", "x")
    assert f"formula {formula!r}" in line and expected in line


@pytest.mark.parametrize(
    "formula", ["thickness ~ __import__('os')", "thickness ~ age + I(age.__class__)"]
)
@pytest.mark.parametrize("command", ["fit-lm", "fit-gam"])
def test_formula_python_internals_refused(run_cli, converted, h5, formula, command):
    line = refused(run_cli, 64, h5, *fit_args(h5, converted[1], formula, command))
    assert "double underscore" in line


def test_aliased_column_is_nan_as_modelarray_writes_it(run_cli, converted, h5):
    """R's lm reports NA for I(2 * age) (a multiple of age) and ModelArray, reading
    broom::tidy, writes its columns with NaN: the rest is the fit of 'age' alone."""
    cohort = converted[1]
    for name, formula in [("both", "thickness ~ age + I(2 * age)"), ("age", "thickness ~ age")]:
        code, _, err = run_cli(*fit_args(h5, cohort, formula), "--analysis-name", name, *QUIET)
        assert code == 0, err
    with h5py.File(h5) as file:
        both, alone = (file[f"results/{a}/results_matrix"][()] for a in ("both", "age"))
        names = list(file["results/both/column_names"].asstr()[()])
        alone_names = list(file["results/age/column_names"].asstr()[()])
    aliased = [i for i, n in enumerate(names) if n.startswith("I(2 * age).")]
    assert [names[i] for i in aliased][:3] == [f"I(2 * age).{s}" for s in lm.DEFAULT_TERM_STATS]
    assert np.isnan(both[aliased]).all()
    rest = [i for i in range(len(names)) if i not in aliased]
    assert [names[i] for i in rest] == alone_names
    np.testing.assert_array_equal(both[rest], alone)


@pytest.mark.parametrize("command", ["fit-lm", "fit-gam"])
def test_ordered_factor_is_coded_by_polynomial_contrasts(run_cli, converted, h5, command):
    """--ordered-factor sex=M, as ModelArray's gen_gamFormula_fxSmooth makes osex: levels M, F;
    contr.poly codes M -1/sqrt(2), F +1/sqrt(2), so sex.L is -sexM / sqrt(2)."""
    cohort = converted[1]
    smooth = " + s(age, k = 4, fx = TRUE)" if command == "fit-gam" else " + age"
    args = [*fit_args(h5, cohort, "thickness ~ sex" + smooth, command), *QUIET]
    assert run_cli(*args, "--analysis-name", "o", "--ordered-factor", "sex=M")[0] == 0
    assert run_cli(*args, "--analysis-name", "t")[0] == 0
    with h5py.File(h5) as file:
        o, t = (file[f"results/{a}"] for a in ("o", "t"))
        o_names, t_names = (list(g["column_names"].asstr()[()]) for g in (o, t))
        poly = o["results_matrix"][o_names.index("sex.L.estimate")]
        treatment = t["results_matrix"][t_names.index("sexM.estimate")]
        about = json.loads(o.attrs["greyarray_about"])
    np.testing.assert_allclose(poly, -treatment / np.sqrt(2), rtol=1e-9)
    assert about["ordered_factors"] == {"sex": "M"}


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--ordered-factor", "sex=X"], "--ordered-factor sex=X: no such level (levels: F, M)"),
        (["--ordered-factor", "nosuch=1"], "--ordered-factor: no column 'nosuch' in the cohort"),
        (["--ordered-factor", "sex"], "--ordered-factor 'sex': expected COLUMN=LEVEL"),
        (
            ["--ordered-factor", "sex=F", "--reference-level", "sex=M"],
            "sex: give a column either --reference-level or --ordered-factor",
        ),
    ],
)
def test_ordered_factor_mistakes_are_usage_errors(run_cli, converted, h5, options, expected):
    args = fit_args(h5, converted[1], "thickness ~ sex")
    line = refused(run_cli, 64, h5, *args, *options, "--analysis-name", "x")
    assert expected in line


def test_offset_is_fitted_and_recorded(run_cli, converted, h5):
    """offset(age): the fit of thickness - age, recorded in the analysis' sidecar record."""
    cohort = converted[1]
    args = [*fit_args(h5, cohort, "thickness ~ sex + offset(age)"), *QUIET]
    assert run_cli(*args, "--analysis-name", "off")[0] == 0
    with h5py.File(h5) as file:
        group = file["results/off"]
        names = list(group["column_names"].asstr()[()])
        about = json.loads(group.attrs["greyarray_about"])
        slope = group["results_matrix"][names.index("sexM.estimate")]
        values = file["scalars/thickness/values"][()].astype(float)
    assert about["offset"] == ["offset(age)"]
    table = pd.read_csv(cohort)
    y = values - table["age"].to_numpy()[:, None]
    male = (table["sex"] == "M").to_numpy()
    np.testing.assert_allclose(slope, y[male].mean(axis=0) - y[~male].mean(axis=0), rtol=1e-6)


def test_formula_functions_are_numpys(run_cli, converted, h5):
    """log(age) is the natural log of the column, not the module's logger."""
    cohort = converted[1]
    for name, formula in [("fn", "thickness ~ log(age)"), ("col", "thickness ~ logage")]:
        code, _, err = run_cli(*fit_args(h5, cohort, formula), "--analysis-name", name, *QUIET)
        assert code == 0, err
    with h5py.File(h5) as file:
        fn, col = (file[f"results/{a}/results_matrix"][()] for a in ("fn", "col"))
        assert "log(age).estimate" in file["results/fn/column_names"].asstr()[()]
    np.testing.assert_allclose(fn, col, rtol=1e-10)


def test_r_logical_constants_in_a_formula(run_cli, converted, h5):
    """poly(age, 2, raw = TRUE), as R users write it, is age and age squared."""
    cohort = converted[1]
    for name, formula in [
        ("poly", "thickness ~ poly(age, 2, raw = TRUE)"),
        ("squares", "thickness ~ age + I(age ** 2)"),
    ]:
        code, _, err = run_cli(*fit_args(h5, cohort, formula), "--analysis-name", name, *QUIET)
        assert code == 0, err
    with h5py.File(h5) as file:
        poly, squares = (file[f"results/{a}/results_matrix"][()] for a in ("poly", "squares"))
    np.testing.assert_allclose(poly, squares, rtol=1e-8)


def test_negative_seed_is_a_usage_error(run_cli, converted, h5):
    before = digest(h5)
    args = [*fit_args(h5, converted[1]), "--permutations", "20", "--seed", "-1"]
    code, _, err = run_cli(*args)
    assert code == 64 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("argument --seed: -1 is less than 0"), err
    assert digest(h5) == before


def test_missing_shard_is_a_missing_input(run_cli, converted, h5, tmp_path):
    shard = tmp_path / "nosuch.npz"
    args = [*fit_args(h5, converted[1]), "--permutations", "20", "--merge-shards", shard]
    line = refused(run_cli, 66, h5, *args, "--analysis-name", "merged")
    assert f"{shard}: permutation shard not found" in line


@pytest.mark.parametrize("command", ["fit-lm", "fit-gam"])
def test_read_only_hdf5_is_refused_before_fitting(run_cli, converted, tmp_path, command):
    formula = "thickness ~ age" if command == "fit-lm" else "thickness ~ s(age, k=4)"
    with tmpfs(tmp_path / "ro", "4m") as folder:
        h5 = folder / "data.h5"
        h5.write_bytes(converted[0].read_bytes())
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        args = fit_args(h5, converted[1], formula, command)
        line = refused(run_cli, 73, h5, *args, "--analysis-name", "new")
        assert f"{h5}: cannot write (read-only file system)" in line


def test_nesting_operator_is_rs(run_cli, converted, h5):
    """R reads 'age %in% sex' as age:sex (formulaic read it as sex + sex:age): the same model,
    columns and numbers as 'age:sex'."""
    cohort = converted[1]
    for name, formula in [("nested", "thickness ~ age %in% sex"), ("ix", "thickness ~ age:sex")]:
        code, _, err = run_cli(*fit_args(h5, cohort, formula), "--analysis-name", name, *QUIET)
        assert code == 0, err
    with h5py.File(h5) as file:
        nested, ix = (file[f"results/{a}/results_matrix"][()] for a in ("nested", "ix"))
        names = list(file["results/nested/column_names"].asstr()[()])
    assert "age:sexF.estimate" in names and "age:sexM.estimate" in names
    np.testing.assert_array_equal(nested, ix)


@pytest.mark.parametrize(
    "formula, code, expected",
    [
        ("thickness ~ s(age, logage)", 64, "a smooth of several variables (thin plate)"),
        ("thickness ~ te(age, logage, by = sex)", 64, "by= is supported in s() only"),
        ("thickness ~ s(age, k = c(4, 5))", 64, "takes one k and one bs"),
        ("thickness ~ ti(age, logage, bs = 'ps')", 64, "bs='ps' (supported: tp, ts, cr, cs)"),
        ("thickness ~ s(age) + s(age, k = 5)", 64, "a variable is smoothed twice the same way"),
        ("thickness ~ s(age, by = logage)", 65, "by=logage is numeric"),
        ("thickness ~ s(age, by = flag)", 65, "by=flag is logical; mgcv multiplies the smooth"),
        ("thickness ~ te(age, nosuch)", 65, "unknown column 'nosuch'"),
        ("thickness ~ ti(age, sex)", 65, "'sex' is not numeric (mgcv smooths numbers)"),
    ],
)
def test_smooth_terms_fit_gam_refuses(run_cli, converted, h5, formula, code, expected):
    line = refused(run_cli, code, h5, *fit_args(h5, converted[1], formula, "fit-gam"))
    assert expected in line
