"""CIFTI-2 element spaces: greyordinates (dscalar) and parcels (pscalar, pconn).

A CIFTI space is the XML of its element axis, verbatim, as the first source file had it: two files
with byte-identical XML have the same elements, otherwise nibabel's axes decide. The ModelArray
tables are ModelArrayIO 26's (``greyordinates``, ``parcels/...``); ``greyarray/geometry`` keeps the
XML (export rebuilds files from it) and, for dense data, decoded arrays R or Python users can map
elements with. Reading and writing CIFTI files is ``formats/cifti.py``'s job.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import h5py
import numpy as np

from greyarray.errors import DataError
from greyarray.io import h5read, mesh
from greyarray.io.formats import ciftixml
from greyarray.io.spaces.base import ElementSpace, Neighbours, grid_edges, write_strings

if TYPE_CHECKING:  # nibabel is imported where its axes are used: it costs ~50 ms to import
    from nibabel.cifti2 import cifti2_axes

    from greyarray.io.formats.cifti import CiftiWriter

CIFTI_ECODE = 32
EXTENSIONS = {"dscalar": ".dscalar.nii", "pscalar": ".pscalar.nii", "pconn": ".pconn.nii"}
MAX_NAMES = 100_000  # parcel names a ModelArrayIO table may have
NAMES = {"dscalar": "greyordinates", "pscalar": "parcels", "pconn": "parcel pairs"}


@dataclass(frozen=True)
class Geometry(ElementSpace):
    """What the elements of a CIFTI file are: its kind and the XML of its element axis, verbatim.

    Two files with byte-identical ``xml`` have the same elements; otherwise ``axes`` (nibabel's
    BrainModelAxis/ParcelsAxis, parsed on first use) decides. nibabel only ever parses XML that
    ``ciftixml.check_elements`` accepted, re-serialised from defusedxml's tree.
    """

    kind: str  # dscalar | pscalar | pconn
    xml: bytes  # the MatrixIndicesMap element(s) defining the elements
    n_elements: int
    source: str = field(default="", compare=False)  # the file it came from, for messages
    stored_kinds: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def checked(cls, kind: str, xml: bytes, source: str) -> Geometry:
        """A geometry whose XML passed ``ciftixml.check_elements``; element count from the XML."""
        elements = _check_elements(kind, _document(xml), source)
        geometry = _class(kind)(kind, xml, math.prod(elements.counts), source)
        vars(geometry)["elements"] = elements  # the cached_property's value: checked once
        return geometry

    @cached_property
    def elements(self) -> ciftixml.Elements:
        """The checked element axis (counts per dimension, XML safe for nibabel)."""
        return _check_elements(self.kind, self.document(), self.source)

    @cached_property
    def axes(self) -> tuple[cifti2_axes.Axis, ...]:
        """The element axes: (BrainModelAxis,), (ParcelsAxis,) or (rows, columns) for pconn."""
        from nibabel.cifti2.parse_cifti2 import Cifti2Extension

        clean = self.elements.clean
        dims = (0, 1) if self.kind == "pconn" else (1,)
        try:
            header = Cifti2Extension(code=CIFTI_ECODE, content=clean).get_content()
            axes = tuple(header.get_axis(dim) for dim in dims)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            message = " ".join(str(err).split())[:200] or type(err).__name__
            raise DataError(
                f"{self.source}: nibabel cannot read the CIFTI XML ({message})"
            ) from None
        if tuple(len(a) for a in axes) != self.elements.counts:
            raise DataError(f"{self.source}: nibabel reads other element counts than the XML has")
        return axes

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one map's values as nibabel sees it (pconn: rows x columns), from the XML."""
        return (self.n_elements,) if self.kind != "pconn" else self.elements.counts

    def document(self) -> bytes:
        """A minimal, valid CIFTI-2 XML document holding only the element axis."""
        return _document(self.xml)

    @classmethod
    def from_axes(cls, kind: str, axes: tuple[cifti2_axes.Axis, ...]) -> Geometry:
        """Build from nibabel axes (used when the XML comes from nibabel, e.g. stored geometry)."""
        import nibabel as nb
        from nibabel.cifti2 import cifti2_axes

        full = (cifti2_axes.ScalarAxis(["x"]), *axes) if kind != "pconn" else axes
        xml = nb.cifti2.Cifti2Header.from_axes(full).to_xml()
        maps = ciftixml.index_maps(xml, "<nibabel>")
        element = b"".join(xml[m.start : m.end] for m in ciftixml.element_maps(kind, maps))
        return _class(kind)(kind, element, int(np.prod([len(a) for a in axes])), "<nibabel>")

    def difference(self, other: ElementSpace) -> str | None:
        """None when ``other`` has the same elements, else a short description of what differs."""
        if self.kind != other.kind:
            return f"it is a {other.kind} file, the first file is a {self.kind} file"
        if self.xml == other.xml:
            return None
        assert isinstance(other, Geometry)
        for mine, theirs in zip(self.axes, other.axes, strict=True):
            if mine != theirs:
                return describe_axis_difference(mine, theirs)
        return None

    @property
    def identity(self) -> bytes:
        return self.xml

    def check(self) -> None:
        self.axes  # noqa: B018 (nibabel's verdict)

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.kind]

    def writer(self, compress: bool = True) -> CiftiWriter:
        from greyarray.io.formats.cifti import CiftiWriter

        return CiftiWriter(self)  # CIFTI files are never compressed

    def check_template(self, path: Path) -> Geometry:
        from greyarray.io import remote
        from greyarray.io.formats.cifti import read_file

        template = remote.read_file(path) if remote.is_url(path) else read_file(path)
        if problem := self.difference(template.geometry):
            raise DataError(problem)
        return self

    def describe(self) -> str:
        return f"CIFTI-2 {self.kind}, {self.n_elements:,} {NAMES[self.kind]}"

    def to_hdf5(self, h5: h5py.File) -> None:
        """ModelArrayIO's table(s), then the full geometry: the CIFTI XML (what export rebuilds
        files from) and, for dense data, decoded arrays."""
        self._write_tables(h5)
        group = h5.create_group("greyarray/geometry")
        group.attrs["cifti_kind"] = self.kind
        group.attrs["n_elements"] = self.n_elements
        document = self.document()  # fixed-length, so gzip applies (91k: 600 KB -> ~100 KB)
        group.create_dataset(
            "cifti_xml", data=np.array([document], f"S{len(document)}"), compression="gzip"
        )
        self._write_arrays(group)

    def _write_tables(self, h5: h5py.File) -> None:
        """The element tables exactly as ModelArrayIO 26 writes them."""

    def _write_arrays(self, group: h5py.Group) -> None:
        """Decoded per-element arrays under greyarray/geometry (dense data only)."""

    def check_tables(self, h5: h5py.File, template: Path) -> None:
        """Files from ModelArrayIO record element counts and names: the template must agree."""
        if "greyordinates" in h5:
            table = h5["greyordinates"]
            if not isinstance(table, h5py.Dataset) or len(table.shape) != 2:
                raise DataError(f"{h5.filename}: greyordinates is not a 2-D dataset")
            count = table.shape[-1]
            names = h5read.decode(
                table.attrs.get("structure_names", []), f"{h5.filename}: greyordinates"
            )
            if (
                self.kind != "dscalar"
                or count != self.n_elements
                or (names and set(names) != set(map(str, self.axes[0].name)))
            ):
                raise DataError(
                    f"{template}: does not match the {count} greyordinates stored in {h5.filename}"
                )
        for key in ("parcel_id", "parcel_id_from"):
            if f"parcels/{key}" in h5:
                where = f"{h5.filename}: parcels/{key}"
                names = h5read.strings(h5[f"parcels/{key}"], where, MAX_NAMES)
                if list(map(str, self.axes[0].name)) != names:
                    raise DataError(
                        f"{template}: its parcels differ from those stored in {h5.filename}"
                    )

    @classmethod
    def from_hdf5(cls, group: h5py.Group, where: str) -> Geometry | None:
        """The geometry GreyArray stored (None without its XML). Checked as a source file's XML
        is, and against the stored element count: export writes this XML into every file, so a
        damaged one must stop it, not produce invalid CIFTI files."""
        if "cifti_xml" not in group:
            return None
        dataset = group["cifti_xml"]
        if (
            not isinstance(dataset, h5py.Dataset)
            or dataset.shape != (1,)
            or dataset.dtype.kind != "S"
            or dataset.dtype.itemsize > ciftixml.MAX_XML_BYTES
        ):
            raise DataError(f"{where}/cifti_xml is not one CIFTI XML string (damaged file?)")
        document = bytes(dataset[0])
        head, tail = b'<CIFTI Version="2"><Matrix>', b"</Matrix></CIFTI>"
        if not (document.startswith(head) and document.endswith(tail)):
            raise DataError(f"{where}/cifti_xml is not the CIFTI XML GreyArray stores (damaged?)")
        kind = group.attrs.get("cifti_kind")
        kind = kind.decode(errors="replace") if isinstance(kind, bytes) else str(kind)
        if kind not in EXTENSIONS:
            raise DataError(f"{where}: unknown stored CIFTI kind {kind[:40]!r}")
        count = group.attrs.get("n_elements")
        if not isinstance(count, (int, np.integer)) or isinstance(count, (bool, np.bool_)):
            raise DataError(f"{where}: n_elements {str(count)[:40]!r} is not an integer")
        geometry = checked_geometry(f"{where}/cifti_xml", kind, document[len(head) : -len(tail)])
        if geometry.n_elements != count:
            raise DataError(
                f"{where}: n_elements is {count} but its CIFTI XML defines {geometry.n_elements} "
                "elements"
            )
        return geometry


