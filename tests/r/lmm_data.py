"""Makes tests/data/lmm/phenotypes.csv and values.csv (seeded): a longitudinal cohort with
families and sites, and elements covering what fit-lmm must match lme4 on.

40 participants in 16 families, 1 to 4 sessions each (unbalanced; 4 with a single session),
scanned at one of 3 sites per session (a participant can change site: site and participant are
crossed). Elements (columns), each a different truth:
  0-5   random intercept of varying size, random slopes of age of varying size
  6-7   no participant variance at all (REML fits are singular: lme4's isSingular)
  8-9   family and site effects (nested and crossed fits have both variances)
  10-11 a few missing values (NA) at random
  12    two participants' values missing entirely
  13    too few finite values (under ModelArray's threshold): not fitted
  14    a strong slope correlated with the intercept, age uncentred
  15    pure noise
Run from the repository: python3 tests/r/lmm_data.py
"""

from pathlib import Path

import numpy as np
import pandas as pd

OUT = Path(__file__).parent.parent / "data" / "lmm"


def main() -> None:
    rng = np.random.default_rng(2024)
    rows = []
    sessions = rng.choice([1, 2, 3, 4], size=40, p=[0.1, 0.35, 0.3, 0.25])
    sessions[:4] = 1
    for i, count in enumerate(sessions):
        family = f"fam{i % 16:02d}"
        sex = "F" if rng.random() < 0.5 else "M"
        start = rng.uniform(9, 14)
        site = rng.integers(0, 3)
        for s in range(count):
            if rng.random() < 0.2:  # moved to another site
                site = (site + 1) % 3
            rows.append(
                {
                    "participant_id": f"sub-{i:02d}",
                    "session_id": f"ses-{s + 1}",
                    "family_id": family,
                    "site": f"site{site}",
                    "sex": sex,
                    "age": round(start + 1.7 * s + rng.normal(0, 0.15), 3),
                    "source_file": f"sub-{i:02d}_ses-{s + 1}.dscalar.nii",
                }
            )
    table = pd.DataFrame(rows)
    n = len(table)
    pid = pd.factorize(table.participant_id)[0]
    fam = pd.factorize(table.family_id)[0]
    site = pd.factorize(table.site)[0]
    age = table.age.to_numpy()
    male = (table.sex == "M").to_numpy(float)
    columns = []
    for e in range(16):
        intercept_sd = [0.2, 0.5, 1.0, 2.0, 0.8, 1.5, 0, 0, 0.6, 0.6, 1, 1, 1, 1, 1.5, 0][e]
        slope_sd = [0, 0.05, 0.1, 0.2, 0.3, 0.02, 0, 0, 0, 0.05, 0.1, 0, 0.1, 0, 0.25, 0][e]
        u0 = rng.normal(0, 1, 40)
        u1 = rng.normal(0, 1, 40)
        if e == 14:
            u1 = -0.8 * u0 + 0.6 * u1
        y = (
            2.5
            + 0.04 * age
            - 0.1 * male
            + intercept_sd * u0[pid]
            + slope_sd * u1[pid] * (age - 12)
            + rng.normal(0, 0.4, n)
        )
        if e in (8, 9):
            y += 0.5 * rng.normal(0, 1, 16)[fam] + 0.7 * rng.normal(0, 1, 3)[site]
        if e == 15:
            y = rng.normal(0, 1, n)
        if e in (10, 11):
            y[rng.choice(n, 6, replace=False)] = np.nan
        if e == 12:
            y[np.isin(pid, [5, 9])] = np.nan
        if e == 13:
            y[rng.choice(n, n - 12, replace=False)] = np.nan
        columns.append(y)
    OUT.mkdir(parents=True, exist_ok=True)
    table.to_csv(OUT / "phenotypes.csv", index=False)
    # float32 values (what the HDF5 holds), written exactly: R reads the same numbers
    values = np.column_stack(columns).astype(np.float32).astype(np.float64)
    values = pd.DataFrame(values, columns=[f"e{e}" for e in range(16)])
    values.to_csv(OUT / "values.csv", index=False, na_rep="NA", float_format="%.17g")
    print(n, "observations")


if __name__ == "__main__":
    main()
