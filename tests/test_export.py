"""export-results: every layout ModelArray writes, exact values, geometry with/without template."""

from __future__ import annotations

import h5py
import nibabel as nb
import numpy as np
import pytest
from conftest import CONTE32K, PCONN, PSCALAR, subject_values, write_cohort
from test_cifti import shifted_geometry

from greyarray.errors import DataError
from greyarray.io.cohort import load_cohort
from greyarray.io.export import export_results
from greyarray.io.formats import cifti
from greyarray.io.store import StoreOptions, to_modelarray

NAMES = [
    "element_id",
    "Intercept.estimate",
    "age.estimate",
    "age.statistic",
    "age.p.value",
    "model.adj.r.squared",
    "model.p.value",
    "model.nobs",
    "age.p.value.fdr",
]


def fake_results(n_elements: int, n_rows: int | None = None, seed: int = 0) -> np.ndarray:
    """(columns, rows) like writeResults: element_id 0-based, p-values in [0, 1], NaN rows."""
    rng = np.random.default_rng(seed)
    rows = n_elements if n_rows is None else n_rows
    ids = np.sort(rng.choice(n_elements, rows, replace=False)) if n_rows else np.arange(rows)
    data = rng.normal(size=(len(NAMES), rows))
    data[0] = ids
    for i, name in enumerate(NAMES):
        if "p.value" in name:
            data[i] = rng.uniform(size=rows)
    data[NAMES.index("model.nobs")] = rng.integers(11, 30, rows)
    data[1:, :5] = np.nan  # elements with too few subjects
    return data


def write_results(h5_path, analysis: str, data: np.ndarray, layout: str) -> None:
    """Results as ModelArray writes them: ``writeResults`` (hdf5r) or its streaming writer."""
    with h5py.File(h5_path, "a") as h5:
        group = h5.require_group(f"results/{analysis}")
        if layout == "writeResults":  # (cols, rows) float64, chunks 32x32, vlen ASCII names
            group.create_dataset(
                "results_matrix",
                data=data,
                chunks=(8, 32),
                maxshape=(None, None),
                compression="gzip",
                compression_opts=4,
            )
            group.create_dataset("column_names", data=NAMES, dtype=h5py.string_dtype("ascii"))
        elif layout == "streaming":  # fixed-length NUL-padded names, shuffle
            group.create_dataset(
                "results_matrix",
                data=data,
                chunks=(len(NAMES), 500),
                compression="gzip",
                shuffle=True,
            )
            names = group.create_dataset("column_names", data=np.array(NAMES, dtype="S19"))
            names.attrs["rhdf5-NA.OK"] = np.int32(1)
        elif layout == "colnames-attribute":
            matrix = group.create_dataset("results_matrix", data=data)
            matrix.attrs["colnames"] = NAMES
        elif layout == "transposed":  # (rows, cols)
            group.create_dataset("results_matrix", data=data.T)
            group.create_dataset("column_names", data=NAMES, dtype=h5py.string_dtype())


@pytest.fixture(scope="module")
def small_h5(tmp_path_factory, writer91k):
    """A converted 91k cohort of 4 subjects (results are faked on top of it)."""
    folder = tmp_path_factory.mktemp("small")
    csv = write_cohort(folder, writer91k, subject_values(4, 91282))
    to_modelarray(load_cohort(csv), folder / "data.h5", StoreOptions())
    return folder / "data.h5", csv


@pytest.fixture
def results_h5(small_h5, tmp_path):
    path = tmp_path / "data.h5"
    path.write_bytes(small_h5[0].read_bytes())
    return path


def read_map(path):
    image = nb.load(path)
    return np.asarray(image.dataobj), image


def test_export_values_names_and_companions(results_h5, template, tmp_path):
    data = fake_results(91282)
    write_results(results_h5, "lm", data, "writeResults")
    files = export_results(results_h5, "lm", tmp_path / "out")
    names = sorted(p.name for p in files)
    assert "lm_element_id.dscalar.nii" not in names
    assert "lm_model.nobs.dscalar.nii" in names and "lm_age.1m.p.value.fdr.dscalar.nii" in names
    assert len(names) == (len(NAMES) - 1) + 3  # one per result + 3 p-value companions
    template_axis = nb.load(template).header.get_axis(1)
    for i, name in enumerate(NAMES[1:], start=1):
        values, image = read_map(tmp_path / "out" / f"lm_{name}.dscalar.nii")
        assert values.dtype == np.float32 and values.shape == (1, 91282)
        assert np.array_equal(values[0], data[i].astype(np.float32), equal_nan=True)
        assert list(image.header.get_axis(0).name) == [name]
        assert image.header.get_axis(1) == template_axis
        assert image.nifti_header["intent_code"] == 3006
        assert np.isnan(values[0, :5]).all()
    companion, _ = read_map(tmp_path / "out" / "lm_age.1m.p.value.dscalar.nii")
    p = data[NAMES.index("age.p.value")]
    assert np.array_equal(companion[0], (1 - p).astype(np.float32), equal_nan=True)


