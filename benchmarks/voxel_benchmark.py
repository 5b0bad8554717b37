"""Benchmark GreyArray against ModelArrayIO 26.0.0 on NIfTI voxels and MRtrix fixels, same files,
same run (issue 19's targets).

  - voxels: N maps of an MNI 2 mm brain grid (97 x 115 x 97, .nii.gz, float32) with a brain mask
    per subject (a group mask of ~228,800 voxels);
  - fixels: N fixel data files (.mif, float32) of a 300,000-fixel index (100 x 120 x 100 grid).

For each type and N it measures wall time and peak RSS (GNU time) of greyarray to-modelarray (all
CPUs), the floor (benchmarks/floor_voxels.py: read and inflate every input once, write the same
matrix with h5py's gzip, nothing else), and ModelArrayIO's to-modelarray; then export-results of
16 result columns (writeResults' layout) by both tools. Ratios: GreyArray / floor, ModelArrayIO /
GreyArray, and GreyArray's peak at each N (flat in N).

    python3 benchmarks/voxel_benchmark.py                     # N = 500 and 2000 (~1 h, ~15 GB)
    python3 benchmarks/voxel_benchmark.py --sizes 100 --quick  # a few minutes

ModelArrayIO is installed in its own virtual environment (--maio-venv; created when missing).
Results: benchmarks/results/voxels.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import h5py
import nibabel as nb
import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchmark import ensure_maio  # noqa: E402

from greyarray import __version__  # noqa: E402
from greyarray.io.formats.mif import MifWriter  # noqa: E402

SHAPE = (97, 115, 97)  # MNI152 2 mm
AFFINE = np.array([[-2.0, 0, 0, 96], [0, 2, 0, -132], [0, 0, 2, -78], [0, 0, 0, 1]])
GRID = (100, 120, 100)  # fixel template grid (1.25 mm)
N_FIXELS = 300_000
RESULTS = [f"x{i}.{s}" for i in range(4) for s in ("estimate", "statistic", "p.value")]
RESULTS += ["model.adj.r.squared", "model.p.value", "x0.p.value.fdr", "model.p.value.fdr"]


def run(cmd: list[str], cwd: Path | None = None) -> dict:
    """Wall time, CPU time (user + system) and peak RSS of one command, by GNU time. CPU time
    says what the work costs when the machine is shared (wall time then depends on the load)."""
    import subprocess

    timed = ["/usr/bin/time", "-f", "@@ %e %U %S %M", *cmd]
    done = subprocess.run(
        timed, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{done.stderr[-2000:]}")
    wall, user, system, rss_kb = done.stderr.rsplit("@@ ", 1)[1].split()
    return {
        "seconds": float(wall),
        "cpu_seconds": round(float(user) + float(system), 2),
        "peak_rss_mb": round(int(rss_kb) / 1024, 1),
    }


def brain(scale: float = 1.0) -> np.ndarray:
    """An ellipsoid 'brain' of ~228,800 voxels on the MNI 2 mm grid."""
    grid = np.indices(SHAPE).astype(float)
    centre = np.array([48, 66, 41])[:, None, None, None]
    axes = np.array([36.0, 46.0, 33.0])[:, None, None, None] * scale
    return (((grid - centre) / axes) ** 2).sum(axis=0) < 1


def voxel_cohort(folder: Path, n: int) -> Path:
    """N float32 maps (.nii.gz) with their own brain masks, a group mask, a cohort CSV."""
    csv = folder / "cohort.csv"
    if csv.exists() and len(pd.read_csv(csv)) == n:
        return csv
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    group = brain()
    nb.save(nb.Nifti1Image(group.astype(np.uint8), AFFINE), folder / "group_mask.nii.gz")
    pattern = np.where(group, 0.45 + 0.1 * np.sin(np.indices(SHAPE)[0] / 7.0), 0)
    rows = []
    for i in range(n):
        own = brain(rng.uniform(0.97, 1.0))
        data = np.where(own, pattern + rng.normal(0, 0.05, SHAPE), 0).astype(np.float32)
        name, mask = f"sub-{i:05d}_fa.nii.gz", f"sub-{i:05d}_mask.nii.gz"
        nb.save(nb.Nifti1Image(data, AFFINE), folder / name)
        nb.save(nb.Nifti1Image(own.astype(np.uint8), AFFINE), folder / mask)
        rows.append({"scalar_name": "FA", "source_file": name, "source_mask_file": mask})
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def write_mif(path: Path, data: np.ndarray, dims: tuple, layout: str, dtype: str) -> None:
    """An uncompressed MRtrix image (``data``: C-contiguous in file order) with an identity-like
    transform of 1.25 mm voxels."""
    dims = ",".join(map(str, dims))
    head = (
        f"mrtrix image\ndim: {dims}\nvox: 1.25,1.25,1.25{',1' * (dims.count(',') - 2)}\n"
        f"layout: {layout}\ndatatype: {dtype}\n"
        "transform: 1,0,0,-62\ntransform: 0,1,0,-75\ntransform: 0,0,1,-62\n"
    ).encode()
    offset = len(head) + 32
    offset += -offset % 16
    head = (head + f"file: . {offset}\nEND\n".encode()).ljust(offset, b"\0")
    path.write_bytes(head + data.tobytes())


def fixel_cohort(folder: Path, n: int) -> Path:
    """An index of 300,000 fixels in ~140,000 voxels, directions, N data files (.mif)."""
    csv = folder / "cohort.csv"
    if csv.exists() and len(pd.read_csv(csv)) == n:
        return csv
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    grid = np.indices(GRID).astype(float)
    centre = (np.array(GRID) / 2)[:, None, None, None]
    inside = np.flatnonzero((((grid - centre) / (centre * 0.8)) ** 2).sum(axis=0) < 1)
    voxels = np.sort(rng.choice(inside, 140_000, replace=False))
    counts = np.ones(voxels.size, np.uint32)
    extra = rng.choice(voxels.size, 2 * (N_FIXELS - voxels.size), replace=True)
    np.add.at(counts, extra, 1)
    counts = np.minimum(counts, 3)
    while counts.sum() < N_FIXELS:
        short = np.flatnonzero(counts < 3)[: N_FIXELS - counts.sum()]
        counts[short] += 1
    while counts.sum() > N_FIXELS:
        counts[np.flatnonzero(counts > 1)[: counts.sum() - N_FIXELS]] -= 1
    index = np.zeros((*GRID, 2), np.uint32)
    i, j, k = np.unravel_index(voxels, GRID)
    index[i, j, k, 0] = counts
    index[i, j, k, 1] = np.concatenate([[0], np.cumsum(counts)[:-1]])
    # layout +1,+2,+3,+0 as MRtrix writes indices: the 2 values of a voxel side by side
    file_order = np.ascontiguousarray(index.transpose(2, 1, 0, 3))
    write_mif(folder / "index.mif", file_order, (*GRID, 2), "+1,+2,+3,+0", "UInt32LE")
    directions = rng.normal(size=(N_FIXELS, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    vectors = np.ascontiguousarray(directions, "<f4")  # component fastest: layout +1,+0,+2
    write_mif(folder / "directions.mif", vectors, (N_FIXELS, 3, 1), "+1,+0,+2", "Float32LE")
    transform = np.array([[1, 0, 0, -62], [0, 1, 0, -75.0], [0, 0, 1, -62]])
    writer = MifWriter(N_FIXELS, (1.25,) * 3, transform, compress=False)
    base = rng.uniform(0.2, 0.8, N_FIXELS)
    rows = []
    for s in range(n):
        name = f"sub-{s:05d}_fd.mif"
        writer.write(folder / name, base + rng.normal(0, 0.05, N_FIXELS))
        rows.append({"scalar_name": "FD", "source_file": name})
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def warm(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            path.read_bytes()


def add_results(h5_path: Path) -> None:
    """16 result columns (+ element_id) as ModelArray's writeResults stores them."""
    with h5py.File(h5_path, "a") as h5:
        n = h5["scalars"][next(iter(h5["scalars"]))]["values"].shape[1]
        data = np.random.default_rng(0).uniform(size=(len(RESULTS) + 1, n))
        data[0] = np.arange(n)
        group = h5.require_group("results/lm")
        group.create_dataset("results_matrix", data=data, chunks=(len(RESULTS) + 1, 4096))
        names = ["element_id", *RESULTS]
        group.create_dataset("column_names", data=names, dtype=h5py.string_dtype("ascii"))


