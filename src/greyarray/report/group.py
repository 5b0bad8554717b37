"""The group report: for each scalar of each HDF5 file, the cohort, coverage, mean and SD maps,
subjects unlike the others, a carpet of every subject's map; then every analysis found in the
files' ``results/`` groups.

The report is always rebuilt from what is on disk, so an analysis written later adds its section
and never removes an earlier one. Statistics come from one streamed pass per scalar
(``stream.scan``), never the whole matrix at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from greyarray.errors import DataError, MissingInputError
from greyarray.io import h5read
from greyarray.report import figures, harmonization, plots, qc, stream
from greyarray.report.html import (
    Anchors,
    Facts,
    Figure,
    Section,
    Table,
    Text,
    prepare,
    render,
    write,
)
from greyarray.report.layout import SUMMARY_COLUMNS, Layout, summary_rows
from greyarray.report.results import analyses as analyses_in
from greyarray.report.results import results_section

log = logging.getLogger(__name__)

ID_COLUMNS = ("scalar_name", "source_file", "source_mask_file", "participant_id", "session_id")


@dataclass(frozen=True)
class GroupInput:
    """One HDF5 file of the group level, the cohort CSV its subjects come from (optional:
    without it the report has no phenotype section and labels subjects by source_file), and
    a label for its sections (default: the scalar names)."""

    h5: Path
    cohort: Path | None = None
    label: str | None = None


@dataclass(frozen=True)
class Outlier:
    """A flagged subject: reported in the run's summary and log, never dropped."""

    scalar: str
    subject: str  # participant_id (and session) when the cohort has them, else source_file
    source_file: str
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.scalar}: {self.subject}: {'; '.join(self.reasons)}"


@dataclass(frozen=True)
class GroupReport:
    """The written page, the flagged subjects, and the analyses shown (page order)."""

    path: Path
    outliers: list[Outlier] = field(default_factory=list)
    analyses: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Thresholds:
    """ModelArray's rule: an element is fitted with more than max(abs, rel x N) valid subjects."""

    absolute: float = 10
    relative: float = 0.2

    def minimum(self, n_subjects: int) -> float:
        return max(self.absolute, self.relative * n_subjects)


def group_report(
    output: Path,
    inputs: Sequence[GroupInput | Path],
    *,
    participants: pd.DataFrame | None = None,
    analyses: Sequence[str] | None = None,
    thresholds: Thresholds = Thresholds(),
    title: str = "GreyArray group report",
    surface_kind: str = "inflated",
) -> GroupReport:
    """Write the group report to ``output`` (e.g. OUTPUT_DIR/group.html); return the flagged
    subjects. ``analyses`` None shows every analysis present; ``participants`` (the
    participants.tsv table) lets the cohort section list participants without maps."""
    prepare(output)
    anchors = Anchors()
    sections: list[Section] = []
    outliers: list[Outlier] = []
    shown: list[str] = []
    for item in inputs:
        item = item if isinstance(item, GroupInput) else GroupInput(Path(item))
        with _open(item.h5) as h5:
            scalars = h5read.scalar_names(h5)
            if not scalars:
                raise DataError(f"{item.h5}: no scalars/<name>/values (not a ModelArray file?)")
            layout = Layout.from_h5(h5)
            cohort = _read_cohort(item.cohort) if item.cohort else None
            for scalar in scalars:
                label = item.label if item.label and len(scalars) == 1 else scalar
                log.info("Report: statistics of %s in %s", scalar, item.h5)
                section, flagged = scalar_section(
                    h5,
                    scalar,
                    layout,
                    cohort,
                    participants,
                    anchors,
                    label=label,
                    thresholds=thresholds,
                    surface_kind=surface_kind,
                )
                sections.append(section)
                outliers += flagged
            for name in harmonization.harmonized(h5):
                log.info("Report: harmonisation %s in %s", name, item.h5)
                sections.append(harmonization.section(h5, name, layout, anchors, surface_kind))
            where = item.label or (scalars[0] if len(scalars) == 1 else item.h5.name)
            for analysis in analyses_in(h5):
                if analyses is not None and analysis not in analyses:
                    continue
                log.info("Report: results/%s in %s", analysis, item.h5)
                sections.append(
                    results_section(
                        h5,
                        analysis,
                        layout,
                        anchors,
                        title=f"{where}: analysis {analysis}",
                        surface_kind=surface_kind,
                    )
                )
                shown.append(analysis)
    intro = _intro(sections, outliers)
    write(output, render("report.html.j2", title=title, intro=intro, sections=sections))
    return GroupReport(Path(output), outliers, shown)


