"""What every element space answers: the interface store, export, stats and reports rely on.

An element space says what the columns of ``scalars/<s>/values`` are: CIFTI greyordinates or
parcels (``cifti.py``), voxels of a grid under a mask (``voxels.py``), fixels of an MRtrix fixel
directory (``fixels.py``). Each is a small immutable value object, as nibabel's ``cifti2_axes``
are; the code that stores, exports, fits and draws maps asks the space instead of testing what
kind of data it has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from greyarray.errors import DataError

if TYPE_CHECKING:
    from pathlib import Path

    import h5py


@dataclass(frozen=True)
class Neighbours:
    """Which elements touch (CSR: ``indices[indptr[i]:indptr[i + 1]]`` are i's neighbours), the
    extent each element adds to a cluster (vertex area in mm^2, 1 per voxel), and whether it lies
    on a surface (TFCE's 2-D settings) rather than in a volume."""

    indptr: np.ndarray  # (n + 1,) int64
    indices: np.ndarray  # (2 x edges,) int32
    weight: np.ndarray  # (n,) float64
    surface: np.ndarray  # (n,) bool

    @property
    def size(self) -> int:
        return self.weight.size

    @classmethod
    def from_edges(
        cls, n: int, edges: np.ndarray, weight: np.ndarray, surface: np.ndarray
    ) -> Neighbours:
        indptr, indices = csr(n, edges)
        return cls(indptr, indices, np.asarray(weight, dtype=np.float64), np.asarray(surface, bool))


def csr(n: int, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) of the undirected graph on ``n`` nodes with these edges (pairs)."""
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    both = np.concatenate([edges, edges[:, ::-1]])
    both = both[np.lexsort((both[:, 1], both[:, 0]))]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(both[:, 0], minlength=n), out=indptr[1:])
    return indptr, both[:, 1].astype(np.int32)


class MapWriter(ABC):
    """Writes result maps of one space: one file per map, plus companion files some formats
    need beside them (a fixel directory's index and directions)."""

    extension: str
    compress: bool = False  # compressed files are encoded on threads

    @abstractmethod
    def encode(self, values: np.ndarray, name: str = "") -> bytes:
        """The bytes of a file holding one map (``values``: one per element, NaN: no value)."""

    def companions(self) -> dict[str, bytes]:
        """{file name: bytes} written once beside the maps."""
        return {}

    def write(self, path: Path, values: np.ndarray, name: str = "") -> None:
        """Write one map atomically (a temporary file in the same folder, then a rename)."""
        from greyarray.io.fileio import atomic_write

        atomic_write(path, self.encode(values, name))


class ElementSpace(ABC):
    """The elements of one data type. Subclasses are frozen dataclasses with ``kind``,
    ``n_elements`` and ``source`` (the file it came from, for messages, not compared)."""

    kind: str
    n_elements: int
    source: str
    stored_kinds: ClassVar[tuple[str, ...]] = ()  # greyarray/geometry kinds read by from_hdf5
    tables: ClassVar[tuple[str, ...]] = ()  # ModelArrayIO's element tables (top-level objects)

    @property
    @abstractmethod
    def identity(self) -> bytes:
        """Bytes that are equal for files of the same space (a cheap first comparison)."""

    def check(self) -> None:  # noqa: B027 (most spaces check everything when built)
        """Run the checks a space defers until it is used (before anything is written)."""

    @abstractmethod
    def difference(self, other: ElementSpace) -> str | None:
        """None when ``other`` has the same elements, else what differs, in words."""

    @abstractmethod
    def to_hdf5(self, h5: h5py.File) -> None:
        """Write ModelArrayIO's element tables and ``greyarray/geometry``."""

    @classmethod
    @abstractmethod
    def from_hdf5(cls, group: h5py.Group, where: str) -> ElementSpace:
        """The space stored in ``greyarray/geometry`` (checked: export writes files from it)."""

    @abstractmethod
    def check_tables(self, h5: h5py.File, template: Path) -> None:
        """Refuse a template (this space) that disagrees with the element tables ModelArrayIO
        wrote in ``h5`` (a file without GreyArray's geometry)."""

    def neighbours(self, connectivity: int) -> Neighbours:
        """Which elements touch, for TFCE (``connectivity``: voxel neighbourhood, 6/18/26)."""
        raise DataError(self.no_neighbourhood(self.kind) or "no neighbourhood")

    @classmethod
    def no_neighbourhood(cls, kind: str) -> str | None:
        """Why TFCE cannot run on this kind of space (None: it can)."""
        return None

    @abstractmethod
    def describe(self) -> str:
        """One line for logs, methods text and reports: kind and size."""

    @property
    @abstractmethod
    def extension(self) -> str:
        """The file name ending of this space's maps."""

    @abstractmethod
    def writer(self, compress: bool = True) -> MapWriter:
        """Writes result maps on this space (``compress``: gzip where the format allows)."""

    @abstractmethod
    def check_template(self, path: Path) -> ElementSpace:
        """Check a template map (``--example-file``) against this space (DataError saying what
        differs) and return the space to write maps with (with the template's header, where
        the format keeps one)."""


def write_strings(h5: h5py.Group, name: str, values) -> None:
    """A 1-D dataset of variable-length UTF-8 strings (as ModelArrayIO writes names)."""
    import h5py

    h5.create_dataset(name, data=[str(v) for v in values], dtype=h5py.string_dtype())


def grid_edges(ijk: np.ndarray, connectivity: int) -> np.ndarray:
    """Pairs of rows of ``ijk`` (voxel indices) whose voxels touch: by a face (6), a face or an
    edge (18), or also a corner (26)."""
    if connectivity not in (6, 18, 26):
        raise ValueError(f"connectivity {connectivity}: 6, 18 or 26")
    ijk = np.asarray(ijk, dtype=np.int64)
    if not len(ijk):
        return np.empty((0, 2), np.int64)
    shape = ijk.max(axis=0) + 2  # a margin, so that i + 1 never wraps into the next row
    keys = np.ravel_multi_index((ijk + 1).T, shape + 1)
    order = np.argsort(keys)
    sorted_keys = keys[order]
    rows = np.arange(len(ijk))
    pieces = []
    for offset in np.ndindex(3, 3, 3):
        step = np.array(offset) - 1
        if tuple(step) <= (0, 0, 0) or np.abs(step).sum() > {6: 1, 18: 2, 26: 3}[connectivity]:
            continue  # each pair once: the "forward" offsets within the neighbourhood
        target = np.ravel_multi_index((ijk + 1 + step).T, shape + 1)
        found = np.minimum(np.searchsorted(sorted_keys, target), keys.size - 1)
        hit = sorted_keys[found] == target
        pieces.append(np.column_stack([rows[hit], order[found[hit]]]))
    return np.concatenate(pieces)


def read_bytes(group: h5py.Group, name: str, where: str, limit: int = 2**28) -> bytes:
    """A 1-D uint8 dataset (a file GreyArray kept) as bytes, checked before it is read."""
    import h5py

    dataset = group.get(name)
    if not isinstance(dataset, h5py.Dataset) or dataset.dtype != np.uint8 or dataset.ndim != 1:
        raise DataError(f"{where}/{name} is missing or not bytes (damaged file?)")
    if dataset.size > limit:
        raise DataError(f"{where}/{name} is larger than {limit // 2**20} MiB (damaged file?)")
    return dataset[()].tobytes()