@dataclass(frozen=True)
class Greyordinates(Geometry):
    """Dense CIFTI (dscalar): cortical vertices and subcortical voxels."""

    stored_kinds: ClassVar[tuple[str, ...]] = ("dscalar",)
    tables: ClassVar[tuple[str, ...]] = ("greyordinates",)

    def _write_tables(self, h5: h5py.File) -> None:
        codes, names = factorize(self.axes[0].name)
        table = np.vstack([np.arange(len(codes)), codes])
        dset = h5.create_dataset("greyordinates", data=table)
        dset.attrs["column_names"] = ["vertex_id", "structure_id"]
        dset.attrs["structure_names"] = [str(n) for n in names]

    def _write_arrays(self, group: h5py.Group) -> None:
        axis = self.axes[0]
        codes, names = factorize(axis.name)
        options = {"compression": "gzip", "shuffle": True}
        group.create_dataset("structure", data=codes.astype("i2"), **options)
        group.attrs["structure_names"] = [str(n) for n in names]
        group.create_dataset("vertex", data=axis.vertex.astype("i4"), **options)
        group.create_dataset("voxel_ijk", data=axis.voxel.astype("i4"), **options)
        group.attrs["surface_structures"] = list(axis.nvertices)
        group.attrs["surface_vertex_counts"] = list(axis.nvertices.values())
        if axis.volume_shape is not None:
            group.attrs["volume_shape"] = list(axis.volume_shape)
            group.attrs["volume_affine"] = axis.affine

    def neighbours(self, connectivity: int) -> Neighbours:
        """Cortical vertices joined by the edges of the fsLR 32k triangles (extent: vertex area
        on the midthickness surface); subcortical voxels joined to their neighbours within the
        same structure (extent: 1 per voxel). Structures never touch one another."""
        axis = self.axes[0]
        structure, names = factorize(axis.name)
        vertex = np.asarray(axis.vertex, dtype=np.int64)
        ijk = np.asarray(axis.voxel, dtype=np.int64)
        counts = {str(k): int(v) for k, v in axis.nvertices.items()}
        weight = np.ones(self.n_elements)
        surface = np.zeros(self.n_elements, bool)
        pieces = []
        for code, name in enumerate(names):
            elements = np.flatnonzero(structure == code)
            if name in counts:
                hemisphere = mesh.HEMISPHERES.get(name)
                if hemisphere is None or counts[name] != mesh.N_VERTICES:
                    raise DataError(
                        f"no mesh for surface {name} ({counts[name]} vertices): TFCE knows the "
                        f"fsLR 32k cortex ({mesh.N_VERTICES} vertices per hemisphere)"
                    )
                pieces.append(surface_edges(elements, vertex[elements], hemisphere))
                weight[elements] = mesh.vertex_areas(hemisphere)[vertex[elements]]
                surface[elements] = True
            else:
                pieces.append(elements[grid_edges(ijk[elements], connectivity)])
        edges = np.concatenate(pieces) if pieces else np.empty((0, 2), np.int64)
        return Neighbours.from_edges(self.n_elements, edges, weight, surface)


