"""The BIDS-App's HTML reports: ``OUTPUT_DIR/sub-<label>.html`` and ``OUTPUT_DIR/group.html``.

The participant level draws the maps its manifests list (the maps it checked). Every group run
rebuilds group.html from all the group HDF5 files on disk, so a scalar or an analysis of an
earlier run keeps its section. Subjects unlike the cohort are listed in the run's summary and
logged, one warning each, never dropped. ``--reports-only`` redraws the reports from existing
outputs and writes nothing else (besides the run's log).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from greyarray.bids import citation
from greyarray.bids.cohort import find_participants, read_table
from greyarray.bids.run import MANIFEST, Run
from greyarray.errors import DataError, MissingInputError, UsageError

log = logging.getLogger("greyarray")

GROUP_REPORT = "group.html"
OUTLIERS = "Subjects unlike the cohort (kept in every analysis; check them in the report):"


def wanted(settings: Run) -> bool:
    return not settings.args.no_report


def participant_path(settings: Run, subject: str) -> Path:
    return settings.output_dir / f"sub-{subject}.html"


def group_path(settings: Run) -> Path:
    return settings.output_dir / GROUP_REPORT


# ---- participant level -----------------------------------------------------------------------
def participant_reports(settings: Run, manifests: dict[str, dict]) -> list[str]:
    """One report per participant (label -> manifest): a section per scalar and session."""
    from greyarray.report import participant_report

    paths = []
    for subject, manifest in manifests.items():
        maps = map_files(manifest, settings.args.map)
        paths.append(participant_report(participant_path(settings, subject), subject, maps))
        log.info("Wrote report %s", paths[-1])
    if len(paths) == 1:
        return [f"Report: {paths[0]}"]
    return [f"Reports: {settings.output_dir}/sub-<label>.html ({len(paths)} participants)"]


def map_files(manifest: dict, wanted_map: str | None) -> list:
    """The manifest's checked maps, by scalar then session; the map of a multi-map file is
    ``--map`` as the participant level used it, else the name it recorded."""
    from greyarray.report import MapFile

    entries = sorted(manifest["files"], key=lambda e: (e["scalar"], e["session"] or ""))
    return [
        MapFile(
            e["scalar"],
            Path(e["dataset"]) / e["path"],
            e["session"],
            wanted_map or e.get("map") or None,
            Path(e["mask"]) if e.get("mask") else None,
        )
        for e in entries
    ]


def load_manifests(settings: Run) -> dict[str, dict]:
    """The manifests of the selected participants (all under OUTPUT_DIR without a selection),
    with every map they list still present: what ``--reports-only`` draws."""
    out = settings.output_dir
    if settings.subjects:
        paths = {s: out / MANIFEST.format(s) for s in settings.subjects}
    else:
        found = sorted(p.name[4:] for p in out.glob("sub-*") if p.is_dir())
        paths = {s: out / MANIFEST.format(s) for s in found if (out / MANIFEST.format(s)).is_file()}
    if not paths:
        raise MissingInputError(
            f"{out}: no participant manifests (sub-*/sub-*_greyarray.json); run the participant "
            "level first"
        )
    manifests = {}
    for subject, path in paths.items():
        if not path.is_file():
            raise MissingInputError(f"{path}: no manifest; run the participant level first")
        try:
            manifests[subject] = json.loads(path.read_text())
            maps = map_files(manifests[subject], None)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise DataError(f"{path}: not a GreyArray manifest ({err!r})") from None
        for item in maps:
            if not item.path.is_file():
                raise MissingInputError(f"{item.path}: listed in {path} but not found")
    return manifests


# ---- group level -----------------------------------------------------------------------------
def group_report(settings: Run) -> list[str]:
    """Rebuild group.html from every group HDF5 on disk; the summary's outlier lines (each
    flagged subject is also logged as a warning)."""
    from greyarray.report import Thresholds
    from greyarray.report import group_report as draw

    inputs = group_inputs(settings)
    done = draw(
        group_path(settings),
        inputs,
        participants=_participants(settings),
        thresholds=Thresholds(settings.args.num_subj_lthr_abs, settings.args.num_subj_lthr_rel),
    )
    log.info("Wrote report %s", done.path)
    citation.update(settings.logs, reports=methods_facts(settings, inputs))
    lines = []
    for outlier in done.outliers:
        reasons = "; ".join(outlier.reasons)
        log.warning(
            "Subject unlike the cohort (kept): %s: %s (%s): %s",
            outlier.scalar,
            outlier.subject,
            outlier.source_file,
            reasons,
        )
        lines.append(f"  {outlier.scalar}: {outlier.subject} ({outlier.source_file}): {reasons}")
    return ["", OUTLIERS, *lines] if lines else []


def group_inputs(settings: Run) -> list:
    """Every ``group/desc-*_modelarray.h5`` with its cohort CSV, in the order of scalar names."""
    from greyarray.report import GroupInput

    inputs = []
    for h5 in settings.group_dir.glob("desc-*_modelarray.h5"):
        csv = h5.with_name(h5.name.replace("_modelarray.h5", "_cohort.csv"))
        inputs.append(GroupInput(h5, csv if csv.is_file() else None, label=_scalar(h5)))
    return sorted(inputs, key=lambda item: (item.label or "", item.h5.name))


def methods_facts(settings: Run, inputs: list) -> dict:
    """The values of the methods text's paragraph on the reports (boilerplate/reports.md); the
    HCP acknowledgment when maps were drawn on the S1200 surfaces."""
    import h5py
    import matplotlib

    from greyarray.io import mesh
    from greyarray.report import qc
    from greyarray.report.layout import Layout

    listed = [
        "`group.html` (per scalar: the cohort, valid participants per element, mean and "
        "standard deviation maps, each map's similarity to the cohort; every analysis)"
    ]
    if any(settings.output_dir.glob("sub-*.html")):
        listed.insert(0, "`sub-<label>.html` per participant (each map with its distribution)")
    surfaces = False
    for item in inputs:
        with h5py.File(item.h5, "r") as h5:
            surfaces = surfaces or bool(Layout.from_h5(h5).drawable)
    return {
        "matplotlib_version": matplotlib.__version__,
        "reports_list": " and ".join(listed),
        "threshold": f"{qc.THRESHOLD:g}",
        "gross": f"{qc.GROSS:g}",
        "surface_text": f"\n{mesh.ACKNOWLEDGMENT}\n" if surfaces else "",
    }


def _scalar(h5: Path) -> str | None:
    """The scalar name the group level gave (its sidecar), or None: the HDF5's own names."""
    try:
        return str(json.loads(h5.with_suffix(".json").read_text())["Scalar"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _participants(settings: Run) -> pd.DataFrame | None:
    """participants.tsv (as the conversion read it; its warnings were given then)."""
    path = settings.args.participants_file or find_participants(settings.bids_dir)
    return read_table(path) if path else None


def report_line(settings: Run) -> str:
    return f"Report: {group_path(settings)}"


# ---- --reports-only --------------------------------------------------------------------------
def reports_only(settings: Run) -> int:
    """Redraw the reports of this level from existing outputs; convert, fit, export nothing."""
    args = settings.args
    if args.no_report:
        raise UsageError("--reports-only and --no-report exclude each other")
    if args.model or args.analysis_name:
        raise UsageError(
            "--reports-only redraws the reports of what exists; leave out --model and "
            "--analysis-name (group.html shows every analysis on disk)"
        )
    if args.analysis_level == "participant":
        manifests = load_manifests(settings)
        settings.open_output("reports")
        return settings.finish(participant_reports(settings, manifests))
    if not group_inputs(settings):
        raise MissingInputError(
            f"{settings.group_dir}: no desc-*_modelarray.h5; run the group level first"
        )
    settings.open_output("reports")
    return settings.finish([*group_report(settings), "", report_line(settings)])
