"""Make OUTPUT_DIR a BIDS derivatives dataset (BIDS 1.11.1).

``dataset_description.json`` (written once, under a lock, because parallel participant jobs start
together), ``.bidsignore`` for what BIDS has no rule for (HDF5, cohort CSVs, manifests), ``logs/``
with the run's configuration and the methods boilerplate assembled from the templates in the
top-level ``boilerplate/`` folder, and BIDS names for exported statistical maps (the statistics
naming fitlins and nilearn use: ``contrast-<term>_stat-<statistic>_statmap``).
"""

from __future__ import annotations

import logging
import os
import re
from importlib.resources import files
from pathlib import Path
from string import Template

import yaml

from greyarray import __version__
from greyarray.io.fileio import atomic_write, locked, write_json
from greyarray.stats.lm import MODEL_STATS, TERM_STATS

log = logging.getLogger(__name__)

BIDS_VERSION = "1.11.1"
CODE_URL = "https://github.com/greyarray/greyarray"
BIDSIGNORE = [
    "group/",
    "logs/",
    "sub-*/*_greyarray.json",
    "*.h5",
    "*_cohort.csv",
    "*_modelarray.json",
]
# ModelArray column suffix -> BIDS statistic label (others: non-alphanumerics dropped)
STATS = {"estimate": "effect", "std.error": "se", "statistic": "statistic", "p.value": "p"}
KNOWN = [*TERM_STATS, *MODEL_STATS, "edf", "ref.df", "dev.expl"]  # + GAM statistics


def container() -> dict | None:
    """``GeneratedBy.Container`` from variables the images set (GREYARRAY_CONTAINER_*)."""
    kind = os.environ.get("GREYARRAY_CONTAINER_TYPE")
    if not kind:
        return None
    info = {"Type": kind, "Tag": os.environ.get("GREYARRAY_CONTAINER_TAG", __version__)}
    if uri := os.environ.get("GREYARRAY_CONTAINER_URI"):
        info["URI"] = uri
    return info


def description(sources: list[Path]) -> dict:
    generated = {
        "Name": "greyarray",
        "Version": __version__,
        "Description": "CIFTI-2 maps to ModelArray's HDF5 layout, and results back",
        "CodeURL": CODE_URL,
    }
    if image := container():
        generated["Container"] = image
    return {
        "Name": "GreyArray: greyordinate maps prepared for ModelArray",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [{"URL": Path(s).resolve().as_uri()} for s in sources],
        "HowToAcknowledge": "Please cite ModelArray (Zhao et al., 2023, NeuroImage, "
        "doi:10.1016/j.neuroimage.2023.120037) and GreyArray; the methods text "
        "and references are in logs/CITATION.md and logs/CITATION.bib.",
    }


def init_dataset(output_dir: Path, sources: list[Path]) -> None:
    """dataset_description.json and .bidsignore, created once even when jobs start together."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with locked(output_dir / ".greyarray.lock"):
        path = output_dir / "dataset_description.json"
        if not path.exists():
            write_json(path, description(sources), indent=2)
        ignore = output_dir / ".bidsignore"
        lines = ignore.read_text().splitlines() if ignore.exists() else []
        missing = [entry for entry in BIDSIGNORE if entry not in lines]
        if missing:
            atomic_write(ignore, ("\n".join(lines + missing) + "\n").encode())


def write_config(logs_dir: Path, name: str, config: dict) -> Path:
    """The run's resolved options as YAML, for the record."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    path = logs_dir / name
    atomic_write(path, yaml.safe_dump(config, sort_keys=False).encode())
    return path


def _template(name: str) -> str:
    return (files("greyarray") / "boilerplate" / name).read_text(encoding="utf-8")


def write_citation(logs_dir: Path, facts: dict, analysis: dict | None = None) -> Path:
    """logs/CITATION.md (methods text filled from the run) and logs/CITATION.bib."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    facts = {
        **facts,
        "analysis_text": Template(_template("analysis.md")).substitute(analysis)
        if analysis
        else "",
    }
    text = Template(_template("methods.md")).substitute(facts) + _template("copyright.md")
    bib = _template("references.bib")
    keys = re.findall(r"@\w+\{([^,]+),", bib)
    cited = [key for key in keys if f"@{key}" in text]
    text += "".join(f"- [@{key}]\n" for key in cited)
    atomic_write(logs_dir / "CITATION.md", text.encode())
    atomic_write(logs_dir / "CITATION.bib", bib.encode())
    return logs_dir / "CITATION.md"


def label(text: str) -> str:
    """A BIDS label (alphanumeric) from any name: ``alff_desc-smooth`` -> ``alffDescSmooth``."""
    camel = re.sub(r"[^A-Za-z0-9]+([A-Za-z0-9])", lambda m: m.group(1).upper(), text)
    return re.sub(r"[^A-Za-z0-9]", "", camel)


def split_column(column: str) -> tuple[str, str]:
    """ModelArray's ``<term>.<statistic>`` column name -> (term, statistic)."""
    for stat in sorted(KNOWN, key=len, reverse=True):
        for prefix in ("1m.", ""):
            key = f".{prefix}{stat}"
            if key in column:
                term, rest = column.split(key, 1)
                return term, f"{prefix}{stat}{rest}"
    term, _, stat = column.partition(".")
    return term, stat or "value"


def statmap_name(entities: str, scalar: str, analysis: str, column: str, ext: str) -> str:
    """``<entities>_desc-<scalar><Analysis>_contrast-<term>_stat-<stat>_statmap<ext>``."""
    term, stat = split_column(column)
    base = stat.removeprefix("1m.")
    stat_label = STATS.get(base) or label(base.replace("p.value", "p"))
    for method in re.findall(r"p\.value\.(\w+)", base):
        stat_label = f"p{method}"
    if stat.startswith("1m."):
        stat_label = f"1m{stat_label}"
    contrast = label(term.replace(":", "X"))
    desc = label(scalar) + label(analysis)[:1].upper() + label(analysis)[1:]
    prefix = f"{entities}_" if entities else ""
    return f"{prefix}desc-{desc}_contrast-{contrast}_stat-{stat_label}_statmap{ext}"


def write_statmaps(h5_path: Path, meta: dict, analysis: str) -> list[Path]:
    """Export results/<analysis> of a group HDF5 as BIDS statistical maps beside it, each with a
    JSON sidecar naming its ModelArray column; ``meta`` is the HDF5's sidecar (scalar, entities)."""
    import h5py

    from greyarray.bids.discover import KEYS
    from greyarray.io import cifti, export

    with h5py.File(h5_path, "r") as h5:
        geometry = export.resolve_geometry(h5, None)
        results = export.read_results(h5, analysis, geometry.n_elements)
    entities = "_".join(
        f"{KEYS[k]}-{v}" for k, v in meta["Entities"].items() if k not in ("stat", "desc")
    )
    writer = cifti.CiftiWriter(geometry)
    paths = []
    for column, values in export.result_maps(results):
        ext = cifti.EXTENSIONS[geometry.kind]
        path = h5_path.parent / statmap_name(entities, meta["Scalar"], analysis, column, ext)
        writer.write(path, values, column)
        sidecar = {
            "ModelArrayColumn": column,
            "Scalar": meta["Scalar"],
            "Analysis": analysis,
            "SourceHDF5": h5_path.name,
        }
        if ".1m." in f".{column}":
            sidecar["Description"] = "1 - p-value, for display"
        write_json(path.with_name(path.name.split(".")[0] + ".json"), sidecar)
        paths.append(path)
    return paths
