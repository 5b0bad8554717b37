"""Benchmark greyarray fit-lmm on whole-brain HDF5s, beside lme4 + lmerTest in the same run.

Builds HDF5s in ModelArray's layout (float32, chunks of all observations x a run of elements,
~2% of elements with a few missing observations) for longitudinal cohorts with a random
intercept and a random age slope per participant, and times (each in its own process, peak
memory from the kernel):

    intercept     1,000 participants x 2 sessions = 2,000 observations,
                  'y ~ age + sex + (1 | participant_id)'
    slope         1,000 participants, 900 with 2 sessions and 100 with 3 (2,100 observations):
                  'y ~ age + sex + (1 + age | participant_id)'; lme4 refuses this model on
                  exactly 1,000 x 2 (as many observations as random effects: "probably
                  unidentifiable"), and so does fit-lmm
    intercept20k  10,000 participants x 2 sessions = 20,000 observations (ABCD's size),
                  random intercept

then runs lmerTest::lmer + summary() (lme4's fit, Satterthwaite t tests; what ModelArray.wrap
would run per element) on a sample of elements of each HDF5 in one Rscript, and reports the
per-element time, its whole-brain extrapolation on one core, and the ratio. Results are printed
and written to benchmarks/results/lmm.json.

    python3 benchmarks/lmm_benchmark.py                  # full size (~30 min, 8 GB of disk)
    python3 benchmarks/lmm_benchmark.py --elements 5000 --cases intercept slope
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
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
CASES = {  # name: (participants, sessions of the extra participants, formula)
    "intercept": (1000, 0, "y ~ age + sex + (1 | participant_id)"),
    "slope": (1000, 100, "y ~ age + sex + (1 + age | participant_id)"),
    "intercept20k": (10000, 0, "y ~ age + sex + (1 | participant_id)"),
}
R_CODE = r"""
suppressMessages(library(lmerTest))
args <- commandArgs(trailingOnly = TRUE)
phen <- read.csv(args[1]); values <- as.matrix(read.csv(args[2]))
formula <- as.formula(args[3])
t0 <- proc.time()[["elapsed"]]
for (j in seq_len(ncol(values))) {
  dat <- phen; dat$y <- values[, j]; dat <- dat[is.finite(dat$y), ]
  fit <- lmer(formula, data = dat)
  s <- summary(fit)$coefficients; v <- as.data.frame(VarCorr(fit))
}
cat((proc.time()[["elapsed"]] - t0) / ncol(values), "\n")
"""


def build(path: Path, participants: int, third: int, n_elements: int, seed: int = 0):
    """The HDF5 and its cohort: two sessions per participant (a third for ``third`` of them),
    ages 9-11 at baseline and 2 years apart; per element a fixed age effect, a random
    intercept and a random age slope per participant, and noise. Written in stripes."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(participants):
        baseline = rng.uniform(9, 11)
        sex = rng.choice(["F", "M"])
        for s in range(2 + (i < third)):
            rows.append(
                {
                    "source_file": f"sub-{i:05d}_ses-{s + 1}_y.dscalar.nii",
                    "participant_id": f"sub-{i:05d}",
                    "age": round(baseline + 2 * s + rng.normal(0, 0.1), 3),
                    "sex": sex,
                }
            )
    cohort = pd.DataFrame(rows)
    n = len(cohort)
    pid = pd.factorize(cohort["participant_id"])[0]
    age = cohort["age"].to_numpy() - 12
    male = (cohort["sex"] == "M").to_numpy()
    chunk = max(1, min(n_elements, 2**20 // (4 * n)))
    with h5py.File(path, "w", libver=("earliest", "v110")) as h5:
        values = h5.create_dataset(
            "scalars/y/values", (n, n_elements), dtype=np.float32, chunks=(n, chunk)
        )
        h5.create_dataset(
            "scalars/y/column_names", data=list(cohort["source_file"]), dtype=h5py.string_dtype()
        )
        step = max(chunk, (64 * 2**20 // (8 * n)) // chunk * chunk)
        for start in range(0, n_elements, step):
            k = min(step, n_elements - start)
            intercept = rng.normal(0, rng.uniform(0, 1, k), (participants, k))
            slope = rng.normal(0, rng.uniform(0, 0.1, k), (participants, k))
            block = (
                2.5
                + 0.03 * age[:, None] * rng.normal(1, 1, k)
                + 0.1 * male[:, None]
                + intercept[pid]
                + slope[pid] * age[:, None]
                + rng.normal(0, 0.3, (n, k))
            )
            holes = rng.uniform(size=k) < 0.02  # 2% of elements miss a few observations
            block[:, holes] = np.where(
                rng.uniform(size=(n, holes.sum())) < 0.01, np.nan, block[:, holes]
            )
            values[:, start : start + k] = block.astype(np.float32)
    return cohort


def run_greyarray(h5: Path, cohort_csv: Path, formula: str, nprocs: int) -> tuple[float, float]:
    """(seconds, peak resident memory in GB) of ``greyarray fit-lmm`` in its own process."""
    command = [
        sys.executable, "-m", "greyarray", "fit-lmm", "--input-hdf5", str(h5), "--cohort-file",
        str(cohort_csv), "--formula", formula, "--overwrite", "--nprocs", str(nprocs),
    ]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    stderr = process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"fit-lmm failed:\n{stderr}")
    return seconds, usage.ru_maxrss / 2**20


def time_lmer(h5: Path, cohort: pd.DataFrame, formula: str, n: int, folder: Path) -> float:
    """Seconds per element of lmerTest::lmer + summary() (default lmerControl)."""
    with h5py.File(h5, "r") as f:
        values = f["scalars/y/values"][:, :n].astype(np.float64)
    cohort.drop(columns="source_file").to_csv(folder / "p.csv", index=False)
    pd.DataFrame(values).to_csv(folder / "v.csv", index=False, na_rep="NA", float_format="%.9g")
    (folder / "bench.R").write_text(R_CODE)
    done = subprocess.run(
        ["Rscript", str(folder / "bench.R"), str(folder / "p.csv"), str(folder / "v.csv"),
         formula],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=91282)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--r-elements", type=int, default=20, help="0 skips R")
    parser.add_argument("--nprocs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", type=Path, help="keep the HDF5s here (default: temporary)")
    args = parser.parse_args()
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="lmm-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    report = {
        "elements": args.elements,
        "cpus": os.cpu_count(),
        "nprocs": args.nprocs,
        "machine": platform.machine(),
        "cases": {},
    }
    for name in args.cases:
        participants, third, formula = CASES[name]
        h5 = folder / f"{name}.h5"
        start = time.perf_counter()
        cohort = build(h5, participants, third, args.elements)
        cohort.to_csv(folder / f"{name}.csv", index=False)
        print(
            f"built {h5} ({len(cohort)} x {args.elements}) in {time.perf_counter() - start:.0f} s"
        )
        seconds, memory = run_greyarray(h5, folder / f"{name}.csv", formula, args.nprocs)
        case = {
            "observations": len(cohort),
            "participants": participants,
            "formula": formula,
            "greyarray_seconds": seconds,
            "greyarray_peak_memory_gb": memory,
        }
        print(f"greyarray fit-lmm {name}: {seconds:.1f} s, peak memory {memory:.2f} GB", flush=True)
        if args.r_elements and shutil.which("Rscript"):
            per = time_lmer(h5, cohort, formula, args.r_elements, folder)
            whole = per * args.elements
            case |= {
                "lmer_seconds_per_element": per,
                "lmer_whole_brain_hours_one_core": whole / 3600,
                "speedup_vs_lmer_one_core": whole / seconds,
            }
            print(
                f"lme4 + lmerTest {name}: {per * 1e3:.0f} ms/element -> {whole / 3600:.2f} h for "
                f"{args.elements} elements on one core ({whole / seconds:.0f}x fit-lmm's time)",
                flush=True,
            )
        report["cases"][name] = case
        h5.unlink()
    out = HERE / "results" / "lmm.json"
    if out.exists() and set(args.cases) != set(CASES):  # --cases: keep the other cases' runs
        report["cases"] = json.loads(out.read_text())["cases"] | report["cases"]
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
