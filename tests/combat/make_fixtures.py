"""Make tests/data/combat/: a cohort, its values and what neuroCombat 0.2.12 and neuroHarmonize
2.5.2 compute from them (every neuroCombat option; ComBat-GAM with s(age), seed 0, and
harmonizationApply to held-out subjects; the linear model applied too).

    python3 tests/combat/make_fixtures.py    # needs the reference environment (see
                                             # tests/combat_reference.py); ~15 s
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import combat_reference as ref  # noqa: E402

OUT = HERE.parent / "data" / "combat"
SEED, N_ELEMENTS = 20260518, 100
SIZES = {"siteA": 10, "siteB": 12, "siteC": 14, "siteD": 12}


def main() -> None:
    values, cohort = ref.cohort_data(SEED, N_ELEMENTS, SIZES)
    held_out = ref.new_subjects(cohort)
    calls = ref.neurocombat_calls(ref.NEUROCOMBAT_VARIANTS) + ref.neuroharmonize_calls(held_out)
    with tempfile.TemporaryDirectory() as tmp:
        results = ref.run(ref.create(ref.venv()), Path(tmp), values, cohort, calls)
    OUT.mkdir(parents=True, exist_ok=True)
    cohort.to_csv(OUT / "cohort.csv", index=False)
    wanted = {name: results[name] for name in [*ref.NEUROCOMBAT_VARIANTS, "gam", "linear"]} | {
        "gam.apply": results["gam.apply"],
        "linear.apply": results["linear.apply"],
    }
    np.savez_compressed(OUT / "expected.npz", values=values, held_out=held_out, **wanted)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
