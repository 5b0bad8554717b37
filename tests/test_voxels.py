"""NIfTI voxels: to-modelarray --mask and export-results equal ModelArrayIO 26's files; nibabel and
MRtrix3 read every exported map; grids are checked; hostile NIfTI files are refused in one line."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import h5py
import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from conftest import require

sys.path.insert(0, str(Path(__file__).parent / "modelarrayio"))
from make_fixtures import add_results

DATA = Path(__file__).parent / "data" / "modelarrayio"
VOXELS = DATA / "voxels"


def convert(run_cli, folder: Path, out: Path, *flags: object) -> tuple[int, str]:
    code, _, err = run_cli(
        "to-modelarray", "--cohort-file", folder / "cohort.csv", "--output", out, *flags
    )
    return code, err


def refused(code: int, err: str, expected: int, pattern: str) -> None:
    lines = [line for line in err.splitlines() if not line.startswith(("INFO", "WARNING"))]
    assert code == expected, err
    assert len(lines) == 1 and lines[0].startswith("greyarray: error: "), err
    assert pattern in lines[0], lines[0]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    from greyarray import cli

    out = tmp_path_factory.mktemp("voxels") / "ga.h5"
    args = ["to-modelarray", "--cohort-file", VOXELS / "cohort.csv", "--output", out]
    assert cli.main([*map(str, args), "--mask", str(VOXELS / "group_mask.nii.gz")]) == 0
    return out


def test_hdf5_equals_modelarrayio(converted):
    """Same voxels table (int64 voxel_id, i, j, k), values (subject masks -> NaN, a scaled
    int16 map, a NaN), names; GreyArray's grid and provenance under greyarray/."""
    with h5py.File(converted) as ours, h5py.File(VOXELS / "modelarrayio" / "maio.h5") as theirs:
        assert ours["voxels"].dtype == theirs["voxels"].dtype == np.int64
        assert np.array_equal(ours["voxels"][()], theirs["voxels"][()])
        assert list(ours["voxels"].attrs["column_names"]) == ["voxel_id", "i", "j", "k"]
        a, b = ours["scalars/FA/values"][()], theirs["scalars/FA/values"][()]
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b, equal_nan=True)
        assert np.isnan(a).sum() > 100  # subject masks
        names = ours["scalars/FA/column_names"].asstr()[()]
        assert list(names) == list(theirs["scalars/FA/column_names"].asstr()[()])
        geometry = ours["greyarray/geometry"].attrs
        assert geometry["space"] == "voxels" and list(geometry["volume_shape"]) == [12, 14, 10]
        assert geometry["volume_affine"][0, 0] == -2
        prov = ours["greyarray/sources/FA"]
        assert list(prov["nonfinite_count"][()]) == [0, 0, 0, 1] + [0] * 8
        assert (prov["outside_mask_count"][()] > 0).all()
        assert len(set(prov["mask_sha256"].asstr()[()])) == 12


def exported(run_cli, h5: Path, out: Path, *flags: object) -> list[Path]:
    code, _, err = run_cli(
        "export-results", "--analysis-name", "lm", "--input-hdf5", h5, "--output-dir", out, *flags
    )
    assert code == 0, err
    return sorted(out.iterdir())


