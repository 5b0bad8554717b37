"""Plots that are not brain maps: distributions, phenotypes, subjects, the carpet."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colormaps

from greyarray.report import qc
from greyarray.report.figures import Image, Style, image, new_figure
from greyarray.report.layout import Layout, short_name
from greyarray.report.stream import CohortStats

FLAG = "#d62728"
BLUE = "#4c72b0"
MAX_PHENOTYPES = 24


def histogram(values: np.ndarray, label: str, title: str) -> Image:
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    figure = new_figure(520, 260)
    axes = figure.add_axes((0.13, 0.18, 0.83, 0.7))
    if finite.size:  # one filled step outline: hist() draws a patch per bar, 10x slower
        counts, edges = np.histogram(finite, bins=80)
        axes.stairs(counts, edges, fill=True, color=BLUE)
    axes.set_xlabel(label, fontsize=9)
    axes.set_ylabel("elements", fontsize=9)
    axes.set_title(title, fontsize=10, loc="left")
    axes.tick_params(labelsize=8)
    return image(figure, title)


def phenotypes(table: pd.DataFrame, title: str) -> Image:
    """A small plot per column: histogram (numeric) or level counts (categorical)."""
    columns = list(table.columns)[:MAX_PHENOTYPES]
    per_row = 4
    n_rows = -(-len(columns) // per_row)
    cell_w, cell_h = 280, 190
    figure = new_figure(cell_w * per_row, cell_h * n_rows + 30)
    figure.text(0.01, 1 - 6 / (cell_h * n_rows + 30), title, va="top", fontsize=11)
    for k, name in enumerate(columns):
        column = table[name]
        axes = figure.add_subplot(n_rows, per_row, k + 1)
        numbers = pd.to_numeric(column, errors="coerce")
        if numbers.notna().sum() == column.notna().sum() and column.notna().any():
            axes.hist(numbers.dropna(), bins=20, color=BLUE)
        else:
            counts = column.value_counts().head(8)
            axes.bar(range(len(counts)), counts.to_numpy(), color=BLUE)
            axes.set_xticks(
                range(len(counts)), [str(c)[:10] for c in counts.index], rotation=30, ha="right"
            )
        missing = int(column.isna().sum())
        axes.set_title(f"{name[:28]}" + (f" ({missing} missing)" if missing else ""), fontsize=9)
        axes.tick_params(labelsize=7)
    figure.subplots_adjust(
        left=0.05,
        right=0.98,
        top=1 - 50 / (cell_h * n_rows + 30),
        bottom=0.12 if n_rows == 1 else 0.07,
        hspace=0.7,
        wspace=0.3,
    )
    return image(
        figure,
        title,
        ""
        if len(table.columns) <= MAX_PHENOTYPES
        else f"First {MAX_PHENOTYPES} of {len(table.columns)} columns.",
    )


def outliers(stats: CohortStats, checks: qc.SubjectChecks, labels: list[str], title: str):
    """Correlation with the median map per subject (sorted), and mean against SD."""
    flagged = checks.flagged
    figure = new_figure(1000, 330)
    figure.text(0.01, 0.98, title, va="top", fontsize=11)
    left = figure.add_axes((0.07, 0.15, 0.4, 0.72))
    order = np.argsort(np.nan_to_num(stats.correlation, nan=-2), kind="stable")
    rank = np.arange(len(order))
    colours = np.where(flagged[order], FLAG, BLUE)
    left.scatter(rank, stats.correlation[order], c=colours, s=12)
    line = qc.correlation_limit(stats.correlation)
    if line is not None:
        left.axhline(line, color=FLAG, lw=0.8, ls="--")
    left.set_xlabel("subjects, sorted", fontsize=9)
    left.set_ylabel("correlation with the median map", fontsize=9)
    right = figure.add_axes((0.57, 0.15, 0.4, 0.72))
    right.scatter(stats.subject_mean, stats.subject_sd, c=np.where(flagged, FLAG, BLUE), s=12)
    right.set_xlabel("subject mean", fontsize=9)
    right.set_ylabel("subject SD", fontsize=9)
    for k, i in enumerate(np.flatnonzero(flagged)[:12]):
        offset = {"xytext": (4, 2 + 9 * (k % 6)), "textcoords": "offset points"}  # no overlap
        position = int(np.flatnonzero(order == i)[0])
        left.annotate(labels[i], (position, stats.correlation[i]), fontsize=7, color=FLAG, **offset)
        right.annotate(
            labels[i],
            (stats.subject_mean[i], stats.subject_sd[i]),
            fontsize=7,
            color=FLAG,
            **offset,
        )
    for axes in (left, right):
        axes.tick_params(labelsize=8)
    return image(figure, title)


def carpet(stats: CohortStats, layout: Layout, flagged: np.ndarray, title: str) -> Image:
    """Subjects (rows, cohort order) x elements (columns, file order: grouped by structure),
    each cell the mean of a run of elements; flagged subjects marked on the right."""
    n = stats.carpet.shape[0]
    rows_px = int(np.clip(2 * n, 160, 700))
    height = rows_px + 120
    figure = new_figure(1100, height)
    figure.text(0.01, 1 - 6 / height, title, va="top", fontsize=11)
    axes = figure.add_axes((0.06, 40 / height, 0.84, rows_px / height))
    style = Style.auto(stats.median, "value")
    shown = axes.imshow(
        stats.carpet,
        aspect="auto",
        interpolation="nearest",
        cmap=colormaps[style.cmap],
        norm=style.norm,
        extent=(0, stats.carpet_edges[-1], n - 0.5, -0.5),
    )
    axes.set_xlabel("elements (file order)", fontsize=9)
    axes.set_ylabel("subjects (cohort order)", fontsize=9)
    axes.tick_params(labelsize=8)
    for name, start, stop in layout.structures:
        if start:
            axes.axvline(start, color="white", lw=0.6)
        if (stop - start) > 0.04 * layout.n_elements:
            axes.text(
                (start + stop) / 2,
                -0.5 - n * 0.02,
                short_name(name),
                ha="center",
                va="bottom",
                fontsize=7,
                rotation=0,
            )
    for i in np.flatnonzero(flagged):
        axes.annotate(
            "",
            (stats.carpet_edges[-1], i),
            xytext=(stats.carpet_edges[-1] * 1.03, i),
            arrowprops={"arrowstyle": "->", "color": FLAG},
            annotation_clip=False,
        )
    bar = figure.add_axes((0.93, 40 / height, 0.015, rows_px / height))
    figure.colorbar(shown, cax=bar).ax.tick_params(labelsize=8)
    return image(
        figure, title, "Flagged subjects are marked with red arrows." if flagged.any() else ""
    )
