"""The group level: one cohort CSV and one ModelArray HDF5 per scalar, under OUTPUT_DIR/group/.

A re-run never destroys a user's work. An HDF5 whose inputs are unchanged (same files, same
sha256, same storage) is kept as it is, with whatever ModelArray wrote into it. One whose inputs
changed is replaced only with ``--overwrite``, and, if it holds results (hours of fitting in R),
only with ``--discard-results``, which also removes the maps exported from those results. Every
decision is taken, and every file checked, before anything is written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from greyarray.bids import citation, derivatives, discover, reports
from greyarray.bids.cohort import build_cohort, load_phenotypes, report_mismatch
from greyarray.bids.run import Run
from greyarray.errors import DataError, OutputError, UsageError
from greyarray.io.cohort import Cohort, read_csv_text
from greyarray.io.fileio import atomic_write, write_json
from greyarray.io.sources import Source, check_sources
from greyarray.io.store import StoreOptions, analyses_in, stored_inputs, write_modelarray

log = logging.getLogger("greyarray")


@dataclass
class Plan:
    """One scalar's conversion: its files, table, checked sources and what to do."""

    name: str
    files: list[discover.Found]
    h5: Path
    table: pd.DataFrame
    sources: list[Source] = field(default_factory=list)
    action: str = "write"  # write (new file) | keep | replace | discard (replace, drop results)
    analyses: list[str] = field(default_factory=list)  # results/ of the existing file
    group_mask: bytes | None = None  # NIfTI: the group mask made from the subject masks

    @property
    def mask_path(self) -> Path:
        return self.h5.with_name(self.h5.name.replace("_modelarray.h5", "_mask.nii.gz"))

    @property
    def csv(self) -> Path:
        return self.h5.with_name(self.h5.name.replace("_modelarray.h5", "_cohort.csv"))


def h5_path(settings: Run, scalar: str) -> Path:
    return settings.group_dir / f"desc-{derivatives.label(scalar)}_modelarray.h5"


def run(settings: Run) -> int:
    from greyarray.bids import harmonize

    plans = convert(settings, settings.find("group"), harmonize.check(settings))
    harmonized = []
    if harmonize.wanted(settings):  # every scalar, each in its own HDF5
        harmonized = ["", f"Harmonised by {settings.args.harmonize}:"] + [
            harmonize.harmonize_scalar(settings, plan.h5, plan.csv, plan.name)[1] for plan in plans
        ]
    outliers, report = [], []
    if reports.wanted(settings):  # every HDF5 on disk, not only this run's
        outliers, report = reports.group_report(settings), [reports.report_line(settings)]
    lines = summary(plans) + harmonized + outliers + r_hint(settings, plans[0]) + report
    return settings.finish(lines)


def convert(
    settings: Run,
    naming: discover.Naming,
    check_table: Callable[[pd.DataFrame], None] | None = None,
    mode: str = "group",
) -> list[Plan]:
    """Check everything, decide per scalar, then write: the group level's conversion."""
    options = StoreOptions(nprocs=settings.args.nprocs)
    participants, sessions = load_phenotypes(settings.args.participants_file, settings.bids_dir)
    if participants is not None:
        subjects = {f"sub-{f.subject}" for files in naming.scalars.values() for f in files}
        report_mismatch(subjects, participants)
    plans = []
    for name, files in naming.scalars.items():
        h5 = h5_path(settings, name)
        table = build_cohort({name: files}, settings.group_dir, participants, sessions)
        if check_table is not None:  # on the table as the fit will read it from the CSV
            check_table(read_csv_text(table.to_csv(index=False, na_rep="NA")))
        plans.append(Plan(name, files, h5, table))
    for plan in plans:  # group/ may not exist yet: open the files by their found paths
        Cohort.from_table(plan.csv, plan.table)
        paths = {os.path.relpath(f.path, settings.group_dir): f.path for f in plan.files}
        files = [(s, paths[s]) for s in plan.table["source_file"]]
        space, masks = _voxel_space(settings, plan, [path for _, path in files])
        plan.sources = check_sources(
            files,
            settings.args.map,
            options.nprocs,
            label=plan.name,
            space=space,
            masks=masks,
        )
    _refuse_shared_files(plans)
    for plan in plans:
        _decide(settings, plan, options)
    settings.open_output(mode, {"scalars": [plan.name for plan in plans]})
    for plan in plans:
        _execute(settings, plan, options)
    citation.update(settings.logs, facts=methods_facts(settings, plans, options))
    return plans