@pytest.mark.parametrize("layout", ["streaming", "colnames-attribute", "transposed"])
def test_every_layout_exports_the_same_files(results_h5, tmp_path, layout):
    data = fake_results(91282, seed=1)
    write_results(results_h5, "ref", data, "writeResults")
    write_results(results_h5, "other", data, layout)
    export_results(results_h5, "ref", tmp_path / "ref")
    export_results(results_h5, "other", tmp_path / "other")
    for path in (tmp_path / "ref").iterdir():
        twin = tmp_path / "other" / path.name.replace("ref_", "other_", 1)
        assert twin.read_bytes() == path.read_bytes()


def test_partial_fit_is_placed_by_element_id(results_h5, tmp_path):
    data = fake_results(91282, n_rows=1000, seed=2)
    write_results(results_h5, "part", data, "writeResults")
    export_results(results_h5, "part", tmp_path / "out")
    values, _ = read_map(tmp_path / "out" / "part_age.estimate.dscalar.nii")
    ids = data[0].astype(int)
    expected = np.full(91282, np.nan, np.float32)
    expected[ids] = data[NAMES.index("age.estimate")]
    assert np.array_equal(values[0], expected, equal_nan=True)
    assert np.isfinite(values).sum() == 1000 - 5


def test_template_gives_identical_files(results_h5, small_h5, tmp_path, template):
    write_results(results_h5, "lm", fake_results(91282, seed=3), "writeResults")
    export_results(results_h5, "lm", tmp_path / "stored")
    export_results(results_h5, "lm", tmp_path / "example", template)
    cohort = load_cohort(small_h5[1])
    export_results(
        results_h5, "lm", tmp_path / "cohort", cohort.resolve(cohort.table["source_file"][0])
    )
    for path in (tmp_path / "stored").iterdir():
        assert (tmp_path / "example" / path.name).read_bytes() == path.read_bytes()
        assert (tmp_path / "cohort" / path.name).read_bytes() == path.read_bytes()


def test_template_must_match(results_h5, tmp_path, geometry91k):
    write_results(results_h5, "lm", fake_results(91282), "writeResults")
    with pytest.raises(
        DataError,
        match="32k_fs_LR.dscalar.nii: does not match the geometry "
        "stored in .*: 60951 greyordinates",
    ):
        export_results(results_h5, "lm", tmp_path / "a", CONTE32K)
    shifted = tmp_path / "shifted.dscalar.nii"
    cifti.CiftiWriter(shifted_geometry(geometry91k, 2.0)).write(shifted, np.zeros(91282))
    with pytest.raises(DataError, match="shifted.dscalar.nii: .*volume affine differs"):
        export_results(results_h5, "lm", tmp_path / "b", shifted)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_file_from_modelarrayio_needs_template(results_h5, tmp_path, template):
    """Without GreyArray's geometry (a ModelArrayIO file) a template is required and checked."""
    write_results(results_h5, "lm", fake_results(91282), "writeResults")
    with h5py.File(results_h5, "a") as h5:
        del h5["greyarray"]
    with pytest.raises(DataError, match="holds no GreyArray geometry.*--example-file"):
        export_results(results_h5, "lm", tmp_path / "x")
    with pytest.raises(DataError, match="does not match the 91282 greyordinates"):
        export_results(results_h5, "lm", tmp_path / "x", CONTE32K)
    assert export_results(results_h5, "lm", tmp_path / "x", template)


@pytest.mark.parametrize("path", [PSCALAR, PCONN], ids=["pscalar", "pconn"])
def test_parcellated_export(tmp_path, path):
    geometry = cifti.read_file(path).geometry
    csv = write_cohort(
        tmp_path, cifti.CiftiWriter(geometry), subject_values(3, geometry.n_elements)
    )
    h5_path = tmp_path / "p.h5"
    to_modelarray(load_cohort(csv), h5_path, StoreOptions())
    data = fake_results(geometry.n_elements, seed=4)
    write_results(h5_path, "lm", data, "writeResults")
    export_results(h5_path, "lm", tmp_path / "out")
    ext = cifti.EXTENSIONS[geometry.kind]
    values, image = read_map(tmp_path / "out" / f"lm_age.estimate{ext}")
    expected = data[NAMES.index("age.estimate")].astype(np.float32)
    assert np.array_equal(values.ravel(), expected, equal_nan=True)  # pconn: row-major
    original = nb.load(path).header
    assert image.header.get_axis(1) == original.get_axis(1)
    if geometry.kind == "pconn":
        assert image.header.get_axis(0) == original.get_axis(0) and values.shape == (54, 54)


