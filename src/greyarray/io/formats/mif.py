"""MRtrix image files (``.mif``, ``.mif.gz``), read and written as MRtrix documents them.

A text header (``mrtrix image``, then ``key: value`` lines, then ``END``) followed by binary
data at the offset its ``file: . <offset>`` entry gives. ``dim`` and ``vox`` list the axes;
``layout`` their order and direction on file (``+1,+2,+3,+0``: axis 3 varies fastest; a minus
sign stores the axis reversed); ``datatype`` is one of MRtrix's types (Int8 ... UInt64, Float32,
Float64, with LE/BE or the machine's order); ``transform`` the first 3 rows of the voxel-to-scanner
matrix with unit axes (voxel sizes apart); ``scaling: offset,scale`` maps stored values to real
ones. A ``.mif.gz`` is the whole file gzip-compressed. Data are returned in MRtrix's logical
order (``data[i, j, k, ...]``), as MRtrix tools and ModelArrayIO see them.

Nothing is trusted: the header is at most ``MAX_HEADER_BYTES``, every entry is checked (dims,
layout a permutation, a known datatype), data stored in another file (``.mih`` style) is refused,
naming files outside the image's folder as such, and the data block must be exactly what the dims
and datatype promise (``stream`` refuses truncated files and gzip bombs).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from greyarray.errors import DataError
from greyarray.io import inputs
from greyarray.io.formats.stream import MAX_DATA_BYTES, ImageStream, gzip_bytes
from greyarray.io.spaces.base import MapWriter

if TYPE_CHECKING:
    from greyarray.io.remote import S3Url

EXTENSIONS = (".mif.gz", ".mif")
MAGIC = b"mrtrix image"
MAX_HEADER_BYTES = 2**20
GZIP_LEVEL = 1  # what ModelArrayIO (nibabel's opener) writes
TYPES = {
    "int8": "i1",
    "uint8": "u1",
    "int16": "i2",
    "uint16": "u2",
    "int32": "i4",
    "uint32": "u4",
    "int64": "i8",
    "uint64": "u8",
    "float32": "f4",
    "float64": "f8",
}
STRUCTURAL = ("dim", "vox", "layout", "datatype", "transform", "scaling", "file")


@dataclass(frozen=True)
class MifHeader:
    """A parsed MRtrix image header."""

    path: Path
    dim: tuple[int, ...]
    vox: tuple[float, ...]
    layout: tuple[int, ...]  # signed order per axis: +1 / -1 ... encoded as (order + 1) * sign
    dtype: np.dtype
    transform: np.ndarray = field(repr=False)  # 3 x 4, unit axes
    scaling: tuple[float, float] | None  # (offset, scale)
    offset: int  # data offset in the (decompressed) stream
    others: tuple[tuple[str, str], ...] = ()  # every other entry, in order (key as written)

    @property
    def affine(self) -> np.ndarray:
        """Voxel to scanner mm: the transform's columns scaled by the voxel sizes."""
        affine = np.eye(4)
        sizes = np.ones(3)
        spatial = min(3, len(self.vox))
        sizes[:spatial] = self.vox[:spatial]
        affine[:3, :3] = self.transform[:, :3] * sizes
        affine[:3, 3] = self.transform[:, 3]
        return affine

    @property
    def nbytes(self) -> int:
        return math.prod(self.dim) * self.dtype.itemsize

    def value(self, key: str) -> str | None:
        """The (last) value of another entry, e.g. ``nfixels``."""
        found = [v for k, v in self.others if k.lower() == key]
        return found[-1] if found else None


@dataclass(frozen=True)
class MifImage:
    header: MifHeader
    data: np.ndarray  # logical order, as stored (dtype of the file)
    sha256: str

    def values(self) -> np.ndarray:
        """float64, scaled."""
        values = self.data.astype(np.float64)
        if self.header.scaling is not None:
            offset, scale = self.header.scaling
            with np.errstate(over="ignore", invalid="ignore"):
                values = offset + scale * values
        return values


def read_image(path: Path, name: Path | S3Url | None = None) -> MifImage:
    """Read and check one MRtrix image (header and data, once); ``name``: what the file is
    called in messages and in the header (an S3 object whose copy ``path`` is)."""
    with inputs.open_regular(path) as (fd, stamp):
        path = name or path
        stream = ImageStream(fd, path, stamp.size)
        header, read = read_header(stream, path)
        if not stream.gzipped and stamp.size < header.offset + header.nbytes:
            raise DataError(
                f"{path}: its header says {' x '.join(map(str, header.dim))} values of "
                f"{header.dtype.name} ({header.nbytes:,} bytes) at byte {header.offset:,}, but "
                f"the file has only {stamp.size:,} bytes (dims, layout or datatype disagree "
                "with the file size)"
            )
        start = read[header.offset : header.offset + header.nbytes]
        stream.skip_to(max(stream.position, header.offset))
        raw = start + stream.read_exact(header.nbytes - len(start))
        sha256 = stream.finish()
        inputs.verify(path, fd, stamp)
    data = to_logical(np.frombuffer(raw, header.dtype), header.dim, header.layout)
    return MifImage(header, data, sha256)


