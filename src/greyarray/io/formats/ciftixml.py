"""Validate CIFTI-2 XML with a hardened parser before anything else (nibabel included) reads it.

Hostile XML (a DOCTYPE, entity declarations, "billion laughs", external entities) is refused by
``defusedxml`` with DTDs forbidden: CIFTI files never have one. Well-formedness (mismatched tags,
undefined entities) is expat's verdict, not a regular expression's. Then the attributes nibabel
does not check are checked here: integers that must be non-negative, index counts that must match
the index lists, vertex and voxel indices inside their surface and volume, known brain structures,
contiguous brain models, unique parcel names. Each check gives one line without the file name;
callers prefix it.

Cost: parsing and checking the 600 KB element axis of a 91k file takes tens of milliseconds, so
``cifti`` runs ``check_elements`` once per distinct element axis; ``check_header`` (the small rest
of each file's XML) runs per file.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from xml.parsers import expat

import numpy as np
from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeET

from greyarray.errors import DataError

MAX_XML_BYTES = 32 * 2**20  # real 91k files have ~0.6 MB
# the CIFTI-2 standard's brain structures (nibabel's CIFTI_BRAIN_STRUCTURES, which a test
# compares; not imported from nibabel, whose import costs ~50 ms)
STRUCTURES = frozenset(
    "CIFTI_STRUCTURE_" + name
    for name in (
        "ACCUMBENS_LEFT",
        "ACCUMBENS_RIGHT",
        "ALL",
        "ALL_GREY_MATTER",
        "ALL_WHITE_MATTER",
        "AMYGDALA_LEFT",
        "AMYGDALA_RIGHT",
        "BRAIN_STEM",
        "CAUDATE_LEFT",
        "CAUDATE_RIGHT",
        "CEREBELLAR_WHITE_MATTER_LEFT",
        "CEREBELLAR_WHITE_MATTER_RIGHT",
        "CEREBELLUM",
        "CEREBELLUM_LEFT",
        "CEREBELLUM_RIGHT",
        "CEREBRAL_WHITE_MATTER_LEFT",
        "CEREBRAL_WHITE_MATTER_RIGHT",
        "CORTEX",
        "CORTEX_LEFT",
        "CORTEX_RIGHT",
        "DIENCEPHALON_VENTRAL_LEFT",
        "DIENCEPHALON_VENTRAL_RIGHT",
        "HIPPOCAMPUS_LEFT",
        "HIPPOCAMPUS_RIGHT",
        "INVALID",
        "OTHER",
        "OTHER_GREY_MATTER",
        "OTHER_WHITE_MATTER",
        "PALLIDUM_LEFT",
        "PALLIDUM_RIGHT",
        "PUTAMEN_LEFT",
        "PUTAMEN_RIGHT",
        "THALAMUS_LEFT",
        "THALAMUS_RIGHT",
    )
)
MARKER_TAG = "GreyArrayElementAxis"
MARKER = f"<{MARKER_TAG}/>".encode()  # stands for the element axis in the per-file remainder
MAX_VOLUME_SIDE = 100_000
_DIGITS = re.compile(r"[0-9\s]*")
_UINT = re.compile(r"\s*[0-9]+\s*")


class XmlProblem(ValueError):
    """What is wrong with a CIFTI XML, in one line without the file name."""


def parse(data: bytes, what: str) -> ET.Element:
    """The root of ``data`` parsed by expat through defusedxml; DTDs and entities refused."""
    if len(data) > MAX_XML_BYTES:
        raise XmlProblem(
            f"{what} is {len(data) / 2**20:.0f} MiB, larger than any real CIFTI file "
            f"(limit {MAX_XML_BYTES // 2**20} MiB)"
        )
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise XmlProblem(f"{what} declares a DOCTYPE or ENTITY (refused: CIFTI XML has none)")
    try:
        return SafeET.fromstring(data, forbid_dtd=True)
    except ET.ParseError as err:
        raise XmlProblem(f"malformed {what} ({expat.errors.messages[err.code]})") from None
    except DefusedXmlException as err:
        raise XmlProblem(f"{what} refused ({type(err).__name__})") from None


@dataclass(frozen=True)
class Header:
    """What each file's own XML (all but the element axis) says."""

    version: str
    maps: dict[int, str]  # matrix dimension -> index type of the maps outside the element axis
    map_names: tuple[str, ...]  # NamedMap/MapName of the SCALARS map


