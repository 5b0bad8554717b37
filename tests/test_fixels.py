"""MRtrix fixels: GreyArray's MIF reader against files MRtrix3 wrote (strides, data types, byte
orders, scaling, .mif.gz), its writer read by MRtrix3; to-modelarray --index-file and
export-results equal ModelArrayIO 26's; hostile MIF files refused in one line."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from conftest import require

from greyarray.io.formats import mif

sys.path.insert(0, str(Path(__file__).parent / "modelarrayio"))
from make_fixtures import add_results

FIXELS = Path(__file__).parent / "data" / "modelarrayio" / "fixels"
INDEX, DIRECTIONS = FIXELS / "template" / "index.mif", FIXELS / "template" / "directions.mif"
FLAGS = ("--index-file", INDEX, "--directions-file", DIRECTIONS)


def mrtrix(*args: object) -> str:
    require("mrconvert")
    done = subprocess.run([*map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> Path:
    """A 4-D image written by MRtrix3 (6 x 5 x 4 x 3, an oblique transform, 2 mm voxels)."""
    require("mrconvert")
    folder = tmp_path_factory.mktemp("mif")
    rng = np.random.default_rng(0)
    affine = np.array([[0, -2.0, 0, 10], [2.0, 0, 0, -7], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    nb.save(
        nb.Nifti1Image(rng.normal(size=(6, 5, 4, 3)).astype(np.float32), affine), folder / "v.nii"
    )
    mrtrix("mrconvert", "-quiet", folder / "v.nii", folder / "v.mif")
    return folder / "v.mif"


@pytest.mark.parametrize(
    "options",
    [
        [],
        ["-strides", "-1,2,3,4", "-datatype", "float64be"],
        ["-strides", "3,-1,2,4", "-datatype", "int16le", "-scaling", "0.5,0.001"],
        ["-strides", "4,3,-2,-1", "-datatype", "uint32be", "-scaling", "-3,0.0001"],
        ["-strides", "2,3,4,1", "-datatype", "int8"],
        ["-strides", "-2,-3,-4,1", "-datatype", "float32be"],
    ],
)
@pytest.mark.parametrize("suffix", [".mif", ".mif.gz"])
def test_reader_equals_mrtrix(volume, tmp_path, options, suffix):
    """Files MRtrix3 wrote in any layout and data type read as MRtrix3 reads them: the same
    values as MRtrix's own conversion to a NIfTI that nibabel reads, the same affine."""
    path = tmp_path / f"v{suffix}"
    mrtrix("mrconvert", "-quiet", volume, *options, path)
    reference = tmp_path / "reference.nii"
    mrtrix("mrconvert", "-quiet", path, "-strides", "1,2,3,4", "-datatype", "float64", reference)
    image = mif.read_image(path)
    expected = nb.load(reference)
    strides = mrtrix("mrinfo", "-config", "RealignTransform", "false", "-strides", path).split()
    assert image.header.layout == tuple(int(s) for s in strides)
    assert np.array_equal(image.values(), expected.get_fdata())
    assert np.allclose(image.header.affine, expected.affine, atol=1e-5)
    info = mrtrix("mrinfo", "-size", path).split()
    assert info[:4] == [str(d) for d in image.header.dim]


def test_writer_is_read_by_mrtrix(tmp_path):
    """Maps GreyArray writes (.mif.gz and .mif): mrinfo and mrstats read them, dims, voxel sizes,
    transform and values as written."""
    require("mrstats")
    transform = np.array([[1, 0, 0, -5.5], [0, 1, 0, -4.0], [0, 0, 1, 3.25]])
    values = np.random.default_rng(0).normal(size=300).astype(np.float32)
    values[7] = np.nan
    for compress in (True, False):
        writer = mif.MifWriter(300, (2.0, 2.0, 2.0), transform, (("comments", "test"),), compress)
        path = tmp_path / f"map{writer.extension}"
        writer.write(path, values)
        assert mrtrix("mrinfo", "-size", path).split() == ["300", "1", "1"]
        got = [float(v) for v in mrtrix("mrinfo", "-transform", path).split()]
        assert np.allclose(np.array(got).reshape(4, 4)[:3], transform)
        stats = mrtrix("mrstats", "-output", "mean", "-output", "count", path).split()
        assert float(stats[0]) == pytest.approx(np.nanmean(values), abs=1e-5)
        assert int(stats[1]) == 299
        assert np.array_equal(mif.read_image(path).values().ravel(), values, equal_nan=True)


