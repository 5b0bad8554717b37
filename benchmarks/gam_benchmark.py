"""Benchmark greyarray fit-gam on a whole-brain HDF5, beside mgcv (ModelArray.gam's engine).

Builds an HDF5 in ModelArray's layout (default 91,282 elements x 1,000 subjects, float32,
chunks of all subjects x 256 elements, ~5% of elements with a few missing subjects), times
    fit-gam  'y ~ s(age, k = 4, fx = TRUE) + sex'  (method REML),
    fit-gam  'y ~ s(age) + sex'                    (method REML, penalised),
    fit-gam  ModelArray's gen_gamFormula_fxSmooth formula (osex + s(age) + s(age, by = osex),
             k = 4, fx = TRUE, osex ordered; GCV.Cp, ModelArray.gam's default),
    fit-gam  ModelArray's gen_gamFormula_contIx formula (ti(age) + ti(edu) + ti(age, edu),
             k = 4, fx = TRUE; GCV.Cp),
    fit-gam  'y ~ ti(age) + ti(edu) + ti(age, edu)' (method REML, four smoothing parameters),
    fit-gam  'y ~ te(age, edu) + sex'               (method REML, two smoothing parameters),
then runs mgcv::gam on a sample of elements in one Rscript (as ModelArray.gam does, one gam()
plus summary/tidy per element) and reports the per-element time and its whole-brain
extrapolation. Results are printed and written to benchmarks/results/gam.json.

    python3 benchmarks/gam_benchmark.py                   # full size, ~15 minutes
    python3 benchmarks/gam_benchmark.py --elements 5000 --r-elements 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from greyarray.stats.gam import fit_gam

HERE = Path(__file__).resolve().parent
FORMULAS = {
    "fx": ("y ~ s(age, k = 4, fx = TRUE) + sex", "REML"),
    "penalised": ("y ~ s(age) + sex", "REML"),
    "fxsmooth": (
        "y ~ osex + s(age, k = 4, fx = TRUE) + s(age, k = 4, by = osex, fx = TRUE)",
        "GCV.Cp",
    ),
    "contix": (
        "y ~ ti(age, k = 4, fx = TRUE) + ti(edu, k = 4, fx = TRUE) "
        "+ ti(age, edu, k = 4, fx = TRUE)",
        "GCV.Cp",
    ),
    "ti": ("y ~ ti(age) + ti(edu) + ti(age, edu)", "REML"),
    "te": ("y ~ te(age, edu) + sex", "REML"),
}
R_CODE = r"""
suppressMessages({library(mgcv); library(broom)})
args <- commandArgs(trailingOnly = TRUE)
phen <- read.csv(args[1]); values <- as.matrix(read.csv(args[2]))
phen$osex <- ordered(phen$osex, levels = c("F", "M"))  # --ordered-factor osex=F
for (i in seq(3, length(args), by = 2)) {
  formula <- as.formula(args[i])
  t0 <- proc.time()[["elapsed"]]
  for (j in seq_len(ncol(values))) {
    dat <- phen; dat$y <- values[, j]; dat <- dat[is.finite(dat$y), ]
    fit <- gam(formula, data = dat, method = args[i + 1])
    s <- summary(fit); st <- tidy(fit); pt <- tidy(fit, parametric = TRUE); gl <- glance(fit)
  }
  cat((proc.time()[["elapsed"]] - t0) / ncol(values), "\n")
}
"""


def build(path: Path, n_subjects: int, n_elements: int, seed: int = 0) -> pd.DataFrame:
    """The HDF5 and its cohort; writes in stripes so memory stays bounded."""
    rng = np.random.default_rng(seed)
    cohort = pd.DataFrame(
        {
            "source_file": [f"sub-{i:04d}_y.dscalar.nii" for i in range(n_subjects)],
            "age": np.round(rng.uniform(8, 22, n_subjects), 2),
            "sex": rng.choice(["F", "M"], n_subjects),
            "edu": np.round(rng.uniform(8, 20, n_subjects), 1),
        }
    )
    cohort["osex"] = cohort["sex"]
    age = cohort["age"].to_numpy()
    edu = cohort["edu"].to_numpy()
    male = (cohort["sex"] == "M").to_numpy()
    with h5py.File(path, "w") as h5:
        values = h5.create_dataset(
            "scalars/y/values",
            (n_subjects, n_elements),
            dtype=np.float32,
            chunks=(n_subjects, 256),
        )
        h5.create_dataset(
            "scalars/y/column_names", data=list(cohort["source_file"]), dtype=h5py.string_dtype()
        )
        step = 8192
        for start in range(0, n_elements, step):
            k = min(step, n_elements - start)
            slope = rng.normal(0, 1, k)
            block = (
                2.5
                + np.sin(age / 3)[:, None] * slope
                + 0.1 * male[:, None]
                + np.outer((age - 15) * (edu - 14) / 40, rng.normal(0, 1, k))
                + rng.normal(0, 0.5, (n_subjects, k))
            )
            holes = rng.uniform(size=k) < 0.05  # 5% of elements miss a few subjects
            block[:, holes] = np.where(
                rng.uniform(size=(n_subjects, holes.sum())) < 0.01, np.nan, block[:, holes]
            )
            values[:, start : start + k] = block.astype(np.float32)
    return cohort


def time_greyarray(h5: Path, cohort_csv: Path) -> dict[str, float]:
    times = {}
    for name, (formula, method) in FORMULAS.items():
        start = time.perf_counter()
        ordered = {"osex": "F"} if "osex" in formula else None
        fit_gam(
            h5, cohort_csv, formula, name, method=method, overwrite=True, ordered_factors=ordered
        )
        times[name] = time.perf_counter() - start
        print(f"greyarray fit-gam {name:10s} {formula!r}: {times[name]:.1f} s", flush=True)
    return times


def time_mgcv(h5: Path, cohort: pd.DataFrame, n_elements: int, folder: Path) -> list[float]:
    """Seconds per element of mgcv::gam + summary/tidy/glance (ModelArray.gam's inner loop)."""
    with h5py.File(h5, "r") as f:
        values = f["scalars/y/values"][:, :n_elements].astype(np.float64)
    cohort.drop(columns="source_file").to_csv(folder / "p.csv", index=False)
    pd.DataFrame(values).to_csv(folder / "v.csv", index=False, na_rep="NA", float_format="%.9g")
    (folder / "bench.R").write_text(R_CODE)
    done = subprocess.run(
        ["Rscript", str(folder / "bench.R"), str(folder / "p.csv"), str(folder / "v.csv")]
        + [part for formula_method in FORMULAS.values() for part in formula_method],
        check=True,
        capture_output=True,
        text=True,
    )
    return [float(x) for x in done.stdout.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=91282)
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--r-elements", type=int, default=200, help="0 skips R")
    parser.add_argument("--workdir", type=Path, help="keep the HDF5 here (default: temporary)")
    args = parser.parse_args()
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="gam-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    h5 = folder / "bench.h5"
    start = time.perf_counter()
    cohort = build(h5, args.subjects, args.elements)
    cohort.to_csv(folder / "cohort.csv", index=False)
    print(f"built {h5} ({args.subjects} x {args.elements}) in {time.perf_counter() - start:.0f} s")
    report = {
        "subjects": args.subjects,
        "elements": args.elements,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "greyarray_seconds": time_greyarray(h5, folder / "cohort.csv"),
    }
    if args.r_elements and shutil.which("Rscript"):
        per_element = time_mgcv(h5, cohort, args.r_elements, folder)
        report["mgcv_seconds_per_element"] = dict(zip(FORMULAS, per_element, strict=True))
        for name, seconds in report["mgcv_seconds_per_element"].items():
            hours = seconds * args.elements / 3600
            print(
                f"mgcv (ModelArray.gam's engine) {name:10s}: {seconds * 1e3:.1f} ms/element "
                f"-> {hours:.2f} h for {args.elements} elements on one core"
            )
    out = HERE / "results" / "gam.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if args.workdir is None:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