def check_header(remainder: bytes, n_markers: int) -> Header:
    """Check a file's XML with its element axis replaced by ``MARKER`` (``n_markers`` times)."""
    root = parse(remainder, "CIFTI XML")
    if root.tag != "CIFTI":
        raise XmlProblem(f"CIFTI XML root element is <{root.tag}>, not <CIFTI>")
    matrices = root.findall("Matrix")
    if len(matrices) != 1 or len(root) != 1:
        raise XmlProblem("CIFTI XML must hold exactly one <Matrix>")
    markers = [c for c in matrices[0] if c.tag == MARKER_TAG]
    if len(markers) != n_markers or sum(1 for _ in root.iter(MARKER_TAG)) != n_markers:
        raise XmlProblem("malformed CIFTI XML (MatrixIndicesMap inside a comment or text)")
    maps: dict[int, str] = {}
    names: tuple[str, ...] = ()
    for mim in matrices[0].findall("MatrixIndicesMap"):
        kind = mim.get("IndicesMapToDataType", "")
        for dim in _dimensions(mim):
            maps[dim] = kind.removeprefix("CIFTI_INDEX_TYPE_")
        if kind == "CIFTI_INDEX_TYPE_SCALARS":
            names = tuple(_map_name(named) for named in mim.findall("NamedMap"))
    return Header(root.get("Version", ""), maps, names)


def _map_name(named: ET.Element) -> str:
    found = named.findall("MapName")
    if len(found) != 1:
        raise XmlProblem(f"a NamedMap has {len(found)} MapName elements, not 1")
    return (found[0].text or "").strip()


def _dimensions(mim: ET.Element) -> list[int]:
    text = mim.get("AppliesToMatrixDimension", "")
    if not re.fullmatch(r"[0-9]+(,[0-9]+)*", text):
        raise XmlProblem(f"MatrixIndicesMap AppliesToMatrixDimension {text!r} is not a list of 0/1")
    return [int(d) for d in text.split(",")]


@dataclass(frozen=True)
class Elements:
    """A checked element axis: element counts per dimension, and the XML nibabel may parse
    (re-serialised from the checked tree: no comments, nothing expat did not accept)."""

    counts: tuple[int, ...]  # (greyordinates,), (parcels,) or pconn (rows, columns)
    clean: bytes


# what each element of an element axis may contain (anything else is refused, which also
# bounds the depth of the tree that is re-serialised for nibabel)
CHILDREN = {
    "BRAIN_MODELS": {"BrainModel", "Volume"},
    "PARCELS": {"Surface", "Parcel", "Volume"},
    "BrainModel": {"VertexIndices", "VoxelIndicesIJK"},
    "Parcel": {"Vertices", "VoxelIndicesIJK"},
    "Volume": {"TransformationMatrixVoxelIndicesIJKtoXYZ"},
}
EXPECTED_TYPES = {
    "dscalar": ("BRAIN_MODELS",),
    "pscalar": ("PARCELS",),
    "pconn": ("PARCELS", "PARCELS"),
}


def check_elements(kind: str, document: bytes) -> Elements:
    """Check the element axis ``document`` (CIFTI/Matrix holding only its MatrixIndicesMaps)."""
    root = parse(document, "CIFTI XML element axis")
    matrix = root.find("Matrix")
    mims = [] if matrix is None else list(matrix)
    if any(m.tag != "MatrixIndicesMap" for m in mims) or not mims:
        raise XmlProblem("malformed CIFTI XML element axis (not a sequence of MatrixIndicesMap)")
    by_dim: dict[int, ET.Element] = {}
    for mim in mims:
        for dim in _dimensions(mim):
            if dim in by_dim:
                raise XmlProblem(f"CIFTI XML maps matrix dimension {dim} twice")
            by_dim[dim] = mim
    wanted = EXPECTED_TYPES[kind]
    dims = (0, 1) if kind == "pconn" else (1,)
    if sorted(by_dim) != list(dims):
        raise XmlProblem(f"CIFTI XML element axis maps dimensions {sorted(by_dim)}")
    counts = []
    for dim, expected in zip(dims, wanted, strict=True):
        mim = by_dim[dim]
        found = mim.get("IndicesMapToDataType", "").removeprefix("CIFTI_INDEX_TYPE_")
        if found != expected:
            raise XmlProblem(f"dimension {dim} is {found}, expected {expected} for a {kind} file")
        _check_children(mim, expected)
        counts.append(_brain_models(mim) if expected == "BRAIN_MODELS" else _parcels(mim))
    return Elements(tuple(counts), ET.tostring(root))


def _check_children(element: ET.Element, kind: str) -> None:
    allowed = CHILDREN.get(kind, set())
    for child in element:
        if child.tag not in allowed:
            raise XmlProblem(f"unexpected <{str(child.tag)[:40]}> in <{element.tag}>")
        _check_children(child, child.tag)


def _uint(element: ET.Element, name: str, where: str, positive: bool = False) -> int:
    value = element.get(name)
    if value is None:
        raise XmlProblem(f"{where} has no {name}")
    if not _UINT.fullmatch(value) or (positive and int(value) == 0):
        sign = "positive" if positive else "non-negative"
        raise XmlProblem(f"{where} {name}={value!r} is not a {sign} integer")
    return int(value)