_END = re.compile(rb"\nEND\r?\n")


def read_header(stream: ImageStream, path: Path) -> tuple[MifHeader, bytes]:
    """The header, and every byte read from the stream so far (the data may start in them)."""
    text = b""
    while (end := _END.search(text)) is None:
        if len(text) > MAX_HEADER_BYTES:
            raise DataError(
                f"{path}: MRtrix header has no END line within {MAX_HEADER_BYTES // 2**20} MiB"
            )
        chunk = stream.read(4096)
        if not chunk:
            raise DataError(f"{path}: MRtrix header has no END line (truncated or not MRtrix)")
        text += chunk
        if not text[: len(MAGIC)].startswith(MAGIC[: len(text)]):
            raise DataError(f"{path}: not an MRtrix image (it does not start with 'mrtrix image')")
    header = parse_header(path, text[: end.start()].decode("utf-8", "replace"), end.end())
    return header, text


def parse_header(path: Path, text: str, end_of_header: int) -> MifHeader:
    lines = text.replace("\r\n", "\n").split("\n")
    if lines[0].strip() != MAGIC.decode():
        raise DataError(f"{path}: not an MRtrix image (first line {lines[0][:40]!r})")
    entries: list[tuple[str, str]] = []
    for number, line in enumerate(lines[1:], 2):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, colon, value = line.partition(":")
        if not colon or not key.strip():
            raise DataError(f"{path}: MRtrix header line {number} is not 'key: value'")
        entries.append((key.strip(), value.strip()))
    found: dict[str, list[str]] = {}
    for key, value in entries:
        found.setdefault(key.lower(), []).append(value)
    for required in ("dim", "vox", "layout", "datatype", "file"):
        if required not in found:
            raise DataError(f"{path}: MRtrix header has no {required} entry")
    for single in ("dim", "vox", "layout", "datatype", "scaling"):
        if len(found.get(single, [])) > 1:
            raise DataError(f"{path}: MRtrix header has {single} twice")
    dim = _dims(path, found["dim"][0])
    vox = _numbers(path, "vox", found["vox"][0])
    if len(vox) != len(dim):
        raise DataError(f"{path}: MRtrix header has {len(dim)} dims but {len(vox)} voxel sizes")
    layout = _layout(path, found["layout"][0], len(dim))
    dtype = _datatype(path, found["datatype"][0])
    transform = _transform(path, found.get("transform", []))
    scaling = None
    if "scaling" in found:
        values = _numbers(path, "scaling", found["scaling"][0])
        if len(values) != 2 or not all(map(math.isfinite, values)):
            raise DataError(
                f"{path}: MRtrix scaling {found['scaling'][0][:40]!r} is not offset,scale"
            )
        if values != (0.0, 1.0):
            scaling = (values[0], values[1])
    offset = _data_file(path, found["file"], end_of_header)
    others = tuple((k, v) for k, v in entries if k.lower() not in STRUCTURAL)
    header = MifHeader(path, dim, vox, layout, dtype, transform, scaling, offset, others)
    if header.nbytes > MAX_DATA_BYTES:
        raise DataError(
            f"{path}: its header promises {header.nbytes / 2**20:,.0f} MiB of data, more than "
            f"any map GreyArray converts ({MAX_DATA_BYTES // 2**20} MiB)"
        )
    return header


