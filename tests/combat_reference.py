"""neuroCombat 0.2.12 and neuroHarmonize 2.5.2 in their own virtual environment (their pins clash
with GreyArray's: numpy < 2), for the live tests and tests/combat/make_fixtures.py.

    python3 tests/combat_reference.py create [DIR]   # what .ci/run does before the tests

The environment is GREYARRAY_COMBAT_VENV (default ~/.cache/greyarray/combat-reference). Tests
skip without it on a laptop; under CI=1 they create it (PyPI, ~20 s) rather than skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy and pandas are imported where used: ``create`` runs before the
    import numpy as np  # project's dependencies are installed (.ci/run)
    import pandas as pd

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "combat" / "reference.py"
# What the references ran with when the fixtures were made (statsmodels >= 0.14.5 takes the
# generator neuroHarmonize passes for its cross-validation folds; numpy 1.x for neuroCombat).
PINS = [
    "neuroCombat==0.2.12",
    "neuroHarmonize==2.5.2",
    "numpy==1.26.4",
    "pandas==2.3.3",
    "scipy==1.17.1",
    "statsmodels==0.15.0",
    "patsy==1.0.3",
    "nibabel==5.4.2",
]


def venv() -> Path:
    default = Path.home() / ".cache" / "greyarray" / "combat-reference"
    return Path(os.environ.get("GREYARRAY_COMBAT_VENV", default))


def create(folder: Path) -> Path:
    """The environment with the pinned references (reused when its pins are these)."""
    python, stamp = folder / "bin" / "python", folder / "greyarray-pins.txt"
    if python.exists() and stamp.is_file() and stamp.read_text() == "\n".join(PINS):
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PINS], check=True)
    stamp.write_text("\n".join(PINS))
    return python


def python() -> Path:
    """The references' Python: skip without it on a laptop, make it in CI."""
    import pytest

    folder = venv()
    stamp = folder / "greyarray-pins.txt"
    if stamp.is_file() and stamp.read_text() == "\n".join(PINS):
        return folder / "bin" / "python"
    if os.environ.get("CI"):
        return create(folder)
    pytest.skip(f"no neuroCombat environment at {folder} (python3 {__file__} create)")


def run(
    interpreter: Path, folder: Path, values: np.ndarray, cohort: pd.DataFrame, calls: list[dict]
) -> dict[str, np.ndarray]:
    """Run the calls (tests/combat/reference.py) on ``values`` (subjects x elements)."""
    import numpy as np

    np.save(folder / "values.npy", values)
    cohort.to_csv(folder / "cohort.csv", index=False)
    request = {
        "values": str(folder / "values.npy"),
        "cohort": str(folder / "cohort.csv"),
        "output": str(folder / "reference.npz"),
        "calls": calls,
    }
    (folder / "request.json").write_text(json.dumps(request))
    done = subprocess.run(
        [str(interpreter), str(RUNNER), str(folder / "request.json")],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"reference run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    with np.load(folder / "reference.npz") as data:
        return dict(data)


def cohort_data(seed: int, n_elements: int, sizes: dict[str, int]):
    """(values, cohort): float32-exact values with site effects in location and scale, ages on
    a quarter-year grid (neuroCombat casts covariates to float32: these are exact), sex F/M (and
    0/1 for neuroHarmonize, which takes numbers only), rows shuffled across sites."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    site = np.repeat(list(sizes), list(sizes.values()))
    n = site.size
    age = np.round(rng.uniform(8, 80, n) * 4) / 4
    sex = rng.choice(["F", "M"], n)
    base = rng.normal(2.5, 0.3, n_elements)
    shift = {s: rng.normal(0, 0.2, n_elements) for s in sizes}
    scale = {s: rng.uniform(0.6, 1.6) for s in sizes}
    values = np.empty((n, n_elements))
    for i in range(n):
        trend = 0.01 * age[i] - 0.00008 * age[i] ** 2 + 0.1 * (sex[i] == "M")
        noise = scale[site[i]] * rng.normal(0, 0.15, n_elements)
        values[i] = base + trend + shift[site[i]] + noise
    order = rng.permutation(n)
    cohort = pd.DataFrame(
        {
            "source_file": [f"sub-{i:03d}_thickness.dscalar.nii" for i in range(n)],
            "site": site[order],
            "age": age[order],
            "sex": sex[order],
            "sexnum": (sex[order] == "M").astype(float),
        }
    )
    return values[order].astype(np.float32).astype(np.float64), cohort


NEUROCOMBAT_VARIANTS = {  # fixture name: neuroCombat's arguments
    "parametric": {},
    "nonparametric": {"parametric": False},
    "mean_only": {"mean_only": True},
    "mean_only_nonparametric": {"mean_only": True, "parametric": False},
    "no_eb": {"eb": False},
    "reference": {"ref_batch": "siteB"},
    "reference_nonparametric": {"ref_batch": "siteB", "parametric": False},
    "reference_mean_only": {"ref_batch": "siteB", "mean_only": True},
}


def neurocombat_calls(variants: dict[str, dict]) -> list[dict]:
    base = {"tool": "neuroCombat", "batch": "site", "categorical": ["sex"], "continuous": ["age"]}
    return [{"name": name, **base, **arguments} for name, arguments in variants.items()]


def new_subjects(cohort: pd.DataFrame, per_site: int = 2) -> list[int]:
    """Rows held out as new subjects: the first of every site (neuroHarmonize's
    harmonizationApply needs every training site among the new subjects)."""
    import numpy as np

    rows = []
    for site in sorted(cohort["site"].unique()):
        rows += [int(r) for r in np.flatnonzero(cohort["site"] == site)[:per_site]]
    return sorted(rows)


def neuroharmonize_calls(apply: list[int], seed: int = 0) -> list[dict]:
    base = {"tool": "neuroHarmonize", "batch": "site", "covariates": ["age", "sexnum"]}
    return [
        {"name": "gam", **base, "smooth_terms": ["age"], "seed": seed, "apply": apply},
        {"name": "linear", **base, "apply": apply},
    ]


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "create":
        sys.exit(f"usage: python3 {sys.argv[0]} create [DIR]")
    print(create(Path(sys.argv[2]) if len(sys.argv) > 2 else venv()))
