"""Voxels of a NIfTI grid under a group mask (ModelArrayIO's ``--mask``).

The elements are the mask's voxels (value > 0) in numpy's C order of (i, j, k), ModelArrayIO's
order, which its ``voxels`` table (voxel_id, i, j, k) records. ``greyarray/geometry`` adds the
grid (shape, affine), a hash of the mask and the header result maps are written with, so that
``export-results`` needs no mask for files GreyArray made.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import h5py
import numpy as np

from greyarray.errors import DataError
from greyarray.io.spaces.base import ElementSpace, MapWriter, Neighbours, grid_edges, read_bytes

AFFINE_TOLERANCE = 1e-4  # mm: files on one grid may differ by rounding in their headers
CONNECTIVITY = 6  # PALM's default for volumes


def describe_grid(shape, affine) -> str:
    """``97 x 115 x 97 grid of 2 x 2 x 2 mm``."""
    sizes = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    return f"{' x '.join(map(str, shape))} grid of {' x '.join(f'{s:g}' for s in sizes)} mm"


def grid_difference(shape, affine, other_shape, other_affine, what: str) -> str | None:
    """What differs between two grids (shape, or affine beyond the tolerance), or None."""
    if tuple(shape) != tuple(other_shape):
        return f"shape {tuple(other_shape)}, {what} has {tuple(shape)}"
    mine, theirs = np.asarray(affine, dtype=float), np.asarray(other_affine, dtype=float)
    worst = float(np.abs(mine - theirs).max())
    if worst > AFFINE_TOLERANCE:
        return (
            f"its voxel-to-mm affine differs from {what}'s by up to {worst:.3g} mm (tolerance "
            f"{AFFINE_TOLERANCE:g} mm): origin {np.round(theirs[:3, 3], 4).tolist()}, "
            f"{what} has {np.round(mine[:3, 3], 4).tolist()}"
        )
    return None


@dataclass(frozen=True, eq=False)
class VoxelGrid(ElementSpace):
    """The voxels of a group mask: grid shape, affine, and each element's (i, j, k)."""

    shape: tuple[int, int, int]
    affine: np.ndarray = field(repr=False)  # 4 x 4
    ijk: np.ndarray = field(repr=False)  # (n, 3) int64, C order of the mask's voxels
    head: bytes = field(repr=False, default=b"")  # the header result maps are written with
    source: str = ""
    kind: ClassVar[str] = "voxels"
    stored_kinds: ClassVar[tuple[str, ...]] = ("voxels",)
    tables: ClassVar[tuple[str, ...]] = ("voxels",)

    @classmethod
    def from_mask(cls, shape, affine, mask: np.ndarray, head: bytes, source: str) -> VoxelGrid:
        """From a boolean mask volume, indexed [i, j, k]."""
        ijk = np.column_stack(np.nonzero(mask)).astype(np.int64)
        if not len(ijk):
            raise DataError(f"{source}: the mask has no voxel > 0")
        return cls(tuple(int(s) for s in shape), np.asarray(affine, float), ijk, head, source)

    @property
    def n_elements(self) -> int:
        return len(self.ijk)

    @cached_property
    def flat(self) -> np.ndarray:
        """Each element's index in a NIfTI data block (Fortran order: i fastest)."""
        return np.ravel_multi_index(tuple(self.ijk.T), self.shape, order="F")

    @cached_property
    def mask_sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.ijk, "<i8").tobytes()).hexdigest()

    @property
    def identity(self) -> bytes:
        return repr((self.shape, self.affine.tobytes(), self.mask_sha256)).encode()

    def grid_difference(self, shape, affine, what: str = "the group mask") -> str | None:
        return grid_difference(self.shape, self.affine, shape, affine, what)

    def difference(self, other: ElementSpace) -> str | None:
        if not isinstance(other, VoxelGrid):
            return f"it holds {other.kind}, the first holds voxels"
        problem = self.grid_difference(other.shape, other.affine, "the first")
        if problem:
            return problem
        if other.n_elements != self.n_elements or not np.array_equal(self.ijk, other.ijk):
            return f"its mask has {other.n_elements:,} voxels, the first's {self.n_elements:,}" + (
                "" if other.n_elements != self.n_elements else " (other voxels)"
            )
        return None

    def to_hdf5(self, h5: h5py.File) -> None:
        group = write_grid(h5, self, self.ijk, mask_sha256=self.mask_sha256)
        group.create_dataset("nifti_header", data=np.frombuffer(self.head, np.uint8))

    @classmethod
    def from_hdf5(cls, group: h5py.Group, where: str) -> VoxelGrid:
        h5 = group.file
        shape = _ints(group.attrs.get("volume_shape"), 3, f"{where}: volume_shape")
        affine = np.asarray(group.attrs.get("volume_affine", np.zeros(0)), dtype=float)
        if affine.shape != (4, 4) or not np.isfinite(affine).all():
            raise DataError(f"{where}: volume_affine is not a 4 x 4 matrix (damaged file?)")
        ijk = read_voxel_table(h5, shape)
        grid = cls(shape, affine, ijk, read_bytes(group, "nifti_header", where), where)
        if grid.mask_sha256 != _text(group.attrs.get("mask_sha256")):
            raise DataError(f"{h5.filename}: voxels table differs from the mask it was made with")
        return grid

    def check_tables(self, h5: h5py.File, template: Path) -> None:
        if "voxels" not in h5:
            raise DataError(
                f"{h5.filename}: holds no voxels table; it was not made from NIfTI maps"
            )
        ijk = read_voxel_table(h5, self.shape)
        if not np.array_equal(ijk, self.ijk):
            raise DataError(
                f"{template}: its {self.n_elements:,} mask voxels differ from the "
                f"{len(ijk):,} voxels stored in {h5.filename}"
            )

    def neighbours(self, connectivity: int = CONNECTIVITY) -> Neighbours:
        edges = grid_edges(self.ijk, connectivity)
        n = self.n_elements
        return Neighbours.from_edges(n, edges, np.ones(n), np.zeros(n, bool))

    def describe(self) -> str:
        return f"{self.n_elements:,} voxels of a {describe_grid(self.shape, self.affine)}"

    @property
    def extension(self) -> str:
        return ".nii.gz"

    def check_template(self, path: Path) -> VoxelGrid:
        from greyarray.io.formats.nifti import read_volume

        volume = read_volume(path)
        if problem := self.grid_difference(volume.shape, volume.affine, "the stored grid"):
            raise DataError(problem)
        return self

    def writer(self, compress: bool = True) -> MapWriter:
        from greyarray.io.formats.nifti import NiftiWriter

        return NiftiWriter(self.head, self.shape, self.flat, compress)


