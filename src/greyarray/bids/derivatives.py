"""Make OUTPUT_DIR a BIDS derivatives dataset (BIDS 1.11.1).

``dataset_description.json`` (written once, under a lock, because parallel participant jobs start
together), ``.bidsignore`` for what BIDS has no rule for (HDF5, cohort CSVs, manifests, reports;
never the statistical maps), ``logs/`` with each run's configuration, and BIDS names and sidecars
for exported statistical maps (the statistics naming fitlins and nilearn use:
``contrast-<term>_stat-<statistic>_statmap``). The methods text is citation.py's.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import yaml

from greyarray import __version__
from greyarray.errors import OutputError
from greyarray.io.fileio import atomic_write, locked, make_folder, write_json
from greyarray.stats.names import MODEL_STATS, TERM_STATS

log = logging.getLogger(__name__)

BIDS_VERSION = "1.11.1"
CODE_URL = "https://github.com/greyarray/greyarray"
LOCK = ".greyarray.lock"
BIDSIGNORE = [
    LOCK,
    "logs/",
    "sub-*/*_greyarray.json",
    "*.h5",
    "*_cohort.csv",
    "*_modelarray.json",
    "*.html",
    "*.perm-shard-*.npz",  # group --model --permutation-shard: null distributions
]
LEGACY_BIDSIGNORE = ["group/"]  # hid the statistical maps (GreyArray 0.1.0)
# ModelArray statistic (after "<term>.") -> BIDS stat label; others: label() of the name
STAT_LABELS = {
    "estimate": "effect",
    "std.error": "se",
    "statistic": "statistic",
    "p.value": "p",
    "p.value.fdr": "pfdr",
    "p.value.fwe": "pfwe",
    "tfce": "tfce",
    "tfce.p.value.fwe": "tfcepfwe",
    "tfce.1m.p.value.fwe": "1mtfcepfwe",
    "cor": "corr",
}
KNOWN = sorted(
    {
        *TERM_STATS,
        *MODEL_STATS,
        *STAT_LABELS,
        "edf",
        "ref.df",
        "dev.expl",
        "delta.adj.rsq",
        "partial.rsq",
    },
    key=len,
    reverse=True,
)


def container() -> dict | None:
    """``GeneratedBy.Container`` from variables the images set (GREYARRAY_CONTAINER_*)."""
    kind = os.environ.get("GREYARRAY_CONTAINER_TYPE")
    if not kind:
        return None
    default = f"greyarray-{__version__}.sif" if kind == "apptainer" else f"greyarray:{__version__}"
    info = {"Type": kind, "Tag": os.environ.get("GREYARRAY_CONTAINER_TAG", default)}
    if uri := os.environ.get("GREYARRAY_CONTAINER_URI"):
        info["URI"] = uri
    return info


def description(sources: list[Path]) -> dict:
    generated = {
        "Name": "greyarray",
        "Version": __version__,
        "Description": "CIFTI-2 and NIfTI maps to ModelArray's HDF5 layout, and results back",
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
    make_folder(output_dir)
    with locked(output_dir / LOCK):
        path = output_dir / "dataset_description.json"
        if not path.exists():
            write_json(path, description(sources), indent=2)
        ignore = output_dir / ".bidsignore"
        lines = ignore.read_text().splitlines() if ignore.exists() else []
        kept = [line for line in lines if line not in LEGACY_BIDSIGNORE]
        missing = [entry for entry in BIDSIGNORE if entry not in kept]
        if missing or kept != lines:
            atomic_write(ignore, ("\n".join(kept + missing) + "\n").encode())


def write_config(logs_dir: Path, name: str, config: dict) -> Path:
    """The run's resolved options as YAML, for the record."""
    make_folder(logs_dir)
    path = logs_dir / name
    atomic_write(path, yaml.safe_dump(config, sort_keys=False).encode())
    return path


def label(text: str) -> str:
    """A BIDS label (alphanumeric) from any name: ``alff_desc-smooth`` -> ``alffDescSmooth``."""
    camel = re.sub(r"[^A-Za-z0-9]+([A-Za-z0-9])", lambda m: m.group(1).upper(), text)
    return re.sub(r"[^A-Za-z0-9]", "", camel)


