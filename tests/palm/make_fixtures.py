"""Make tests/data/palm/: PALM's exhaustive FWE p-values where PALM needs minutes (8! = 40,320
permutations: ~3 min each in Octave). Run from the repository root:

    python3 tests/palm/make_fixtures.py [PALM_DIR]

Each fixture folder holds the inputs (cohort.csv: source_file and phenotypes; values.csv:
subjects x elements) and PALM's output (palm_fwep.csv: one column per tested term, R's names).
The design PALM gets is GreyArray's own model matrix of the formula, so both fit the same model.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS.parent / "src")]

import palm_reference  # noqa: E402

from greyarray.stats import design as design_layer  # noqa: E402

FIXTURES = TESTS / "data" / "palm"
FORMULAS = {"exhaustive": "y ~ age + w", "blocks": "y ~ age + group"}


def exhaustive(rng) -> tuple[pd.DataFrame, np.ndarray, None]:
    """8 subjects, continuous covariates: all 8! permutations of each."""
    n = 8
    phenotypes = pd.DataFrame(
        {
            "source_file": [f"sub-{i:02d}.dscalar.nii" for i in range(n)],
            "age": rng.uniform(20, 70, n).round(1),
            "w": rng.normal(0, 1, n).round(3),
        }
    )
    values = rng.normal(0, 1, (n, 20)) + 0.04 * phenotypes["age"].to_numpy()[:, None]
    return phenotypes, _float32(values), None


def blocks(rng) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """8 participants x 2 sessions, whole-block permutation: 8! for age (varies within
    participant), 8!/(4! 4!) = 70 for group (constant within participant: tied blocks)."""
    participant = np.repeat(np.arange(1, 9), 2)
    order = rng.permutation(16)  # sessions interleaved in the file order
    participant = participant[order]
    group = np.where(np.isin(participant, [2, 3, 5, 8]), "pat", "ctl")
    phenotypes = pd.DataFrame(
        {
            "source_file": [f"sub-{p:02d}_ses-{i}.dscalar.nii" for i, p in enumerate(participant)],
            "participant_id": [f"sub-{p:02d}" for p in participant],
            "age": rng.uniform(20, 70, 16).round(1),
            "group": group,
        }
    )
    values = rng.normal(0, 1, (16, 20)) + 0.5 * (group == "pat")[:, None]
    return phenotypes, _float32(values), participant


def _float32(values: np.ndarray) -> np.ndarray:
    """Values a float32 HDF5 stores exactly, so that PALM and GreyArray see the same data."""
    return values.astype(np.float32).astype(np.float64)


def main(palm_dir: str | None = None) -> None:
    if palm_dir:
        palm_reference.PALM = Path(palm_dir)
    rng = np.random.default_rng(20260101)
    made = {"exhaustive": exhaustive(rng), "blocks": blocks(rng)}
    analyses = []
    for name, (phenotypes, values, eb) in made.items():
        design = design_layer.build_design(FORMULAS[name], phenotypes)
        tested = [c for c in design.columns if c != "Intercept"]
        contrasts = np.array([[float(c == t) for c in design.columns] for t in tested])
        analyses.append(
            palm_reference.Analysis(
                name, values, design.matrix, contrasts, blocks=eb, permutations=50000
            )
        )
    with tempfile.TemporaryDirectory() as tmp:
        palm_reference.run(Path(tmp), analyses)
        for name, (phenotypes, values, _) in made.items():
            folder = FIXTURES / name
            folder.mkdir(parents=True, exist_ok=True)
            phenotypes.to_csv(folder / "cohort.csv", index=False)
            pd.DataFrame(values).to_csv(folder / "values.csv", index=False, float_format="%.17g")
            tested = [c for c in design_layer.build_design(FORMULAS[name], phenotypes).columns[1:]]
            fwep = {
                term: palm_reference.read(Path(tmp), name, "dat_tstat_fwep", i + 1)
                for i, term in enumerate(tested)
            }
            pd.DataFrame(fwep).to_csv(folder / "palm_fwep.csv", index=False)
            (folder / "formula.txt").write_text(FORMULAS[name] + "\n")
            print(f"wrote {folder}")


if __name__ == "__main__":
    main(*sys.argv[1:])
