"""NIfTI-1 and NIfTI-2 volumes (``.nii``, ``.nii.gz``): read one 3-D map, write result maps.

Headers are parsed by nibabel's header classes (its checks, its affine: the sform if set, else
the qform, else the voxel sizes, as ``img.affine``); the data block is read by ``stream`` (one
pass, bounded, hashed) and scaled as nibabel's ``get_fdata`` scales it (float64 arithmetic), so
values equal ModelArrayIO's. A map is 3-D (trailing dimensions of size 1 are allowed); only
single-file NIfTI (``n+1``/``n+2``) with real-valued data is read.

Result maps are written as ModelArrayIO writes them: a NIfTI-1 file with the group mask's header
(data type float32, no scaling), the values on the mask's voxels and 0 elsewhere.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from greyarray.errors import DataError
from greyarray.io import inputs
from greyarray.io.formats.stream import MAX_DATA_BYTES, ImageStream, gzip_bytes
from greyarray.io.spaces.base import MapWriter

if TYPE_CHECKING:
    from greyarray.io.remote import S3Url

EXTENSIONS = (".nii.gz", ".nii")
GZIP_LEVEL = 1  # nibabel's default for .nii.gz (what ModelArrayIO writes)
MAX_EXTENSION_BYTES = 16 * 2**20  # header extensions before the data


@dataclass(frozen=True)
class Volume:
    """One NIfTI map: its grid (shape, affine), raw data (Fortran order) and scaling."""

    path: Path
    shape: tuple[int, int, int]
    affine: np.ndarray  # 4 x 4, voxel to mm
    data: np.ndarray  # 1-D, the data block as stored (Fortran order: i fastest)
    slope: float | None  # None: unscaled
    inter: float
    sha256: str
    header: bytes  # the bytes before the data (header and extensions)

    def values(self, flat: np.ndarray | None = None) -> np.ndarray:
        """float64 values (scaled as nibabel's get_fdata) at Fortran-order indices ``flat``
        (default: every voxel)."""
        raw = self.data if flat is None else self.data[flat]
        values = raw.astype(np.float64)
        if self.slope is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                values = values * self.slope
                if self.inter:
                    values = values + self.inter
        return values

    def positive(self, flat: np.ndarray | None = None) -> np.ndarray:
        """Where the (scaled) value is > 0: a mask, as ModelArrayIO reads masks."""
        with np.errstate(invalid="ignore"):
            return self.values(flat) > 0


def _header_class(path: Path, first: bytes):
    import nibabel as nb

    if len(first) < 4:
        raise DataError(f"{path}: file is empty or truncated (not a NIfTI file)")
    for order in "<>":
        size = struct.unpack(order + "i", first[:4])[0]
        if size == 348:
            return nb.Nifti1Header, 348
        if size == 540:
            return nb.Nifti2Header, 540
    raise DataError(f"{path}: not a NIfTI-1 or NIfTI-2 file (header size field {first[:4]!r})")


def read_volume(path: Path, name: Path | S3Url | None = None) -> Volume:
    """Read and check one 3-D NIfTI map (the whole data block, once); ``name``: what the file
    is called in messages and in the volume (an S3 object whose copy ``path`` is)."""
    with inputs.open_regular(path) as (fd, stamp):
        volume = read_from(fd, name or path, stamp.size)
        inputs.verify(name or path, fd, stamp)
    return volume


def read_from(fd: int, path: Path, size: int) -> Volume:
    from nibabel.spatialimages import HeaderDataError

    stream = ImageStream(fd, path, size)
    first = stream.read(4)
    header_class, header_size = _header_class(path, first)
    block = first + stream.read_exact(header_size - 4, "the NIfTI header")
    try:
        header = header_class(block, check=True)
    except (HeaderDataError, ValueError) as err:
        raise DataError(f"{path}: invalid NIfTI header ({_short(err)})") from None
    magic = bytes(header["magic"])
    if magic[:3] in (b"ni1", b"ni2"):
        raise DataError(f"{path}: is a NIfTI header (.hdr) whose data is in another file")
    shape = _shape(path, header)
    dtype = _dtype(path, header)
    offset = int(header.get_data_offset())
    count = int(np.prod(shape))
    nbytes = count * dtype.itemsize
    if nbytes > MAX_DATA_BYTES:
        raise DataError(
            f"{path}: its header promises {nbytes / 2**20:,.0f} MiB of data, more than any map "
            f"GreyArray converts ({MAX_DATA_BYTES // 2**20} MiB)"
        )
    if offset < header_size or offset > header_size + MAX_EXTENSION_BYTES:
        raise DataError(f"{path}: data offset {offset} is not after the NIfTI header")
    head = block + stream.read_exact(offset - header_size, "the header extensions")
    if not stream.gzipped and size < offset + nbytes:
        raise DataError(
            f"{path}: file is truncated ({size} bytes, its header needs {offset + nbytes})"
        )
    raw = stream.read_exact(nbytes)
    sha256 = stream.finish()
    slope, inter = header.get_slope_inter()
    affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    if not np.isfinite(affine).all():
        raise DataError(f"{path}: its voxel-to-mm affine has non-finite values")
    data = np.frombuffer(raw, dtype)
    return Volume(
        path,
        shape,
        affine,
        data,
        None if slope is None else float(slope),
        0.0 if inter is None else float(inter),
        sha256,
        head,
    )


def _shape(path: Path, header) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in header.get_data_shape())
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        raise DataError(
            f"{path}: has shape {shape}; GreyArray converts 3-D maps (one volume per file)"
        )
    if min(shape[:3]) < 1:
        raise DataError(f"{path}: has an empty dimension (shape {shape})")
    return shape[0], shape[1], shape[2]


def _dtype(path: Path, header) -> np.dtype:
    code = int(header["datatype"])
    try:
        dtype = header.get_data_dtype()
    except Exception:
        raise DataError(f"{path}: unknown NIfTI datatype code {code}") from None
    if dtype.kind not in "iuf" or dtype.names is not None or dtype.itemsize > 8:
        raise DataError(f"{path}: NIfTI datatype code {code} ({dtype}) is not a real number type")
    return dtype


def _short(err: Exception) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def result_header(mask_head: bytes) -> bytes:
    """The bytes before the data of a result map: ModelArrayIO's header (the group mask's,
    made NIfTI-1, float32, unscaled, as nibabel writes it), computed once by nibabel."""
    import nibabel as nb

    header_class, _ = _header_class(Path("<mask>"), mask_head[:4])
    mask = header_class.from_fileobj(io.BytesIO(mask_head), check=False)  # with extensions
    shape = mask.get_data_shape()
    template = mask.copy()
    template.set_data_dtype(np.float32)
    image = nb.Nifti1Image(np.zeros(shape, np.float32), mask.get_best_affine(), template)
    buffer = io.BytesIO()
    image.to_file_map({"image": nb.FileHolder(fileobj=buffer)})
    blob = buffer.getvalue()
    written = nb.Nifti1Header.from_fileobj(io.BytesIO(blob), check=False)
    return blob[: int(written.get_data_offset())]


class NiftiWriter(MapWriter):
    """Result maps on a voxel grid: ModelArrayIO's header, float32 values on the mask's voxels
    (NaN where not fitted), 0 outside the mask; gzip-compressed unless ``compress`` is off."""

    def __init__(self, head: bytes, shape: tuple[int, int, int], flat: np.ndarray, compress=True):
        self.head = head
        self.shape = shape
        self.flat = flat  # Fortran-order index of each element's voxel
        self.compress = compress
        self.extension = ".nii.gz" if compress else ".nii"

    def encode(self, values: np.ndarray, name: str = "") -> bytes:
        with np.errstate(invalid="ignore", over="ignore"):
            values = np.asarray(values, dtype=np.float32)
        if values.size != self.flat.size:
            raise ValueError(f"{values.size} values for {self.flat.size} voxels")
        volume = np.zeros(int(np.prod(self.shape)), "<f4")
        volume[self.flat] = values
        data = self.head + volume.tobytes()
        if not self.compress:
            return data
        return gzip_bytes(data, GZIP_LEVEL)
