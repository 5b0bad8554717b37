"""Benchmark greyarray harmonize beside neuroCombat 0.2.12, in the same run, on the same HDF5.

Builds a ModelArray HDF5 of 91,282 elements x N subjects (default 2,000) in 4 sites (site
effects in location and scale, age and sex effects; float32, gzip, chunks of all subjects, as
to-modelarray writes it), then measures wall time and peak RSS (GNU time) of
  - greyarray harmonize --batch site --covariates "age + sex" (parametric EB, in place), and
  - neuroCombat(dat, covars, "site", ["sex"], ["age"]) in its own environment: read the scalar
    into the features x samples float64 matrix it takes, run it, write the result back as a
    scalar (the same task), the call itself timed inside;
and the largest relative difference between the two harmonised scalars. With --large it also
measures greyarray alone at 91,282 x 20,000 (memory stays bounded; neuroCombat would need
~80 GB). Results: benchmarks/results/combat.json and combat.md.

    python3 benchmarks/combat_benchmark.py             # ~5 minutes (neuroCombat ~1-2 of them)
    python3 benchmarks/combat_benchmark.py --large     # + 91k x 20,000 (~25 GB of disk)

The reference environment is tests/combat_reference.py's plus h5py (--venv; made when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from greyarray.io.store import StoreOptions, scalar_output

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from combat_reference import PINS  # noqa: E402

SITES = {"A": 0.30, "B": 0.22, "C": 0.28, "D": 0.20}  # share of subjects
REFERENCE = r"""
import sys, time
import h5py, numpy as np, pandas as pd
np.int = int
from neuroCombat import neuroCombat
h5_path, csv, out_name = sys.argv[1:4]
with h5py.File(h5_path, "r") as h5:
    dset = h5["scalars/y/values"]
    dat = dset[()].T.astype(np.float64)  # features x samples, as neuroCombat takes it
    names = h5["scalars/y/column_names"][()]
    chunks = dset.chunks
covars = pd.read_csv(csv)[["site", "age", "sex"]]
start = time.perf_counter()
done = neuroCombat(dat=dat, covars=covars, batch_col="site", categorical_cols=["sex"],
                   continuous_cols=["age"])
seconds = time.perf_counter() - start
with h5py.File(h5_path, "a") as h5:
    group = h5.create_group(f"scalars/{out_name}")
    group.create_dataset("values", data=done["data"].T.astype(np.float32), chunks=chunks,
                         compression="gzip", compression_opts=4, shuffle=True)
    group.create_dataset("column_names", data=names)
print(f"@@ {seconds:.3f}")
"""


def run(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time and peak RSS of one command (GNU time; a child of this process would inherit
    its peak RSS through wait4)."""
    done = subprocess.run(
        ["/usr/bin/time", "-f", "@@@ %e %M", *cmd],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{done.stderr[-3000:]}")
    wall, rss_kb = done.stderr.rsplit("@@@ ", 1)[1].split()
    result = {"seconds": float(wall), "peak_rss_mb": round(int(rss_kb) / 1024, 1)}
    if "@@ " in done.stdout:
        result["call_seconds"] = float(done.stdout.rsplit("@@ ", 1)[1].split()[0])
    return result


def ensure_venv(folder: Path) -> Path:
    python = folder / "bin" / "python"
    if not (python.exists() and (folder / "greyarray-bench").exists()):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PINS, "h5py<3.12"], check=True)
        (folder / "greyarray-bench").write_text("\n".join(PINS))
    return python