def test_export_equals_modelarrayio(run_cli, converted, tmp_path):
    """No mask needed for GreyArray's file; the same NIfTI bytes as ModelArrayIO (header from
    the group mask, float32, NaN where unfitted, 0 outside the mask), for its file and ours;
    element_id is not a map (as for CIFTI)."""
    h5 = tmp_path / "ga.h5"
    shutil.copy(converted, h5)
    add_results(h5)
    theirs = tmp_path / "maio.h5"
    shutil.copy(VOXELS / "modelarrayio" / "maio.h5", theirs)
    reference = {p.name: p for p in (VOXELS / "modelarrayio" / "export").iterdir()}
    ours = exported(run_cli, h5, tmp_path / "a")
    assert {p.name for p in ours} == set(reference) - {"lm_element_id.nii.gz"}
    mask = ("--mask", VOXELS / "group_mask.nii.gz")
    for files in (ours, exported(run_cli, theirs, tmp_path / "b", *mask)):
        for path in files:
            assert gzip.decompress(path.read_bytes()) == gzip.decompress(
                reference[path.name].read_bytes()
            ), path.name
    image = nb.load(tmp_path / "a" / "lm_Intercept.estimate.nii.gz")
    data = image.get_fdata()
    assert image.get_data_dtype() == np.float32 and np.isnan(data).sum() == 1
    assert np.array_equal(image.affine, nb.load(VOXELS / "group_mask.nii.gz").affine)
    plain = exported(run_cli, h5, tmp_path / "c", "--no-compress")
    assert [p.name for p in plain] == [p.name.removesuffix(".gz") for p in ours]
    assert np.array_equal(nb.load(plain[0]).get_fdata(), nb.load(ours[0]).get_fdata(), True)


def test_mrtrix_reads_exported_maps(run_cli, converted, tmp_path):
    """MRtrix3's mrinfo and mrstats read every exported map (.nii.gz and .nii) and agree with
    nibabel on grid and values."""
    require("mrstats")
    h5 = tmp_path / "ga.h5"
    shutil.copy(converted, h5)
    add_results(h5)
    files = exported(run_cli, h5, tmp_path / "a") + exported(
        run_cli, h5, tmp_path / "b", "--no-compress"
    )
    for path in files:
        info = subprocess.run(
            ["mrinfo", "-size", "-datatype", path], capture_output=True, text=True, check=True
        ).stdout.split()
        assert info == ["12", "14", "10", "Float32LE"], (path, info)
        stats = subprocess.run(
            ["mrstats", "-output", "max", "-ignorezero", path],
            capture_output=True,
            text=True,
            check=True,
        )
        assert float(stats.stdout) == pytest.approx(np.nanmax(nb.load(path).get_fdata()), 1e-6)


def test_live_modelarrayio(run_cli, tmp_path):
    """ModelArrayIO 26.0.0 itself (MODELARRAYIO: its executable; CI installs it in a venv),
    on the voxel and fixel cohorts: its HDF5 equals GreyArray's, element tables and values."""
    maio = os.environ.get("MODELARRAYIO") or shutil.which("modelarrayio")
    if maio is None:
        if os.environ.get("CI"):
            pytest.fail("modelarrayio is not installed (set MODELARRAYIO), and CI must run this")
        pytest.skip("modelarrayio is not installed")
    for kind, flags in (
        ("voxels", ["--mask", "group_mask.nii.gz"]),
        (
            "fixels",
            ["--index-file", "template/index.mif", "--directions-file", "template/directions.mif"],
        ),
    ):
        folder = DATA / kind
        theirs, ours = tmp_path / f"{kind}_maio.h5", tmp_path / f"{kind}_ga.h5"
        subprocess.run(
            [maio, "to-modelarray", "--cohort-file", "cohort.csv", "--output", theirs, *flags],
            cwd=folder,
            check=True,
            capture_output=True,
        )
        paths = [folder / f for f in flags[1::2]]
        flagged = [x for pair in zip(flags[::2], paths, strict=True) for x in pair]
        code, err = convert(run_cli, folder, ours, *flagged)
        assert code == 0, err
        with h5py.File(ours) as a, h5py.File(theirs) as b:
            tables = [k for k in b if k != "scalars"]
            assert tables == (["voxels"] if kind == "voxels" else ["fixels", "voxels"])
            for key in tables:
                assert a[key].dtype == b[key].dtype and np.array_equal(a[key][()], b[key][()])
            scalar = next(iter(b["scalars"]))
            values = f"scalars/{scalar}/values"
            assert np.array_equal(a[values][()], b[values][()], equal_nan=True)


