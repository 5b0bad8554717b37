"""Run neuroCombat 0.2.12 and neuroHarmonize 2.5.2 on stored inputs: executed by the Python of
their own virtual environment (tests/combat_reference.py makes it), never imported by GreyArray.

    python reference.py REQUEST.json

REQUEST.json: {"values": "Y.npy" (subjects x elements), "cohort": "cohort.csv",
"output": "out.npz", "calls": [{"name", "tool": "neuroCombat" | "neuroHarmonize", ...}]}.
neuroCombat calls give batch, categorical, continuous, eb, parametric, mean_only, ref_batch;
neuroHarmonize calls give batch, covariates (numeric), smooth_terms, eb, ref_batch, seed, and
optionally "apply": rows of the cohort that are new subjects (harmonizationApply), the others
training rows. The output holds <name> (harmonized, subjects x elements), <name>.gamma_star and
<name>.delta_star, and for applied models <name>.apply.
"""

import json
import sys

import numpy as np
import pandas as pd

# neuroCombat's reference-batch path calls np.int, which NumPy 1.24 removed: alias it
np.int = int

from neuroCombat import neuroCombat  # noqa: E402
from neuroHarmonize import harmonizationApply, harmonizationLearn  # noqa: E402


def main(path: str) -> None:
    with open(path) as handle:
        request = json.load(handle)
    values = np.load(request["values"])
    cohort = pd.read_csv(request["cohort"], dtype={request["calls"][0]["batch"]: str})
    out = {}
    for call in request["calls"]:
        name = call["name"]
        if call["tool"] == "neuroCombat":
            columns = [call["batch"], *call.get("categorical", []), *call.get("continuous", [])]
            done = neuroCombat(
                dat=values.T.copy(),
                covars=cohort[columns].copy(),
                batch_col=call["batch"],
                categorical_cols=call.get("categorical", []),
                continuous_cols=call.get("continuous", []),
                eb=call.get("eb", True),
                parametric=call.get("parametric", True),
                mean_only=call.get("mean_only", False),
                ref_batch=call.get("ref_batch"),
            )
            out[name] = done["data"].T
            out[f"{name}.gamma_star"] = np.asarray(done["estimates"]["gamma.star"], float)
            out[f"{name}.delta_star"] = np.asarray(done["estimates"]["delta.star"], float)
            continue
        covars = cohort[[call["batch"], *call["covariates"]]].rename(
            columns={call["batch"]: "SITE"}
        )
        new = np.zeros(len(cohort), bool)
        new[call.get("apply", [])] = True
        model, harmonized = harmonizationLearn(
            values[~new],
            covars[~new].reset_index(drop=True),
            eb=call.get("eb", True),
            smooth_terms=call.get("smooth_terms", []),
            ref_batch=call.get("ref_batch"),
            seed=call.get("seed"),
        )
        out[name] = harmonized
        out[f"{name}.gamma_star"] = np.asarray(model["gamma_star"], float)
        out[f"{name}.delta_star"] = np.asarray(model["delta_star"], float)
        if new.any():
            out[f"{name}.apply"] = harmonizationApply(
                values[new], covars[new].reset_index(drop=True), model
            )
    np.savez(request["output"], **out)


if __name__ == "__main__":
    main(sys.argv[1])