def build(folder: Path, n_subjects: int, n_elements: int, seed: int = 0) -> tuple[Path, Path]:
    """Cohort CSV and HDF5 (written in stripes through GreyArray's own writer)."""
    rng = np.random.default_rng(seed)
    site = rng.choice(list(SITES), n_subjects, p=list(SITES.values()))
    cohort = pd.DataFrame(
        {
            "source_file": [f"sub-{i:05d}_y.dscalar.nii" for i in range(n_subjects)],
            "site": site,
            "age": np.round(rng.uniform(8, 80, n_subjects) * 4) / 4,
            "sex": rng.choice(["F", "M"], n_subjects),
        }
    )
    csv, h5 = folder / "cohort.csv", folder / "data.h5"
    cohort.to_csv(csv, index=False)
    codes = pd.Categorical(site, list(SITES)).codes
    age, male = cohort["age"].to_numpy(), (cohort["sex"] == "M").to_numpy()
    base = rng.normal(2.5, 0.4, n_elements).astype(np.float32)
    shift = rng.normal(0, 0.15, (len(SITES), n_elements)).astype(np.float32)
    scale = rng.uniform(0.7, 1.5, len(SITES)).astype(np.float32)
    options = StoreOptions(nprocs=os.cpu_count() or 1, compression_level=1)
    with scalar_output(h5, "y", cohort["source_file"], n_elements, options) as out:
        width = out.chunk_width * max(1, 2**26 // (4 * n_subjects * out.chunk_width))
        for start in range(0, n_elements, width):
            stop = min(start + width, n_elements)
            noise = rng.standard_normal((n_subjects, stop - start), dtype=np.float32)
            block = base[start:stop] + shift[codes, start:stop] + 0.1 * male[:, None]
            block += (0.005 * age)[:, None].astype(np.float32)
            block += scale[codes][:, None] * 0.2 * noise
            out.write(start, block)
    return csv, h5


def warm(path: Path) -> None:
    """Read the file once (the page cache then serves both tools alike)."""
    with open(path, "rb") as handle:
        while handle.read(2**26):
            pass


def harmonize(csv: Path, h5: Path, output: str = "y_combat") -> dict:
    return run(
        [
            sys.executable,
            "-m",
            "greyarray",
            "harmonize",
            "--input-hdf5",
            str(h5),
            "--cohort-file",
            str(csv),
            "--scalar",
            "y",
            "--batch",
            "site",
            "--covariates",
            "age + sex",
            "--output-scalar",
            output,
            "--overwrite",
            "--log-level",
            "WARNING",
        ]
    )


def largest_difference(h5: Path, ours: str, theirs: str) -> float:
    """max |ours - theirs| / |theirs| over every value (streamed)."""
    worst = 0.0
    with h5py.File(h5, "r") as file:
        a, b = file[f"scalars/{ours}/values"], file[f"scalars/{theirs}/values"]
        step = a.chunks[1] * 64
        for start in range(0, a.shape[1], step):
            x = a[:, start : start + step].astype(np.float64)
            y = b[:, start : start + step].astype(np.float64)
            worst = max(worst, float(np.max(np.abs(x - y) / np.abs(y))))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=2000)
    parser.add_argument("--elements", type=int, default=91282)
    parser.add_argument("--large", action="store_true", help="also 91,282 x 20,000, GreyArray")
    parser.add_argument("--large-subjects", type=int, default=20000)
    parser.add_argument("--no-reference", action="store_true", help="skip neuroCombat")
    parser.add_argument("--venv", type=Path, default=Path.home() / ".cache/greyarray/combat-bench")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: tmp)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="combat-bench-", dir=args.work))
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "elements": args.elements,
        "sites": len(SITES),
    }
    try:
        warm_up = work / "warm-up"  # numba compiles (and caches) the kernels once, here
        warm_up.mkdir()
        harmonize(*build(warm_up, 40, 500))
        csv, h5 = build(work, args.subjects, args.elements)
        warm(h5)
        row: dict = {"subjects": args.subjects, "greyarray": harmonize(csv, h5)}
        print(f"greyarray harmonize {args.subjects}: {row['greyarray']}", flush=True)
        if not args.no_reference:
            python = ensure_venv(args.venv)
            script = work / "reference.py"
            script.write_text(REFERENCE)
            row["neurocombat"] = run([str(python), str(script), str(h5), str(csv), "y_nc"])
            print(f"neuroCombat {args.subjects}: {row['neurocombat']}", flush=True)
            row["speedup"] = round(row["neurocombat"]["seconds"] / row["greyarray"]["seconds"], 1)
            row["speedup_call_only"] = round(
                row["neurocombat"]["call_seconds"] / row["greyarray"]["seconds"], 1
            )
            row["largest_relative_difference"] = largest_difference(h5, "y_combat", "y_nc")
        result["standard"] = row
        h5.unlink()
        if args.large:
            folder = work / "large"
            folder.mkdir()
            csv, h5 = build(folder, args.large_subjects, args.elements, seed=1)
            warm(h5)
            result["large"] = {"subjects": args.large_subjects, "greyarray": harmonize(csv, h5)}
            print(f"greyarray harmonize {args.large_subjects}: {result['large']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = HERE / "results"
    earlier = out / "combat.json"
    if "large" not in result and earlier.is_file():  # keep the last --large measurement
        large = json.loads(earlier.read_text()).get("large")
        if large:
            result["large"] = {**large, "from_an_earlier_run": True}
    (out / "combat.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "combat.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    row = result["standard"]
    lines = [
        f"91,282 elements x {row['subjects']:,} subjects, {result['sites']} sites, "
        f"{result['machine']['cpus']} CPUs:",
        "",
        "| tool | wall (s) | peak RSS (MB) |",
        "|---|---|---|",
        f"| greyarray harmonize | {row['greyarray']['seconds']} | "
        f"{row['greyarray']['peak_rss_mb']} |",
    ]
    if "neurocombat" in row:
        nc = row["neurocombat"]
        lines.append(
            f"| neuroCombat 0.2.12 (read, call {nc['call_seconds']} s, write) | {nc['seconds']} "
            f"| {nc['peak_rss_mb']} |"
        )
        lines += [
            "",
            f"Speed-up: {row['speedup']}x (neuroCombat's call alone: {row['speedup_call_only']}x); "
            f"largest relative difference of the stored values: "
            f"{row['largest_relative_difference']:.2e}.",
        ]
    if "large" in result:
        large = result["large"]
        lines += [
            "",
            f"91,282 x {large['subjects']:,}: greyarray harmonize "
            f"{large['greyarray']['seconds']} s, peak RSS {large['greyarray']['peak_rss_mb']} MB.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
