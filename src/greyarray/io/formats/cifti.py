"""Read and write CIFTI-2 files without a full nibabel round trip per file.

nibabel parses the whole ~600 KB XML header of a 91k file into Python objects (0.1-0.5 s per file)
while the data block is ~365 KB read in ~1 ms. A cohort shares one geometry, so GreyArray parses
the NIfTI-2 header and locates the XML itself, compares the raw bytes of the element axis with the
first file's, and asks nibabel for a semantic comparison only when those bytes differ. Data are read
straight from their offset, honouring datatype, byte order and scaling.

Nothing is trusted: only regular files are opened (``inputs``), only the header, the extensions
and the data block the header promises are read, the XML goes through defusedxml and is checked
against the NIfTI dims (``ciftixml``: the element axis once per distinct XML, found again by a
byte compare; the small rest of each file's XML per file), and nibabel only ever sees XML that
defusedxml parsed.
"""

from __future__ import annotations

import html
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from greyarray.errors import DataError
from greyarray.io import inputs
from greyarray.io.formats import ciftixml, nifti2
from greyarray.io.spaces.base import MapWriter
from greyarray.io.spaces.cifti import (  # noqa: F401 (Geometry: what a CIFTI file's elements are)
    CIFTI_ECODE,
    EXTENSIONS,
    Geometry,
    checked_geometry,
)

NIFTI2_HEADER = nifti2.HEADER
NIFTI2_SIZE = nifti2.SIZE
# NIfTI-2 header, extension flags, and the extensions (the CIFTI XML) before the data
MAX_HEAD_BYTES = NIFTI2_SIZE + 4 + ciftixml.MAX_XML_BYTES + 2**20

# (type of matrix dimension 0, type of dimension 1) -> CIFTI file kind
KINDS = {
    ("SCALARS", "BRAIN_MODELS"): "dscalar",
    ("SCALARS", "PARCELS"): "pscalar",
    ("PARCELS", "PARCELS"): "pconn",
    ("SERIES", "BRAIN_MODELS"): "dtseries",
    ("SERIES", "PARCELS"): "ptseries",
    ("LABELS", "BRAIN_MODELS"): "dlabel",
    ("LABELS", "PARCELS"): "plabel",
    ("BRAIN_MODELS", "BRAIN_MODELS"): "dconn",
    ("PARCELS", "BRAIN_MODELS"): "pdconn",
    ("BRAIN_MODELS", "PARCELS"): "dpconn",
}
KIND_NAMES = {
    "dtseries": "dense data series",
    "ptseries": "parcellated data series",
    "dlabel": "dense label",
    "plabel": "parcellated label",
    "dconn": "dense connectivity",
    "pdconn": "parcellated-dense connectivity",
    "dpconn": "dense-parcellated connectivity",
}
SUPPORTED = ("dscalar", "pscalar", "pconn")
# NIfTI intent code and name each supported kind is written with (CIFTI-2 spec, appendix)
INTENTS = {
    "dscalar": (3006, b"ConnDenseScalar"),
    "pscalar": (3008, b"ConnParcelScalr"),
    "pconn": (3003, b"ConnParcels"),
}


