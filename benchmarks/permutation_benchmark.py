"""Benchmark fit-lm --permutations on 91,282 greyordinates, and PALM where it can finish here.

Rows (wall time and peak RSS of each command, GNU time):
  - fit-lm 'thickness ~ age' without permutations (the parametric fit alone);
  - with --permutations N (max |t|), and with --permutations N --tfce;
  - TFCE of one 91k map (ms, in-process, median of 50);
  - one batch with 1% of the values missing at random (every element its own pattern);
  - PALM (Octave) and GreyArray on 50 elements x 8 subjects, exhaustive 8! = 40,320 permutations.

    python3 benchmarks/permutation_benchmark.py                        # 1000 subjects, N=5000
    python3 benchmarks/permutation_benchmark.py --permutations 500     # quicker; extrapolate

The cohort (benchmark.py's synthetic 91k maps) is built once under --work.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from benchmark import build_cohort, run

from greyarray.demo import template_path
from greyarray.stats import permutation, tfce

HERE = Path(__file__).resolve().parent
GREYARRAY = [sys.executable, "-m", "greyarray"]


def build(work: Path, n: int, name: str = "perm.h5") -> tuple[Path, Path]:
    """The cohort and its HDF5 (converted once)."""
    csv = build_cohort(work / f"n{n}" / "cohort", n, template_path())
    h5 = work / f"n{n}" / name
    if not h5.exists():
        run([*GREYARRAY, "to-modelarray", "--cohort-file", str(csv), "--output", str(h5)])
    return h5, csv


def fit(h5: Path, csv: Path, nprocs: int, *more: str) -> dict:
    command = [*GREYARRAY, "fit-lm", "--input-hdf5", str(h5), "--cohort-file", str(csv)]
    command += ["--formula", "thickness ~ age", "--overwrite", "--log-level", "WARNING"]
    return run([*command, "--nprocs", str(nprocs), *more])


def scattered(h5: Path, csv: Path, nprocs: int) -> dict:
    """One batch (256 permutations, plus the observed batch) on a copy with 1% of the values
    missing at random, so that nearly every element has its own pattern of subjects."""
    copy = h5.with_name("perm_nan.h5")
    if not copy.exists():
        shutil.copy(h5, copy)
        with h5py.File(copy, "a") as file:
            values = file["scalars/thickness/values"]
            rng = np.random.default_rng(0)
            for start in range(0, values.shape[1], 8192):
                block = values[:, start : start + 8192]
                block[rng.uniform(size=block.shape) < 0.01] = np.nan
                values[:, start : start + 8192] = block
    return fit(copy, csv, nprocs, "--permutations", str(permutation.BATCH))


def tfce_ms(h5: Path) -> float:
    """Median ms of one TFCE of a 91k |z| map (the age statistic of the fit above)."""
    with h5py.File(h5, "r") as file:
        graph = tfce.greyordinate_graph(file)
        names = list(file["results/lm/column_names"].asstr()[()])
        z = np.abs(file["results/lm/results_matrix"][names.index("age.statistic")])
    tfce.tfce(z, graph)
    times = []
    for _ in range(50):
        start = time.perf_counter()
        tfce.tfce(z, graph)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 1)


def palm_row(work: Path) -> dict:
    """50 elements x 8 subjects, all 40,320 permutations: PALM in Octave, then GreyArray."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import palm_reference

    rng = np.random.default_rng(0)
    ph = pd.DataFrame({"source_file": [f"s{i}" for i in range(8)], "age": rng.uniform(20, 70, 8)})
    values = rng.normal(0, 1, (8, 50)).astype(np.float32)
    design = np.column_stack([np.ones(8), ph["age"]])
    folder = Path(tempfile.mkdtemp(dir=work))
    start = time.perf_counter()
    palm_reference.run(
        folder,
        [palm_reference.Analysis("b", values, design, np.array([[0, 1]]), permutations=50000)],
    )
    palm_s = time.perf_counter() - start
    h5 = folder / "small.h5"
    with h5py.File(h5, "w") as file:
        file["scalars/y/values"] = values
        file["scalars/y/column_names"] = list(ph["source_file"])
    ph.assign(scalar_name="y").to_csv(folder / "cohort.csv", index=False)
    ours = run(
        [*GREYARRAY, "fit-lm", "--input-hdf5", str(h5), "--cohort-file", str(folder / "cohort.csv"),
         "--formula", "y ~ age", "--num-subj-lthr-abs", "0", "--permutations", "50000",
         "--log-level", "WARNING"]
    )  # fmt: skip
    with h5py.File(h5, "r") as file:
        names = list(file["results/lm/column_names"].asstr()[()])
        p = file["results/lm/results_matrix"][names.index("age.p.value.fwe")]
    palm_p = palm_reference.read(folder, "b", "dat_tstat_fwep", 1)
    return {
        "palm_seconds": round(palm_s, 1),
        "greyarray": ours,
        "max_abs_difference": float(np.abs(p - palm_p).max()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ga-bench")
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--permutations", type=int, default=5000)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--skip-palm", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    h5, csv = build(args.work, args.subjects)
    n = str(args.permutations)
    row = {
        "subjects": args.subjects,
        "elements": 91282,
        "permutations": args.permutations,
        "nprocs": args.nprocs,
        "batch": permutation.BATCH,
        "machine": f"{platform.machine()}, {args.nprocs} cores, {platform.python_version()}",
        "fit_only": fit(h5, csv, args.nprocs),
        "max_t": fit(h5, csv, args.nprocs, "--permutations", n),
        "tfce": fit(h5, csv, args.nprocs, "--permutations", n, "--tfce"),
        "tfce_ms_per_map": tfce_ms(h5),
        "scattered_nan_one_batch": scattered(h5, csv, args.nprocs),
    }
    if not args.skip_palm:
        row["palm_50x8_exhaustive"] = palm_row(args.work)
    text = markdown(row)
    print(text)
    (HERE / "results" / "permutation_latest.json").write_text(json.dumps(row, indent=1) + "\n")
    (HERE / "results" / "permutation_latest.md").write_text(text + "\n")
    return 0


def markdown(row: dict) -> str:
    n, s, k = row["permutations"], row["subjects"], row["nprocs"]
    lines = [
        f"| 91,282 elements x {s} subjects, {n} permutations, {k} cores | wall | peak RSS |",
        "|---|---|---|",
    ]
    for key, label in [
        ("fit_only", "fit-lm, no permutations"),
        ("max_t", "fit-lm --permutations (FWE by max statistic)"),
        ("tfce", "fit-lm --permutations --tfce"),
    ]:
        lines.append(f"| {label} | {row[key]['seconds']} s | {row[key]['peak_rss_mb']:.0f} MB |")
    lines.append(f"| TFCE of one 91k map | {row['tfce_ms_per_map']} ms | |")
    nan = row["scattered_nan_one_batch"]
    per_batch = nan["seconds"] - row["fit_only"]["seconds"]  # two batches: observed + null
    lines.append(
        f"| 1% scattered NaN, {row['batch']} permutations (one batch) | {nan['seconds']} s "
        f"(~{per_batch / 2 * (n / row['batch']) / 60:.0f} min for {n}, extrapolated) | "
        f"{nan['peak_rss_mb']:.0f} MB |"
    )
    if "palm_50x8_exhaustive" in row:
        palm = row["palm_50x8_exhaustive"]
        lines.append(f"| PALM (Octave), 50 elements x 8 subjects, 40,320 permutations | "
                     f"{palm['palm_seconds']} s | |")  # fmt: skip
        lines.append(f"| GreyArray, same (max difference {palm['max_abs_difference']:.1e}) | "
                     f"{palm['greyarray']['seconds']} s | "
                     f"{palm['greyarray']['peak_rss_mb']:.0f} MB |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
