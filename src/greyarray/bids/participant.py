"""The participant level: check one participant's maps, record them in a manifest.

``OUTPUT_DIR/sub-<label>/sub-<label>_greyarray.json`` lists every map with the scalar name it
belongs to (named as the group level will name it), its geometry hash, sha256 and non-finite
count. Jobs for different participants can run at the same time on one OUTPUT_DIR. Then each
participant's report, ``OUTPUT_DIR/sub-<label>.html``, draws those maps (reports.py).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from greyarray import __version__
from greyarray.bids import discover, reports
from greyarray.bids.run import MANIFEST, Run
from greyarray.io import sources
from greyarray.io.fileio import make_folder, write_json

log = logging.getLogger("greyarray")


def run(settings: Run) -> int:
    naming = settings.find("participant")
    found = [item for files in naming.scalars.values() for item in files]
    masks = discover.subject_masks(found, settings.roots)
    by_subject: dict[str, list[tuple[str, discover.Found]]] = {}
    for name, files in naming.scalars.items():
        for item in files:
            by_subject.setdefault(item.subject, []).append((name, item))
    skipped: dict[str, list[tuple[str, discover.Found]]] = {}
    for name, files in naming.skipped.items():
        for item in files:
            skipped.setdefault(item.subject, []).append((name, item))
    manifests = {
        subject: {
            "participant_id": f"sub-{subject}",
            "greyarray_version": __version__,
            "bids_dir": str(settings.bids_dir),
            "selection": settings.selection(),
            "scalar_filter": settings.args.scalar or None,  # the group level may need more
            "files": [_check(settings, name, item, masks.get(item.path)) for name, item in items],
            "skipped": [_entry(name, item) for name, item in skipped.get(subject, [])],
        }
        for subject, items in sorted(by_subject.items())
    }
    settings.open_output("participant", {"scalars": list(naming.scalars)})  # all checked
    for subject, manifest in manifests.items():
        path = settings.output_dir / MANIFEST.format(subject)
        make_folder(path.parent)
        write_json(path, manifest)
    n_files = sum(len(m["files"]) for m in manifests.values())
    lines = [
        f"Checked {n_files} files of {len(manifests)} participant(s) "
        f"({', '.join(naming.scalars)}); manifests in {settings.output_dir}/sub-*/"
    ]
    if reports.wanted(settings):
        lines += reports.participant_reports(settings, manifests)
    return settings.finish(lines)


def _entry(name: str, item: discover.Found) -> dict:
    return {
        "scalar": name,
        "query": item.scalar,
        "path": item.relative,
        "dataset": str(item.root),
        "session": item.session,
        "entities": item.entities,
    }


def _check(settings: Run, name: str, item: discover.Found, mask: Path | None) -> dict:
    source = sources.inspect_alone(item.path, item.relative, settings.args.map, mask)
    if source.n_nonfinite:
        log.warning(
            "%s: %d non-finite values (missing for ModelArray)", item.path, source.n_nonfinite
        )
    entry = {
        **_entry(name, item),
        "kind": source.file.kind,
        "n_elements": source.file.geometry.n_elements,
        "map": source.map_name,
        "geometry_sha256": hashlib.sha256(source.file.geometry.identity).hexdigest(),
        "sha256": source.sha256,
        "nonfinite_count": source.n_nonfinite,
    }
    if discover.is_volume(item.path):
        entry["mask"] = str(mask) if mask else None
        entry["mask_sha256"] = source.mask.sha256 if source.mask else None
    return entry