# ---- grids and masks --------------------------------------------------------------------------
def cohort(folder: Path, n: int = 3, shape=(4, 5, 6), affine=None, masks: bool = False) -> Path:
    """n float32 maps (and masks) on a grid, a group mask of every voxel."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine
    folder.mkdir(parents=True, exist_ok=True)
    nb.save(nb.Nifti1Image(np.ones(shape, np.uint8), affine), folder / "mask.nii.gz")
    rows = []
    for i in range(n):
        name = f"s{i}.nii.gz"
        nb.save(nb.Nifti1Image(np.full(shape, i, np.float32), affine), folder / name)
        row = {"scalar_name": "fa", "source_file": name}
        if masks:
            nb.save(nb.Nifti1Image(np.ones(shape, np.uint8), affine), folder / f"m{i}.nii.gz")
            row["source_mask_file"] = f"m{i}.nii.gz"
        rows.append(row)
    pd.DataFrame(rows).to_csv(folder / "cohort.csv", index=False)
    return folder


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ("shape", "s1.nii.gz: does not match the group mask"),
        ("affine", "affine differs from the group mask's by up to 0.001 mm"),
        ("mask", "m1.nii.gz: the subject mask of s1.nii.gz does not match the group mask"),
        ("4d", "s1.nii.gz: has shape (4, 5, 6, 2); GreyArray converts 3-D maps"),
    ],
)
def test_grid_mismatch_is_one_line(run_cli, tmp_path, change, pattern):
    folder = cohort(tmp_path / "in", masks=True)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    target = folder / ("m1.nii.gz" if change == "mask" else "s1.nii.gz")
    if change in ("shape", "mask"):
        data = np.ones((4, 5, 7), np.float32)
    elif change == "4d":
        data = np.ones((4, 5, 6, 2), np.float32)
    else:
        data, affine[0, 3] = np.ones((4, 5, 6), np.float32), 1e-3
    nb.save(nb.Nifti1Image(data, affine), target)
    out = tmp_path / "o.h5"
    code, err = convert(run_cli, folder, out, "--mask", folder / "mask.nii.gz")
    refused(code, err, 65, pattern)
    assert not out.exists() and not list(tmp_path.glob("**/.greyarray-tmp-*"))


def test_affine_rounding_is_tolerated(run_cli, tmp_path):
    """Headers that differ by rounding (< 1e-4 mm) are one grid."""
    folder = cohort(tmp_path / "in")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[1, 3] = 5e-6
    nb.save(nb.Nifti1Image(np.full((4, 5, 6), 1, np.float32), affine), folder / "s1.nii.gz")
    code, err = convert(run_cli, folder, tmp_path / "o.h5", "--mask", folder / "mask.nii.gz")
    assert code == 0, err


@pytest.mark.parametrize(
    ("flags", "pattern"),
    [
        ([], "lists NIfTI maps: give the group mask with --mask"),
        (["--index-file", "x.mif"], "--index-file is for fixel data;"),
    ],
)
def test_flags_must_fit_the_data_type(run_cli, tmp_path, flags, pattern):
    folder = cohort(tmp_path / "in")
    code, err = convert(run_cli, folder, tmp_path / "o.h5", *flags)
    refused(code, err, 64, pattern)


def test_export_refuses_another_grid(run_cli, tmp_path):
    """A mask or template map on another grid than the stored one is refused."""
    folder = cohort(tmp_path / "in")
    h5 = tmp_path / "o.h5"
    assert convert(run_cli, folder, h5, "--mask", folder / "mask.nii.gz")[0] == 0
    add_results(h5)
    other = tmp_path / "other.nii.gz"
    nb.save(nb.Nifti1Image(np.ones((4, 5, 7), np.uint8), np.eye(4)), other)
    for flag in ("--mask", "--example-file"):
        code, _, err = run_cli(
            "export-results",
            "--analysis-name",
            "lm",
            "--input-hdf5",
            h5,
            "--output-dir",
            tmp_path / "x",
            flag,
            other,
        )
        refused(code, err, 65, "does not match the geometry stored in")
        assert not (tmp_path / "x").exists()


# ---- hostile files ----------------------------------------------------------------------------
def nifti_bytes(shape=(4, 5, 6), dtype=np.float32) -> bytes:
    image = nb.Nifti1Image(np.ones(shape, dtype), np.eye(4))
    return image.to_bytes()


def huge_header() -> bytes:
    """The header of a 2000 x 2000 x 200 float32 volume (3 GB), with a few bytes of data."""
    header = nb.Nifti1Header()
    header.set_data_shape((2000, 2000, 200))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    return header.binaryblock + bytes(1004)


def test_gzip_bomb_is_refused_in_bounded_time(run_cli, tmp_path):
    """A .nii.gz whose header promises 480 bytes of data but inflates to 64 MiB of zeros (one
    that inflates to terabytes is refused as fast: reading stops 1 MiB past the promise)."""
    folder = cohort(tmp_path / "in")
    zeros = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = zeros.compress(nifti_bytes())
    with open(folder / "s1.nii.gz", "wb") as handle:
        handle.write(chunk)
        for _ in range(4):
            handle.write(zeros.compress(bytes(2**24)))
        handle.write(zeros.flush())
    assert (folder / "s1.nii.gz").stat().st_size < 2**18
    start = time.perf_counter()
    code, err = convert(run_cli, folder, tmp_path / "o.h5", "--mask", folder / "mask.nii.gz")
    refused(code, err, 65, "s1.nii.gz: inflates beyond the 832 bytes its header gives")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (lambda: gzip.compress(nifti_bytes())[:-40], "s1.nii.gz: file is truncated"),
        (lambda: nifti_bytes()[:600], "s1.nii.gz: file is truncated"),
        (lambda: gzip.compress(nifti_bytes())[:-8] + b"\0" * 8, "s1.nii.gz: damaged gzip data"),
        (lambda: nifti_bytes(dtype=np.complex64), "is not a real number type"),
        (lambda: huge_header(), "more than any map GreyArray converts"),
        (lambda: b"\x00" * 400, "not a NIfTI-1 or NIfTI-2 file"),
        (lambda: b"", "file is empty or truncated"),
    ],
)
def test_broken_nifti_is_one_line(run_cli, tmp_path, content, pattern):
    folder = cohort(tmp_path / "in")
    (folder / "s1.nii.gz").write_bytes(content())
    code, err = convert(run_cli, folder, tmp_path / "o.h5", "--mask", folder / "mask.nii.gz")
    refused(code, err, 65, pattern)


def test_fifo_is_refused(run_cli, tmp_path):
    folder = cohort(tmp_path / "in")
    (folder / "s1.nii.gz").unlink()
    os.mkfifo(folder / "s1.nii.gz")
    code, err = convert(run_cli, folder, tmp_path / "o.h5", "--mask", folder / "mask.nii.gz")
    refused(code, err, 66, "s1.nii.gz: is a FIFO (named pipe), not a regular file")


# ---- reports ------------------------------------------------------------------------------------
def test_group_report_draws_voxel_mosaics(run_cli, converted, tmp_path):
    """The group report of a voxel HDF5: geometry, coverage (subject masks leave voxels
    unfitted), mean and SD and result maps as mosaics of axial slices over the mask."""
    from test_report import embedded_images

    from greyarray.report import GroupInput, group_report

    h5 = tmp_path / "ga.h5"
    shutil.copy(converted, h5)
    assert (
        run_cli(
            "fit-lm",
            "--input-hdf5",
            h5,
            "--cohort-file",
            VOXELS / "cohort.csv",
            "--formula",
            "FA ~ age",
        )[0]
        == 0
    )
    report = group_report(tmp_path / "g.html", [GroupInput(h5, VOXELS / "cohort.csv")])
    page = report.path.read_text()
    assert "NIfTI, the group mask&#39;s voxels in a 12 x 14 x 10 grid of 2 x 2 x 2 mm" in page
    assert "ModelArray leaves unfitted" in page and report.analyses == ["lm"]
    assert "source_mask_file" not in page.split("Phenotype columns")[1].split("</tr>")[0]
    images = embedded_images(page)
    assert len(images) >= 8 and all(picture.size[0] == width for picture, width in images)
    mosaic = next(p for p, _ in images if p.size[1] > 250)  # two rows of slices
    assert mosaic.size[0] >= 600
