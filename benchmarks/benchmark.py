"""Benchmark GreyArray against ModelArrayIO 26.0.0 on the same 91k cohorts, in the same run.

For each cohort size N it builds N subject dscalars on the real fsLR 91k template (float32 maps
with noise, distinct map names), warms the page cache, then measures wall time and peak RSS of:
  - greyarray to-modelarray (all CPUs, and --nprocs 1), ModelArrayIO to-modelarray;
  - the floor: read every data block raw, write the same matrix with h5py (same chunks and filters);
  - export-results of 10 result columns in writeResults' layout, both tools;
  - ModelArray's read pattern: one element (all subjects) at a time through a 1 MiB chunk cache,
    on GreyArray's file, ModelArrayIO's file and a contiguous copy;
and prints a table and writes it as JSON (and Markdown, for the README).

    python3 benchmarks/benchmark.py --quick            # N=20 and 100, a few minutes
    python3 benchmarks/benchmark.py --sizes 100 500 2000

ModelArrayIO is installed in its own virtual environment (--maio-venv; created when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from greyarray import __version__
from greyarray.demo import phenotypes, template_path, thickness_maps
from greyarray.io.formats import cifti

HERE = Path(__file__).resolve().parent
RESULT_NAMES = [
    "element_id",
    "Intercept.estimate",
    "Intercept.statistic",
    "Intercept.p.value",
    "age.estimate",
    "age.statistic",
    "age.p.value",
    "model.adj.r.squared",
    "model.p.value",
    "age.p.value.fdr",
    "model.p.value.fdr",
]


def run(cmd: list[str], cwd: Path | None = None) -> dict:
    """Wall time and peak RSS of one command, measured by GNU time.

    Not wait4 from here: a child forked from this (large) process inherits its peak RSS.
    """
    timed = ["/usr/bin/time", "-f", "@@ %e %M", *cmd]
    done = subprocess.run(
        timed, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{done.stderr[-2000:]}")
    wall, rss_kb = done.stderr.rsplit("@@ ", 1)[1].split()
    return {"seconds": float(wall), "peak_rss_mb": round(int(rss_kb) / 1024, 1)}


def ensure_maio(venv: Path) -> Path:
    exe = venv / "bin" / "modelarrayio"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "modelarrayio==26.0.0"], check=True
        )
    return exe


def build_cohort(folder: Path, n: int, template: Path) -> Path:
    """N subject files (distinct map names) and a cohort CSV with relative paths."""
    csv = folder / "cohort.csv"
    if csv.exists() and len(pd.read_csv(csv)) == n:
        return csv
    folder.mkdir(parents=True, exist_ok=True)
    geometry = cifti.read_file(template).geometry
    writer = cifti.CiftiWriter(geometry)
    table = phenotypes(n, seed=n)
    files = []
    for subject, values in zip(
        table["participant_id"], thickness_maps(geometry.n_elements, table, seed=n), strict=True
    ):
        files.append(f"{subject}_thickness.dscalar.nii")
        writer.write(folder / files[-1], values, f"{subject}_thickness")
    table.assign(scalar_name="thickness", source_file=files).to_csv(csv, index=False)
    return csv


def warm(folder: Path) -> None:
    for path in folder.glob("*.nii"):
        path.read_bytes()


def write_results(h5_path: Path, n_elements: int) -> None:
    """10 result columns (+ element_id) as ModelArray's writeResults stores them."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(len(RESULT_NAMES), n_elements))
    data[0] = np.arange(n_elements)
    with h5py.File(h5_path, "a") as h5:
        group = h5.require_group("results/lm")
        group.create_dataset(
            "results_matrix",
            data=data,
            chunks=(32, 32),
            maxshape=(None, None),
            compression="gzip",
            compression_opts=4,
        )
        group.create_dataset("column_names", data=RESULT_NAMES, dtype=h5py.string_dtype("ascii"))


def element_reads(h5_path: Path, n_reads: int = 3000) -> float:
    """ms per element reading (all subjects, one element) in order, through a 1 MiB cache."""
    with h5py.File(h5_path, "r", rdcc_nbytes=2**20) as h5:
        values = h5["scalars/thickness/values"]
        n = min(n_reads, values.shape[1])
        start = time.perf_counter()
        for j in range(n):
            values[:, j]
        return round((time.perf_counter() - start) / n * 1000, 3)