def convert(run_cli, out: Path, *flags: object, folder: Path = FIXELS) -> tuple[int, str]:
    code, _, err = run_cli(
        "to-modelarray", "--cohort-file", folder / "cohort.csv", "--output", out, *flags
    )
    return code, err


def test_hdf5_and_export_equal_modelarrayio(run_cli, tmp_path):
    """The fixels (float64 fixel_id, voxel_id, x, y, z) and voxels (int64) tables and values
    equal ModelArrayIO's; exported maps hold the same values, dims and transform (read by
    MRtrix3 too); index.mif and directions.mif are copied, without any template or flag."""
    h5 = tmp_path / "ga.h5"
    code, err = convert(run_cli, h5, *FLAGS)
    assert code == 0, err
    reference = FIXELS / "modelarrayio"
    with h5py.File(h5) as ours, h5py.File(reference / "maio.h5") as theirs:
        for table in ("fixels", "voxels", "scalars/FD/values"):
            assert ours[table].dtype == theirs[table].dtype
            assert np.array_equal(ours[table][()], theirs[table][()], equal_nan=True)
            assert dict(ours[table].attrs).keys() == dict(theirs[table].attrs).keys()
        assert ours["greyarray/geometry"].attrs["space"] == "fixels"
    add_results(h5)
    out = tmp_path / "export"
    code, _, err = run_cli(
        "export-results", "--analysis-name", "lm", "--input-hdf5", h5, "--output-dir", out
    )
    assert code == 0, err
    expected = {p.name for p in (reference / "export").iterdir()} - {"lm_element_id.mif.gz"}
    assert {p.name for p in out.iterdir()} == expected
    for name in ("index.mif", "directions.mif"):
        assert (out / name).read_bytes() == (reference / "export" / name).read_bytes()
    for path in out.glob("lm_*"):
        ours, theirs = mif.read_image(path), mif.read_image(reference / "export" / path.name)
        assert ours.data.dtype == np.float32 and ours.header.dim == theirs.header.dim
        assert np.array_equal(ours.values(), theirs.values(), equal_nan=True)
        assert np.array_equal(ours.header.affine, theirs.header.affine)
    stats = mrtrix("mrstats", "-output", "count", out / "lm_Intercept.estimate.mif.gz")
    assert int(stats) == 167  # 168 fixels, one not fitted (NaN)


def test_template_and_flags_on_export(run_cli, tmp_path):
    """ModelArrayIO's own HDF5 exports with its flags; a template with another fixel count
    is refused."""
    theirs = tmp_path / "maio.h5"
    shutil.copy(FIXELS / "modelarrayio" / "maio.h5", theirs)
    out = tmp_path / "a"
    args = ["export-results", "--analysis-name", "lm", "--input-hdf5", theirs, "--output-dir", out]
    code, _, err = run_cli(*args, *FLAGS, "--cohort-file", FIXELS / "cohort.csv")
    assert code == 0, err
    assert len(list(out.glob("lm_*.mif.gz"))) == 4
    code, _, err = run_cli(*args[:-1], tmp_path / "b")
    assert code == 64 and "give the fixel index and directions with --index-file" in err
    short = tmp_path / "short.mif"
    mif.MifWriter(10, (2.0, 2.0, 2.0), np.eye(3, 4), compress=False).write(short, np.zeros(10))
    code, _, err = run_cli(*args[:-1], tmp_path / "c", *FLAGS, "--example-file", short)
    assert code == 65 and "fixel data of these fixels are 168 x 1 x 1" in err