def _voxel_space(settings: Run, plan: Plan, paths: list[Path]):
    """For NIfTI maps: (the group mask's voxels, each map's subject mask); (None, None) for
    CIFTI. The group mask is --group-mask, else the voxels inside at least half of the
    subject masks (made here, written beside the HDF5)."""
    from greyarray.io.formats import group_mask
    from greyarray.io.sources import majority_mask

    if not all(discover.is_volume(path) for path in paths):
        return None, None
    found = discover.subject_masks(plan.files, settings.roots)
    masks = [found.get(path) for path in paths]
    without = sum(m is None for m in masks)
    if without:
        log.warning(
            "%s: %d of %d maps have no subject mask (desc-brain_mask of their participant, "
            "session and space), e.g. %s; their finite non-zero voxels count as inside",
            plan.name,
            without,
            len(masks),
            paths[masks.index(None)],
        )
    if settings.args.group_mask is not None:
        return group_mask(settings.args.group_mask), masks
    grid, plan.group_mask = majority_mask(paths, masks, str(plan.mask_path))
    log.info(
        "%s: group mask of %d voxels (inside at least half of %d subject masks)",
        plan.name,
        grid.n_elements,
        len(masks),
    )
    return grid, masks


def _refuse_shared_files(plans: list[Plan]) -> None:
    """Two scalars whose names give one BIDS label (``alff_desc-smooth``, ``alffDescSmooth``)
    would write one file: refused before anything is written."""
    names: dict[Path, str] = {}
    for plan in plans:
        if (other := names.setdefault(plan.h5, plan.name)) != plan.name:
            raise UsageError(
                f"scalars {other!r} and {plan.name!r} would both be written to {plan.h5.name}; "
                "rename one of them (--config)"
            )


def _decide(settings: Run, plan: Plan, options: StoreOptions) -> None:
    if not plan.h5.exists():
        return
    try:
        stored = stored_inputs(plan.h5, plan.name)
    except DataError:  # another file of that name (a busy file waits, then fails: BusyError)
        if not settings.args.overwrite:
            raise OutputError(
                f"{plan.h5}: exists but is not a GreyArray HDF5 of scalar {plan.name!r}; use "
                "--overwrite to replace it"
            ) from None
        if (analyses := analyses_in(plan.h5)) and not settings.args.discard_results:
            raise OutputError(
                f"{plan.h5}: holds another scalar with ModelArray results ({', '.join(analyses)}); "
                "it was left as it is. Use --discard-results to replace it, or move it away"
            ) from None
        plan.analyses = analyses
        plan.action = "discard" if analyses else "replace"
        return
    change = stored.difference(plan.sources, options.description)
    plan.analyses = stored.analyses
    if change is None:
        plan.action = "keep"
    elif stored.analyses and not settings.args.discard_results:
        raise OutputError(
            f"{plan.h5}: holds ModelArray results ({', '.join(stored.analyses)}) and its inputs "
            f"changed ({change}); it was left as it is. Use --discard-results to convert "
            "again (removing those results and the maps exported from them), or move it away"
        )
    elif stored.analyses:
        plan.action = "discard"
    elif not settings.args.overwrite:
        raise OutputError(
            f"{plan.h5}: output exists and its inputs changed ({change}); use --overwrite to "
            "replace it"
        )
    else:
        plan.action = "replace"


def _write_cohort_csv(settings: Run, plan: Plan) -> None:
    """The cohort CSV beside its HDF5. A kept HDF5 keeps its CSV: one edited by hand (a column
    added for R), or made from an earlier participants.tsv that results were fitted with, is
    rewritten only with --overwrite, and the difference is said."""
    text = plan.table.to_csv(index=False, na_rep="NA").encode()
    if plan.action == "keep" and plan.csv.is_file() and not settings.args.overwrite:
        if plan.csv.read_bytes() != text:
            log.warning(
                "%s differs from what the inputs give now (edited, or participants.tsv "
                "changed); kept as it is, as its HDF5 is (--overwrite rewrites it)",
                plan.csv,
            )
        return
    atomic_write(plan.csv, text)


