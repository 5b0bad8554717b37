"""The NIfTI-2 header as numpy sees it, without importing nibabel.

Importing nibabel costs ~50 ms (its package imports every image class, urllib, scipy), a tenth
of an ``export-results`` run. Reading and writing a CIFTI file needs only the 540-byte header
layout and the datatype codes, which the NIfTI-2 standard fixes; the tests check both against
nibabel's own tables, so nibabel stays the reference and is imported only where its CIFTI axes
are needed.
"""

from __future__ import annotations

import numpy as np

SIZE = 540

HEADER = np.dtype(
    [
        ("sizeof_hdr", "<i4"),
        ("magic", "S4"),
        ("eol_check", "i1", (4,)),
        ("datatype", "<i2"),
        ("bitpix", "<i2"),
        ("dim", "<i8", (8,)),
        ("intent_p1", "<f8"),
        ("intent_p2", "<f8"),
        ("intent_p3", "<f8"),
        ("pixdim", "<f8", (8,)),
        ("vox_offset", "<i8"),
        ("scl_slope", "<f8"),
        ("scl_inter", "<f8"),
        ("cal_max", "<f8"),
        ("cal_min", "<f8"),
        ("slice_duration", "<f8"),
        ("toffset", "<f8"),
        ("slice_start", "<i8"),
        ("slice_end", "<i8"),
        ("descrip", "S80"),
        ("aux_file", "S24"),
        ("qform_code", "<i4"),
        ("sform_code", "<i4"),
        ("quatern_b", "<f8"),
        ("quatern_c", "<f8"),
        ("quatern_d", "<f8"),
        ("qoffset_x", "<f8"),
        ("qoffset_y", "<f8"),
        ("qoffset_z", "<f8"),
        ("srow_x", "<f8", (4,)),
        ("srow_y", "<f8", (4,)),
        ("srow_z", "<f8", (4,)),
        ("slice_code", "<i4"),
        ("xyzt_units", "<i4"),
        ("intent_code", "<i4"),
        ("intent_name", "S16"),
        ("dim_info", "u1"),
        ("unused_str", "S15"),
    ]
)

# every datatype code the standard defines; only the real-number ones map to a dtype
KNOWN_CODES = frozenset({0, 1, 2, 4, 8, 16, 32, 64, 128, 255, 256, 512, 768})
KNOWN_CODES |= {1024, 1280, 1536, 1792, 2048, 2304}
REAL_DTYPES = {
    2: np.dtype("u1"),
    4: np.dtype("i2"),
    8: np.dtype("i4"),
    16: np.dtype("f4"),
    64: np.dtype("f8"),
    256: np.dtype("i1"),
    512: np.dtype("u2"),
    768: np.dtype("u4"),
    1024: np.dtype("i8"),
    1280: np.dtype("u8"),
}


def float32_header(shape: tuple[int, int], intent_code: int, intent_name: bytes) -> np.ndarray:
    """The header nibabel's ``Nifti2Header`` gives a float32 CIFTI matrix of ``shape`` (rows,
    columns): dims 5 and 6 hold the matrix, unit pixdims, scl_slope 1; vox_offset left 0."""
    header = np.zeros((), HEADER)
    header["sizeof_hdr"], header["magic"] = SIZE, b"n+2"
    header["eol_check"] = (13, 10, 26, 10)
    header["datatype"], header["bitpix"] = 16, 32
    header["dim"] = (6, 1, 1, 1, 1, *shape, 1)
    header["pixdim"], header["scl_slope"] = 1.0, 1.0
    header["intent_code"], header["intent_name"] = intent_code, intent_name
    return header