@dataclass(frozen=True)
class Parcels(Geometry):
    """Parcellated CIFTI: parcels (pscalar) or pairs of parcels (pconn, rows x columns flattened
    row-major, as ModelArrayIO flattens them)."""

    stored_kinds: ClassVar[tuple[str, ...]] = ("pscalar", "pconn")
    tables: ClassVar[tuple[str, ...]] = ("parcels",)

    def _write_tables(self, h5: h5py.File) -> None:
        if self.kind == "pscalar":
            write_strings(h5, "parcels/parcel_id", self.axes[0].name)
        else:
            write_strings(h5, "parcels/parcel_id_from", self.axes[0].name)
            write_strings(h5, "parcels/parcel_id_to", self.axes[1].name)

    @classmethod
    def no_neighbourhood(cls, kind: str) -> str | None:
        return (
            f"TFCE needs dense greyordinates; {kind} data are parcellated (no neighbourhood): "
            "run without --tfce"
        )


_CLASSES = {"dscalar": Greyordinates, "pscalar": Parcels, "pconn": Parcels}


def _class(kind: str) -> type[Geometry]:
    return _CLASSES.get(kind, Geometry)


def surface_edges(elements: np.ndarray, vertices: np.ndarray, hemisphere: str) -> np.ndarray:
    """Triangle edges of the fsLR 32k mesh between the given vertices, as element pairs."""
    lookup = np.full(mesh.N_VERTICES, -1, dtype=np.int64)
    lookup[vertices] = elements
    pairs = lookup[mesh.edges(mesh.surface(hemisphere, "midthickness").faces)]
    return pairs[(pairs >= 0).all(axis=1)]