def _execute(settings: Run, plan: Plan, options: StoreOptions) -> None:
    if plan.group_mask is not None and (plan.action != "keep" or not plan.mask_path.exists()):
        atomic_write(plan.mask_path, plan.group_mask)
    if plan.action == "keep":
        kept = f", with its results ({', '.join(plan.analyses)})" if plan.analyses else ""
        log.info("%s: inputs unchanged; kept as it is%s", plan.h5, kept)
    else:
        try:
            write_modelarray(  # a file that appeared since _decide is another run's: kept
                plan.h5,
                {plan.name: plan.sources},
                options,
                settings.command_line,
                overwrite=plan.action != "write",
            )
            log.info("Wrote %s", plan.h5)
        except OutputError:
            if not _written_meanwhile(settings, plan, options):
                raise
            log.info("%s: written meanwhile by another run from the same inputs; kept", plan.h5)
    if plan.action == "discard":
        removed = derivatives.exported_statmaps(plan.h5.parent, plan.h5.name, set(plan.analyses))
        for path in removed:
            path.unlink(missing_ok=True)
        citation.update(settings.logs, discarded=(plan.name, plan.analyses))
        log.warning(
            "%s: inputs changed; results %s discarded (--discard-results), with the %d "
            "statistical map files exported from them",
            plan.h5,
            ", ".join(plan.analyses),
            len(removed),
        )
    _write_cohort_csv(settings, plan)
    sidecar = {
        "Scalar": plan.name,
        "Entities": discover.common_entities(plan.files),
        "Key": [list(pair) for pair in plan.files[0].key()] if not plan.files[0].scalar else None,
        "Participants": int(plan.table["participant_id"].nunique()),
        "Files": len(plan.files),
        "CohortFile": plan.csv.name,
        "Sources": sorted({str(f.root) for f in plan.files}),
    }
    if plan.sources and plan.sources[0].file.geometry.kind == "voxels":
        sidecar["GroupMask"] = (
            plan.mask_path.name if plan.group_mask is not None else str(settings.args.group_mask)
        )
        sidecar["GroupMaskRule"] = (
            "voxels inside at least half of the maps' subject masks (desc-brain_mask; a map "
            "without one counts its finite non-zero voxels)"
            if plan.group_mask is not None
            else "given with --group-mask"
        )
    write_json(plan.h5.with_suffix(".json"), sidecar)


def _written_meanwhile(settings: Run, plan: Plan, options: StoreOptions) -> bool:
    """Another group run on this OUTPUT_DIR (e.g. a second SLURM chain) published the HDF5
    while this one wrote it: from the same inputs it is this run's file; from others, _decide
    says why it cannot be replaced."""
    if plan.action != "write" or not plan.h5.exists():
        return False
    _decide(settings, plan, options)
    return plan.action == "keep"


def scalar_record(plan: Plan) -> dict:
    """What the methods text says of one scalar, kept in logs/ so that a later group run of
    other scalars describes every scalar converted into OUTPUT_DIR, not only its own."""
    return {
        "files": [[f.subject, f.session, f.root.name] for f in plan.files],
        "entities": discover.common_entities(plan.files),
        "kinds": sorted({s.file.kind for s in plan.sources}),
        "n_elements": plan.sources[0].file.geometry.n_elements,
        "masked": sum(s.mask is not None for s in plan.sources),
        "group_mask": "made" if plan.group_mask is not None else "given",
        "nonfinite": [s.n_nonfinite for s in plan.sources],
        "rows": len(plan.table),
    }