def write_grid(h5: h5py.File, space: ElementSpace, ijk: np.ndarray, **attrs) -> h5py.Group:
    """ModelArrayIO's ``voxels`` table (voxel_id, i, j, k) of these voxels, and
    ``greyarray/geometry`` with the space's kind, size and grid (and ``attrs``)."""
    ids = np.arange(len(ijk), dtype=np.int64)
    table = h5.create_dataset("voxels", data=np.vstack([ids, np.asarray(ijk, np.int64).T]))
    table.attrs["column_names"] = ["voxel_id", "i", "j", "k"]
    group = h5.create_group("greyarray/geometry")
    group.attrs.update(
        {
            "space": space.kind,
            "n_elements": space.n_elements,
            "volume_shape": list(space.shape),
            "volume_affine": space.affine,
            **attrs,
        }
    )
    return group


def read_voxel_table(h5: h5py.File, shape) -> np.ndarray:
    """The (i, j, k) of ModelArrayIO's ``voxels`` table, checked against the grid."""
    table = h5.get("voxels")
    if not isinstance(table, h5py.Dataset) or len(table.shape) != 2 or table.shape[0] != 4:
        raise DataError(f"{h5.filename}: voxels is not a 4-row table (voxel_id, i, j, k)")
    if table.dtype.kind not in "iu":
        raise DataError(f"{h5.filename}: voxels holds {table.dtype}, not integers")
    data = table[()].astype(np.int64)
    if (data[0] != np.arange(data.shape[1])).any():
        raise DataError(f"{h5.filename}: voxels' voxel_id is not 0, 1, 2, ...")
    ijk = data[1:].T.copy()
    if len(ijk) and ((ijk < 0).any() or (ijk >= np.asarray(shape)).any()):
        raise DataError(f"{h5.filename}: voxels has (i, j, k) outside the {shape} grid")
    return ijk


def _ints(value, length: int, where: str) -> tuple[int, ...]:
    array = np.asarray(value if value is not None else [], dtype=float).ravel()
    if array.size != length or not np.isfinite(array).all() or (array < 1).any():
        raise DataError(f"{where} is not {length} positive integers (damaged file?)")
    return tuple(int(v) for v in array)


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