def _indices(element: ET.Element, where: str) -> np.ndarray:
    text = element.text or ""
    if not _DIGITS.fullmatch(text):
        bad = next(t for t in text.split() if not t.isascii() or not t.isdigit())
        raise XmlProblem(f"{where} has {bad[:20]!r}, not a non-negative integer index")
    try:
        return np.array(text.split(), dtype=np.int64)
    except OverflowError:
        raise XmlProblem(f"{where} has an index too large for any surface or volume") from None


def _structure(element: ET.Element, where: str) -> str:
    name = element.get("BrainStructure", "")
    if name not in STRUCTURES:
        raise XmlProblem(f"{where} has unknown BrainStructure {name[:60]!r}")
    return name


def _child(element: ET.Element, tag: str, where: str) -> ET.Element:
    found = element.findall(tag)
    if len(found) != 1:
        raise XmlProblem(f"{where} has {len(found)} <{tag}> elements, not 1")
    return found[0]


def _volume(mim: ET.Element) -> tuple[int, int, int] | None:
    volumes = mim.findall("Volume")
    if not volumes:
        return None
    if len(volumes) > 1:
        raise XmlProblem("MatrixIndicesMap has more than one <Volume>")
    text = volumes[0].get("VolumeDimensions", "")
    found = re.fullmatch(r"\s*([0-9]{1,6})\s*,\s*([0-9]{1,6})\s*,\s*([0-9]{1,6})\s*", text)
    shape = tuple(int(d) for d in found.groups()) if found else (0,)
    if min(shape) < 1 or max(shape) > MAX_VOLUME_SIDE:
        raise XmlProblem(
            f"Volume VolumeDimensions={text[:60]!r} is not three integers in 1..{MAX_VOLUME_SIDE}"
        )
    where = "Volume transformation matrix"
    matrix = _child(volumes[0], "TransformationMatrixVoxelIndicesIJKtoXYZ", "Volume")
    _signed_int(matrix, "MeterExponent", where)
    try:
        values = np.array((matrix.text or "").split(), dtype=np.float64)
    except ValueError:
        raise XmlProblem(f"{where} has a value that is not a number") from None
    if values.size != 16 or not np.isfinite(values).all():
        raise XmlProblem(f"{where} needs 16 finite numbers, has {values.size}")
    return shape  # type: ignore[return-value]


def _signed_int(element: ET.Element, name: str, where: str) -> int:
    value = element.get(name, "")
    if not re.fullmatch(r"\s*-?[0-9]{1,4}\s*", value):
        raise XmlProblem(f"{where} {name}={value[:60]!r} is not an integer")
    return int(value)


def _check_vertices(indices: np.ndarray, n_vertices: int, where: str) -> None:
    if indices.size and indices.max() >= n_vertices:
        raise XmlProblem(
            f"{where} has vertex {indices.max()}, outside its surface of {n_vertices} vertices"
        )
    if np.unique(indices).size != indices.size:
        raise XmlProblem(f"{where} lists a vertex twice")


def _check_voxels(indices: np.ndarray, shape, where: str) -> np.ndarray:
    """The voxels as (n, 3), inside ``shape``; returns their linear indices."""
    if shape is None:
        raise XmlProblem(f"{where} has voxels but the map defines no <Volume>")
    if indices.size % 3:
        raise XmlProblem(f"{where} has {indices.size} voxel indices, not a multiple of 3")
    ijk = indices.reshape(-1, 3)
    outside = (ijk >= np.array(shape)).any(1)
    if outside.any():
        raise XmlProblem(
            f"{where} has voxel {ijk[outside][0].tolist()}, outside the volume {list(shape)}"
        )
    return np.ravel_multi_index(ijk.T, shape) if ijk.size else np.zeros(0, np.int64)