def factorize(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(0-based codes, unique values in order of first appearance), as pandas.factorize."""
    uniques, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse], [str(u) for u in uniques[order]]


def _document(xml: bytes) -> bytes:
    return b'<CIFTI Version="2"><Matrix>' + xml + b"</Matrix></CIFTI>"


def _check_elements(kind: str, document: bytes, source: str) -> ciftixml.Elements:
    try:
        return ciftixml.check_elements(kind, document)
    except ciftixml.XmlProblem as problem:
        raise DataError(f"{source}: {problem}") from None


_KNOWN: list[Geometry] = []  # recently checked geometries, most recent first
_KNOWN_LOCK = threading.Lock()
KNOWN_MAX = 4  # each holds a 91k geometry's axes (~20 MB)


def checked_geometry(path: Path | str, kind: str, xml: bytes) -> Geometry:
    """The checked Geometry of this element axis: checked once per distinct XML (a byte compare
    finds it again: ~30 us for a 91k file, against tens of ms to check it)."""
    with _KNOWN_LOCK:
        known = next((g for g in _KNOWN if g.kind == kind and g.xml == xml), None)
    if known is not None:
        return known
    geometry = Geometry.checked(kind, xml, str(path))
    with _KNOWN_LOCK:
        _KNOWN.insert(0, geometry)
        del _KNOWN[KNOWN_MAX:]
    return geometry


def describe_axis_difference(ref: cifti2_axes.Axis, other: cifti2_axes.Axis) -> str:
    """What differs between two element axes, in words a user can act on."""
    from nibabel.cifti2 import cifti2_axes

    if type(ref) is not type(other):
        return f"{type(other).__name__} instead of {type(ref).__name__}"
    if isinstance(ref, cifti2_axes.ParcelsAxis):
        return _describe_parcels(ref, other)
    if len(ref) != len(other):
        return f"{len(other)} greyordinates, the first file has {len(ref)}"
    if (ref.name != other.name).any():
        i = int(np.flatnonzero(ref.name != other.name)[0])
        return f"greyordinate {i} is {other.name[i]}, in the first file {ref.name[i]}"
    if ref.nvertices != other.nvertices:
        return f"surface sizes {other.nvertices}, the first file has {ref.nvertices}"
    for label, mine, theirs in (
        ("surface vertex", ref.vertex, other.vertex),
        ("voxel", ref.voxel, other.voxel),
    ):
        bad = np.flatnonzero((np.asarray(mine) != np.asarray(theirs)).reshape(len(ref), -1).any(1))
        if bad.size:
            i = int(bad[0])
            return (
                f"{bad.size} {label} indices differ, first at greyordinate {i} ({ref.name[i]}): "
                f"{_fmt(theirs[i])}, in the first file {_fmt(mine[i])}"
            )
    return _describe_volume(ref, other) or "greyordinate geometry differs"


def _describe_volume(ref, other) -> str | None:
    if ref.volume_shape != other.volume_shape:
        return f"volume shape {other.volume_shape}, the first file has {ref.volume_shape}"
    if (ref.affine is None) != (other.affine is None) or (
        ref.affine is not None and not np.array_equal(ref.affine, other.affine)
    ):
        return (
            f"volume affine differs (voxel-to-mm translation {_fmt(_origin(other.affine))}, "
            f"in the first file {_fmt(_origin(ref.affine))})"
        )
    return None


def _describe_parcels(ref: cifti2_axes.ParcelsAxis, other: cifti2_axes.ParcelsAxis) -> str:
    if len(ref) != len(other):
        return f"{len(other)} parcels, the first file has {len(ref)}"
    for i, (a, b) in enumerate(zip(ref.name, other.name, strict=True)):
        if a != b:
            return f"parcel {i} is {b!r}, in the first file {a!r}"
    for i, name in enumerate(ref.name):
        same_vox = np.array_equal(ref.voxels[i], other.voxels[i])
        mine, theirs = ref.vertices[i], other.vertices[i]
        same_vert = mine.keys() == theirs.keys() and all(
            np.array_equal(mine[k], theirs[k]) for k in mine
        )
        if not (same_vox and same_vert):
            return f"parcel {name!r} covers other {'voxels' if not same_vox else 'vertices'}"
    if ref.nvertices != other.nvertices:
        return f"surface sizes {other.nvertices}, the first file has {ref.nvertices}"
    return _describe_volume(ref, other) or "parcel definitions differ"


def _origin(affine) -> object:
    return None if affine is None else np.round(np.asarray(affine)[:3, 3], 3).tolist()


def _fmt(value) -> str:
    return str(np.asarray(value).tolist())