@dataclass(frozen=True)
class CiftiFile:
    """The parsed header of one CIFTI-2 file: enough to read its data without nibabel."""

    path: Path
    kind: str
    rows: int  # CIFTI matrix dimension 0 (maps for scalar kinds)
    cols: int  # CIFTI matrix dimension 1
    dtype: np.dtype  # on-disk, with byte order
    offset: int
    scale: tuple[float, float] | None  # (slope, intercept) when not identity
    geometry: Geometry
    map_names: tuple[str, ...]  # scalar kinds only

    @property
    def data_size(self) -> int:
        return self.rows * self.cols * self.dtype.itemsize

    def select_map(self, wanted: str | None) -> int:
        """Index of the map ``--map`` asks for (a name, or a 1-based index as wb_command counts)."""
        if self.kind == "pconn":
            return 0
        if wanted is None:
            if self.rows > 1:
                names = ", ".join(repr(n) for n in self.map_names)
                raise DataError(
                    f"{self.path}: has {self.rows} maps ({names}); choose one with --map NAME|INDEX"
                )
            return 0
        if wanted in self.map_names:
            return self.map_names.index(wanted)
        if wanted.isdigit() and 1 <= int(wanted) <= self.rows:
            return int(wanted) - 1
        names = ", ".join(repr(n) for n in self.map_names)
        raise DataError(f"{self.path}: no map {wanted!r} (maps: {names}; indices 1..{self.rows})")

    def elements(self, read: Callable[[int, int], bytes], map_index: int, start: int, stop: int):
        """Values of elements [start, stop) of one map, as stored (scaling applied).

        ``read(offset, size)`` returns file bytes. pconn elements are the row-major flattening of
        the (rows, cols) matrix, as ModelArrayIO flattens them; on disk NIfTI stores it
        column-major, so a pconn reads its whole (small) matrix.
        """
        size = self.dtype.itemsize
        if self.kind == "pconn":
            raw = read(self.offset, self.data_size)
            values = _frombuffer(raw, self.dtype, self.rows * self.cols, self.path)
            values = values.reshape(self.cols, self.rows).T.ravel()[start:stop]
        else:  # value of (map m, element g) is at m + g * rows
            count = (stop - start) * self.rows
            raw = read(self.offset + start * self.rows * size, count * size)
            values = _frombuffer(raw, self.dtype, count, self.path)[map_index :: self.rows]
        return self._scaled(values)

    def _scaled(self, values: np.ndarray) -> np.ndarray:
        if self.scale is not None:
            with np.errstate(over="ignore", invalid="ignore"):  # inf: counted as non-finite
                values = values * self.scale[0] + self.scale[1]
        return values

    @property
    def block_unit(self) -> int:
        """Bytes of one element of every map: data blocks cut at multiples of it hold whole
        elements."""
        return self.rows * self.dtype.itemsize

    def count_nonfinite(self, raw: bytes, map_index: int) -> int:
        """Non-finite values of the used map in ``raw``, a data block of whole elements."""
        if self.dtype.kind != "f" and self.scale is None:
            return 0
        values = np.frombuffer(raw, self.dtype)
        if self.kind != "pconn":
            values = values[map_index :: self.rows]
        values = self._scaled(values)
        return int(values.size - np.count_nonzero(np.isfinite(values)))


def _frombuffer(raw: bytes, dtype: np.dtype, count: int, path: Path) -> np.ndarray:
    if len(raw) < count * dtype.itemsize:
        raise DataError(f"{path}: file is truncated (data block shorter than its header says)")
    return np.frombuffer(raw, dtype, count)


def pread_from(path: Path) -> Callable[[int, int], bytes]:
    """A ``read(offset, size)`` that opens the (regular) file for each call: no descriptors are
    held. Sources read through ``inputs.read_checked`` instead, which also verifies identity."""

    def read(offset: int, size: int) -> bytes:
        with inputs.open_regular(path) as (fd, _):
            return inputs.pread_exact(fd, size, offset, path)

    return read


def bytes_reader(blob: bytes) -> Callable[[int, int], bytes]:
    """A ``read(offset, size)`` over bytes already in memory."""
    view = memoryview(blob)
    return lambda offset, size: view[offset : offset + size]


def read_head(read: Callable[[int, int], bytes], path: Path, file_size: int) -> bytes:
    """The bytes before the data (NIfTI-2 header and extensions), and never more than that;
    ``read(offset, size)`` returns exactly ``size`` bytes of the file."""
    first = read(0, min(file_size, NIFTI2_SIZE + 12))
    header = _nifti2_header(path, first)
    offset = _data_offset(path, header, first)
    if offset > MAX_HEAD_BYTES:
        if len(first) >= NIFTI2_SIZE + 8:
            esize = struct.unpack(_byteorder(header) + "i", first[544:548])[0]
            if esize - 8 > ciftixml.MAX_XML_BYTES:
                raise DataError(f"{path}: {_too_large(esize - 8)}")
        raise DataError(
            f"{path}: data offset {offset} is beyond the {MAX_HEAD_BYTES // 2**20} MiB a CIFTI "
            "header and XML may take"
        )
    if file_size < offset:
        raise DataError(
            f"{path}: file is truncated ({file_size} bytes, its data should start at {offset})"
        )
    return read(0, offset)


