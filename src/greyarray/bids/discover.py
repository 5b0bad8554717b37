"""Find the maps of a BIDS dataset with pybids (CIFTI-2, and NIfTI maps in a standard space),
and group them into scalars.

BIDS_DIR may be a derivatives dataset (XCP-D, fMRIPrep, QSIRecon, ASLPrep, ...) or a raw dataset
whose derivatives are given with ``--derivatives`` or found in ``derivatives/``. Each dataset is
indexed by its own BIDSLayout: no validation, no metadata, only the selected subjects, and the
derivative entities pybids 0.22 does not know (``stat``, ``param``, ``cohort``) registered so
that ``stat-alff`` and ``stat-reho``, ``param-fa`` and ``param-md`` never merge.

NIfTI maps are the parametric maps of BIDS derivatives (suffixes ``NIFTI_SUFFIXES``: QSIRecon's
``dwimap``, ASLPrep's ``cbf`` and ``att``, XCP-D's ``boldmap``) in a standard space (a ``space``
entity that is not an individual's: ``NATIVE_SPACES``); each gets the matching subject mask
(``desc-brain_mask`` of the same participant, session, space and resolution:
``subject_masks``). Names that are not BIDS (HCP's ``100307.thickness.32k_fs_LR...``) are found
with regular expressions from the config file.

A scalar is one kind of map: by default every distinct combination of entities other than
subject, session and run (so the space is part of it), named after its ``stat`` or ``param``
(or suffix) plus whatever entities tell it
apart from the others (``alff``, ``alff_desc-smooth``, ``thickness_den-32k``); the config or the
BIDS filter file can instead name scalars and give their queries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from greyarray.errors import DataError, GreyArrayError, MissingInputError

log = logging.getLogger(__name__)

CIFTI_EXTENSIONS = (".dscalar.nii", ".pscalar.nii", ".pconn.nii")
NIFTI_EXTENSIONS = (".nii.gz", ".nii")
NIFTI_SUFFIXES = ("dwimap", "cbf", "att", "boldmap")  # QSIRecon, ASLPrep, XCP-D parametric maps
# spaces of one individual: maps in them are not on a common grid across participants
NATIVE_SPACES = {"T1w", "T2w", "dwi", "ACPC", "orig", "fsnative", "boldref", "func", "anat", "asl"}
# Derivative entities pybids 0.22 lacks (re-declaring one it has crashes its database).
EXTRA_ENTITIES = {
    "name": "greyarray",
    "entities": [
        {"name": "stat", "pattern": "[_/\\\\]+stat-([a-zA-Z0-9+]+)"},
        {"name": "param", "pattern": "[_/\\\\]+param-([a-zA-Z0-9+]+)"},
        {"name": "cohort", "pattern": "[_/\\\\]+cohort-([a-zA-Z0-9+]+)"},
    ],
}
# pybids entity name -> BIDS key, in the BIDS filename order, for readable scalar names
KEYS = {
    "task": "task",
    "acquisition": "acq",
    "ceagent": "ce",
    "reconstruction": "rec",
    "direction": "dir",
    "echo": "echo",
    "part": "part",
    "space": "space",
    "cohort": "cohort",
    "atlas": "atlas",
    "segmentation": "seg",
    "res": "res",
    "den": "den",
    "label": "label",
    "model": "model",
    "hemi": "hemi",
    "roi": "roi",
    "subset": "subset",
    "param": "param",
    "stat": "stat",
    "desc": "desc",
}
IGNORED = {"subject", "session", "run", "datatype", "extension", "suffix", "fmap", "scans"}


class NoFilesError(GreyArrayError):
    """Filters selected no files (BIDS execution spec exit code 18)."""

    exit_code = 18


class InvalidDatasetError(GreyArrayError):
    """The input is not a usable BIDS dataset (exit code 16)."""

    exit_code = 16


@dataclass(frozen=True)
class Found:
    """One discovered map: where it is and what its name says."""

    path: Path
    root: Path  # dataset it was found in
    subject: str
    session: str | None
    entities: dict[str, str] = field(hash=False)  # without subject/session
    scalar: str | None = None  # set when a named query or pattern found it

    @property
    def relative(self) -> str:
        return str(self.path.relative_to(self.root))

    def key(self) -> tuple:
        """What makes two files the same kind of map: entities other than subject/session/run."""
        return key_of(self.entities)


def key_of(entities: dict[str, str]) -> tuple:
    """The sorted (entity, value) pairs of a file's entities but subject, session and run."""
    ignored = ("subject", "session", "run")
    return tuple(sorted((k, str(v)) for k, v in entities.items() if k not in ignored))