def split_column(column: str) -> tuple[str, str]:
    """ModelArray's ``<term>.<statistic>`` column name -> (term, statistic). fit-lmm's random
    effects ``<group>.sd.<coef>`` and ``<group>.cor.<coef1>.<coef2>`` -> (``<group>.<coef>``,
    sd) and (``<group>.<coef1>:<coef2>``, cor)."""
    for marker in (".sd.", ".cor."):
        if marker in column:
            group, coefs = column.split(marker, 1)
            if marker == ".cor.":
                coefs = ":".join(coefs.split(".", 1))
            return f"{group}.{coefs}", marker.strip(".")
    for stat in KNOWN:
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
    stat_label = STAT_LABELS.get(base) or label(base.replace("p.value", "p"))
    if stat.startswith("1m."):
        stat_label = f"1m{stat_label}"
    contrast = label(term.replace(":", "X"))
    desc = label(scalar) + label(analysis)[:1].upper() + label(analysis)[1:]
    prefix = f"{entities}_" if entities else ""
    return f"{prefix}desc-{desc}_contrast-{contrast}_stat-{stat_label}_statmap{ext}"


def describe_column(column: str) -> str:
    """What a statistical map holds, in words, for its sidecar."""
    _, stat = split_column(column)
    words = {
        "p.value": "p-value (uncorrected)",
        "p.value.fdr": "p-value corrected for the false discovery rate over elements "
        "(Benjamini-Hochberg)",
        "p.value.fwe": "p-value corrected for the family-wise error rate over elements "
        "(permutations, maximum statistic)",
        "tfce.p.value.fwe": "family-wise error corrected p-value of the TFCE score",
        "tfce": "threshold-free cluster enhancement score",
        "tfce.1m.p.value.fwe": "1 - family-wise error corrected p-value of the TFCE score, "
        "for display",
        "estimate": "estimate (effect size in the scalar's units per unit of the term)",
        "statistic": "test statistic",
        "std.error": "standard error of the estimate",
        "df": "degrees of freedom of the t test (Satterthwaite, as lmerTest computes them)",
        "sd": "standard deviation of the random effect (lme4's VarCorr), or of the residual",
        "cor": "correlation of the two random effects (lme4's VarCorr)",
        "logLik": "log-likelihood (the REML criterion under REML, as lme4's logLik)",
        "singular": "1 where the fit is singular (lme4's isSingular), else 0",
        "converged": "1 where the optimiser converged, else 0",
    }
    base = stat.removeprefix("1m.")
    text = words.get(base, base)
    return f"1 - {text}, for display" if stat.startswith("1m.") else text


def statmap_path(folder: Path, meta: dict, analysis: str, column: str, ext: str) -> Path:
    from greyarray.bids.discover import KEYS

    entities = "_".join(
        f"{KEYS[k]}-{v}"
        for k, v in meta["Entities"].items()
        if k not in ("stat", "param", "desc")  # the scalar's name is in desc
    )
    name = statmap_name(entities, meta["Scalar"], analysis, column, ext)
    return folder / name


def sidecar_of(path: Path) -> Path:
    return path.with_name(path.name.split(".")[0] + ".json")


def analysis_label(analysis: str) -> str:
    """What the analysis contributes to a statistical map's desc: two analyses whose keys are
    equal (``lm``/``Lm``, ``my_lm``/``myLm``; case too, for macOS's file systems) would write
    the same files."""
    return label(analysis).casefold()


