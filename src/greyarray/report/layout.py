"""Where each element of a map goes on screen: surface vertices, voxels, parcels or strips.

A ``Layout`` is built once per element space and tells the figures how to place a flat vector
of element values: cortical greyordinates onto fsLR 32k vertices, subcortical ones and NIfTI
voxels into a volume, fixels into the voxels that hold them (``fixel_voxel``), parcels into bars
or a matrix. This module and ``figures.brain_map`` are the one place that draws by space type.
Files written by other tools (ModelArrayIO) record structure codes, parcel names, or voxel and
fixel tables without an affine; they are drawn as strips, bars or voxel slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h5py
import numpy as np
from nibabel.cifti2 import cifti2_axes

from greyarray.errors import DataError
from greyarray.io import h5read, mesh
from greyarray.io.spaces import (
    ElementSpace,
    FixelSet,
    VoxelGrid,
    read_geometry,
    stored_kind,
)
from greyarray.io.spaces.voxels import describe_grid


@dataclass(frozen=True)
class Surface:
    """The elements of one cortical structure and the vertices they sit on."""

    structure: str
    elements: np.ndarray  # element indices (into the map)
    vertices: np.ndarray  # vertex index of each element
    n_vertices: int  # vertices of the whole surface (including the medial wall)

    @property
    def hemisphere(self) -> str | None:
        """``L``/``R`` when this is a cortex on the fsLR 32k mesh the figures can draw."""
        hemi = mesh.HEMISPHERES.get(self.structure)
        return hemi if self.n_vertices == mesh.N_VERTICES else None

    def on_mesh(self, values: np.ndarray) -> np.ndarray:
        """One value per mesh vertex; NaN where the map has no element (e.g. medial wall)."""
        out = np.full(self.n_vertices, np.nan)
        out[self.vertices] = values[self.elements]
        return out


@dataclass(frozen=True)
class Volume:
    """The voxel elements: their ijk indices in a volume of ``shape`` mapped by ``affine``."""

    elements: np.ndarray
    ijk: np.ndarray  # (n, 3)
    shape: tuple[int, int, int]
    affine: np.ndarray  # 4 x 4, voxel to mm

    @property
    def voxel_size(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


@dataclass(frozen=True)
class Layout:
    """How to draw the elements of one geometry."""

    kind: str  # dscalar | pscalar | pconn
    n_elements: int
    structures: list[tuple[str, int, int]] = field(default_factory=list)  # name, start, stop
    surfaces: list[Surface] = field(default_factory=list)
    volume: Volume | None = None
    parcels: list[str] = field(default_factory=list)  # pscalar parcels; pconn rows
    columns: list[str] = field(default_factory=list)  # pconn columns
    fixel_voxel: np.ndarray | None = None  # fixels: index into volume.ijk of each element

    def on_voxels(self, values: np.ndarray) -> np.ndarray:
        """Values per voxel of ``volume``: the elements' own (voxels), or for fixels the value
        of largest magnitude among each voxel's fixels (NaN: none finite)."""
        if self.fixel_voxel is None:
            return values
        size = np.where(np.isnan(values), -1.0, np.abs(values))
        order = np.lexsort((size, self.fixel_voxel))  # by voxel, then |value|: last is largest
        last = np.r_[self.fixel_voxel[order][1:] != self.fixel_voxel[order][:-1], True]
        out = np.full(len(self.volume.ijk), np.nan)
        out[self.fixel_voxel[order][last]] = values[order][last]
        return out

    @property
    def fixels_per_voxel(self) -> np.ndarray | None:
        if self.fixel_voxel is None:
            return None
        return np.bincount(self.fixel_voxel, minlength=len(self.volume.ijk))

    @property
    def drawable(self) -> list[Surface]:
        """The fsLR 32k cortical surfaces (drawn on the mesh)."""
        return [s for s in self.surfaces if s.hemisphere]

    @property
    def strips(self) -> list[tuple[str, int, int]]:
        """Surface structures not drawable on the fsLR 32k mesh: drawn as flat strips."""
        drawn = {s.structure for s in self.drawable}
        names = {s.structure for s in self.surfaces} - drawn
        if not self.surfaces and self.volume is None:  # geometry known only by structure
            names = {name for name, _, _ in self.structures}
        return [item for item in self.structures if item[0] in names]

    @classmethod
    def from_geometry(cls, geometry: ElementSpace) -> Layout:
        if isinstance(geometry, VoxelGrid):
            return cls.voxels(geometry.ijk, geometry.shape, geometry.affine)
        if isinstance(geometry, FixelSet):
            return cls.fixels(
                geometry.voxel_ijk, geometry.shape, geometry.affine, geometry.fixel_voxel
            )
        axes = geometry.axes
        if geometry.kind == "pscalar":
            return cls("pscalar", geometry.n_elements, parcels=[str(n) for n in axes[0].name])
        if geometry.kind == "pconn":
            return cls(
                "pconn",
                geometry.n_elements,
                parcels=[str(n) for n in axes[0].name],
                columns=[str(n) for n in axes[1].name],
            )
        return _dense(axes[0])

    @classmethod
    def voxels(cls, ijk: np.ndarray, shape, affine) -> Layout:
        """NIfTI voxels: every element is a voxel of the volume."""
        n = len(ijk)
        volume = Volume(np.arange(n), np.asarray(ijk), tuple(int(s) for s in shape), affine)
        return cls("voxels", n, [("voxels", 0, n)], volume=volume)

    @classmethod
    def fixels(cls, voxel_ijk: np.ndarray, shape, affine, fixel_voxel: np.ndarray) -> Layout:
        """Fixels drawn in the voxels that hold them."""
        n = len(fixel_voxel)
        volume = Volume(
            np.arange(len(voxel_ijk)), np.asarray(voxel_ijk), tuple(int(s) for s in shape), affine
        )
        return cls("fixels", n, [("fixels", 0, n)], volume=volume, fixel_voxel=fixel_voxel)

    @classmethod
    def from_h5(cls, h5: h5py.File) -> Layout:
        """From the decoded geometry GreyArray stores (no XML parsing), else from ModelArrayIO's
        structure codes or parcel names."""
        scalars = h5read.scalar_names(h5)
        if not scalars:
            raise DataError(f"{h5.filename}: no scalars/<name>/values (not a ModelArray file?)")
        n = h5read.read_scalar(h5, scalars[0]).n_elements
        stored = h5.get("greyarray/geometry")
        if stored is not None and "structure" in stored:
            return _stored_dense(stored)
        if stored_kind(h5) in ("voxels", "fixels"):
            return cls.from_geometry(read_geometry(h5))
        if "voxels" in h5:  # ModelArrayIO's tables: no affine, drawn on a 1 mm grid
            return _modelarrayio_volume(h5, n)
        if "parcels/parcel_id" in h5:
            return cls("pscalar", n, parcels=list(h5["parcels/parcel_id"].asstr()[()]))
        if "parcels/parcel_id_from" in h5:
            rows = list(h5["parcels/parcel_id_from"].asstr()[()])
            cols = list(h5["parcels/parcel_id_to"].asstr()[()])
            return cls("pconn", n, parcels=rows, columns=cols)
        geometry = read_geometry(h5)
        if geometry is not None:
            return cls.from_geometry(geometry)
        if "greyordinates" in h5:
            codes = h5["greyordinates"][1]
            names = [_text(v) for v in h5["greyordinates"].attrs.get("structure_names", [])]
            return cls("dscalar", n, structures=_runs(codes, names))
        return cls("dscalar", n, structures=[("all elements", 0, n)])