def _brain_models(mim: ET.Element) -> int:
    """Check a BRAIN_MODELS map; returns its number of greyordinates."""
    shape = _volume(mim)
    total, structures, voxels = 0, set(), []
    models = mim.findall("BrainModel")
    for i, model in enumerate(models):
        where = f"BrainModel {i}"
        name = _structure(model, where)
        where = f"BrainModel {i} ({name})"
        if name in structures:
            raise XmlProblem(f"{where} repeats a brain structure")
        structures.add(name)
        offset, count = _uint(model, "IndexOffset", where), _uint(model, "IndexCount", where)
        if offset != total:
            raise XmlProblem(
                f"{where} IndexOffset={offset}, but the models before it end at {total}"
            )
        total += count
        model_type = model.get("ModelType")
        if model_type == "CIFTI_MODEL_TYPE_SURFACE":
            n_vertices = _uint(model, "SurfaceNumberOfVertices", where, positive=True)
            indices = _indices(_child(model, "VertexIndices", where), f"{where} VertexIndices")
            _check_vertices(indices, n_vertices, where)
        elif model_type == "CIFTI_MODEL_TYPE_VOXELS":
            indices = _indices(_child(model, "VoxelIndicesIJK", where), f"{where} VoxelIndicesIJK")
            voxels.append(_check_voxels(indices, shape, where))
            indices = indices[::3]
        else:
            raise XmlProblem(f"{where} has unknown ModelType {str(model_type)[:60]!r}")
        if indices.size != count:
            raise XmlProblem(f"{where} IndexCount={count} but it lists {indices.size} indices")
    if total == 0:
        raise XmlProblem("CIFTI XML BRAIN_MODELS map has no greyordinates")
    _unique_voxels(voxels, "two brain models")
    return total


def _unique_voxels(voxels: Iterable[np.ndarray], what: str) -> None:
    linear = np.concatenate([np.zeros(0, np.int64), *voxels])
    if np.unique(linear).size != linear.size:
        raise XmlProblem(f"a voxel is listed twice (in {what} or one of them)")


def _parcels(mim: ET.Element) -> int:
    """Check a PARCELS map; returns its number of parcels."""
    shape = _volume(mim)
    surfaces: dict[str, int] = {}
    for surface in mim.findall("Surface"):
        name = _structure(surface, "Surface")
        if name in surfaces:
            raise XmlProblem(f"Surface {name} is declared twice")
        surfaces[name] = _uint(surface, "SurfaceNumberOfVertices", f"Surface {name}", True)
    parcels = mim.findall("Parcel")
    names: set[str] = set()
    for i, parcel in enumerate(parcels):
        name = parcel.get("Name")
        if name is None:
            raise XmlProblem(f"Parcel {i} has no Name")
        where = f"Parcel {i} ({name[:60]!r})"
        if name in names:
            raise XmlProblem(f"{where} repeats a parcel name")
        names.add(name)
        seen: set[str] = set()
        for vertices in parcel.findall("Vertices"):
            structure = _structure(vertices, where)
            if structure not in surfaces or structure in seen:
                raise XmlProblem(f"{where} Vertices of {structure}: no such Surface, or twice")
            seen.add(structure)
            indices = _indices(vertices, f"{where} Vertices")
            _check_vertices(indices, surfaces[structure], f"{where} {structure}")
        for voxels in parcel.findall("VoxelIndicesIJK"):
            _check_voxels(_indices(voxels, f"{where} voxels"), shape, where)
    if not parcels:
        raise XmlProblem("CIFTI XML PARCELS map has no parcels")
    return len(parcels)


@dataclass(frozen=True)
class Map:
    """One MatrixIndicesMap found in the raw XML: its index type and byte range."""

    type: str
    start: int
    end: int


def index_maps(xml: bytes, path: Path | str) -> dict[int, Map]:
    """{matrix dimension: raw MatrixIndicesMap}, found by a linear scan (no parsing: the 600 KB
    element axis is compared as bytes; ``_check_header`` and ``check_elements`` parse)."""
    maps: dict[int, Map] = {}
    pos = 0
    while (start := xml.find(b"<MatrixIndicesMap", pos)) >= 0:
        close = xml.find(b">", start)
        tag = xml[start : close + 1] if close >= 0 else b""
        if tag.endswith(b"/>"):
            end = start + len(tag)
        else:
            end = xml.find(b"</MatrixIndicesMap>", start)
            end = end + len(b"</MatrixIndicesMap>") if end >= 0 and tag else -1
        if end < 0:
            raise DataError(f"{path}: malformed CIFTI XML (unclosed MatrixIndicesMap)")
        dims = re.search(rb'AppliesToMatrixDimension\s*=\s*"([0-9]+(?:,[0-9]+)*)"', tag)
        kind = re.search(rb'IndicesMapToDataType\s*=\s*"CIFTI_INDEX_TYPE_(\w+)"', tag)
        if dims is None or kind is None:
            raise DataError(
                f"{path}: malformed CIFTI XML (MatrixIndicesMap without dimension/type)"
            )
        for dim in map(int, dims.group(1).split(b",")):
            if dim in maps:
                raise DataError(f"{path}: CIFTI XML maps matrix dimension {dim} twice")
            maps[dim] = Map(kind.group(1).decode(), start, end)
        pos = end
    return maps


def element_maps(kind: str, maps: dict[int, Map]) -> list[Map]:
    """The maps defining the elements, in dimension order, each once."""
    if kind != "pconn":
        return [maps[1]]
    return [maps[0]] if maps[0] == maps[1] else [maps[0], maps[1]]