def _too_large(size: int) -> str:
    return (
        f"CIFTI XML is {size / 2**20:.0f} MiB, larger than any real CIFTI file (limit "
        f"{ciftixml.MAX_XML_BYTES // 2**20} MiB)"
    )


def parse(path: Path, head: bytes, file_size: int | None = None) -> CiftiFile:
    """Parse a CIFTI-2 file from ``head`` (its bytes up to the data at least) and its size;
    refuse what GreyArray cannot convert or what is inconsistent."""
    file_size = len(head) if file_size is None else file_size
    header = _nifti2_header(path, head)
    offset = _data_offset(path, header, head)
    xml = _cifti_xml(path, head, header, offset)
    _check_version(path, xml)
    maps = ciftixml.index_maps(xml, path)
    kind = _kind(path, maps)
    dim = header["dim"]
    if dim[0] != 6 or any(d != 1 for d in dim[1:5]) or min(dim[5], dim[6]) < 1:
        shown = list(dim[: dim[0] + 1]) if 0 <= dim[0] <= 7 else list(dim)
        raise DataError(f"{path}: NIfTI dims {shown} are not those of a CIFTI-2 matrix")
    rows, cols = int(dim[5]), int(dim[6])
    dtype = _data_dtype(path, header)
    element_maps = ciftixml.element_maps(kind, maps)
    own = _check_header(path, xml, element_maps, kind)
    geometry = checked_geometry(path, kind, b"".join(xml[m.start : m.end] for m in element_maps))
    _check_dims(path, geometry, rows, cols)
    if kind != "pconn" and len(own.map_names) != rows:
        raise DataError(f"{path}: header has {rows} maps but the XML names {len(own.map_names)}")
    if file_size < offset + rows * cols * dtype.itemsize:
        raise DataError(
            f"{path}: file is truncated ({file_size} bytes, header needs "
            f"{offset + rows * cols * dtype.itemsize})"
        )
    return CiftiFile(path, kind, rows, cols, dtype, offset, _scale(header), geometry, own.map_names)


def _check_dims(path: Path, geometry: Geometry, rows: int, cols: int) -> None:
    """The NIfTI matrix must be exactly what the XML describes (else values and elements would
    be silently misaligned)."""
    if geometry.kind == "pconn":
        if (rows, cols) != geometry.shape:
            raise DataError(
                f"{path}: NIfTI dims say a {rows} x {cols} matrix but the CIFTI XML defines "
                f"{geometry.shape[0]} x {geometry.shape[1]} parcels"
            )
    elif cols != geometry.n_elements:
        what = "greyordinates" if geometry.kind == "dscalar" else "parcels"
        raise DataError(
            f"{path}: NIfTI dims say {cols} columns but the CIFTI XML defines "
            f"{geometry.n_elements} {what}"
        )


def _scale(header: np.ndarray) -> tuple[float, float] | None:
    """(slope, intercept) to apply, or None: a slope of 0 or NaN means unscaled, as in NIfTI."""
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    inter = inter if np.isfinite(inter) else 0.0
    if not np.isfinite(slope) or slope == 0 or (slope == 1 and inter == 0):
        return None
    return slope, inter


def read_file(path: Path) -> CiftiFile:
    """Parse a CIFTI-2 file's header from disk (its data are not read)."""
    with inputs.opened(path) as file:
        return parse(path, read_head(file.read, path, file.size), file.size)