def write_statmaps(
    h5_path: Path, meta: dict, analysis: str, about: dict, overwrite: bool = False
) -> list[Path]:
    """Export results/<analysis> of a group HDF5 as BIDS statistical maps beside it, each with a
    JSON sidecar saying what it holds and where it comes from. ``meta`` is the HDF5's sidecar
    (scalar, entities); ``about`` adds what the caller knows (model, counts, threshold rule).
    The set appears whole or not at all (written in a private folder, then moved).

    Maps a user already has are never silently replaced: a map of another analysis at one of
    the names is refused; maps of an earlier export of this analysis that differ from the new
    ones (results refitted or rewritten by R) are replaced, and those no longer produced
    removed, only with ``overwrite``."""
    from greyarray.io import export
    from greyarray.io.fileio import staging
    from greyarray.io.inputs import open_hdf5
    from greyarray.io.names import unique_files

    with open_hdf5(h5_path) as h5:
        geometry = export.resolve_geometry(h5, None)
        results = export.read_results(h5, analysis, geometry.n_elements)
    folder = h5_path.parent
    files = unique_files(
        export.output_names(results),
        lambda c: statmap_path(folder, meta, analysis, c, geometry.extension),
        f"{h5_path}: results/{analysis} columns",
    )
    for path in files:
        _refuse_foreign(path, h5_path.name, analysis, overwrite)
    paths = {column: path for path, column in files.items()}
    earlier = set(exported_statmaps(folder, h5_path.name, {analysis}))
    stale = earlier - set(files) - {sidecar_of(path) for path in files}
    writer, changed = geometry.writer(), 0
    with staging(folder) as private:
        for column, values in export.result_maps(results):
            path, data = paths[column], writer.encode(values, column)
            same = path in earlier and path.read_bytes() == data
            changed += path in earlier and not same
            if not same:  # an unchanged map is left as it is (its file, its times)
                (private / path.name).write_bytes(data)
            sidecar = {
                "ModelArrayColumn": column,
                "Description": describe_column(column),
                "Scalar": meta["Scalar"],
                "Analysis": analysis,
                "SourceHDF5": h5_path.name,
                "CohortFile": meta.get("CohortFile"),
                **about,
            }
            if (text := _sidecar_text(sidecar_of(path), sidecar)) is not None:
                (private / sidecar_of(path).name).write_text(text)
        if (changed or stale) and not overwrite:
            raise OutputError(
                f"{folder}: {changed + sum(p.suffix == '.nii' for p in stale)} statistical maps "
                f"exported earlier from "
                f"results/{analysis} of {h5_path.name} differ from its results now; they were "
                "left as they are. Use --overwrite to replace them, or another --analysis-name"
            )
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.warning("Removed %d statistical map files of an earlier %s", len(stale), analysis)
    return list(files)


# what GreyArray writes into a statistical map's sidecar (bids/results.py's ``about`` too)
SIDECAR_KEYS = {
    "ModelArrayColumn", "Description", "Scalar", "Analysis", "SourceHDF5", "CohortFile",
    "Model", "FittedBy", "NumberOfRows", "ElementThreshold", "Permutations", "Method",
    "Smoothing", "NumberOfRowsWithPhenotypes", "ReferenceLevels", "OrderedFactors", "Offset",
    "AliasedColumnsLeftOut", "Warnings", "Harmonization", "NotHarmonized",
}  # fmt: skip


def _sidecar_text(path: Path, ours: dict) -> str | None:
    """The sidecar to write, None when the one there already says it all: what a user added
    (notes, keys of their own) is kept, what GreyArray wrote is brought up to date."""
    try:
        there = json.loads(path.read_text())
    except (OSError, ValueError):
        there = None
    if not isinstance(there, dict):
        return json.dumps(ours, indent=1) + "\n"
    kept = {k: v for k, v in there.items() if k in ours or k not in SIDECAR_KEYS}
    merged = {**kept, **ours}
    if merged == there:
        return None
    return json.dumps(merged, indent=1) + "\n"


def _refuse_foreign(path: Path, h5_name: str, analysis: str, overwrite: bool) -> None:
    """A map at ``path`` that another analysis (or HDF5) wrote is the user's: never replaced."""
    if not path.exists():
        return
    try:
        info = json.loads(sidecar_of(path).read_text())
        owner = (info.get("SourceHDF5"), info.get("Analysis"))
    except (OSError, ValueError, AttributeError):  # no sidecar: a file of unknown origin
        owner = None
    if owner == (h5_name, analysis) or (owner is None and overwrite):
        return
    whose = f"analysis {owner[1]!r} of {owner[0]}" if owner else "unknown origin (no sidecar)"
    raise OutputError(
        f"{path}: exists, from {whose}; analysis {analysis!r} would replace it. Use another "
        "--analysis-name" + ("" if owner else ", or --overwrite")
    )


def exported_statmaps(folder: Path, h5_name: str, analyses: set[str]) -> list[Path]:
    """The statistical maps (and sidecars) exported from these analyses of one HDF5: only the
    exact names GreyArray writes (a user's ``...statmap.mycopy.dscalar.nii`` is theirs), and
    a sidecar that is not GreyArray's (not a JSON object) is skipped."""
    from greyarray.io.spaces import MAP_EXTENSIONS

    found = []
    for sidecar in folder.glob("*_statmap.json"):
        try:
            info = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict):
            continue
        if info.get("SourceHDF5") == h5_name and info.get("Analysis") in analyses:
            stem = sidecar.name[: -len(".json")]
            maps = [folder / f"{stem}{ext}" for ext in MAP_EXTENSIONS]
            found += [sidecar, *(path for path in maps if path.exists())]
    return found