def _open(path: Path) -> h5py.File:
    if not Path(path).is_file():
        raise MissingInputError(f"{path}: HDF5 file not found")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path}: cannot read as HDF5 ({err})") from None


def _read_cohort(path: Path) -> pd.DataFrame:
    if not Path(path).is_file():
        raise MissingInputError(f"{path}: cohort file not found")
    return pd.read_csv(path, dtype={c: str for c in ID_COLUMNS})


def _intro(sections: list[Section], outliers: list[Outlier]) -> list:
    blocks: list = [
        Text(
            "One section per scalar (cohort, coverage, mean and SD, subjects unlike "
            "the others, carpet) and one per analysis found in the HDF5 files."
        )
    ]
    if outliers:
        names = ", ".join(f"{o.subject} ({o.scalar})" for o in outliers)
        blocks.append(
            Text(
                f"{len(outliers)} subject map(s) flagged as unlike the cohort (kept "
                f"in every analysis; check them): {names}.",
                "warning",
            )
        )
    elif sections:
        blocks.append(Text("No subject map flagged as unlike the cohort.", "ok"))
    return blocks


def subject_labels(names: list[str], cohort: pd.DataFrame | None) -> tuple[list[str], list[str]]:
    """(label per HDF5 subject, sessions): participant_id[, session] via the cohort's source_file
    (ModelArray's match), else the source_file itself."""
    if cohort is None or "participant_id" not in cohort:
        return names, [""] * len(names)
    rows = cohort.drop_duplicates("source_file").set_index("source_file")
    labels, sessions = [], []
    for name in names:
        if name in rows.index:
            labels.append(str(rows.at[name, "participant_id"]))
            session = rows.at[name, "session_id"] if "session_id" in rows else None
            sessions.append("" if pd.isna(session) else str(session))
        else:
            labels.append(name)
            sessions.append("")
    return labels, sessions


def scalar_section(
    h5: h5py.File,
    scalar: str,
    layout: Layout,
    cohort: pd.DataFrame | None,
    participants: pd.DataFrame | None,
    anchors: Anchors,
    *,
    label: str,
    thresholds: Thresholds = Thresholds(),
    surface_kind: str = "inflated",
) -> tuple[Section, list[Outlier]]:
    stored = h5read.read_scalar(h5, scalar)
    values, names = stored.values, stored.names
    n, g = values.shape
    stats = stream.scan(values)
    checks = qc.check_subjects(stats)
    rows = _cohort_rows(cohort, scalar)
    labels, sessions = subject_labels(names, rows)
    section = Section(label, anchors(label))
    section.add(
        Facts(
            [
                ("HDF5 file", str(h5.filename)),
                (
                    "Values",
                    f"scalars/{scalar}/values: {n:,} subjects x {g:,} elements ({layout.kind})",
                ),
            ]
        ),
        Table(SUMMARY_COLUMNS, summary_rows(layout), caption="Geometry"),
        *(Figure(image) for image in figures.geometry_figures(layout, label)),
    )
    if rows is not None:
        section.subsections.append(cohort_section(rows, names, participants, anchors, label))
    section.subsections.append(
        coverage_section(stats, layout, thresholds.minimum(n), n, anchors, label, surface_kind)
    )
    section.subsections.append(maps_section(stats, layout, anchors, label, surface_kind))
    section.subsections.append(outlier_section(stats, checks, labels, sessions, anchors, label))
    section.subsections.append(carpet_section(stats, layout, checks, anchors, label))
    flagged = [
        Outlier(
            scalar,
            labels[i] + (f" {_prefixed(sessions[i], 'ses-')}" if sessions[i] else ""),
            names[i],
            tuple(checks.reasons[i]),
        )
        for i in np.flatnonzero(checks.flagged)
    ]
    section.summary = f"{n:,} subjects" + (f", {len(flagged)} flagged" if flagged else "")
    return section, flagged