def _nifti2_header(path: Path, blob: bytes) -> np.ndarray:
    if len(blob) < 4:
        raise DataError(f"{path}: file is empty or truncated (not a NIfTI file)")
    if blob[:2] == b"\x1f\x8b":
        raise DataError(
            f"{path}: is gzip-compressed (a .nii.gz); gzipped NIfTI is not CIFTI-2, whose files "
            "are never compressed (a volumetric NIfTI map cannot be converted)"
        )
    for order in "<>":
        size = struct.unpack(order + "i", blob[:4])[0]
        if size == 348:
            raise DataError(f"{path}: is a NIfTI-1 file, not CIFTI-2 (CIFTI-2 needs NIfTI-2)")
        if size == NIFTI2_SIZE:
            if len(blob) < NIFTI2_SIZE + 4:
                raise DataError(f"{path}: file is truncated (incomplete NIfTI-2 header)")
            header = np.frombuffer(blob, NIFTI2_HEADER.newbyteorder(order), 1)[0]
            if not bytes(header["magic"]).startswith(b"n+2"):
                raise DataError(f"{path}: NIfTI-2 header has bad magic {bytes(header['magic'])!r}")
            return header
    raise DataError(f"{path}: not a NIfTI file (no NIfTI-1/NIfTI-2 header)")


def _data_offset(path: Path, header: np.ndarray, head: bytes) -> int:
    if head[NIFTI2_SIZE] == 0:
        raise DataError(f"{path}: NIfTI-2 file without a CIFTI extension (plain NIfTI, not CIFTI)")
    offset = int(header["vox_offset"])
    if offset < NIFTI2_SIZE + 4 + 8:
        raise DataError(
            f"{path}: data offset {offset} lies inside the NIfTI-2 header (CIFTI data start "
            "after the header and the CIFTI extension)"
        )
    return offset


def _cifti_xml(path: Path, head: bytes, header: np.ndarray, offset: int) -> bytes:
    order = _byteorder(header)
    pos = NIFTI2_SIZE + 4
    while pos + 8 <= offset:
        esize, ecode = struct.unpack(order + "ii", head[pos : pos + 8])
        if esize < 8:
            raise DataError(f"{path}: corrupt NIfTI extension at byte {pos} (size {esize})")
        if pos + esize > offset:
            what = "the CIFTI XML extension" if ecode == CIFTI_ECODE else "a NIfTI extension"
            raise DataError(
                f"{path}: data offset {offset} lies inside {what} (bytes {pos}..{pos + esize})"
            )
        if ecode == CIFTI_ECODE:
            if esize - 8 > ciftixml.MAX_XML_BYTES:
                raise DataError(f"{path}: {_too_large(esize - 8)}")
            return bytes(head[pos + 8 : pos + esize]).rstrip(b"\x00 \n")
        pos += esize
    raise DataError(f"{path}: NIfTI-2 file without a CIFTI extension (plain NIfTI, not CIFTI)")


def _check_version(path: Path, xml: bytes) -> None:
    """CIFTI-1 gets a message saying how to convert it (before its other differences show)."""
    start = xml.find(b"<CIFTI")
    tag = xml[start : xml.find(b">", start) + 1] if start >= 0 else b""
    version = re.search(rb'\sVersion\s*=\s*"([^"]*)"', tag)
    if version is None:
        raise DataError(f"{path}: CIFTI XML has no <CIFTI Version=...> element")
    if not version.group(1).startswith(b"2"):
        raise DataError(
            f"{path}: is a CIFTI-{version.group(1).decode(errors='replace')[:20]} file; GreyArray "
            "reads CIFTI-2 (convert it: wb_command -file-convert -cifti-version-convert FILE 2 OUT)"
        )


def _kind(path: Path, maps: dict[int, ciftixml.Map]) -> str:
    if set(maps) != {0, 1}:
        raise DataError(f"{path}: CIFTI matrix has dimensions {sorted(maps)}; expected 2")
    kind = KINDS.get((maps[0].type, maps[1].type))
    if kind in SUPPORTED:
        return kind
    if kind is None:
        what = f"unsupported CIFTI type ({maps[0].type} x {maps[1].type})"
    else:
        what = f"a CIFTI {KIND_NAMES[kind]} ({kind}) file"
    raise DataError(f"{path}: is {what}; GreyArray converts dscalar, pscalar and pconn files")


