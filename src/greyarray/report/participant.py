"""The participant report: each of one participant's maps on the brain, with its numbers.

One section per scalar and session: the map (fsLR surface views and subcortical slices, or
parcels), a histogram, the non-finite count and the geometry. Files are read with GreyArray's
own CIFTI reader; nibabel parses each distinct geometry once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from greyarray.io.formats import cifti
from greyarray.report import figures, plots
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


@dataclass(frozen=True)
class MapFile:
    """One map of the participant: its scalar, file, session and which map of a multi-map file
    (a name or a 1-based index, as ``--map``; None for single-map files)."""

    scalar: str
    path: Path
    session: str | None = None
    map: str | None = None
    mask: Path | None = None  # a NIfTI map's subject mask (drawn within it)


@lru_cache(maxsize=8)
def layout_of(geometry: cifti.Geometry) -> Layout:
    """Layouts by geometry: a participant's maps usually share one (parsed once)."""
    return Layout.from_geometry(geometry)


def participant_report(
    output: Path, participant: str, maps: Sequence[MapFile], *, surface_kind: str = "inflated"
) -> Path:
    """Write the participant's report to ``output`` (e.g. OUTPUT_DIR/sub-<label>.html)."""
    prepare(output)
    label = participant if participant.startswith("sub-") else f"sub-{participant}"
    anchors = Anchors()
    sections = [map_section(item, anchors, surface_kind) for item in maps]
    intro = [
        Text(
            f"{len(maps)} map(s) of {label}: each drawn on the brain with its value "
            "distribution, non-finite count and geometry."
        )
    ]
    page = render("report.html.j2", title=f"GreyArray: {label}", intro=intro, sections=sections)
    return write(output, page)


def read_map(item: MapFile) -> tuple[np.ndarray, Layout, str, str]:
    """(values, layout, map name, kind) of one map: a CIFTI file, or a NIfTI map within its
    subject mask (all its voxels without one)."""
    from greyarray.io.formats import data_type

    if data_type(str(item.path), sniff=True) == "nifti":
        from greyarray.io.formats.nifti import read_volume
        from greyarray.io.spaces import VoxelGrid

        volume = read_volume(Path(item.path))
        inside = np.ones(volume.shape, bool)
        if item.mask is not None:  # checked on the map's grid by the participant level
            inside = read_volume(Path(item.mask)).positive().reshape(volume.shape, order="F")
        grid = VoxelGrid.from_mask(volume.shape, volume.affine, inside, b"", str(item.path))
        values = volume.values(grid.flat)
        within = f" within {Path(item.mask).name}" if item.mask else " (no subject mask)"
        kind = f"NIfTI, {grid.n_elements:,} voxels{within}"
        return values, Layout.from_geometry(grid), "(one volume)", kind
    parsed = cifti.read_file(Path(item.path))
    index = parsed.select_map(item.map)
    values = parsed.elements(
        cifti.pread_from(parsed.path), index, 0, parsed.geometry.n_elements
    ).astype(np.float64)
    name = parsed.map_names[index] if parsed.map_names else "(pconn)"
    kind = f"CIFTI-2 {parsed.kind}, {parsed.geometry.n_elements:,} elements"
    return values, layout_of(parsed.geometry), name, kind


def map_section(item: MapFile, anchors: Anchors, surface_kind: str = "inflated") -> Section:
    values, layout, map_name, kind = read_map(item)
    session = str(item.session or "")
    title = item.scalar + (f", ses-{session.removeprefix('ses-')}" if session else "")
    finite = values[np.isfinite(values)]
    n_bad = values.size - finite.size
    section = Section(title, anchors(title), summary=f"{n_bad:,} non-finite" if n_bad else "")
    facts = [
        ("File", str(item.path)),
        ("Map", map_name),
        ("Kind", kind),
        ("Non-finite values", f"{n_bad:,} ({n_bad / max(values.size, 1):.2%})"),
    ]
    if finite.size:
        low, mid, high = np.percentile(finite, [0, 50, 100])
        facts.append(("Min / median / max", f"{low:.4g} / {mid:.4g} / {high:.4g}"))
        sd = finite.std(ddof=1) if finite.size > 1 else 0.0
        facts.append(("Mean (SD)", f"{finite.mean():.4g} ({sd:.4g})"))
    section.add(Facts(facts))
    if n_bad:
        section.add(
            Text(
                f"{n_bad:,} non-finite values: ModelArray treats them as missing for "
                "this participant at those elements.",
                "warning",
            )
        )
    style = figures.Style.auto(values, item.scalar)
    picture, note = figures.brain_map(layout, values, style, title, surface_kind)
    section.add(Figure(picture, note))
    section.add(Figure(plots.histogram(values, item.scalar, f"{title}: distribution")))
    section.add(Table(SUMMARY_COLUMNS, summary_rows(layout), caption="Geometry"))
    return section