def methods_facts(settings: Run, plans: list[Plan], options: StoreOptions) -> dict:
    """The values the methods template (boilerplate/methods.md) is filled with: this run's
    scalars and those recorded by earlier runs whose HDF5 is still in group/."""
    import h5py
    import nibabel
    from bids import __version__ as pybids_version

    from greyarray import __version__

    records = {
        name: record
        for name, record in citation.load_state(settings.logs).get("scalars", {}).items()
        if h5_path(settings, name).is_file()
    }
    records.update({plan.name: scalar_record(plan) for plan in plans})
    files = {tuple(f) for r in records.values() for f in r["files"]}
    n_sessions = len({(subject, session) for subject, session, _ in files if session})
    volumes = {n: r for n, r in records.items() if r["kinds"] == ["nifti"]}
    greyordinates = {n: r for n, r in records.items() if n not in volumes}
    described = [r for r in settings.roots if (r / "dataset_description.json").is_file()]
    versions = sorted(
        {str(discover.load_description(r).get("BIDSVersion", "")) for r in described} - {""}
    )
    rows = sum(r["rows"] for r in records.values())
    return {
        "scalars": records,  # kept for the next run (citation.update), not used by the template
        "greyarray_version": __version__,
        "nibabel_version": nibabel.__version__,
        "h5py_version": h5py.__version__,
        "hdf5_version": h5py.version.hdf5_version,
        "pybids_version": pybids_version,
        "maps_text": _maps_text(greyordinates, volumes),
        "heading_text": " and ".join(
            name for group, name in ((greyordinates, "greyordinate"), (volumes, "voxel")) if group
        ),
        "checks_text": _checks_text(greyordinates, volumes),
        "n_participants": len({subject for subject, _, _ in files}),
        "sessions_text": f" ({n_sessions} sessions)" if n_sessions else "",
        "datasets": ", ".join(sorted({root for _, _, root in files})),
        "input_bids_text": f"BIDS {' and '.join(versions)}" if versions else "BIDS",
        "n_scalars": len(records),
        "scalars_text": ", ".join(records),
        "nonfinite_text": _nonfinite_text([c for r in records.values() for c in r["nonfinite"]]),
        "matrix_text": (
            "a matrix with one row per session of each participant and one column per element"
            if n_sessions
            else "a participants-by-elements matrix"
        )
        + f" ({rows:,} rows in all)",
        "sessions_table_text": " and `sessions.tsv` files" if n_sessions else "",
        "storage_text": f"{options.description}, chunks of at most 1 MiB holding all rows",
    }


def _space(records: dict) -> str:
    """The entities all these scalars share that say where their elements are."""
    first = next(iter(records.values()))["entities"]
    shared = {
        k: v for k, v in first.items() if all(r["entities"].get(k) == v for r in records.values())
    }
    return " ".join(f"{k}-{v}" for k, v in shared.items() if k in ("space", "den", "seg", "res"))


def _maps_text(greyordinates: dict, volumes: dict) -> str:
    counts = [
        (sum(len(r["files"]) for r in group.values()), name)
        for group, name in ((greyordinates, "CIFTI-2 [@cifti2]"), (volumes, "NIfTI"))
        if group
    ]
    return " and ".join(f"{n} {name}" for n, name in counts) + " maps"


def _checks_text(greyordinates: dict, volumes: dict) -> str:
    """What every map was checked for, per data type."""
    texts = []
    if greyordinates:
        kinds = sorted({k for r in greyordinates.values() for k in r["kinds"]})
        elements = sorted({r["n_elements"] for r in greyordinates.values()})
        texts.append(
            f"Every CIFTI map was checked to be a {' or '.join(f'CIFTI-2 {k}' for k in kinds)} "
            "file with exactly the element geometry of the first map of its scalar "
            f"({_space(greyordinates) or 'greyordinate space of the inputs'}: "
            f"{' or '.join(f'{n:,}' for n in elements)} elements; structure of every "
            "greyordinate, surface vertex indices, voxel indices, volume dimensions and affine "
            "were compared)"
        )
    if volumes:
        elements = sorted({r["n_elements"] for r in volumes.values()})
        made = any(r.get("group_mask") == "made" for r in volumes.values())
        masked = sum(r.get("masked", 0) for r in volumes.values())
        n = sum(len(r["files"]) for r in volumes.values())
        rule = (
            "made of the voxels inside at least half of the participants' brain masks"
            if made
            else "given by the user"
        )
        texts.append(
            "Every NIfTI map was checked to be a 3-D volume on the grid of its scalar's group "
            f"mask ({_space(volumes) or 'one space'}: dimensions and voxel-to-mm affine within "
            f"1e-4 mm; {' or '.join(f'{v:,}' for v in elements)} voxels, the group mask {rule}); "
            f"{masked} of the {n} maps were masked by their participant's brain mask "
            "(desc-brain_mask of the same session and space: voxels outside it are missing)"
        )
    return ". ".join(texts)


