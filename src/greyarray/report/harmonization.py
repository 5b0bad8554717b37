"""The report's section per harmonised scalar (``greyarray/harmonization/<s>`` of an HDF5): what
was done, per site the mean map before and after harmonisation (as its difference from the
average of the sites, one colour scale for both), and the distributions of subject means per site.

Everything shown was added up by ``harmonize`` while it wrote the scalar (per batch mean maps,
per subject means): drawing needs no pass over the data.
"""

from __future__ import annotations

import json

import h5py
import numpy as np

from greyarray.io.h5read import decode
from greyarray.report import figures
from greyarray.report.figures import Image, image, new_figure
from greyarray.report.html import Anchors, Facts, Figure, Section, Table, Text
from greyarray.report.layout import Layout

GROUP = "greyarray/harmonization"
MAX_SITE_MAPS = 8  # sites drawn as brain maps (all are in the table and the distributions)
BEFORE, AFTER = "#8c8c8c", "#4c72b0"


def harmonized(h5: h5py.File) -> list[str]:
    """The harmonised scalars whose estimates the file holds (staging groups left out)."""
    group = h5.get(GROUP)
    if not isinstance(group, h5py.Group):
        return []
    return sorted(n for n in group if not n.startswith(".") and isinstance(group[n], h5py.Group))


def section(h5: h5py.File, name: str, layout: Layout, anchors: Anchors, kind: str) -> Section:
    group = h5[f"{GROUP}/{name}"]
    about = json.loads(group.attrs["about"])
    levels = decode(group["batch_levels"][()], f"{group.name}/batch_levels")
    before, after = group["batch_mean_before"][()], group["batch_mean_after"][()]
    subjects = (group["subject_mean_before"][()], group["subject_mean_after"][()])
    batch = group["batch"][()]
    column = about.get("batch_column", "batch")
    title = f"{about.get('input_scalar', '?')} harmonised by {column} ({name})"
    part = Section(title, anchors(title))
    counts = about.get("subjects_per_batch", {})
    elements = about.get("elements", {})
    applied = group.attrs.get("applied_from")
    part.add(
        Facts(
            [
                ("Method", f"{about.get('method')} ({about.get('options_text')})"),
                ("Reproduces", about.get("reproduces", "")),
                ("Covariates kept", about.get("covariates") or "none"),
                ("Sites", ", ".join(f"{k} ({v})" for k, v in counts.items())),
                *([("Estimates applied from", str(applied))] if applied else []),
                (
                    "Elements",
                    ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in elements.items()),
                ),
                ("Harmonised scalar", f"scalars/{name}"),
            ]
        )
    )
    average = (np.nanmean(before, axis=0), np.nanmean(after, axis=0))
    shift = (before - average[0], after - average[1])
    rms = [np.sqrt(np.nanmean(s**2, axis=1)) for s in shift]
    part.add(
        Table(
            [column, "subjects", "RMS site effect before", "after", "mean before", "after"],
            [
                [
                    level,
                    f"{int((batch == k).sum()):,}",
                    f"{rms[0][k]:.4g}",
                    f"{rms[1][k]:.4g}",
                    f"{np.nanmean(subjects[0][batch == k]):.4g}",
                    f"{np.nanmean(subjects[1][batch == k]):.4g}",
                ]
                for k, level in enumerate(levels)
            ],
            caption="Per site: the root mean square over elements of the site's mean map minus "
            "the average of the sites' mean maps, and the mean of its subjects' mean values",
        )
    )
    if np.nanmax(rms[1]) > np.nanmax(rms[0]):
        part.add(Text("The site effect is larger after harmonisation than before.", "warning"))
    part.add(Figure(distributions(subjects, batch, levels, title)))
    style = figures.Style.diverging(shift[0][:MAX_SITE_MAPS], f"site mean - average ({column})")
    for k, level in enumerate(levels[:MAX_SITE_MAPS]):
        for when, values in (("before", shift[0][k]), ("after", shift[1][k])):
            picture, note = figures.brain_map(
                layout, values, style, f"{column} {level}: mean - average of sites, {when}", kind
            )
            part.add(Figure(picture, note))
    if len(levels) > MAX_SITE_MAPS:
        part.add(Text(f"Maps of the first {MAX_SITE_MAPS} of {len(levels)} sites are drawn."))
    part.summary = f"{len(levels)} sites, {about.get('method')}"
    return part


def distributions(subjects, batch: np.ndarray, levels: list[str], title: str) -> Image:
    """Per site, box plots of the subjects' mean values before and after, side by side."""
    figure = new_figure(max(520, 90 * len(levels) + 160), 300)
    axes = figure.add_axes((0.1, 0.2, 0.86, 0.68))
    positions = np.arange(len(levels)) * 3.0
    for offset, values, colour in ((0, subjects[0], BEFORE), (1, subjects[1], AFTER)):
        data = [values[(batch == k) & np.isfinite(values)] for k in range(len(levels))]
        shown = [d if d.size else np.array([np.nan]) for d in data]
        axes.boxplot(
            shown,
            positions=positions + offset,
            widths=0.8,
            patch_artist=True,
            boxprops={"facecolor": colour, "color": colour},
            medianprops={"color": "black"},
            flierprops={"markersize": 3, "markeredgecolor": colour},
        )
    axes.set_xticks(positions + 0.5, [str(level)[:14] for level in levels], fontsize=8)
    axes.set_ylabel("subject mean over elements", fontsize=9)
    axes.set_title(f"{title}: before (grey) and after (blue)", fontsize=10, loc="left")
    axes.tick_params(labelsize=8)
    return image(figure, f"{title}: subject means per site before and after")