def contiguous_copy(src: Path, dst: Path) -> Path:
    with h5py.File(src, "r") as h5, h5py.File(dst, "w") as out:
        out.create_dataset("scalars/thickness/values", data=h5["scalars/thickness/values"][()])
    return dst


def measure(n: int, work: Path, maio: Path | None, template: Path) -> dict:
    folder = work / f"n{n}"
    csv = build_cohort(folder / "cohort", n, template)
    warm(folder / "cohort")
    out = folder / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    greyarray = [sys.executable, "-m", "greyarray"]
    row: dict = {"n_subjects": n}
    ours = out / "greyarray.h5"
    row["greyarray"] = run(
        [
            *greyarray,
            "to-modelarray",
            "--cohort-file",
            str(csv),
            "--output",
            str(ours),
            "--log-level",
            "WARNING",
        ]
    )
    row["greyarray_nprocs1"] = run(
        [
            *greyarray,
            "to-modelarray",
            "--cohort-file",
            str(csv),
            "--output",
            str(out / "g1.h5"),
            "--nprocs",
            "1",
            "--log-level",
            "WARNING",
        ]
    )
    with h5py.File(ours, "r") as h5:
        chunk = h5["scalars/thickness/values"].chunks[1]
    row["floor"] = run(
        [sys.executable, str(HERE / "floor.py"), str(csv), str(out / "floor.h5"), str(chunk)]
    )
    row["file_mb"] = {"greyarray": round(ours.stat().st_size / 2**20, 2)}
    write_results(ours, 91282)
    row["greyarray_export"] = run(
        [
            *greyarray,
            "export-results",
            "--analysis-name",
            "lm",
            "--input-hdf5",
            str(ours),
            "--output-dir",
            str(out / "g_exp"),
            "--cohort-file",
            str(csv),
            "--log-level",
            "WARNING",
        ]
    )
    row["element_read_ms"] = {"greyarray": element_reads(ours)}
    row["element_read_ms"]["contiguous"] = element_reads(contiguous_copy(ours, out / "contig.h5"))
    if maio is not None:
        theirs = out / "modelarrayio.h5"
        row["modelarrayio"] = run(
            [
                str(maio),
                "to-modelarray",
                "--cohort-file",
                str(csv),
                "--output",
                str(theirs),
                "--log-level",
                "WARNING",
            ],
            cwd=csv.parent,
        )
        row["file_mb"]["modelarrayio"] = round(theirs.stat().st_size / 2**20, 2)
        write_results(theirs, 91282)
        row["modelarrayio_export"] = run(
            [
                str(maio),
                "export-results",
                "--analysis-name",
                "lm",
                "--input-hdf5",
                str(theirs),
                "--output-dir",
                str(out / "m_exp"),
                "--cohort-file",
                str(csv),
                "--log-level",
                "WARNING",
            ],
            cwd=csv.parent,
        )
        row["element_read_ms"]["modelarrayio"] = element_reads(theirs)
        with h5py.File(ours, "r") as a, h5py.File(theirs, "r") as b:
            row["same_values"] = bool(
                np.array_equal(a["scalars/thickness/values"][()], b["scalars/thickness/values"][()])
            )
    return row