def _cohort_rows(cohort: pd.DataFrame | None, scalar: str) -> pd.DataFrame | None:
    if cohort is None:
        return None
    if "scalar_name" in cohort and (cohort["scalar_name"] == scalar).any():
        return cohort[cohort["scalar_name"] == scalar]
    return cohort


# ---- cohort ------------------------------------------------------------------------------------
def phenotype_columns(rows: pd.DataFrame) -> list[str]:
    return [c for c in rows.columns if c not in ID_COLUMNS]


def cohort_section(
    rows: pd.DataFrame,
    names: list[str],
    participants: pd.DataFrame | None,
    anchors: Anchors,
    where: str,
) -> Section:
    section = Section("cohort", anchors(f"{where} cohort"))
    facts = [("Cohort rows (maps)", f"{len(rows):,}")]
    if "participant_id" in rows:
        facts.append(("Participants", f"{rows['participant_id'].nunique():,}"))
    if "session_id" in rows:
        facts.append(
            (
                "Sessions",
                f"{rows['session_id'].dropna().nunique():,} distinct labels, "
                f"{rows['session_id'].notna().sum():,} rows with a session",
            )
        )
    columns = phenotype_columns(rows)
    facts.append(("Phenotype columns", ", ".join(columns) if columns else "none"))
    section.add(Facts(facts))
    section.add(*_mismatches(rows, names, participants, columns))
    if columns:
        section.add(
            Table(
                ["column", "type", "missing", "summary"],
                [_describe(rows[c], c) for c in columns],
                caption="Phenotypes",
            )
        )
        section.add(Figure(plots.phenotypes(rows[columns], f"{where}: phenotypes")))
    return section


def _mismatches(rows, names, participants, columns) -> list[Text]:
    out = []
    sources = set(rows["source_file"].astype(str)) if "source_file" in rows else set()
    unmatched = [n for n in names if n not in sources]
    if unmatched:
        out.append(
            Text(
                f"{len(unmatched)} HDF5 subjects have no cohort row (ModelArray will "
                f"refuse the cohort): {_list(unmatched)}",
                "warning",
            )
        )
    if "participant_id" not in rows:
        return out
    with_maps = {_prefixed(p) for p in rows["participant_id"].dropna()}
    if participants is not None and "participant_id" in participants:
        listed = {_prefixed(p) for p in participants["participant_id"].dropna()}
        no_row = sorted(with_maps - listed)
        no_maps = sorted(listed - with_maps)
        out.append(_listing(no_row, "participant(s) with maps but no phenotype row"))
        out.append(_listing(no_maps, "participant(s) in the phenotype table without maps"))
    elif columns:
        empty = rows[rows[columns].isna().all(axis=1)]["participant_id"]
        out.append(
            _listing(
                sorted({_prefixed(p) for p in empty}),
                "participant(s) with maps but no phenotype values",
            )
        )
    return out


def _listing(items: list[str], what: str) -> Text:
    if not items:
        return Text(f"No {what.replace('participant(s)', 'participants')}.", "ok")
    return Text(f"{len(items)} {what}: {_list(items)}", "warning")


def _list(items: list[str], limit: int = 30) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _prefixed(label: object, prefix: str = "sub-") -> str:
    text = str(label)
    return text if text.startswith(prefix) else f"{prefix}{text}"


def _describe(column: pd.Series, name: str) -> list[str]:
    missing = int(column.isna().sum())
    numbers = pd.to_numeric(column, errors="coerce")
    if numbers.notna().sum() == column.notna().sum() and column.notna().any():
        summary = (
            f"mean {numbers.mean():.4g} (SD {numbers.std():.4g}), "
            f"range {numbers.min():.4g} to {numbers.max():.4g}"
        )
        kind = "numeric"
    else:
        counts = column.value_counts()
        summary = ", ".join(f"{k}: {v}" for k, v in counts.head(8).items())
        summary += f" (+{len(counts) - 8} more levels)" if len(counts) > 8 else ""
        kind = f"categorical, {len(counts)} levels"
    return [name, kind, f"{missing:,}", summary]