def measure(kind: str, n: int, work: Path, maio: Path | None) -> dict:
    folder = work / f"{kind}_n{n}"
    inputs = folder / "inputs"
    csv = (voxel_cohort if kind == "voxels" else fixel_cohort)(inputs, n)
    if kind == "voxels":
        flags = ["--mask", "group_mask.nii.gz"]
    else:
        flags = ["--index-file", "index.mif", "--directions-file", "directions.mif"]
    out = folder / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    warm(inputs)
    quiet = ["--log-level", "WARNING"]
    row: dict = {"kind": kind, "n_subjects": n}
    ours = out / "greyarray.h5"
    cmd = [sys.executable, "-m", "greyarray", "to-modelarray", "--cohort-file", "cohort.csv"]
    row["greyarray"] = run([*cmd, "--output", str(ours), *flags, *quiet], cwd=inputs)
    with h5py.File(ours) as h5:
        chunk = h5[f"scalars/{'FA' if kind == 'voxels' else 'FD'}/values"].chunks[1]
    warm(inputs)
    floor = [sys.executable, str(HERE / "floor_voxels.py"), kind, str(csv), str(out / "floor.h5")]
    row["floor"] = run([*floor, str(chunk)])
    add_results(ours)
    export = [sys.executable, "-m", "greyarray", "export-results", "--analysis-name", "lm"]
    row["greyarray_export"] = run(
        [*export, "--input-hdf5", str(ours), "--output-dir", str(out / "g_exp"), *quiet]
    )
    if maio is not None:
        theirs = out / "modelarrayio.h5"
        warm(inputs)
        cmd = [str(maio), "to-modelarray", "--cohort-file", "cohort.csv", "--output", str(theirs)]
        row["modelarrayio"] = run([*cmd, *flags, *quiet], cwd=inputs)
        add_results(theirs)
        template = ["--cohort-file", "cohort.csv"] if kind == "fixels" else []
        cmd = [str(maio), "export-results", "--analysis-name", "lm", "--input-hdf5", str(theirs)]
        cmd += ["--output-dir", str(out / "m_exp"), *flags, *template, *quiet]
        row["modelarrayio_export"] = run(cmd, cwd=inputs)
        scalar = "FA" if kind == "voxels" else "FD"
        with h5py.File(ours) as a, h5py.File(theirs) as b:
            key = f"scalars/{scalar}/values"
            row["same_values"] = bool(np.array_equal(a[key][()], b[key][()], equal_nan=True))
    row["ratios"] = ratios(row)
    shutil.rmtree(out / "g_exp", ignore_errors=True)
    shutil.rmtree(out / "m_exp", ignore_errors=True)
    return row