def measure_lm(work: Path, template: Path, n: int = 1000) -> dict:
    """fit-lm on N subjects x 91,282 elements, 5 terms; clean, then with 1% scattered NaNs (so
    nearly every element has its own missing pattern)."""
    folder = work / f"n{n}"
    csv = build_cohort(folder / "cohort", n, template)
    table = pd.read_csv(csv)
    table["site"] = np.where(np.arange(n) % 3, "B", "A")
    table.to_csv(csv.with_name("cohort_site.csv"), index=False)
    h5 = folder / "lm.h5"
    h5.unlink(missing_ok=True)
    greyarray = [sys.executable, "-m", "greyarray"]
    run(
        [
            *greyarray,
            "to-modelarray",
            "--cohort-file",
            str(csv.with_name("cohort_site.csv")),
            "--output",
            str(h5),
            "--log-level",
            "WARNING",
        ]
    )
    fit = [
        *greyarray,
        "fit-lm",
        "--input-hdf5",
        str(h5),
        "--cohort-file",
        str(csv.with_name("cohort_site.csv")),
        "--formula",
        "thickness ~ age + sex + site + age:sex",
        "--overwrite",
        "--log-level",
        "WARNING",
    ]
    row = {"n_subjects": n, "n_terms": 5, "clean": run(fit)}
    with h5py.File(h5, "a") as f:
        values = f["scalars/thickness/values"]
        rng = np.random.default_rng(0)
        for start in range(0, values.shape[1], 8192):
            block = values[:, start : start + 8192]
            block[rng.uniform(size=block.shape) < 0.01] = np.nan
            values[:, start : start + 8192] = block
    row["scattered_nan"] = run(fit)
    modelarray_s = 91282 * 0.045  # ModelArray.lm: ~45 ms per element (quoted, not measured here)
    row["modelarray_lm_quoted_s"] = modelarray_s
    row["speedup_vs_quoted"] = round(modelarray_s / row["clean"]["seconds"], 0)
    return row


def measure_exports(n: int, work: Path, maio: Path) -> dict:
    """export-results of both tools on the files an earlier full run left (same run, same
    files), median of 3: a change to export needs no new 12-minute conversion."""
    folder = work / f"n{n}"
    csv, out = folder / "cohort" / "cohort.csv", folder / "out"
    timings = {}
    for tool, exe, h5 in (
        ("greyarray_export", [sys.executable, "-m", "greyarray"], out / "greyarray.h5"),
        ("modelarrayio_export", [str(maio)], out / "modelarrayio.h5"),
    ):
        cmd = [*exe, "export-results", "--analysis-name", "lm", "--input-hdf5", str(h5)]
        cmd += ["--output-dir", str(out / f"{tool}_again"), "--cohort-file", str(csv)]
        runs = [run([*cmd, "--log-level", "WARNING"], cwd=csv.parent) for _ in range(3)]
        timings[tool] = sorted(runs, key=lambda r: r["seconds"])[1]
    return timings