def _dims(path: Path, text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(re.fullmatch(r"[0-9]{1,12}", p) for p in parts):
        raise DataError(f"{path}: MRtrix dim {text[:60]!r} is not a list of integers")
    dim = tuple(int(p) for p in parts)
    if min(dim) < 1 or len(dim) > 16:
        raise DataError(f"{path}: MRtrix dim {text[:60]!r}: sizes must be >= 1 (at most 16 axes)")
    return dim


def _numbers(path: Path, key: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError:
        raise DataError(f"{path}: MRtrix {key} {text[:60]!r} is not a list of numbers") from None


def _layout(path: Path, text: str, ndim: int) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    if not all(re.fullmatch(r"[+-]?[0-9]{1,2}", p) for p in parts) or len(parts) != ndim:
        raise DataError(
            f"{path}: MRtrix layout {text[:60]!r} does not give a signed order for each of its "
            f"{ndim} axes"
        )
    orders = [abs(int(p)) for p in parts]
    if sorted(orders) != list(range(ndim)):
        raise DataError(
            f"{path}: MRtrix layout {text[:60]!r} is not a permutation of 0..{ndim - 1}"
        )
    return tuple(
        (order + 1) * (-1 if p.startswith("-") else 1)
        for p, order in zip(parts, orders, strict=True)
    )


def _datatype(path: Path, text: str) -> np.dtype:
    name = text.strip().lower()
    order = "="
    if name.endswith(("le", "be")) and name[:-2] in TYPES:
        order, name = ("<" if name.endswith("le") else ">"), name[:-2]
    if name not in TYPES:
        why = (
            "bitwise and complex data are not maps"
            if name in ("bit", "cfloat32", "cfloat64")
            else "unknown"
        )
        raise DataError(f"{path}: MRtrix datatype {text[:40]!r} ({why})")
    dtype = np.dtype(TYPES[name])
    return dtype if dtype.itemsize == 1 else dtype.newbyteorder(order)


def _transform(path: Path, rows: list[str]) -> np.ndarray:
    if not rows:
        return np.eye(3, 4)
    values = [v for row in rows for v in _numbers(path, "transform", row)]
    if len(values) < 12 or not all(map(math.isfinite, values[:12])):
        raise DataError(f"{path}: MRtrix transform has fewer than 12 finite values")
    return np.array(values[:12], dtype=np.float64).reshape(3, 4)


def _data_file(path: Path, entries: list[str], end_of_header: int) -> int:
    if len(entries) > 1:
        raise DataError(f"{path}: MRtrix header names {len(entries)} data files; one expected")
    parts = entries[0].split()
    name = parts[0] if parts else ""
    if name != "." and not isinstance(path, Path):  # an S3 object: no folder to look in
        raise DataError(
            f"{path}: its data are in another file ({name[:80]!r}); GreyArray reads single-file "
            ".mif images (mrconvert IMAGE.mih IMAGE.mif)"
        )
    if name != ".":
        folder = path.resolve().parent
        target = (folder / name).resolve() if name else folder
        inside = target.parent == folder or folder in target.parents
        where = "inside" if inside else "outside"
        raise DataError(
            f"{path}: its data are in another file ({name[:80]!r}, {where} the image's folder"
            f"{'' if inside else ': refused'}); GreyArray reads single-file .mif images "
            "(mrconvert IMAGE.mih IMAGE.mif)"
        )
    if len(parts) != 2 or not parts[1].isdigit():
        raise DataError(f"{path}: MRtrix file entry {entries[0][:60]!r} is not '. OFFSET'")
    offset = int(parts[1])
    if offset < end_of_header or offset > end_of_header + MAX_HEADER_BYTES:
        raise DataError(
            f"{path}: MRtrix data offset {offset} is not just after its header (which ends at "
            f"byte {end_of_header})"
        )
    return offset


def to_logical(raw: np.ndarray, dim: tuple[int, ...], layout: tuple[int, ...]) -> np.ndarray:
    """File order -> MRtrix's logical order: the axis of order 0 varies fastest on file, and an
    axis with a negative sign is stored from its last voxel to its first."""
    ndim = len(dim)
    fastest_first = sorted(range(ndim), key=lambda axis: abs(layout[axis]))
    on_file = fastest_first[::-1]  # C order: slowest axis first
    data = raw.reshape([dim[a] for a in on_file]).transpose(np.argsort(on_file))
    flips = tuple(slice(None, None, -1) if layout[a] < 0 else slice(None) for a in range(ndim))
    return data[flips]


def layout_text(layout: tuple[int, ...]) -> str:
    return ",".join(f"{'-' if s < 0 else '+'}{abs(s) - 1}" for s in layout)


def _number(value: float) -> str:
    return repr(float(value)).removesuffix(".0") if math.isfinite(value) else str(value)


class MifWriter(MapWriter):
    """Result maps on fixels: one value per fixel (``dim: F,1,1``), float32, ModelArrayIO's
    names; a header with the template's voxel sizes, transform and other entries."""

    def __init__(
        self,
        n: int,
        vox: tuple[float, ...],
        transform: np.ndarray,
        others: tuple[tuple[str, str], ...] = (),
        compress: bool = True,
        companions: dict[str, bytes] | None = None,
    ):
        self.n = n
        self.compress = compress
        self.extension = ".mif.gz" if compress else ".mif"
        self._companions = companions or {}
        lines = [
            MAGIC.decode(),
            f"dim: {n},1,1",
            "vox: " + ",".join(_number(v) for v in (list(vox[:3]) + [1.0] * 3)[:3]),
            "layout: +0,+1,+2",
            "datatype: Float32LE",
        ]
        lines += [
            "transform: " + ", ".join(_number(v) for v in row) for row in np.asarray(transform)
        ]
        lines += [f"{key}: {value}" for key, value in others]
        text = ("\n".join(lines) + "\n").encode("utf-8")
        offset = len(text) + len(b"file: . \nEND\n")
        offset += len(str(offset + 16))
        offset += -offset % 16
        line = f"file: . {offset}\nEND\n".encode()
        self.head = (text + line).ljust(offset, b"\x00")
        if len(text) + len(line) > offset:
            raise AssertionError("MIF header offset")

    def encode(self, values: np.ndarray, name: str = "") -> bytes:
        with np.errstate(invalid="ignore", over="ignore"):
            values = np.asarray(values, dtype=np.float32)
        if values.size != self.n:
            raise ValueError(f"{values.size} values for {self.n} fixels")
        data = self.head + values.astype("<f4").tobytes()
        return gzip_bytes(data, GZIP_LEVEL) if self.compress else data

    def companions(self) -> dict[str, bytes]:
        return dict(self._companions)


def safe_name(name: str) -> str:
    """A companion file's name: its base name only (never a path)."""
    return os.path.basename(name) or "file.mif"
