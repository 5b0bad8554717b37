"""Fixels of an MRtrix fixel directory (ModelArrayIO's ``--index-file`` / ``--directions-file``).

The index image (i x j x k x 2) holds per voxel the number of fixels and the index of its first
fixel; the directions image (F x 3 x 1) each fixel's direction. The elements are the F fixels in
their order in the fixel data files. ModelArrayIO's tables are ``fixels`` (fixel_id, voxel_id,
x, y, z) and ``voxels`` (voxel_id, i, j, k; the voxels holding fixels, in the order of their
first fixel). ``greyarray/geometry`` keeps the index and directions files as they were (export
writes them beside the maps, as ModelArrayIO copies them) and the header of result maps.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import h5py
import numpy as np

from greyarray.errors import DataError
from greyarray.io.spaces.base import ElementSpace, MapWriter, read_bytes
from greyarray.io.spaces.voxels import describe_grid, grid_difference, write_grid


@dataclass(frozen=True, eq=False)
class FixelSet(ElementSpace):
    """F fixels in the voxels of a grid, with their directions."""

    shape: tuple[int, int, int]  # the index's voxel grid
    affine: np.ndarray = field(repr=False)
    voxel_ijk: np.ndarray = field(repr=False)  # (V, 3) voxels with fixels, by first fixel
    fixel_voxel: np.ndarray = field(repr=False)  # (F,) int32: row of voxel_ijk of each fixel
    directions: np.ndarray = field(repr=False)  # (F, 3) float32
    vox: tuple[float, float, float] = (1.0, 1.0, 1.0)  # voxel sizes (result maps' header)
    transform: np.ndarray = field(repr=False, default_factory=lambda: np.eye(3, 4))
    files: tuple[tuple[str, bytes], ...] = field(repr=False, default=())  # index, directions
    others: tuple[tuple[str, str], ...] = field(repr=False, default=())  # result maps' header
    source: str = ""
    kind: ClassVar[str] = "fixels"
    stored_kinds: ClassVar[tuple[str, ...]] = ("fixels",)
    tables: ClassVar[tuple[str, ...]] = ("fixels", "voxels")

    @classmethod
    def from_index(cls, index, directions, files=(), source: str = "") -> FixelSet:
        """From the parsed index and directions images (``formats.mif.MifImage``), checked:
        fixels of each voxel are consecutive and every fixel belongs to one voxel."""
        where = source or str(index.header.path)
        dim = index.header.dim
        if len(dim) != 4 or dim[3] != 2:
            raise DataError(
                f"{index.header.path}: has dims {dim}; a fixel index image is i x j x k x 2"
            )
        if (
            index.data.dtype.kind not in "iu"
            and not (index.values() == np.round(index.values())).all()
        ):
            raise DataError(f"{index.header.path}: index values are not integers")
        values = index.values()
        if not np.isfinite(values).all() or (values < 0).any() or values.max() >= 2**31:
            raise DataError(f"{index.header.path}: index values must be integers in 0..2^31")
        counts = values[..., 0].astype(np.int64)
        first = values[..., 1].astype(np.int64)
        ijk = np.column_stack(np.nonzero(counts))
        starts = first[tuple(ijk.T)]
        order = np.argsort(starts, kind="stable")
        ijk, starts, sizes = ijk[order], starts[order], counts[tuple(ijk[order].T)]
        expected = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(sizes) else sizes
        bad = np.flatnonzero(starts != expected)
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"{index.header.path}: fixels are not stored voxel after voxel: voxel "
                f"{tuple(int(v) for v in ijk[i])} starts at fixel {int(starts[i])}, expected "
                f"{int(expected[i])} (a damaged or non-MRtrix index)"
            )
        n = int(sizes.sum())
        if n == 0:
            raise DataError(f"{index.header.path}: the index holds no fixel")
        stated = index.header.value("nfixels")
        if stated is not None and stated.strip() != str(n):
            raise DataError(
                f"{index.header.path}: its header says nfixels: {stated[:20]}, its voxels hold {n}"
            )
        ddim = directions.header.dim
        if len(ddim) < 2 or ddim[0] != n or ddim[1] != 3 or any(d != 1 for d in ddim[2:]):
            raise DataError(
                f"{directions.header.path}: has dims {ddim}; the directions of the index's {n:,} "
                f"fixels are {n} x 3 x 1"
            )
        grid = index.header
        return cls(
            (int(dim[0]), int(dim[1]), int(dim[2])),
            grid.affine,
            ijk.astype(np.int64),
            np.repeat(np.arange(len(sizes), dtype=np.int32), sizes),
            directions.values().reshape(n, 3).astype(np.float32),
            tuple(float(v) for v in grid.vox[:3]),
            grid.transform,
            tuple(files),
            source=where,
        )

    @property
    def n_elements(self) -> int:
        return self.fixel_voxel.size

    @cached_property
    def index_sha256(self) -> str:
        digest = hashlib.sha256()
        for array in (self.voxel_ijk, self.fixel_voxel, self.directions):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    @property
    def identity(self) -> bytes:
        return repr((self.shape, self.affine.tobytes(), self.index_sha256)).encode()

    def difference(self, other: ElementSpace) -> str | None:
        if not isinstance(other, FixelSet):
            return f"it holds {other.kind}, the first holds fixels"
        if other.n_elements != self.n_elements:
            return f"{other.n_elements:,} fixels, the first has {self.n_elements:,}"
        problem = grid_difference(self.shape, self.affine, other.shape, other.affine, "the first")
        if problem:
            return problem
        if not (
            np.array_equal(self.voxel_ijk, other.voxel_ijk)
            and np.array_equal(self.fixel_voxel, other.fixel_voxel)
        ):
            return "its fixels lie in other voxels"
        if not np.allclose(self.directions, other.directions, rtol=0, atol=1e-6):
            return "its fixel directions differ"
        return None

    def fixel_table(self) -> np.ndarray:
        """ModelArrayIO's ``fixels`` table (5 x F, float64: fixel_id, voxel_id, x, y, z)."""
        return np.vstack(
            [
                np.arange(self.n_elements, dtype=np.float64),
                self.fixel_voxel.astype(np.float64),
                self.directions.T.astype(np.float64),
            ]
        )

    def to_hdf5(self, h5: h5py.File) -> None:
        table = h5.create_dataset("fixels", data=self.fixel_table())
        table.attrs["column_names"] = ["fixel_id", "voxel_id", "x", "y", "z"]
        group = write_grid(
            h5,
            self,
            self.voxel_ijk,
            voxel_sizes=list(self.vox),
            transform=self.transform,
            index_sha256=self.index_sha256,
        )
        for role, (name, blob) in zip(("index", "directions"), self.files, strict=False):
            data = group.create_dataset(
                f"{role}_file", data=np.frombuffer(blob, np.uint8), compression="gzip"
            )
            data.attrs["name"] = name

    @classmethod
    def from_hdf5(cls, group: h5py.Group, where: str) -> FixelSet:
        from greyarray.io.spaces.voxels import read_voxel_table

        h5 = group.file
        attrs = group.attrs
        shape = tuple(int(v) for v in np.asarray(attrs.get("volume_shape", []), dtype=np.int64))
        if len(shape) != 3:
            raise DataError(f"{where}: volume_shape is not 3 integers (damaged file?)")
        voxel_ijk = read_voxel_table(h5, shape)
        fixels = h5.get("fixels")
        if not isinstance(fixels, h5py.Dataset) or fixels.ndim != 2 or fixels.shape[0] != 5:
            raise DataError(f"{h5.filename}: fixels is not a 5-row table (damaged file?)")
        table = fixels[()]
        files = tuple(
            (
                str(group[f"{role}_file"].attrs.get("name", f"{role}.mif")),
                read_bytes(group, f"{role}_file", where),
            )
            for role in ("index", "directions")
            if f"{role}_file" in group
        )
        space = cls(
            shape,
            np.asarray(attrs["volume_affine"], dtype=float),
            voxel_ijk,
            table[1].astype(np.int32),
            table[2:5].T.astype(np.float32),
            tuple(float(v) for v in attrs.get("voxel_sizes", (1.0, 1.0, 1.0))),
            np.asarray(attrs.get("transform", np.eye(3, 4)), dtype=float),
            files,
            source=where,
        )
        if space.index_sha256 != str(attrs.get("index_sha256")):
            raise DataError(
                f"{h5.filename}: fixels/voxels tables differ from the index they came from"
            )
        return space

    def check_tables(self, h5: h5py.File, template: Path) -> None:
        fixels = h5.get("fixels")
        if not isinstance(fixels, h5py.Dataset) or fixels.ndim != 2:
            raise DataError(
                f"{h5.filename}: holds no fixels table; it was not made from fixel data"
            )
        if fixels.shape[1] != self.n_elements:
            raise DataError(
                f"{template}: has {self.n_elements:,} fixels, {h5.filename} holds "
                f"{fixels.shape[1]:,}"
            )

    @classmethod
    def no_neighbourhood(cls, kind: str) -> str | None:
        return (
            "TFCE on fixels needs their connectivity from tractography (MRtrix's CFE, "
            "fixelcfestats), which GreyArray does not compute: run without --tfce"
        )

    def describe(self) -> str:
        return (
            f"{self.n_elements:,} fixels in {len(self.voxel_ijk):,} voxels of a "
            f"{describe_grid(self.shape, self.affine)}"
        )

    @property
    def extension(self) -> str:
        return ".mif.gz"

    def check_template(self, path: Path) -> FixelSet:
        """A fixel data file of these fixels: its header (voxel sizes, transform, other
        entries) is the result maps' header, as ModelArrayIO uses its example file's."""
        from greyarray.io.formats.mif import read_image

        header = read_image(path).header
        if header.dim[0] != self.n_elements or any(d != 1 for d in header.dim[1:]):
            raise DataError(
                f"it has dims {' x '.join(map(str, header.dim))}, fixel data of these fixels are "
                f"{self.n_elements:,} x 1 x 1"
            )
        vox = (*(float(v) for v in header.vox[:3]), 1.0, 1.0, 1.0)[:3]
        return replace(self, vox=vox, transform=header.transform, others=header.others)

    def writer(self, compress: bool = True) -> MapWriter:
        from greyarray.io.formats.mif import MifWriter

        return MifWriter(
            self.n_elements,
            self.vox,
            self.transform,
            self.others,
            compress=compress,
            companions=dict(self.files),
        )