def _nonfinite_text(counts: list[int]) -> str:
    bad = [c for c in counts if c]
    if not bad:
        return " (none were found)"
    return (
        f" ({len(bad)} of {len(counts)} maps held {sum(bad):,} non-finite values, which "
        "ModelArray treats as missing participants for those elements)"
    )


def summary(plans: list[Plan]) -> list[str]:
    lines = ["", "GreyArray group level done", ""]
    for plan in plans:
        table = plan.table
        sessions = table["session_id"].nunique() if "session_id" in table else 0
        state = {"keep": "kept (inputs unchanged)", "discard": "rewritten, results discarded"}
        lines.append(
            f"  {plan.name}: {table['participant_id'].nunique()} participants"
            f"{f', {sessions} session(s)' if sessions else ''}, {len(table)} files; "
            f"HDF5 {state.get(plan.action, 'written')}"
        )
        lines.append(f"    cohort: {plan.csv}\n    HDF5:   {plan.h5}")
    return lines


def suggested_formula(plan: Plan, response: str | None = None, batch: str | None = None) -> str:
    """A formula the cohort can fit: age and sex when present, else its first phenotypes (the
    ``batch`` column of --harmonize left out: ComBat removed its effect)."""
    ignored = {"scalar_name", "source_file", "participant_id", "session_id", batch}
    columns = [c for c in plan.table.columns if c not in ignored]
    chosen = [c for c in ("age", "sex") if c in columns] or columns[:2]
    rhs = " + ".join(f"`{c}`" if not c.isidentifier() else c for c in chosen) or "1"
    response = response or plan.name
    return f"{response if response.isidentifier() else '`' + response + '`'} ~ {rhs}"


def r_hint(settings: Run, plan: Plan) -> list[str]:
    """The next steps: the scalar in R (the harmonised one after --harmonize), the export, or
    the same model fitted here."""
    from greyarray.bids import harmonize

    batch = settings.args.harmonize if harmonize.wanted(settings) else None
    scalar = harmonize.output_name(plan.name) if batch else plan.name
    formula = suggested_formula(plan, scalar, batch)  # in R: the response is the scalar read
    here = suggested_formula(plan, None, batch)  # --model: the converted scalar's name
    again = harmonize.options_text(settings)  # --harmonize: fitted to the harmonised scalar
    repeated = "session_id" in plan.table and plan.table["participant_id"].duplicated().any()
    analysis = "gam" if repeated else "lm"
    lines = [
        "",
        "Next, in R:",
        "  library(ModelArray)",
        f'  ma <- ModelArray("{plan.h5}", scalar_types = "{scalar}")',
        f'  phen <- read.csv("{plan.csv}")',
    ]
    if repeated:
        lines += [
            "  # Participants have several sessions: rows are not independent, so a plain lm",
            "  # is not valid. A random intercept per participant (or a mixed model through",
            "  # ModelArray.wrap and lme4) accounts for it:",
            "  phen$participant_id <- factor(phen$participant_id)",
            f'  res <- ModelArray.gam({formula} + s(participant_id, bs = "re"), ma, phen, '
            f'"{scalar}")',
        ]
    else:
        lines.append(f'  res <- ModelArray.lm({formula}, ma, phen, "{scalar}")')
    lines += [
        f'  writeResults("{plan.h5}", df.output = res, analysis_name = "{analysis}")',
        "Then export the maps:",
        f"  greyarray {settings.bids_dir} {settings.output_dir} group --analysis-name {analysis}",
    ]
    if not repeated:
        lines += [
            "Or fit the same model here, in seconds, and export it:",
            f'  greyarray {settings.bids_dir} {settings.output_dir} group --model "{here}"{again}',
        ]
    else:
        lines += [
            "Or fit the mixed model here (lme4's numbers, lmerTest's tests) and export it:",
            f"  greyarray {settings.bids_dir} {settings.output_dir} group --model "
            f'"{here} + (1 | participant_id)"{again}',
        ]
    return [*lines, ""]
