"""Makes tests/data/lmm/restart/phenotypes.csv and values.csv (seeded): one response of a
random-slope cohort (150 participants, 1-4 sessions, ages 8-60) whose ML fit of
y ~ age + sex + (1 + age | participant_id) has a singular local optimum (correlation -1)
1e-3 in logLik below the optimum, which has both variances positive. It is element 1407 of
2000 drawn as below (the draws of the other elements are kept so the stream is the same).
Reference criteria: tests/r/lmm_fixtures.sh (default_restart_ml, tight_restart_ml).
Run from the repository: python3 tests/r/lmm_restart.py
"""

from pathlib import Path

import numpy as np
import pandas as pd

OUT = Path(__file__).parent.parent / "data" / "lmm" / "restart"
ELEMENT = 1407


def main() -> None:
    rng = np.random.default_rng(3)
    n_part, rows = 150, []
    for i in range(n_part):
        count = rng.choice([1, 2, 3, 4], p=[0.1, 0.3, 0.3, 0.3])
        sex = "F" if rng.random() < 0.5 else "M"
        start = rng.uniform(8, 60)
        site = rng.integers(0, 4)
        for s in range(count):
            if rng.random() < 0.2:
                site = (site + 1) % 4
            rows.append(
                {
                    "participant_id": f"sub-{i:03d}",
                    "session_id": f"ses-{s + 1}",
                    "site": f"site{site}",
                    "sex": sex,
                    "age": round(start + rng.uniform(0.5, 3) * s + rng.normal(0, 0.2), 3),
                    "source_file": f"sub-{i:03d}_ses-{s + 1}.nii",
                }
            )
    table = pd.DataFrame(rows)
    n = len(table)
    pid = pd.factorize(table.participant_id)[0]
    site = pd.factorize(table.site)[0]
    age = table.age.to_numpy()
    male = (table.sex == "M").to_numpy(float)
    for e in range(ELEMENT + 1):
        kind = e % 10
        intercept_sd = rng.choice([0, 0.05, 0.3, 1, 3])
        slope_sd = rng.choice([0, 1e-4, 1e-3, 0.01, 0.05, 0.2])
        rho = rng.uniform(-1, 1)
        if kind == 3:
            rho = rng.choice([-0.999, 0.999])
        u0 = rng.normal(0, 1, n_part)
        u1 = rho * u0 + np.sqrt(1 - rho**2) * rng.normal(0, 1, n_part)
        noise = rng.choice([0.1, 0.5, 1, 5])
        scale = rng.choice([1, 1e-2, 100])
        y = (
            2.5
            + 0.03 * age
            - 0.2 * male
            + intercept_sd * u0[pid]
            + slope_sd * u1[pid] * (age - age.mean())
            + rng.normal(0, noise, n)
        )
        if kind == 5:
            y += 0.5 * rng.normal(0, 1, 4)[site]
        if kind == 7:
            y = rng.normal(0, 1, n)
        y *= scale
        if kind in (2, 6, 9):
            y[rng.choice(n, rng.integers(1, n // 5), replace=False)] = np.nan
        if kind == 8:
            y[np.isin(pid, rng.choice(n_part, 3, replace=False))] = np.nan
    OUT.mkdir(parents=True, exist_ok=True)
    table.to_csv(OUT / "phenotypes.csv", index=False)
    values = pd.DataFrame({"y": y.astype(np.float32).astype(np.float64)})  # what the HDF5 holds
    values.to_csv(OUT / "values.csv", index=False, na_rep="NA", float_format="%.17g")


if __name__ == "__main__":
    main()