def _check_header(path: Path, xml: bytes, element_maps: list[ciftixml.Map], kind: str):
    """Check, per file, the XML outside the element axis (small), with the element axis cut out
    and a marker in its place: the marker must land where a MatrixIndicesMap may be."""
    parts, pos = [], 0
    for piece in sorted(element_maps, key=lambda m: m.start):
        parts += [xml[pos : piece.start], ciftixml.MARKER]
        pos = piece.end
    parts.append(xml[pos:])
    try:
        own = ciftixml.check_header(b"".join(parts), len(element_maps))
    except ciftixml.XmlProblem as problem:
        raise DataError(f"{path}: {problem}") from None
    expected = {} if kind == "pconn" else {0: "SCALARS"}
    if own.maps != expected or not own.version.startswith("2"):
        raise DataError(f"{path}: malformed CIFTI XML (its maps differ from what a scan finds)")
    return own


def _data_dtype(path: Path, header: np.ndarray) -> np.dtype:
    code = int(header["datatype"])
    if code not in nifti2.KNOWN_CODES:
        raise DataError(f"{path}: unknown NIfTI datatype code {code}")
    if code not in nifti2.REAL_DTYPES:
        raise DataError(f"{path}: NIfTI datatype code {code} is not a real number type")
    return nifti2.REAL_DTYPES[code].newbyteorder(_byteorder(header))


def _byteorder(header: np.ndarray) -> str:
    """'=' (native), '<' or '>': the byte order the header was read with."""
    return header.dtype["sizeof_hdr"].byteorder


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(text: str) -> str:
    """``text`` with the characters XML 1.0 forbids even escaped (most C0 controls, lone
    surrogates, U+FFFE/U+FFFF) replaced by U+FFFD: a map name may come from any HDF5 string,
    and one such character makes the whole file unreadable to nibabel and wb_command."""
    return _NOT_XML.sub("\ufffd", text)


class CiftiWriter(MapWriter):
    """Write many single-map CIFTI files sharing one geometry, without nibabel per file.

    The XML is the geometry's element axis verbatim (as the source files had it) after a scalar
    axis holding the map name; the NIfTI-2 header is built once. Writing a file is a name
    substitution and three byte strings.
    """

    def __init__(self, geometry: Geometry):
        self.geometry = geometry
        self.extension = geometry.extension
        self._rows, self._cols = (
            (1, geometry.n_elements) if geometry.kind != "pconn" else (geometry.shape)
        )
        self._header = nifti2.float32_header((self._rows, self._cols), *INTENTS[geometry.kind])

    def xml(self, name: str) -> bytes:
        """The CIFTI-2 XML document of a file holding one map called ``name``."""
        scalars = (
            b""
            if self.geometry.kind == "pconn"
            else (
                b'<MatrixIndicesMap AppliesToMatrixDimension="0" '
                b'IndicesMapToDataType="CIFTI_INDEX_TYPE_SCALARS"><NamedMap><MapName>'
                + html.escape(xml_text(name), quote=False).encode("utf-8")
                + b"</MapName></NamedMap></MatrixIndicesMap>"
            )
        )
        return (
            b'<?xml version="1.0" encoding="UTF-8"?>\n<CIFTI Version="2"><Matrix>'
            + scalars
            + self.geometry.xml
            + b"</Matrix></CIFTI>\n"
        )

    def encode(self, values: np.ndarray, name: str = "") -> bytes:
        """The bytes of a CIFTI-2 file holding ``values`` (one map; pconn: rows*cols, row-major)."""
        # R's NA (a signalling NaN) stays NaN; beyond float32's range becomes inf, no warning
        with np.errstate(invalid="ignore", over="ignore"):
            values = np.asarray(values, dtype=np.float32)
        if values.size != self.geometry.n_elements:
            raise ValueError(f"{values.size} values for {self.geometry.n_elements} elements")
        xml = self.xml(name)
        pad = -(8 + len(xml)) % 16
        extension = struct.pack("<ii", 8 + len(xml) + pad, CIFTI_ECODE) + xml + b"\x00" * pad
        header = self._header.copy()
        header["vox_offset"] = NIFTI2_SIZE + 4 + len(extension)
        data = values.reshape(self._rows, self._cols).T  # NIfTI stores the matrix column-major
        return b"".join(
            (
                header.tobytes(),
                b"\x01\x00\x00\x00",
                extension,
                np.ascontiguousarray(data, "<f4").tobytes(),
            )
        )