def start_up(repeats: int = 7) -> dict:
    """Median wall time of ``greyarray --version`` (the console script, as users run it)."""
    exe = shutil.which("greyarray") or sys.executable
    cmd = [exe, "--version"] if exe != sys.executable else [exe, "-m", "greyarray", "--version"]
    times = sorted(run(cmd)["seconds"] for _ in range(repeats))
    python = sorted(run([sys.executable, "-c", "pass"])["seconds"] for _ in range(repeats))
    return {"greyarray_version_s": times[repeats // 2], "python_startup_s": python[repeats // 2]}


def ratios(row: dict) -> dict:
    out = {
        "vs_floor": round(row["greyarray"]["seconds"] / row["floor"]["seconds"], 2),
        "nprocs_speedup": round(
            row["greyarray_nprocs1"]["seconds"] / row["greyarray"]["seconds"], 2
        ),
    }
    if "modelarrayio" in row:
        out["speedup"] = round(row["modelarrayio"]["seconds"] / row["greyarray"]["seconds"], 1)
        out["export_speedup"] = round(
            row["modelarrayio_export"]["seconds"] / row["greyarray_export"]["seconds"], 1
        )
        out["size_ratio"] = round(row["file_mb"]["greyarray"] / row["file_mb"]["modelarrayio"], 3)
        out["element_read_speedup"] = round(
            row["element_read_ms"]["modelarrayio"] / row["element_read_ms"]["greyarray"], 2
        )
    return out


def markdown(rows: list[dict], machine: str) -> str:
    head = (
        "| N | to-modelarray GreyArray (s / MB) | ModelArrayIO (s / MB) | speed-up | floor (s) "
        "| GreyArray / floor | --nprocs 1 (s) | export GreyArray / ModelArrayIO (s) "
        "| element read GreyArray / ModelArrayIO / contiguous (ms) | file size ratio |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in rows:
        r, m = row["ratios"], row.get("modelarrayio")
        reads = row["element_read_ms"]
        theirs = f"{m['seconds']} / {m['peak_rss_mb']:.0f}" if m else "-"
        lines.append(
            f"| {row['n_subjects']} | {row['greyarray']['seconds']} / "
            f"{row['greyarray']['peak_rss_mb']:.0f} | {theirs} | "
            f"{r.get('speedup', '-')}x | {row['floor']['seconds']} | {r['vs_floor']} | "
            f"{row['greyarray_nprocs1']['seconds']} | {row['greyarray_export']['seconds']} / "
            f"{row.get('modelarrayio_export', {}).get('seconds', '-')} | "
            f"{reads['greyarray']} / {reads.get('modelarrayio', '-')} / {reads['contiguous']} | "
            f"{r.get('size_ratio', '-')} |"
        )
    return f"Machine: {machine}\n\n" + head + "\n".join(lines) + "\n"


def lm_markdown(row: dict) -> str:
    clean, nan = row["clean"], row["scattered_nan"]
    return (
        f"\nfit-lm, {row['n_subjects']} subjects x 91,282 elements x {row['n_terms']} terms: "
        f"{clean['seconds']} s, {clean['peak_rss_mb']:.0f} MB; with 1% scattered missing values "
        f"{nan['seconds']} s, {nan['peak_rss_mb']:.0f} MB (ModelArray.lm: ~45 ms per element, "
        f"~{row['modelarray_lm_quoted_s'] / 60:.0f} min: {row['speedup_vs_quoted']:.0f}x)\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 2000])
    parser.add_argument("--quick", action="store_true", help="N = 20 and 100")
    parser.add_argument("--work", type=Path, default=Path("/tmp/greyarray-bench"))
    parser.add_argument("--maio-venv", type=Path, default=Path("/tmp/greyarray-bench/maio-venv"))
    parser.add_argument("--skip-modelarrayio", action="store_true")
    parser.add_argument("--lm-only", action="store_true", help="only the fit-lm measurement")
    parser.add_argument(
        "--export-only",
        action="store_true",
        help="only export-results (and start-up), on the files of the last full run",
    )
    parser.add_argument(
        "--template",
        type=Path,
        default=template_path(),
        help="91k dscalar whose header the cohort uses",
    )
    parser.add_argument("--output", type=Path, default=HERE / "results" / "latest.json")
    args = parser.parse_args()
    sizes = [20, 100] if args.quick else args.sizes
    maio = None if args.skip_modelarrayio else ensure_maio(args.maio_venv)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
        f"Python {platform.python_version()}, greyarray {__version__}, "
        f"h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version})"
    )
    rows = []
    startup = start_up()
    if args.export_only:
        result = json.loads(args.output.read_text())
        for row in result["rows"]:
            row.update(measure_exports(row["n_subjects"], args.work, maio))
            row["ratios"] = ratios(row)
            print(json.dumps({k: row[k] for k in ("greyarray_export", "modelarrayio_export")}))
        result.update(start_up=startup, date=time.strftime("%Y-%m-%d"))
        return save(result, args.output)
    print(json.dumps({"start_up": startup}), flush=True)
    lm_row = measure_lm(args.work, args.template, 100 if args.quick else 1000)
    print(json.dumps({"fit_lm": lm_row}), flush=True)
    for n in [] if args.lm_only else sizes:
        row = measure(n, args.work, maio, args.template)
        row["ratios"] = ratios(row)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.lm_only:  # keep the conversion rows of the last full run
        previous = json.loads(args.output.read_text()) if args.output.exists() else {}
        rows = previous.get("rows", [])
    result = {
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
        "fit_lm": lm_row,
        "start_up": startup,
    }
    return save(result, args.output)


def save(result: dict, output: Path) -> int:
    """The results as JSON and as the Markdown table the README shows."""
    output.write_text(json.dumps(result, indent=1))
    startup = result["start_up"]
    table = markdown(result["rows"], result["machine"]) + lm_markdown(result["fit_lm"])
    table += (
        f"\n`greyarray --version`: {startup['greyarray_version_s']} s (Python itself: "
        f"{startup['python_startup_s']} s)\n"
    )
    output.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
