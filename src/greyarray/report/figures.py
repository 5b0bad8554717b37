"""The report's figures, drawn headless with matplotlib's object API (no pyplot, no display).

Every figure becomes a PNG embedded in the HTML as a data URI, so a report is one file that opens
offline. Brain maps are composed as RGB pictures (surface views from ``surface.render``, voxel
slices, strips) placed pixel for pixel on a canvas with one colour bar: no resampling, and no
per-triangle drawing per map.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
import PIL.Image
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from greyarray.report import surface
from greyarray.report.layout import Layout, Volume, short_name

DPI = 100
MISSING = 0.55  # grey of voxels/parcels/strip cells without a value
SLICES = 6  # axial slices of the subcortical voxels
MOSAIC = (2, 6)  # rows x columns of axial slices of a NIfTI or fixel volume
VOXEL_PIXELS = 2  # each voxel drawn as at least 2 x 2 pixels (more for small volumes)
STRIP_WIDTH, STRIP_HEIGHT = 900, 14
VIEW_LABELS = ("left lateral", "left medial", "right medial", "right lateral")


@dataclass(frozen=True)
class Image:
    """A figure ready for the page: a PNG data URI and what it shows."""

    src: str
    alt: str
    caption: str = ""
    width: int = 0  # natural width in pixels


@dataclass(frozen=True)
class Style:
    """How values become colours: colour map, limits and the colour bar's label."""

    label: str
    cmap: str = "viridis"
    vmin: float = 0.0
    vmax: float = 1.0

    @property
    def norm(self) -> Normalize:
        return Normalize(self.vmin, self.vmax, clip=True)

    @classmethod
    def sequential(cls, values, label: str, cmap: str = "viridis", vmin=None, vmax=None) -> Style:
        """Limits at the 2nd and 98th percentiles (unless given): a few extremes do not wash
        out the map."""
        low, high = _percentiles(values, 2, 98)
        low, high = low if vmin is None else vmin, high if vmax is None else vmax
        return cls(label, cmap, *_widen(low, high))

    @classmethod
    def auto(cls, values, label: str) -> Style:
        """Diverging when the bulk of the values has both signs (e.g. z-maps), else sequential."""
        low, high = _percentiles(values, 2, 98)
        return cls.diverging(values, label) if low < 0 < high else cls.sequential(values, label)

    @classmethod
    def diverging(cls, values, label: str, cmap: str = "RdBu_r", percentile: float = 98) -> Style:
        """Symmetric limits around zero (so white means zero)."""
        finite = np.abs(np.asarray(values, dtype=float))
        finite = finite[np.isfinite(finite)]
        top = float(np.percentile(finite, percentile)) if finite.size else 1.0
        top = top if top > 0 else 1.0
        return cls(label, cmap, -top, top)


def _percentiles(values, low: float, high: float) -> tuple[float, float]:
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if not finite.size:
        return 0.0, 1.0
    a, b = np.percentile(finite, [low, high])
    return float(a), float(b)


def _widen(low: float, high: float) -> tuple[float, float]:
    if high > low:
        return low, high
    pad = abs(low) * 0.05 or 0.5
    return low - pad, high + pad