def _modelarrayio_volume(h5: h5py.File, n: int) -> Layout:
    from greyarray.io.spaces.voxels import read_voxel_table

    table = h5["voxels"]
    size = np.asarray(table[1:].max(axis=1) + 1 if table.shape[1] else [1, 1, 1], dtype=int)
    ijk = read_voxel_table(h5, tuple(size))
    if "fixels" in h5:
        fixel_voxel = np.asarray(h5["fixels"][1], dtype=np.int64)
        if fixel_voxel.size != n or fixel_voxel.min(initial=0) < 0 or fixel_voxel.max() >= len(ijk):
            raise DataError(f"{h5.filename}: fixels table does not fit the voxels table")
        return Layout.fixels(ijk, size, np.eye(4), fixel_voxel)
    if len(ijk) != n:
        raise DataError(f"{h5.filename}: voxels table has {len(ijk)} rows for {n} elements")
    return Layout.voxels(ijk, size, np.eye(4))


def _stored_dense(group: h5py.Group) -> Layout:
    """A dense layout from ``greyarray/geometry``'s arrays (store.py writes them)."""
    names = [_text(v) for v in group.attrs["structure_names"]]
    vertex, ijk = group["vertex"][()], group["voxel_ijk"][()]
    counts = dict(
        zip(
            map(_text, group.attrs["surface_structures"]),
            map(int, group.attrs["surface_vertex_counts"]),
            strict=True,
        )
    )
    structures = _runs(group["structure"][()], names)
    surfaces = [
        Surface(name, np.arange(a, b), vertex[a:b], counts[name])
        for name, a, b in structures
        if vertex[a] >= 0
    ]
    voxels = np.flatnonzero(vertex < 0)
    volume = None
    if voxels.size:
        shape = tuple(int(s) for s in group.attrs["volume_shape"])
        affine = np.asarray(group.attrs["volume_affine"], dtype=float)
        volume = Volume(voxels, ijk[voxels], shape, affine)
    return Layout("dscalar", len(vertex), structures, surfaces, volume)