# ---- maps --------------------------------------------------------------------------------------
def coverage_section(stats, layout: Layout, minimum: float, n: int, anchors, where, kind):
    section = Section("coverage", anchors(f"{where} coverage"))
    unfitted = stats.valid <= minimum
    complete = int((stats.valid == n).sum())
    section.add(
        Facts(
            [
                ("Elements with every subject finite", f"{complete:,} of {len(stats.valid):,}"),
                ("Elements with a missing subject", f"{len(stats.valid) - complete:,}"),
                (
                    f"Left unfitted by ModelArray (valid subjects <= {minimum:g})",
                    f"{int(unfitted.sum()):,}",
                ),
            ]
        )
    )
    if complete == len(stats.valid):  # a uniform map would show nothing
        section.add(Text(f"Every element has all {n:,} subjects finite.", "ok"))
        return section
    style = figures.Style.sequential(stats.valid, "valid (finite) subjects", vmin=0, vmax=n)
    picture, note = figures.brain_map(
        layout, stats.valid, style, f"{where}: valid subjects per element", kind
    )
    section.add(Figure(picture, note))
    if unfitted.any():
        values = np.where(unfitted, stats.valid, np.nan)
        style = figures.Style.sequential(
            values, "valid subjects", cmap="Reds_r", vmin=0, vmax=max(minimum, 1)
        )
        heading = f"{where}: {int(unfitted.sum()):,} elements ModelArray leaves unfitted"
        picture, note = figures.brain_map(layout, values, style, heading, kind)
        section.add(Figure(picture, note))
    return section


def maps_section(stats, layout: Layout, anchors, where, kind):
    section = Section("mean and SD", anchors(f"{where} mean and SD"))
    for values, name, style in (
        (stats.mean, "mean", figures.Style.auto(stats.mean, "mean over subjects")),
        (stats.sd, "SD", figures.Style.sequential(stats.sd, "SD over subjects", cmap="magma")),
    ):
        picture, note = figures.brain_map(layout, values, style, f"{where}: {name}", kind)
        section.add(Figure(picture, note))
    return section


def outlier_section(stats, checks: qc.SubjectChecks, labels, sessions, anchors, where):
    section = Section("subjects unlike the others", anchors(f"{where} outliers"))
    flagged = checks.flagged
    section.add(
        Text(
            "Each subject's map against the cohort: Pearson correlation with the median map, "
            "mean, SD and non-finite count. Flagged (red): correlation (Fisher z) more than "
            f"{qc.THRESHOLD:g} robust SD (1.4826 MAD) below the cohort's median, or mean or SD "
            f"more than {qc.GROSS:g} robust SD from the median (gross offsets or scales, e.g. "
            "wrong units). Flagged subjects stay in every analysis. Click a header to sort.",
        )
    )
    if flagged.any():
        section.add(
            Text(
                f"{int(flagged.sum())} flagged: "
                + _list(
                    [
                        labels[i] + (f" {_prefixed(sessions[i], 'ses-')}" if sessions[i] else "")
                        for i in np.flatnonzero(flagged)
                    ]
                ),
                "warning",
            )
        )
    else:
        section.add(Text("No subject flagged.", "ok"))
    section.add(Figure(plots.outliers(stats, checks, labels, f"{where}: subjects")))
    with_sessions = any(sessions)
    columns = [
        "subject",
        *(["session"] if with_sessions else []),
        "r with median",
        "robust z (r)",
        "mean",
        "SD",
        "non-finite",
        "flag",
    ]
    order = np.argsort(np.nan_to_num(stats.correlation, nan=-2), kind="stable")
    cells, values = [], []
    for i in order:
        raw = [
            labels[i],
            *([sessions[i]] if with_sessions else []),
            float(stats.correlation[i]),
            float(checks.z_correlation[i]),
            float(stats.subject_mean[i]),
            float(stats.subject_sd[i]),
            int(stats.nonfinite[i]),
            "; ".join(checks.reasons[i]),
        ]
        values.append(raw)
        cells.append([_cell(v) for v in raw])
    section.add(
        Table(
            columns,
            cells,
            values=values,
            marked=[bool(flagged[i]) for i in order],
            sortable=True,
            table_id=f"subjects-{section.anchor}",
        )
    )
    return section


def _cell(value) -> str:
    if isinstance(value, float):
        return "NaN" if value != value else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def carpet_section(stats, layout: Layout, checks, anchors, where):
    section = Section("carpet", anchors(f"{where} carpet"))
    section.add(Figure(plots.carpet(stats, layout, checks.flagged, f"{where}: every subject")))
    return section