def to_png(figure: Figure) -> str:
    """The figure as a ``data:image/png;base64,...`` URI.

    The picture is reduced to a 256-colour palette: 3x smaller and 3x faster to encode than
    matplotlib's RGBA PNG, with no visible change (maps are drawn from one colour map)."""
    if not isinstance(figure.canvas, FigureCanvasAgg):
        FigureCanvasAgg(figure)
    figure.canvas.draw()
    rgb = PIL.Image.fromarray(np.asarray(figure.canvas.buffer_rgba())).convert("RGB")
    buffer = io.BytesIO()
    rgb.quantize(256, method=PIL.Image.Quantize.FASTOCTREE).save(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` pixels with its own Agg canvas."""
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def image(figure: Figure, alt: str, caption: str = "") -> Image:
    return Image(to_png(figure), alt, caption, int(figure.get_figwidth() * DPI))


# ---- brain maps ---------------------------------------------------------------------------------
def brain_map(layout: Layout, values: np.ndarray, style: Style, title: str, kind="inflated"):
    """The map drawn as its geometry allows: surfaces and voxel slices, parcels, a matrix."""
    values = np.asarray(values, dtype=float)
    if layout.kind == "pscalar":
        return parcel_bars(layout.parcels, values, style, title)
    if layout.kind == "pconn":
        matrix = values.reshape(len(layout.parcels), len(layout.columns))
        return connectivity_matrix(layout, matrix, style, title)
    rows: list[tuple[np.ndarray, list[Label]]] = []
    notes = []
    if layout.drawable:
        per_vertex = {s.hemisphere: s.on_mesh(values) for s in layout.drawable}
        picture = surface.render(per_vertex, colormaps[style.cmap], style.norm, kind)
        width, height = surface.PANEL
        labels = [_below(width * (i + 0.5), height, text) for i, text in enumerate(VIEW_LABELS)]
        rows.append((picture, labels))
    if layout.volume is not None:
        whole = layout.kind in ("voxels", "fixels")  # a brain volume: a mosaic
        shape = MOSAIC if whole else (1, SLICES)
        rows += volume_slices(layout.volume, layout.on_voxels(values), style, shape)
        if layout.fixel_voxel is not None:
            notes.append(
                "Fixels are drawn in the voxels that hold them: each voxel shows the value of "
                "largest magnitude among its fixels."
            )
    if layout.strips:
        rows.append(strips(layout, values, style))
        odd = [
            f"{short_name(s.structure)} ({s.n_vertices:,} vertices)"
            for s in layout.surfaces
            if not s.hemisphere
        ]
        if odd:
            notes.append(
                "Surfaces not on the fsLR 32k mesh (32,492 vertices per hemisphere) are drawn as "
                "flat strips, elements in file order: " + ", ".join(odd) + "."
            )
        elif not layout.surfaces and layout.volume is None:
            notes.append(
                "This file records structures but not vertices or voxels (written by another "
                "tool): each structure is drawn as a strip, elements in file order."
            )
    return _canvas(rows, style, title), " ".join(notes)


def geometry_figures(layout: Layout, where: str) -> list[Image]:
    """What a geometry table cannot show: how many fixels each voxel holds."""
    counts = layout.fixels_per_voxel
    if counts is None:
        return []
    voxels = Layout.voxels(layout.volume.ijk, layout.volume.shape, layout.volume.affine)
    style = Style("fixels per voxel", "viridis", 0, max(1, int(counts.max())))
    picture, _ = brain_map(voxels, counts.astype(float), style, f"{where}: fixels per voxel")
    return [picture]


# (x, y, text, horizontal alignment, vertical alignment), in pixels of its picture (y down)
Label = tuple[float, float, str, str, str]


def _below(x: float, height: float, text: str) -> Label:
    return (x, height + 2, text, "center", "top")


def _canvas(rows, style: Style, title: str) -> Image:
    """Stack RGB pictures (labels around them) above one horizontal colour bar."""
    width = max(max(picture.shape[1] for picture, _ in rows), STRIP_WIDTH + 300)
    label_px, bar_px, title_px = 18, 64, 24
    height = title_px + sum(p.shape[0] + label_px for p, _ in rows) + bar_px
    figure = new_figure(width, height)
    figure.text(0.01, 1 - 4 / height, title, va="top", ha="left", fontsize=11)
    top = height - title_px
    for picture, labels in rows:
        h, w = picture.shape[:2]
        left = (width - w) / 2
        axes = figure.add_axes((left / width, (top - h) / height, w / width, h / height))
        axes.imshow(picture, interpolation="nearest", aspect="auto")
        axes.set_axis_off()
        for x, y, text, ha, va in labels:
            figure.text(
                (left + x) / width,
                (top - y) / height,
                text,
                ha=ha,
                va=va,
                fontsize=8,
                color="#444",
            )
        top -= h + label_px
    bar = figure.add_axes((0.3, 38 / height, 0.4, 10 / height))
    colourbar = figure.colorbar(
        ScalarMappable(style.norm, colormaps[style.cmap]), cax=bar, orientation="horizontal"
    )
    colourbar.set_label(style.label, fontsize=9, labelpad=1)
    bar.tick_params(labelsize=8)
    return image(figure, title)


def _colours(values: np.ndarray, style: Style) -> np.ndarray:
    """RGB per value; non-finite values grey."""
    rgb = np.full((*values.shape, 3), MISSING, np.float32)
    known = np.isfinite(values)
    rgb[known] = colormaps[style.cmap](style.norm(values[known]))[..., :3]
    return rgb


def volume_slices(volume: Volume, values: np.ndarray, style: Style, shape=(1, SLICES)):
    """Rows of axial slices through the voxels' bounding box (``shape``: rows x slices per row),
    left hemisphere on the left; voxels outside the volume's elements are white."""
    ijk = volume.ijk
    low, high = ijk.min(axis=0), ijk.max(axis=0) + 1
    grid = np.full(high - low, np.nan)
    inside = np.zeros(high - low, bool)
    local = ijk - low
    grid[tuple(local.T)] = values[volume.elements]
    inside[tuple(local.T)] = True
    if volume.affine[0, 0] < 0:  # i runs right to left: flip so that left is on the left
        grid, inside = grid[::-1], inside[::-1]
    count = shape[0] * shape[1]
    levels = np.unique(np.linspace(0, grid.shape[2] - 1, count + 2).round().astype(int)[1:-1])
    scale = int(np.clip(90 // max(grid.shape[:2]), VOXEL_PIXELS, 16))  # small volumes: bigger
    rows = []
    for start in range(0, len(levels), shape[1]):
        panels, labels, x = [], [], 0
        for k in levels[start : start + shape[1]]:
            rgb = _colours(grid[:, :, k].T[::-1], style)  # rows: anterior at the top
            rgb[~inside[:, :, k].T[::-1]] = 1.0
            rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
            gap = np.ones((rgb.shape[0], 10, 3), np.float32)
            panels += [rgb, gap]
            z = (volume.affine @ np.r_[0, 0, k + low[2], 1])[2]
            labels.append(_below(x + rgb.shape[1] / 2, rgb.shape[0], f"z = {z:g} mm"))
            x += rgb.shape[1] + gap.shape[1]
        picture = np.concatenate(panels[:-1], axis=1)
        labels.append((-4, picture.shape[0] / 2, "L", "right", "center"))
        rows.append((picture, labels))
    return rows


def strips(layout: Layout, values: np.ndarray, style: Style):
    """One row per structure: its elements in file order, averaged into ``STRIP_WIDTH`` cells."""
    rows, labels = [], []
    for name, start, stop in layout.strips:
        cells = _resample(values[start:stop], STRIP_WIDTH)
        top = len(rows) // 2 * STRIP_HEIGHT
        rows += [
            np.repeat(_colours(cells, style)[None], STRIP_HEIGHT - 2, axis=0),
            np.ones((2, STRIP_WIDTH, 3), np.float32),
        ]
        text = f"{short_name(name)} ({stop - start:,})"
        labels.append((-6, top + STRIP_HEIGHT / 2 - 1, text, "right", "center"))
    return np.concatenate(rows, axis=0), labels


def _resample(values: np.ndarray, width: int) -> np.ndarray:
    """``width`` cells: means of equal runs of values (or repeated values when fewer)."""
    if values.size < width:
        return values[(np.arange(width) * values.size) // width]
    edges = np.linspace(0, values.size, width + 1).astype(int)[:-1]
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore"):
        return np.add.reduceat(np.where(finite, values, 0), edges) / np.add.reduceat(finite, edges)


def parcel_bars(names: list[str], values: np.ndarray, style: Style, title: str):
    """Bars per parcel, coloured like a map; labelled when there are few parcels."""
    few = len(names) <= 60
    height = 14 * len(names) + 80 if few else 300
    figure = new_figure(1000, height)
    left = 0.25 if few else 0.07
    axes = figure.add_axes((left, 45 / height, 0.95 - left, 1 - 75 / height))
    colours = _colours(values, style)
    position = np.arange(len(names))
    finite = np.nan_to_num(values)
    if few:
        axes.barh(position, finite, color=colours)
        axes.set_yticks(position, [_clip(n) for n in names], fontsize=7)
        axes.invert_yaxis()
        axes.set_xlabel(style.label, fontsize=9)
    else:
        axes.bar(position, finite, color=colours, width=1.0)
        axes.set_xlabel("parcel (file order)", fontsize=9)
        axes.set_ylabel(style.label, fontsize=9)
    axes.set_title(title, fontsize=10, loc="left")
    missing = int((~np.isfinite(values)).sum())
    note = f"{missing} parcels have no value." if missing else ""
    return image(figure, title), note


def connectivity_matrix(layout: Layout, matrix: np.ndarray, style: Style, title: str):
    """A parcel x parcel matrix (pconn), labelled when small."""
    side = min(700, max(300, 6 * max(matrix.shape)))
    labelled = max(matrix.shape) <= 40
    margin = 130 if labelled else 60  # room for parcel names or axis labels
    width, height = side + margin + 140, side + margin + 40
    figure = new_figure(width, height)
    figure.text(0.01, 1 - 6 / height, title, va="top", fontsize=10)
    axes = figure.add_axes((margin / width, margin / height, side / width, side / height))
    axes.imshow(_colours(matrix, style), interpolation="nearest", aspect="auto")
    if labelled:
        axes.set_yticks(range(matrix.shape[0]), [_clip(n, 20) for n in layout.parcels], fontsize=6)
        axes.set_xticks(
            range(matrix.shape[1]), [_clip(n, 20) for n in layout.columns], fontsize=6, rotation=90
        )
    else:
        axes.set_xlabel("parcel (file order)", fontsize=9)
        axes.set_ylabel("parcel (file order)", fontsize=9)
        axes.tick_params(labelsize=8)
    bar = figure.add_axes(((margin + side + 20) / width, 0.25, 14 / width, 0.5))
    colourbar = figure.colorbar(ScalarMappable(style.norm, colormaps[style.cmap]), cax=bar)
    colourbar.set_label(style.label, fontsize=9)
    bar.tick_params(labelsize=8)
    return image(figure, title), ""


def _clip(text: str, length: int = 32) -> str:
    return text if len(text) <= length else text[: length - 3] + "..."