def test_workbench_reads_exports(results_h5, tmp_path, template, wb_command):
    data = fake_results(91282, seed=5)
    write_results(results_h5, "lm", data, "writeResults")
    export_results(results_h5, "lm", tmp_path / "out")
    exported = tmp_path / "out" / "lm_age.statistic.dscalar.nii"
    wb_command("-cifti-convert", "-to-text", exported, tmp_path / "t.txt")
    text = np.genfromtxt(tmp_path / "t.txt")
    expected = data[NAMES.index("age.statistic")]
    assert np.allclose(text, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert wb_command("-file-information", exported, "-only-map-names").split() == ["age.statistic"]
    rewritten = tmp_path / "wb.dscalar.nii"
    wb_command("-cifti-math", "x", rewritten, "-var", "x", exported)
    values, image = read_map(rewritten)
    assert np.array_equal(values[0], expected.astype(np.float32), equal_nan=True)
    assert image.header.get_axis(1) == nb.load(template).header.get_axis(1)


def test_existing_output_dir(results_h5, tmp_path, caplog):
    write_results(results_h5, "lm", fake_results(91282), "writeResults")
    out = tmp_path / "out"
    out.mkdir()
    (out / "lm_age.estimate.dscalar.nii").write_text("old")
    (out / "notes.txt").write_text("mine")
    export_results(results_h5, "lm", out)
    assert "Output directory exists" in caplog.text
    assert (out / "notes.txt").read_text() == "mine"
    assert nb.load(out / "lm_age.estimate.dscalar.nii").shape == (1, 91282)


def test_unsafe_names_and_factor_columns(results_h5, tmp_path, caplog):
    names = ["element_id", "age:sexM.estimate", "group/x p.value", "site"]
    with h5py.File(results_h5, "a") as h5:
        group = h5.create_group("results/odd")
        group.create_dataset(
            "results_matrix",
            data=np.vstack(
                [np.arange(91282), np.ones(91282), np.full(91282, 0.25), np.full(91282, 2.0)]
            ),
        )
        group.create_dataset("column_names", data=names, dtype=h5py.string_dtype())
        group.create_dataset("lut_forcol4", data=["siteA", "siteB"], dtype=h5py.string_dtype())
    caplog.set_level("INFO")
    files = {p.name for p in export_results(results_h5, "odd", tmp_path)}
    assert files == {
        "odd_age_sexM.estimate.dscalar.nii",
        "odd_group_x_p.value.dscalar.nii",
        "odd_group_x_1m.p.value.dscalar.nii",
        "odd_site.dscalar.nii",
    }
    _, image = read_map(tmp_path / "odd_group_x_p.value.dscalar.nii")
    assert list(image.header.get_axis(0).name) == ["group/x p.value"]
    assert "site is a factor" in caplog.text and "siteB" in caplog.text


def test_bad_results(results_h5, tmp_path):
    write_results(results_h5, "lm", fake_results(91282), "writeResults")
    with pytest.raises(DataError, match=r"no analysis 'glm' \(analyses present: lm\)"):
        export_results(results_h5, "glm", tmp_path / "a")
    with h5py.File(results_h5, "a") as h5:
        short = h5.create_group("results/short")
        short.create_dataset("results_matrix", data=np.ones((2, 500)))
        short.create_dataset(
            "column_names", data=["a.estimate", "b.estimate"], dtype=h5py.string_dtype()
        )
        wrong = h5.create_group("results/wrong")
        wrong.create_dataset("results_matrix", data=np.ones((3, 500)))
        wrong.create_dataset("column_names", data=["a", "b"], dtype=h5py.string_dtype())
        far = h5.create_group("results/far")
        far.create_dataset("results_matrix", data=np.array([[0, 91282], [1.0, 2.0]]))
        far.create_dataset("column_names", data=["element_id", "x"], dtype=h5py.string_dtype())
    with pytest.raises(DataError, match="has 500 rows but the geometry has 91282 elements"):
        export_results(results_h5, "short", tmp_path / "b")
    with pytest.raises(DataError, match=r"shape \(3, 500\), which fits none of its 2 column"):
        export_results(results_h5, "wrong", tmp_path / "c")
    with pytest.raises(DataError, match="element_id spans 0..91282, outside"):
        export_results(results_h5, "far", tmp_path / "d")
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_export_never_imports_nibabel(results_h5, small_h5, tmp_path):
    """The start-up budget of export-results (<= 0.6 s) has no room for nibabel's ~50 ms import:
    the files are written from GreyArray's own NIfTI-2 tables (checked against nibabel's)."""
    import subprocess
    import sys

    data = fake_results(91282)
    write_results(results_h5, "lm", data, "writeResults")
    code = (
        "import sys\nfrom greyarray.cli import main\n"
        f"rc = main(['export-results', '--analysis-name', 'lm', '--input-hdf5', "
        f"{str(results_h5)!r}, '--cohort-file', {str(small_h5[1])!r}, '--output-dir', "
        f"{str(tmp_path / 'out')!r}])\nprint(rc, sorted(m for m in sys.modules if 'nibabel' in m))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0", "[]"], done.stderr
    values, image = read_map(tmp_path / "out" / "lm_age.estimate.dscalar.nii")
    np.testing.assert_array_equal(values[0], data[NAMES.index("age.estimate")].astype(np.float32))
    assert image.nifti_header.get_intent() == ("ConnDenseScalar", (), "ConnDenseScalar")
