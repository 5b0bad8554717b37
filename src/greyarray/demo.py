"""Synthetic cohorts on the real fsLR 91k geometry: for the demo, the tests and the benchmark.

The bundled ``ones.dscalar.nii`` (CIFTI-2 reference data, public domain) supplies the header; each
subject gets a thickness-like map (smooth spatial pattern + an age effect + noise), float32, with
its own map name.
"""

from __future__ import annotations

import logging
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd

from greyarray import cifti

log = logging.getLogger(__name__)


def template_path() -> Path:
    """The bundled 91k dscalar template."""
    return Path(str(files("greyarray") / "data" / "ones.dscalar.nii"))


def phenotypes(n: int, seed: int = 0) -> pd.DataFrame:
    """Ages and sexes for ``n`` subjects, labelled sub-001, sub-002, ..."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "participant_id": [f"sub-{i + 1:03d}" for i in range(n)],
            "age": np.round(rng.uniform(8, 80, n), 1),
            "sex": rng.choice(["F", "M"], n),
        }
    )


def thickness_maps(n_elements: int, table: pd.DataFrame, seed: int = 0):
    """Yield one float32 map per row of ``table``: 2.5 mm +- pattern, thinning with age, noise."""
    rng = np.random.default_rng(seed + 1)
    index = np.arange(n_elements)
    pattern = 0.4 * np.sin(index / 900.0) + 0.2 * np.cos(index / 131.0)
    ageing = -0.004 * (1 + np.sin(index / 5000.0))  # mm per year, varies over the brain
    for age in table["age"]:
        noise = rng.normal(0.0, 0.15, n_elements)
        yield (2.5 + pattern + ageing * (age - 40) + noise).astype(np.float32)


def write_cohort(folder: Path, n: int, seed: int = 0, template: Path | None = None) -> Path:
    """Write ``n`` subject dscalars and a cohort CSV (relative paths) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    geometry = cifti.read_file(template or template_path()).geometry
    writer = cifti.CiftiWriter(geometry)
    table = phenotypes(n, seed)
    sources = []
    maps = thickness_maps(geometry.n_elements, table, seed)
    for subject, values in zip(table["participant_id"], maps, strict=True):
        name = f"{subject}_thickness.dscalar.nii"
        writer.write(folder / name, values, f"{subject}_thickness")
        sources.append(name)
    cohort = table.assign(scalar_name="thickness", source_file=sources)
    path = folder / "cohort.csv"
    cohort[["scalar_name", "source_file", "participant_id", "age", "sex"]].to_csv(path, index=False)
    return path


def run_demo(folder: Path, n_subjects: int = 20, overwrite: bool = False) -> int:
    """Build a cohort in ``folder`` and convert it to ``folder/modelarray.h5``."""
    from greyarray.cli import default_nprocs
    from greyarray.cohort import load_cohort
    from greyarray.store import StoreOptions, to_modelarray

    log.info("Writing %d synthetic subjects on the fsLR 91k template to %s", n_subjects, folder)
    cohort = load_cohort(write_cohort(folder / "inputs", n_subjects))
    output = folder / "modelarray.h5"
    to_modelarray(cohort, output, StoreOptions(nprocs=default_nprocs()), overwrite=overwrite)
    print(
        f"Cohort: {cohort.path}\nHDF5:   {output}\nNext, in R:\n"
        f'  ma <- ModelArray("{output}", scalar_types = c("thickness"))\n'
        f'  phen <- read.csv("{cohort.path}")\n'
        f'  res <- ModelArray.lm(thickness ~ age + sex, ma, phen, "thickness")'
    )
    return 0