def ratios(row: dict) -> dict:
    def ratio(a: str, b: str, what: str = "seconds") -> float:
        return round(row[a][what] / row[b][what], 2)

    out = {
        "vs_floor": ratio("greyarray", "floor"),
        "cpu_vs_floor": ratio("greyarray", "floor", "cpu_seconds"),
    }
    if "modelarrayio" in row:
        out["speedup"] = ratio("modelarrayio", "greyarray")
        out["cpu_speedup"] = ratio("modelarrayio", "greyarray", "cpu_seconds")
        out["export_speedup"] = ratio("modelarrayio_export", "greyarray_export")
        out["export_cpu_speedup"] = ratio("modelarrayio_export", "greyarray_export", "cpu_seconds")
    return out


def markdown(rows: list[dict], machine: str) -> str:
    head = (
        "| data | N | GreyArray s (CPU s) / MB | floor s (CPU s) | GreyArray / floor: wall "
        "(CPU) | ModelArrayIO s (CPU s) / MB | speed-up: wall (CPU) | export 16 columns "
        "GreyArray / ModelArrayIO s (CPU s) | export speed-up: wall (CPU) |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )

    def timing(t: dict | None, memory: bool = True) -> str:
        if not t:
            return "-"
        text = f"{t['seconds']} ({t['cpu_seconds']})"
        return text + (f" / {t['peak_rss_mb']:.0f}" if memory else "")

    lines = []
    for r in rows:
        q = r["ratios"]
        export = f"{timing(r['greyarray_export'], False)} / "
        export += timing(r.get("modelarrayio_export"), False)
        lines.append(
            f"| {r['kind']} | {r['n_subjects']} | {timing(r['greyarray'])} | "
            f"{timing(r['floor'], False)} | {q['vs_floor']} ({q['cpu_vs_floor']}) | "
            f"{timing(r.get('modelarrayio'))} | {q.get('speedup', '-')}x "
            f"({q.get('cpu_speedup', '-')}x) | {export} | {q.get('export_speedup', '-')}x "
            f"({q.get('export_cpu_speedup', '-')}x) |"
        )
    return f"Machine: {machine}\n\n" + head + "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--kinds", nargs="+", default=["voxels", "fixels"])
    parser.add_argument("--quick", action="store_true", help="one size, no ModelArrayIO at 2000")
    parser.add_argument("--work", type=Path, default=Path("/tmp/greyarray-bench-voxels"))
    parser.add_argument("--maio-venv", type=Path, default=Path("/tmp/greyarray-bench/maio-venv"))
    parser.add_argument("--skip-modelarrayio", action="store_true")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "voxels.json")
    args = parser.parse_args()
    import greyarray  # the children run the greyarray this script imports (cwd: the inputs)

    source = str(Path(greyarray.__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])
    maio = None if args.skip_modelarrayio else ensure_maio(args.maio_venv)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
        f"Python {platform.python_version()}, greyarray {__version__}, "
        f"h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version})"
    )
    rows = []
    for kind in args.kinds:
        for n in args.sizes:
            rows.append(measure(kind, n, args.work, maio))
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(args.work / f"{kind}_n{n}" / "out", ignore_errors=True)
    result = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    table = markdown(rows, machine)
    args.output.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
