"""Element spaces: what the columns of a ModelArray matrix are, one value object per data type.

``read_geometry(h5)`` returns the space GreyArray stored in an HDF5 (``greyarray/geometry``), or
None for files another tool wrote; ``copy_space`` gives a new file another's elements, and
``element_difference`` compares two files' elements.
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
    "copy_space",
    "element_difference",
    "read_geometry",
    "read_neighbours",
    "stored_kind",
]

SPACES: dict[str, type[ElementSpace]] = {
    kind: cls for cls in (Greyordinates, Parcels, VoxelGrid, FixelSet) for kind in cls.stored_kinds
}
# ModelArrayIO's element tables of every space (a file without greyarray/geometry has only these)
TABLES = tuple(dict.fromkeys(name for cls in SPACES.values() for name in cls.tables))
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


def copy_space(source: h5py.File, h5: h5py.File) -> None:
    """The elements of ``source`` into the new file ``h5``: the space GreyArray stored
    (``to_hdf5``: ModelArrayIO's tables and ``greyarray/geometry``), else the element tables
    another tool (ModelArrayIO) wrote, as they are."""
    space = read_geometry(source)
    if space is not None:
        space.to_hdf5(h5)
        return
    for name in TABLES:
        if name in source:
            source.copy(source[name], h5, name=name)


def element_difference(first: h5py.File, second: h5py.File) -> tuple[str | None, bool]:
    """(what differs between the elements of two ModelArray files, None: nothing found; whether
    both store their space, so that everything was compared). Without a stored space on both
    sides only ModelArrayIO's element tables that both files have are compared."""
    mine, theirs = read_geometry(first), read_geometry(second)
    if mine is not None and theirs is not None:
        return mine.difference(theirs), True
    for name in TABLES:
        if name in first and name in second and not _same_object(first[name], second[name]):
            return f"their {name} tables differ", False
    return None, False


def _same_object(a: h5py.Group | h5py.Dataset, b: h5py.Group | h5py.Dataset) -> bool:
    """Equal datasets (values and shape), or groups of equal datasets."""
    import numpy as np

    if isinstance(a, h5py.Dataset) and isinstance(b, h5py.Dataset):
        return a.shape == b.shape and np.array_equal(a[()], b[()])
    if isinstance(a, h5py.Group) and isinstance(b, h5py.Group):
        return sorted(a) == sorted(b) and all(_same_object(a[k], b[k]) for k in a)
    return False


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
