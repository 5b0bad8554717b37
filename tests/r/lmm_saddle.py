"""Makes tests/data/lmm/saddle.csv (seeded): responses on tests/data/lmm/phenotypes.csv whose
correlated random slope (y ~ age + sex + (1 + age | participant_id)) has its optimum away
from theta = 0 although, at theta = 0, the criterion rises along each diagonal on its own: it
falls only along a mixed direction (intercept and slope growing together). An optimiser that
stops at theta = 0 (zero gradient, diagonals at their bound, each curving upwards) is at a
saddle. Reference criteria: tests/r/lmm_fixtures.sh (default_saddle*, tight_saddle*).
Run from the repository: python3 tests/r/lmm_saddle.py
"""

from pathlib import Path

import numpy as np
import pandas as pd

DATA = Path(__file__).parent.parent / "data" / "lmm"
# (seed, intercept SD, slope SD, correlation): small random effects beside a residual SD 0.4
TRUTHS = [(2, 0.1, 0.02, 0.5), (1, 0.02, 0.05, -0.6), (2, 0.2, 0.01, -0.9), (34, 0.02, 0.05, -0.6)]


def main() -> None:
    table = pd.read_csv(DATA / "phenotypes.csv")
    pid = pd.factorize(table.participant_id)[0]
    age = table.age.to_numpy()
    male = (table.sex == "M").to_numpy(float)
    columns = {}
    for seed, intercept_sd, slope_sd, rho in TRUTHS:
        rng = np.random.default_rng(seed)
        u0 = rng.normal(0, 1, pid.max() + 1)
        u1 = rho * u0 + np.sqrt(1 - rho**2) * rng.normal(0, 1, pid.max() + 1)
        y = (
            2.5
            + 0.04 * age
            - 0.1 * male
            + intercept_sd * u0[pid]
            + slope_sd * u1[pid] * (age - 12)
            + rng.normal(0, 0.4, len(table))
        )
        columns[f"s{len(columns)}"] = y.astype(np.float32).astype(np.float64)  # what the HDF5 holds
    pd.DataFrame(columns).to_csv(DATA / "saddle.csv", index=False, float_format="%.17g")


if __name__ == "__main__":
    main()
