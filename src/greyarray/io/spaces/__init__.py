"""Element spaces: what the columns of a ModelArray matrix are, one value object per data type.

``read_geometry(h5)`` returns the space GreyArray stored in an HDF5 (``greyarray/geometry``), or
None for files another tool wrote.
"""

from __future__ import annotations

import h5py

from greyarray.errors import DataError
from greyarray.io.spaces.base import ElementSpace, MapWriter, Neighbours
from greyarray.io.spaces.cifti import EXTENSIONS, Geometry, Greyordinates, Parcels
from greyarray.io.spaces.fixels import FixelSet
from greyarray.io.spaces.voxels import VoxelGrid

__all__ = [
    "MAP_EXTENSIONS",
    "ElementSpace",
    "FixelSet",
    "Geometry",
    "Greyordinates",
    "MapWriter",
    "Neighbours",
    "Parcels",
    "VoxelGrid",
    "read_geometry",
    "read_neighbours",
    "stored_kind",
]

SPACES: dict[str, type[ElementSpace]] = {
    kind: cls for cls in (Greyordinates, Parcels, VoxelGrid, FixelSet) for kind in cls.stored_kinds
}
# endings of every space's map files (longest first: ``.nii.gz`` before ``.nii``)
MAP_EXTENSIONS = (*sorted(set(EXTENSIONS.values())), ".nii.gz", ".nii", ".mif.gz", ".mif")


def _group(h5: h5py.File) -> h5py.Group | None:
    top = h5.get("greyarray")
    group = top.get("geometry") if isinstance(top, h5py.Group) else None
    if group is not None and not isinstance(group, h5py.Group):
        raise DataError(f"{h5.filename}: greyarray/geometry is not a group (damaged file?)")
    return group


def stored_kind(h5: h5py.File) -> str | None:
    """The kind of space ``greyarray/geometry`` says it holds (None: no such group)."""
    group = _group(h5)
    if group is None:
        return None
    kind = group.attrs.get("space", group.attrs.get("cifti_kind"))
    return kind.decode(errors="replace") if isinstance(kind, bytes) else str(kind)


def read_geometry(h5: h5py.File) -> ElementSpace | None:
    """The element space GreyArray stored, or None for files written by other tools."""
    group = _group(h5)
    if group is None:
        return None
    where = f"{h5.filename}: greyarray/geometry"
    space = SPACES.get(stored_kind(h5) or "", Geometry)
    return space.from_hdf5(group, where)


def read_neighbours(h5: h5py.File, connectivity: int) -> Neighbours:
    """Which elements of the stored space touch (for TFCE); one line when it has none."""
    kind = stored_kind(h5)
    reason = SPACES[kind].no_neighbourhood(kind) if kind in SPACES else None
    if reason:
        raise DataError(f"{h5.filename}: {reason}")
    space = read_geometry(h5)
    if space is None:
        raise DataError(
            f"{h5.filename}: no stored geometry (greyarray/geometry): TFCE needs an HDF5 written "
            "by greyarray to-modelarray"
        )
    try:
        return space.neighbours(connectivity)
    except DataError as err:
        raise DataError(f"{h5.filename}: {err}") from None
