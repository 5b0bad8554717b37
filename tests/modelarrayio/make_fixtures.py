"""Make tests/data/modelarrayio/: ModelArrayIO 26.0.0's own outputs on small voxel and fixel
cohorts, which the tests compare GreyArray's with (a live run of ModelArrayIO stays in the suite
when it is installed: tests/test_voxels.py). Run from the repository root:

    python3 tests/modelarrayio/make_fixtures.py [--maio PATH/TO/modelarrayio]

Without --maio, ModelArrayIO is installed in a virtual environment under /tmp (as
benchmarks/benchmark.py does). Inputs: ``voxels/`` is made here (12 NIfTI maps on a 12 x 14 x 10
grid with an LAS affine, .nii and .nii.gz, float32 and one scaled int16, a NaN, subject masks);
``fixels/`` comes from MRtrix3 itself (dirgen, amp2sh, fod2fixel on a synthetic FOD image, then
mrcalc for 12 subjects' data files in .mif and .mif.gz, two of them float64 big-endian with
negative strides). Outputs: ModelArrayIO's HDF5 (``maio.h5``) with a results group added
(``add_results``), and its export-results files in ``export/``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data" / "modelarrayio"
N = 12
RESULT_NAMES = ["element_id", "Intercept.estimate", "age.statistic", "age.p.value"]


def add_results(h5_path: Path) -> None:
    """results/lm as ModelArray's writeResults stores it: deterministic values, a NaN."""
    with h5py.File(h5_path, "a") as h5:
        n = h5["scalars"][next(iter(h5["scalars"]))]["values"].shape[1]
        rng = np.random.default_rng(7)
        data = rng.uniform(-1, 1, (len(RESULT_NAMES), n))
        data[0] = np.arange(n)
        data[3] = np.abs(data[3])
        data[1, 2] = np.nan
        group = h5.require_group("results/lm")
        group.create_dataset("results_matrix", data=data, chunks=True, compression="gzip")
        group.create_dataset("column_names", data=RESULT_NAMES, dtype=h5py.string_dtype("ascii"))


def voxel_inputs(folder: Path) -> None:
    import nibabel as nb

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shape = (12, 14, 10)
    affine = np.array([[-2.0, 0, 0, 11], [0, 2, 0, -13], [0, 0, 2, -9], [0, 0, 0, 1]])
    grid = np.indices(shape).astype(float)
    centre = np.array(shape)[:, None, None, None] / 2
    radius = (((grid - centre) / (centre * 0.9)) ** 2).sum(0)
    nb.save(nb.Nifti1Image((radius < 1).astype(np.uint8), affine), folder / "group_mask.nii.gz")
    rows = []
    for i in range(N):
        data = (rng.normal(size=shape) + 0.1 * i).astype(np.float32)
        name = f"sub-{i:02d}_fa.nii" + (".gz" if i % 2 else "")
        if i == 3:
            data[5, 5, 5] = np.nan
        if i == 5:  # scaled integers: values are raw * slope + inter
            image = nb.Nifti1Image((data * 100).astype(np.int16), affine)
            image.header.set_slope_inter(0.01, 0.5)
        else:
            image = nb.Nifti1Image(data, affine)
        nb.save(image, folder / name)
        own = (radius + rng.normal(0, 0.05, shape) < 0.95).astype(np.uint8)
        nb.save(nb.Nifti1Image(own, affine), folder / f"sub-{i:02d}_mask.nii.gz")
        rows.append(
            {
                "scalar_name": "FA",
                "source_file": name,
                "source_mask_file": f"sub-{i:02d}_mask.nii.gz",
                "age": 20 + 3 * i,
            }
        )
    pd.DataFrame(rows).to_csv(folder / "cohort.csv", index=False)