def _dense(axis: cifti2_axes.BrainModelAxis) -> Layout:
    structures, surfaces = [], []
    voxel_parts = []
    for name, part, _ in axis.iter_structures():
        start, stop, _ = part.indices(len(axis))
        structures.append((str(name), start, stop))
        elements = np.arange(start, stop)
        if axis.vertex[start] >= 0:  # (axis.surface_mask re-derives the whole axis per call)
            vertices = np.asarray(axis.vertex[start:stop])
            surfaces.append(Surface(str(name), elements, vertices, axis.nvertices[name]))
        else:
            voxel_parts.append(elements)
    volume = None
    if voxel_parts:
        elements = np.concatenate(voxel_parts)
        volume = Volume(
            elements,
            np.asarray(axis.voxel[elements]),
            tuple(int(s) for s in axis.volume_shape),
            np.asarray(axis.affine, dtype=float),
        )
    return Layout("dscalar", len(axis), structures, surfaces, volume)


def _runs(codes: np.ndarray, names: list[str]) -> list[tuple[str, int, int]]:
    """Contiguous runs of structure codes as (name, start, stop)."""
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    stops = np.r_[starts[1:], len(codes)]
    label = {i: name for i, name in enumerate(names)}
    return [
        (label.get(int(codes[a]), f"structure {codes[a]}"), int(a), int(b))
        for a, b in zip(starts, stops, strict=True)
    ]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def short_name(structure: str) -> str:
    """CIFTI_STRUCTURE_CORTEX_LEFT -> cortex left."""
    return structure.removeprefix("CIFTI_STRUCTURE_").replace("_", " ").lower()


DENSITIES = {32492: "fsLR 32k", 59292: "fsLR 59k", 163842: "fsLR 164k"}
SUMMARY_COLUMNS = ["structure", "elements", "where"]


def summary_rows(layout: Layout) -> list[list[str]]:
    """One row per structure (or parcel set): name, element count, surface density or voxels."""
    if layout.kind == "pscalar":
        return [["parcels", f"{len(layout.parcels):,}", "parcellated scalar (pscalar)"]]
    if layout.kind == "pconn":
        shape = f"{len(layout.parcels)} x {len(layout.columns)} parcels"
        return [["parcel pairs", f"{layout.n_elements:,}", f"connectivity matrix (pconn), {shape}"]]
    if layout.kind == "voxels":
        grid = describe_grid(layout.volume.shape, layout.volume.affine)
        return [["voxels", f"{layout.n_elements:,}", f"NIfTI, the group mask's voxels in a {grid}"]]
    if layout.kind == "fixels":
        counts = layout.fixels_per_voxel
        grid = describe_grid(layout.volume.shape, layout.volume.affine)
        spread = f"{counts.min()} to {counts.max()} per voxel, mean {counts.mean():.2f}"
        where = f"MRtrix fixels in {len(counts):,} voxels ({spread}) of a {grid}"
        return [["fixels", f"{layout.n_elements:,}", where]]
    surfaces = {s.structure: s for s in layout.surfaces}
    rows = []
    for name, start, stop in layout.structures:
        if name in surfaces:
            count = surfaces[name].n_vertices
            where = f"surface, {DENSITIES.get(count, f'{count:,} vertices')} ({count:,} vertices)"
        elif layout.volume is not None:
            size = " x ".join(f"{s:g}" for s in layout.volume.voxel_size)
            shape = " x ".join(map(str, layout.volume.shape))
            where = f"voxels of {size} mm in a {shape} volume"
        else:
            where = "(no vertex or voxel information)"
        rows.append([short_name(name), f"{stop - start:,}", where])
    return rows