def fixel_cohort(folder: Path, data: dict[str, bytes] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(3):
        name = f"s{i}.mif"
        shutil.copy(FIXELS / "sub-00_fd.mif", folder / name)
        rows.append({"scalar_name": "fd", "source_file": name})
    for name, blob in (data or {}).items():
        (folder / name).write_bytes(blob)
    pd.DataFrame(rows).to_csv(folder / "cohort.csv", index=False)
    return folder


HEADER = (FIXELS / "sub-00_fd.mif").read_bytes()
TEXT = HEADER[: HEADER.index(b"\nEND\n") + 5].decode()


def edited(old: str, new: str) -> bytes:
    """sub-00_fd.mif with one header line changed (the data offset kept)."""
    assert old in TEXT
    text = TEXT.replace(old, new)
    offset = int(TEXT.split("file: . ")[1].split()[0])
    return (text.encode() + HEADER[len(TEXT) :])[: max(offset, len(text)) + 168 * 4]


@pytest.mark.parametrize(
    ("blob", "pattern"),
    [
        (lambda: edited("file: . ", "file: ../../etc/passwd 0\n#"), "outside the image's folder"),
        (lambda: edited("file: . ", "file: s0.dat 0\n#"), "inside the image's folder"),
        (lambda: edited("dim: 168,1,1", "dim: 999,1,1"), "disagree with the file size"),
        (lambda: edited("datatype: Float32LE", "datatype: Float64LE"), "disagree with the file"),
        (lambda: edited("layout: +0,+1,+2", "layout: +0,+0,+2"), "is not a permutation"),
        (lambda: edited("datatype: Float32LE", "datatype: CFloat32"), "complex data are not"),
        (lambda: edited("dim: 168,1,1", "dim: 168,1"), "2 dims but 3 voxel sizes"),
        (lambda: edited("dim: 168,1,1", "dim: 9999999999,99,1"), "more than any map"),
        (lambda: b"mrtrix image\n" + b"x: y\n" * 300_000, "no END line within 1 MiB"),
        (lambda: b"mrtrix imagf\n", "not an MRtrix image"),
        (lambda: HEADER[:-100], "disagree with the file size"),
        (lambda: gzip.compress(HEADER + bytes(2**23)), "inflates beyond"),
        (lambda: gzip.compress(HEADER)[:-30], "file is truncated"),
    ],
)
def test_hostile_mif_is_one_line(run_cli, tmp_path, blob, pattern):
    name = "s1.mif.gz" if pattern in ("inflates beyond", "file is truncated") else "s1.mif"
    folder = fixel_cohort(tmp_path / "in", {name: blob()})
    if name.endswith(".gz"):
        table = pd.read_csv(folder / "cohort.csv")
        table.loc[1, "source_file"] = name
        table.to_csv(folder / "cohort.csv", index=False)
    start = time.perf_counter()
    code, err = convert(run_cli, tmp_path / "o.h5", *FLAGS, folder=folder)
    lines = [line for line in err.splitlines() if line.startswith("greyarray: error")]
    assert code == 65 and len(lines) == 1 and pattern in lines[0], err
    assert time.perf_counter() - start < 5
    assert not (tmp_path / "o.h5").exists()


def test_fifo_and_counts(run_cli, tmp_path):
    folder = fixel_cohort(tmp_path / "in")
    (folder / "s1.mif").unlink()
    os.mkfifo(folder / "s1.mif")
    code, err = convert(run_cli, tmp_path / "o.h5", *FLAGS, folder=folder)
    assert code == 66 and "is a FIFO" in err
    folder = fixel_cohort(tmp_path / "in2")
    mif.MifWriter(100, (2.0, 2.0, 2.0), np.eye(3, 4), compress=False).write(
        folder / "s1.mif", np.zeros(100)
    )
    code, err = convert(run_cli, tmp_path / "o.h5", *FLAGS, folder=folder)
    assert code == 65 and "s1.mif: has dims 100 x 1 x 1; fixel data of the index" in err


def test_index_must_be_consistent(run_cli, tmp_path):
    """An index whose voxels' fixels overlap, or a directions file of another count."""
    image = mif.read_image(INDEX)
    data = image.values().copy()
    voxels = np.argwhere(data[..., 0] > 0)
    data[tuple(voxels[1])][1] += 1  # the second voxel starts one fixel late
    bad = tmp_path / "index.mif"
    write_like(INDEX, bad, data)
    folder = fixel_cohort(tmp_path / "in")
    code, err = convert(
        run_cli,
        tmp_path / "o.h5",
        "--index-file",
        bad,
        "--directions-file",
        DIRECTIONS,
        folder=folder,
    )
    assert code == 65 and "fixels are not stored voxel after voxel" in err
    code, err = convert(
        run_cli,
        tmp_path / "o.h5",
        "--index-file",
        INDEX,
        "--directions-file",
        INDEX,
        folder=folder,
    )
    assert code == 65 and "the directions of the index's 168 fixels are 168 x 3 x 1" in err


def write_like(template: Path, path: Path, data: np.ndarray) -> None:
    """A copy of an uncompressed MRtrix image with other values (same header and layout)."""
    header = mif.read_image(template).header
    blob = template.read_bytes()
    order = sorted(range(len(header.dim)), key=lambda a: abs(header.layout[a]))[::-1]
    raw = np.transpose(data, order).astype(header.dtype).tobytes()
    path.write_bytes(blob[: header.offset] + raw)


def test_tfce_on_fixels_is_refused(run_cli, tmp_path):
    h5 = tmp_path / "ga.h5"
    assert convert(run_cli, h5, *FLAGS)[0] == 0
    code, _, err = run_cli(
        "fit-lm",
        "--input-hdf5",
        h5,
        "--cohort-file",
        FIXELS / "cohort.csv",
        "--formula",
        "FD ~ age",
        "--permutations",
        "9",
        "--tfce",
    )
    lines = [line for line in err.splitlines() if line.startswith("greyarray: error")]
    assert code == 65 and len(lines) == 1 and "TFCE on fixels needs" in lines[0], err


def test_projection_to_voxels():
    """A voxel shows the value of largest magnitude among its fixels; NaN when none is
    finite; fixel counts per voxel."""
    from greyarray.report.layout import Layout

    ijk = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    layout = Layout.fixels(ijk, (2, 2, 1), np.eye(4), np.array([0, 0, 0, 1, 2, 2, 3]))
    values = np.array([1.0, -3.0, np.nan, np.nan, 2.0, -2.0, 0.0])
    projected = layout.on_voxels(values)
    assert projected[0] == -3 and np.isnan(projected[1]) and abs(projected[2]) == 2
    assert projected[3] == 0
    assert list(layout.fixels_per_voxel) == [3, 1, 2, 1]


def test_group_report_draws_fixels_in_voxels(run_cli, tmp_path):
    from test_report import embedded_images

    from greyarray.report import GroupInput, group_report

    h5 = tmp_path / "ga.h5"
    assert convert(run_cli, h5, *FLAGS)[0] == 0
    report = group_report(tmp_path / "g.html", [GroupInput(h5, FIXELS / "cohort.csv")])
    page = report.path.read_text()
    assert "MRtrix fixels in 92 voxels (1 to 3 per voxel, mean 1.83)" in page
    assert "each voxel shows the value of largest magnitude among its fixels" in page
    assert 'alt="FD: fixels per voxel"' in page
    images = embedded_images(page)
    assert len(images) >= 6 and all(picture.size[0] == width for picture, width in images)
    # ModelArrayIO's own file (no affine): drawn from its fixels and voxels tables
    theirs = group_report(tmp_path / "m.html", [FIXELS / "modelarrayio" / "maio.h5"])
    assert "MRtrix fixels in 92 voxels" in theirs.path.read_text()


@pytest.mark.parametrize("kind", ["voxels", "fixels"])
def test_round_trip_through_r(run_cli, tmp_path, kind):
    """R's HDF5 stack (rhdf5, hdf5r: ModelArray's) reads the values as ModelArray does
    (elements x subjects) and the subjects' names; results R writes (writeResults' layout, a
    partial fit) come back as NIfTI / MRtrix maps with R's values at their elements."""
    from test_r_interop import rscript

    from greyarray.io.formats import nifti

    folder = FIXELS.parent / kind
    h5 = tmp_path / "data.h5"
    flags = ("--mask", folder / "group_mask.nii.gz") if kind == "voxels" else FLAGS
    assert convert(run_cli, h5, *flags, folder=folder)[0] == 0
    scalar = "FA" if kind == "voxels" else "FD"
    with h5py.File(h5) as file:
        values = file[f"scalars/{scalar}/values"][()]
    n, g = values.shape
    assert rscript("read", h5, scalar, tmp_path / "v.bin").split() == [str(g), str(n)]
    seen = np.fromfile(tmp_path / "v.bin", "<f4").reshape(n, g)
    assert np.array_equal(seen, values, equal_nan=True)
    rng = np.random.default_rng(3)
    ids = np.sort(rng.choice(g, g // 2, replace=False))
    table = pd.DataFrame({"element_id": ids, "age.estimate": rng.normal(size=ids.size)})
    table.to_csv(tmp_path / "res.csv", index=False, float_format="%.17g")
    rscript("write", h5, "lm", tmp_path / "res.csv", "writeResults")
    out = tmp_path / "out"
    code, _, err = run_cli(
        "export-results", "--analysis-name", "lm", "--input-hdf5", h5, "--output-dir", out
    )
    assert code == 0, err
    expected = np.full(g, np.nan, np.float32)
    expected[ids] = table["age.estimate"]
    if kind == "voxels":
        image = nifti.read_volume(out / "lm_age.estimate.nii.gz")
        with h5py.File(h5) as file:
            ijk = file["voxels"][1:].T  # element i is voxel ijk[i]
        got = image.values().reshape(image.shape, order="F")[tuple(ijk.T)]
        assert np.array_equal(got, expected, equal_nan=True)
    else:
        got = mif.read_image(out / "lm_age.estimate.mif.gz").values().ravel()
        assert np.array_equal(got, expected, equal_nan=True)


def test_gam_and_permutations_on_fixels(run_cli, tmp_path):
    """fit-gam and fit-lm --permutations (max statistic, no TFCE) run on fixels unchanged."""
    h5 = tmp_path / "ga.h5"
    assert convert(run_cli, h5, *FLAGS)[0] == 0
    csv = FIXELS / "cohort.csv"
    code, _, err = run_cli(
        "fit-gam",
        "--input-hdf5",
        h5,
        "--cohort-file",
        csv,
        "--formula",
        "FD ~ s(age, k=4)",
        "--num-subj-lthr-abs",
        "5",
    )
    assert code == 0, err
    code, _, err = run_cli(
        "fit-lm",
        "--input-hdf5",
        h5,
        "--cohort-file",
        csv,
        "--formula",
        "FD ~ age",
        "--permutations",
        "20",
        "--num-subj-lthr-abs",
        "5",
        "--analysis-name",
        "perm",
    )
    assert code == 0, err
    with h5py.File(h5) as file:
        names = list(file["results/perm/column_names"].asstr()[()])
        matrix = file["results/perm/results_matrix"][()]
        gam = file["results/gam/results_matrix"]
        assert gam.shape[-1] == 168 or gam.shape[0] == 168
    fwe = matrix[names.index("age.p.value.fwe")]
    assert fwe.shape == (168,) and np.nanmin(fwe) >= 0.05 and np.nanmax(fwe) <= 1