def fixel_inputs(folder: Path) -> None:
    import nibabel as nb

    work = folder / "work"
    work.mkdir(parents=True, exist_ok=True)

    def mrtrix(*args: object) -> None:
        subprocess.run([*map(str, args), "-quiet", "-force"], check=True)

    mrtrix("dirgen", 60, work / "dirs.txt")
    azimuth, elevation = np.loadtxt(work / "dirs.txt").T
    dirs = np.column_stack(
        [
            np.sin(elevation) * np.cos(azimuth),
            np.sin(elevation) * np.sin(azimuth),
            np.cos(elevation),
        ]
    )
    rng = np.random.default_rng(1)
    shape = (6, 5, 4)
    amplitudes = np.zeros((*shape, len(dirs)))
    for voxel in np.ndindex(shape):
        for _ in range(rng.integers(0, 4)):
            u = rng.normal(size=3)
            amplitudes[voxel] += rng.uniform(0.5, 1) * np.exp(
                -20 * (1 - (dirs @ u / np.linalg.norm(u)) ** 2)
            )
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-5, -4, -3]
    nb.save(nb.Nifti1Image(amplitudes.astype(np.float32), affine), work / "amps.nii")
    mrtrix("amp2sh", work / "amps.nii", "-directions", work / "dirs.txt", work / "fod.mif")
    template = folder / "template"
    shutil.rmtree(template, ignore_errors=True)
    mrtrix("fod2fixel", work / "fod.mif", template, "-afd", "afd.mif", "-nthreads", 0)
    rows = []
    for i in range(N):
        name = f"sub-{i:02d}_fd.mif" + (".gz" if i % 2 else "")
        mrtrix("mrcalc", template / "afd.mif", 1 + 0.05 * i, "-mult", work / "fd.mif")
        extra = ["-datatype", "float64be", "-strides", "-1,2,3"] if i % 4 == 3 else []
        mrtrix("mrconvert", work / "fd.mif", *extra, folder / name)
        rows.append({"scalar_name": "FD", "source_file": name, "age": 20 + 3 * i})
    pd.DataFrame(rows).to_csv(folder / "cohort.csv", index=False)
    (template / "afd.mif").unlink()
    shutil.rmtree(work)


def ensure_maio(venv: Path) -> Path:
    exe = venv / "bin" / "modelarrayio"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q", "modelarrayio==26.0.0"]
        subprocess.run(pip, check=True)
    return exe


def run_modelarrayio(maio: Path, folder: Path, out: Path, kind: str) -> None:
    """to-modelarray and export-results as a user runs them, in the cohort's folder."""
    if kind == "voxels":
        flags = ["--mask", "group_mask.nii.gz"]
    else:
        flags = [
            "--index-file",
            "template/index.mif",
            "--directions-file",
            "template/directions.mif",
        ]
    h5 = out / "maio.h5"
    common = ["--log-level", "WARNING"]
    subprocess.run(
        [maio, "to-modelarray", "--cohort-file", "cohort.csv", "--output", h5, *flags, *common],
        cwd=folder,
        check=True,
    )
    add_results(h5)
    export = out / "export"
    shutil.rmtree(export, ignore_errors=True)
    template = ["--cohort-file", "cohort.csv"] if kind == "fixels" else []
    subprocess.run(
        [
            maio,
            "export-results",
            "--analysis-name",
            "lm",
            "--input-hdf5",
            h5,
            "--output-dir",
            export,
            *flags,
            *template,
            *common,
        ],
        cwd=folder,
        check=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maio", type=Path, help="a modelarrayio 26.0.0 executable")
    args = parser.parse_args()
    maio = args.maio or ensure_maio(Path("/tmp/greyarray-maio-venv"))
    for kind, make in (("voxels", voxel_inputs), ("fixels", fixel_inputs)):
        folder = DATA / kind
        if not (folder / "cohort.csv").exists():
            make(folder)
        out = folder / "modelarrayio"
        out.mkdir(exist_ok=True)
        run_modelarrayio(maio, folder, out, kind)
        print(f"{kind}: {sorted(p.name for p in (out / 'export').iterdir())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