def strip(label: str, prefix: str) -> str:
    return label[len(prefix) :] if label.startswith(prefix) else label


def participant_labels(values: list[str] | None) -> list[str] | None:
    """Labels with or without ``sub-``, or a file listing them (whitespace separated)."""
    if not values:
        return None
    if len(values) == 1 and Path(values[0]).is_file():
        values = Path(values[0]).read_text().split()
    return sorted({strip(v.strip(), "sub-") for v in values if v.strip()})


def load_description(root: Path) -> dict:
    path = root / "dataset_description.json"
    if not path.is_file():
        raise InvalidDatasetError(f"{root}: not a BIDS dataset (no dataset_description.json)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidDatasetError(f"{path}: invalid JSON ({err})") from None


def dataset_roots(bids_dir: Path, derivatives: dict[str, Path], plain: bool = False) -> list[Path]:
    """Datasets to search: BIDS_DIR if it is a derivative, plus --derivatives or derivatives/*.

    ``plain``: BIDS_DIR may be a folder without dataset_description.json (HCP-style data found
    by config patterns only).
    """
    if not bids_dir.is_dir():
        raise MissingInputError(f"{bids_dir}: BIDS dataset folder not found")
    if plain and not (bids_dir / "dataset_description.json").exists():
        return [bids_dir]
    description = load_description(bids_dir)
    roots = [bids_dir] if description.get("DatasetType") == "derivative" else []
    for name, path in derivatives.items():
        if not path.is_dir():
            raise MissingInputError(f"{path}: derivatives folder {name!r} not found")
        load_description(path)
        roots.append(path)
    if not roots:
        found = (bids_dir / "derivatives").glob("*/dataset_description.json")
        roots = sorted(p.parent for p in found) or [bids_dir]
    return roots


def _query(filters: dict) -> dict:
    """pybids filters from JSON/YAML: null = entity absent, "*" = any value."""
    from bids.layout import Query

    special = {None: Query.NONE, "*": Query.ANY}
    return {
        key: special.get(value, value) if not isinstance(value, list) else value
        for key, value in filters.items()
    }


def _layout(root: Path, subjects: list[str] | None, database_dir: Path | None):
    from bids import BIDSLayout, BIDSLayoutIndexer

    ignore = [re.compile(r"^/(code|sourcedata|derivatives|figures|logs|group|work)(/|$)")]
    if subjects:
        wanted = "|".join(re.escape(s) for s in subjects)
        ignore.append(re.compile(rf"^/sub-(?!({wanted})(/|$))[^/]+"))
    options = {
        "validate": False,
        "config": ["bids", "derivatives", EXTRA_ENTITIES],
        "indexer": BIDSLayoutIndexer(validate=False, index_metadata=False, ignore=ignore),
    }
    if database_dir is not None:
        signature = _signature(root, subjects)
        folder = database_dir / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
        stamp = folder / "greyarray-signature.txt"
        stale = not stamp.is_file() or stamp.read_text() != signature
        folder.mkdir(parents=True, exist_ok=True)
        layout = BIDSLayout(root, database_path=folder, reset_database=stale, **options)
        stamp.write_text(signature)
        return layout
    return BIDSLayout(root, **options)


def _signature(root: Path, subjects: list[str] | None) -> str:
    """Changes when the selection changes or a file is added, removed or renamed anywhere (its
    folder's mtime changes): then the database is rebuilt."""
    folders = sorted(f"{top}:{os.stat(top).st_mtime_ns}" for top, _, _ in os.walk(root))
    return json.dumps([str(root.resolve()), subjects, folders, EXTRA_ENTITIES])


def discover(
    roots: list[Path],
    subjects: list[str] | None = None,
    sessions: list[str] | None = None,
    queries: dict[str, dict] | None = None,
    patterns: dict[str, str] | None = None,
    database_dir: Path | None = None,
    gzipped: list[Path] | None = None,
) -> list[Found]:
    """Every map of the selected subjects/sessions in ``roots``.

    ``queries`` ({scalar: pybids filters}) replace the default of all dscalar/pscalar/pconn
    files and the NIfTI parametric maps; ``patterns`` ({scalar: regex with a ``subject``
    group}) add non-BIDS files.
    ``gzipped`` receives the files those queries select but for a ``.gz`` extension: never
    CIFTI-2, yet users expect them found, so the caller reports them.
    """
    found: list[Found] = []
    for root in roots:
        if not (root / "dataset_description.json").exists():  # not BIDS: patterns only
            found += _pattern_files(root, patterns or {}, subjects, sessions)
            continue
        layout = _layout(root, subjects, database_dir)
        native: list[str] = []
        for scalar, selection in _selections(queries):
            if subjects:
                selection["subject"] = subjects
            if sessions:
                selection["session"] = sessions
            if gzipped is not None:
                gzipped += _gzipped(layout, selection)
            for path in layout.get(return_type="filename", **selection):
                # parsing the name is 4x faster than asking pybids' database file by file
                entities = dict(layout.parse_file_entities(path))
                if "subject" not in entities:
                    continue  # dataset-level files (atlases, templates) are not subjects' maps
                if is_volume(path) and entities.get("space") in (None, *NATIVE_SPACES):
                    native.append(path)
                    continue
                subject, session = entities.pop("subject"), entities.pop("session", None)
                found.append(
                    Found(
                        Path(path),
                        root,
                        str(subject),
                        None if session is None else str(session),
                        {k: str(v) for k, v in entities.items()},
                        scalar,
                    )
                )
        if native:
            log.info(
                "%s: left out %d NIfTI map(s) in an individual's space (no space entity, or "
                "space-%s): GreyArray converts maps in a standard space, e.g. %s",
                root,
                len(native),
                "/".join(sorted(NATIVE_SPACES)),
                native[0],
            )
        found += _pattern_files(root, patterns or {}, subjects, sessions)
    return sorted(set(found), key=lambda f: (f.subject, f.session or "", str(f.path)))


def _selections(queries: dict[str, dict] | None) -> list[tuple[str | None, dict]]:
    """(scalar name, pybids selection): the named queries (any map extension unless they give
    one), else every CIFTI map and the NIfTI parametric maps of ``NIFTI_SUFFIXES``."""
    if queries:
        extensions = [*CIFTI_EXTENSIONS, *NIFTI_EXTENSIONS]
        return [(name, {"extension": extensions, **_query(f)}) for name, f in queries.items()]
    return [
        (None, {"extension": list(CIFTI_EXTENSIONS)}),
        (None, {"extension": list(NIFTI_EXTENSIONS), "suffix": list(NIFTI_SUFFIXES)}),
    ]


def is_volume(path: str | Path) -> bool:
    """A NIfTI volume (``.nii``, ``.nii.gz``), not a CIFTI-2 file."""
    name = str(path)
    return name.endswith(NIFTI_EXTENSIONS) and not name.endswith(CIFTI_EXTENSIONS)


def _gzipped(layout, selection: dict) -> list[Path]:
    """The files ``selection`` would select if their extensions ended in ``.gz``."""
    extensions = selection["extension"]
    extensions = [extensions] if isinstance(extensions, str) else extensions
    gz = [
        f"{ext}.gz" for ext in extensions if isinstance(ext, str) and ext.endswith(CIFTI_EXTENSIONS)
    ]
    if not gz:
        return []
    return [Path(p) for p in layout.get(return_type="filename", **{**selection, "extension": gz})]


def subject_of(path: Path) -> str:
    """``sub-<label>`` from a BIDS file name (for messages)."""
    match = re.search(r"(?:^|_)(sub-[A-Za-z0-9]+)", path.name)
    return match.group(1) if match else path.name


def _pattern_files(root: Path, patterns: dict[str, str], subjects, sessions) -> list[Found]:
    out = []
    if not patterns:
        return out
    paths = sorted({p for ext in MAP_EXTENSIONS for p in root.rglob(f"*{ext}")})
    for scalar, pattern in patterns.items():
        regex = re.compile(pattern)
        if "subject" not in regex.groupindex:
            raise DataError(f"pattern for {scalar!r} has no (?P<subject>...) group: {pattern}")
        for path in paths:
            match = regex.search(str(path.relative_to(root)))
            if not match:
                continue
            groups = match.groupdict()
            for group in ("subject", "session"):
                if groups.get(group) and not re.fullmatch(r"[A-Za-z0-9+-]+", groups[group]):
                    raise DataError(
                        f"pattern for {scalar!r}: its {group} group captured "
                        f"{groups[group]!r} in {path.relative_to(root)}; a {group} label is "
                        "letters and digits only (e.g. (?P<subject>[0-9]+))"
                    )
            subject, session = strip(groups["subject"], "sub-"), groups.get("session")
            if (subjects and subject not in subjects) or (sessions and session not in sessions):
                continue
            found = Found(path, root, subject, session, {"extension": _extension(path)}, scalar)
            out.append(found)
    return out


def _extension(path: Path) -> str:
    return next(ext for ext in MAP_EXTENSIONS if path.name.endswith(ext))


Key = tuple  # sorted (entity, value) pairs: what makes two files the same kind of map
MAP_EXTENSIONS = (*CIFTI_EXTENSIONS, *NIFTI_EXTENSIONS)  # CIFTI first: .dscalar.nii is not .nii
KIND_ORDER = {".dscalar.nii": 0, ".pscalar.nii": 1, ".pconn.nii": 2, ".nii.gz": 3, ".nii": 4}


@dataclass(frozen=True)
class Naming:
    """Scalars and their files, plus the rare variants left out (reported, not converted)."""

    scalars: dict[str, list[Found]]
    skipped: dict[str, list[Found]]


def name_scalars(
    found: list[Found],
    coverage: dict[Key, int] | None = None,
    known: dict[str, Key] | None = None,
    wanted: list[str] | None = None,
) -> Naming:
    """{scalar name: its files}. Names from queries/patterns are kept; the others are named
    after their entities, so that a name does not depend on unrelated files:

    - a name given in an earlier run (``known``: name -> entity key) is kept;
    - among the variants of one base name (stat, else suffix), the primary one (most
      participants in ``coverage``, then dscalar before parcellated, then fewest entities)
      gets the plain base name, e.g. ``alff``; each other variant gets the base plus the
      entities in which it differs from the primary, e.g. ``alff_desc-smooth``;
    - a variant (not the primary) of fewer than 2 participants or under 10% of the primary's
      is skipped and reported, unless asked for by name in ``wanted``.
    """
    named: dict[str, list[Found]] = defaultdict(list)
    kinds: dict[Key, list[Found]] = defaultdict(list)
    for item in found:
        if item.scalar:
            named[item.scalar].append(item)
        else:
            kinds[item.key()].append(item)
    counts = {key: len({f.subject for f in files}) for key, files in kinds.items()}
    counts.update({k: v for k, v in (coverage or {}).items() if k in kinds})
    names, skipped_keys = _entity_names(list(kinds), counts, known or {})
    scalars = {names[key]: files for key, files in kinds.items()}
    skipped = {
        names[key]: kinds[key]
        for key in skipped_keys
        if names[key] not in (wanted or []) and names[key] not in (known or {})
    }
    for name in skipped:
        del scalars[name]
    scalars.update(named)
    for name, files in scalars.items():
        _check_one_file_per_visit(name, files)
    return Naming(dict(sorted(scalars.items())), skipped)


def _base(key: Key) -> str:
    entities = dict(key)
    return entities.get("stat") or entities.get("param") or entities.get("suffix", "map")


def _entity_names(
    keys: list[Key], counts: dict[Key, int], known: dict[str, Key]
) -> tuple[dict[Key, str], list[Key]]:
    """({key: name}, keys of rare variants)."""
    names = {key: name for name, key in known.items() if key in keys}
    skipped = []
    bases: dict[str, list[Key]] = defaultdict(list)
    for key in keys:
        bases[_base(key)].append(key)
    for base, variants in bases.items():
        variants.sort(
            key=lambda k: (-counts[k], KIND_ORDER.get(dict(k).get("extension"), 3), len(k), k)
        )
        primary = dict(variants[0])
        for key in variants:
            if key in names:
                continue
            names[key] = _variant_name(base, dict(key), primary, set(names.values()))
            rare = counts[key] < 2 or counts[key] < 0.1 * counts[variants[0]]
            if key != variants[0] and rare:
                skipped.append(key)
    return names, skipped


def _variant_name(base: str, kind: dict, primary: dict, taken: set[str]) -> str:
    """The base, plus the entities (and CIFTI kind) in which ``kind`` differs from ``primary``;
    more of its entities, then a number, if that name is taken."""
    named = ("stat", "param")  # the base name's entities
    differing = [
        f"{key}-{kind[entity]}"
        for entity, key in KEYS.items()
        if entity not in named and entity in kind and kind.get(entity) != primary.get(entity)
    ]
    extension, first = kind.get("extension", ""), primary.get("extension", "")
    if extension != first and not (is_volume(extension) and "space" in kind):
        differing.append(extension.split(".")[1])  # pscalar / pconn
    if kind.get("suffix") not in (base, None) and kind.get("suffix") != primary.get("suffix"):
        differing.append(kind["suffix"])
    name = "_".join([base, *differing])
    extra = [f"{key}-{kind[e]}" for e, key in KEYS.items() if e not in named and e in kind]
    for entity in extra:
        if name not in taken:
            break
        if entity not in name:
            name = f"{name}_{entity}"
    candidate, number = name, 2
    while candidate in taken:
        candidate, number = f"{name}_{number}", number + 1
    return candidate


def coverage(roots: list[Path]) -> dict[Key, int]:
    """Participants per kind of map over whole datasets, from file names only (a participant
    job sees one participant, but names must be those the group level chooses). Names that
    differ only in their subject and session labels are parsed once."""
    from bids.layout import parse_file_entities
    from bids.layout.models import Config

    config = [Config.load(c) for c in ("bids", "derivatives", EXTRA_ENTITIES)]
    parsed: dict[str, dict] = {}
    participants: dict[Key, set[str]] = defaultdict(set)
    for root in roots:
        if not (root / "dataset_description.json").exists():
            continue
        for folder in sorted(root.glob("sub-*")):
            for top, _, files in os.walk(folder):
                for name in files:
                    if not name.endswith(MAP_EXTENSIONS):
                        continue
                    path = os.path.join(top, name)
                    pattern = re.sub(r"(?<=sub-)[^_/]+|(?<=ses-)[^_/]+", "*", path)
                    if pattern not in parsed:
                        parsed[pattern] = parse_file_entities(path, config=config)
                    entities = {
                        k: str(v)
                        for k, v in parsed[pattern].items()
                        if k not in ("subject", "session", "run")
                    }
                    if "subject" in parsed[pattern] and _a_map(name, parsed[pattern]):
                        participants[tuple(sorted(entities.items()))].add(folder.name)
    return {key: len(subjects) for key, subjects in participants.items()}


def _a_map(name: str, entities: dict) -> bool:
    """Whether the default discovery takes this file: a CIFTI map, or a NIfTI parametric map
    in a standard space."""
    if not is_volume(name):
        return True
    space = entities.get("space")
    return entities.get("suffix") in NIFTI_SUFFIXES and space not in (None, *NATIVE_SPACES)


MASK_MATCH = ("space", "res", "den", "cohort")  # entities a map and its mask share


def subject_masks(found: list[Found], roots: list[Path]) -> dict[Path, Path | None]:
    """The subject mask of each NIfTI map: the ``desc-brain_mask`` (.nii or .nii.gz) of the same
    participant and session in one of ``roots``, with the map's space (and res, den, cohort
    when the map has them). Among several: the one sharing most of the map's other entities
    (task, ...), then in the map's folder, then in its dataset, then in a folder of its datatype
    (dwi, func, perf), then with the fewest entities of its own (an anatomical mask rather than a
    run's). None when there is none (the map's own non-zero voxels count then); an error naming
    two when the choice is ambiguous."""
    from bids.layout import parse_file_entities
    from bids.layout.models import Config

    config = [Config.load(c) for c in ("bids", "derivatives", EXTRA_ENTITIES)]
    candidates: dict[tuple, list[tuple[Path, Path, dict]]] = {}
    out: dict[Path, Path | None] = {}
    for item in found:
        if not is_volume(item.path):
            continue
        visit = (item.subject, item.session)
        if visit not in candidates:
            candidates[visit] = []
            for root in roots:
                folder = root / f"sub-{item.subject}"
                if item.session:
                    folder = folder / f"ses-{item.session}"
                for path in sorted(folder.glob(f"**/sub-{item.subject}_*desc-brain_mask.nii*")):
                    entities = parse_file_entities(str(path), config=config)
                    if entities.get("suffix") != "mask" or not is_volume(path):
                        continue
                    if str(entities.get("session")) != str(item.session):
                        continue
                    candidates[visit].append((path, root, entities))
        wanted = {k: item.entities[k] for k in MASK_MATCH if k in item.entities}
        ranked = sorted(
            (_rank(path, root, entities, item), str(path))
            for path, root, entities in candidates[visit]
            if all(str(entities.get(k)) == v for k, v in wanted.items())
        )
        if len(ranked) > 1 and ranked[0][0] == ranked[1][0]:
            ties = sum(rank == ranked[0][0] for rank, _ in ranked)
            raise DataError(
                f"{item.path}: {ties} subject masks match it equally ({ranked[0][1]}, "
                f"{ranked[1][1]}); keep one, or give the group mask with --group-mask"
            )
        out[item.path] = Path(ranked[0][1]) if ranked else None
    return out


def _rank(path: Path, root: Path, entities: dict, item: Found) -> tuple:
    """Smaller is a better mask for ``item``: more shared entities, the map's folder, its
    dataset, its datatype folder (dwi, func, ...), fewer entities of its own."""
    own = {k: str(v) for k, v in entities.items() if k not in IGNORED and k != "desc"}
    shared = sum(item.entities.get(k) == v for k, v in own.items())
    extra = sum(k not in item.entities for k in own)
    folder = path.parent != item.path.parent
    return (-shared, folder, root != item.root, path.parent.name != item.path.parent.name, extra)


def _check_one_file_per_visit(name: str, files: list[Found]) -> None:
    visits: dict[tuple, Found] = {}
    for item in files:
        visit = (item.subject, item.session)
        if visit in visits:
            where = f"sub-{item.subject}" + (f" ses-{item.session}" if item.session else "")
            raise DataError(
                f"{where} has two files for scalar {name!r}: {visits[visit].path} and {item.path}"
                " (select one with --bids-filter-file or name scalars in --config)"
            )
        visits[visit] = item


def common_entities(files: list[Found]) -> dict[str, str]:
    """Entities every file of a scalar shares, in BIDS order (for names and sidecars)."""
    first = files[0].entities
    return {
        k: first[k]
        for k in KEYS
        if k in first and all(f.entities.get(k) == first[k] for f in files)
    }
