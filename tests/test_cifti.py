"""Reading CIFTI-2 without nibabel's full parse, and writing files Workbench reads back exactly."""

from __future__ import annotations

import struct

import nibabel as nb
import numpy as np
import pytest
from conftest import CONTE32K, CONTE91K, PCONN, PSCALAR, WRONG_TYPES
from nibabel.cifti2 import cifti2_axes

from greyarray.errors import DataError, MissingInputError
from greyarray.io.formats import cifti


@pytest.mark.parametrize("path", [CONTE91K, CONTE32K, PSCALAR, PCONN], ids=lambda p: p.name)
def test_values_and_axes_equal_nibabel(path, template):
    """Every map of every real file reads exactly as nibabel reads it, full or by range."""
    parsed = cifti.read_file(path)
    image = nb.load(path)
    data = np.asarray(image.dataobj)
    blob = path.read_bytes()
    maps = [data.ravel()] if parsed.kind == "pconn" else list(data)
    assert len(maps) == (1 if parsed.kind == "pconn" else parsed.rows)
    for index, expected in enumerate(maps):
        whole = parsed.elements(cifti.bytes_reader(blob), index, 0, parsed.geometry.n_elements)
        assert whole.dtype == np.float32 and np.array_equal(whole, expected)
        stop = parsed.geometry.n_elements
        part = parsed.elements(cifti.pread_from(path), index, stop // 3, stop - 7)
        assert np.array_equal(part, expected[stop // 3 : stop - 7])
    axes = [image.header.get_axis(i) for i in range(2)]
    expected_axes = tuple(axes) if parsed.kind == "pconn" else (axes[1],)
    assert parsed.geometry.axes == expected_axes
    if parsed.kind != "pconn":
        assert parsed.map_names == tuple(axes[0].name)


def test_dense_kinds(template):
    ones = cifti.read_file(template)
    assert (ones.kind, ones.rows, ones.cols, ones.map_names) == ("dscalar", 1, 91282, ("ones",))
    assert cifti.read_file(PCONN).geometry.n_elements == 54 * 54


@pytest.mark.parametrize("kind", sorted(WRONG_TYPES))
def test_wrong_cifti_types_are_named(kind):
    with pytest.raises(DataError, match=rf"{WRONG_TYPES[kind].name}: is a CIFTI .*\({kind}\) file"):
        cifti.read_file(WRONG_TYPES[kind])


def test_select_map_by_name_index_and_errors():
    two = cifti.read_file(CONTE91K)
    assert two.select_map("corrThickness") == 1
    assert two.select_map("1") == 0 and two.select_map("2") == 1
    with pytest.raises(DataError, match="has 2 maps .*--map"):
        two.select_map(None)
    with pytest.raises(DataError, match="no map 'thick'.*'corrThickness'"):
        two.select_map("thick")
    with pytest.raises(DataError, match="no map '3'"):
        two.select_map("3")


def _swap_endianness(blob: bytes) -> bytes:
    """The same CIFTI file written big-endian: header fields, extension sizes, data."""
    header = np.frombuffer(blob[:540], cifti.NIFTI2_HEADER, 1)
    offset = int(header["vox_offset"][0])
    esize, ecode = struct.unpack("<ii", blob[544:552])
    data = np.frombuffer(blob[offset:], "<f4")
    return b"".join(
        (
            header.byteswap().tobytes(),
            blob[540:544],
            struct.pack(">ii", esize, ecode),
            blob[552:offset],
            data.astype(">f4").tobytes(),
        )
    )


def test_big_endian_and_scaled_int16(tmp_path, writer91k):
    values = np.linspace(-3, 3, 91282).astype(np.float32)
    big = tmp_path / "big.dscalar.nii"
    big.write_bytes(_swap_endianness(writer91k.encode(values, "x")))
    assert np.array_equal(np.asarray(nb.load(big).dataobj)[0], values)  # nibabel agrees
    parsed = cifti.read_file(big)
    assert parsed.dtype.byteorder == ">"
    got = parsed.elements(cifti.pread_from(big), 0, 0, 91282)
    assert np.array_equal(got, values)

    # int16 with scl_slope/scl_inter, written by nibabel
    ints = (np.arange(91282) % 60000 - 30000).astype(np.int16)[None, :]
    path = tmp_path / "scaled.dscalar.nii"
    nb.Cifti2Image(ints, header=nb.load(big).header).to_filename(path)
    blob = bytearray(path.read_bytes())  # nibabel drops a requested scaling: patch the header
    header = np.frombuffer(blob[:540], cifti.NIFTI2_HEADER, 1).copy()
    header["scl_slope"], header["scl_inter"] = 0.5, 10.0
    blob[:540] = header.tobytes()
    path.write_bytes(bytes(blob))
    parsed = cifti.read_file(path)
    assert parsed.scale == (0.5, 10.0) and parsed.dtype == np.int16
    got = parsed.elements(cifti.pread_from(path), 0, 0, 91282)
    assert np.allclose(got, np.asarray(nb.load(path).dataobj)[0]) and got[0] == -30000 * 0.5 + 10


def test_not_cifti(tmp_path):
    nifti1 = tmp_path / "vol.nii"
    nb.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)).to_filename(nifti1)
    with pytest.raises(DataError, match="vol.nii: is a NIfTI-1 file, not CIFTI-2"):
        cifti.read_file(nifti1)
    nifti2 = tmp_path / "vol2.nii"
    nb.Nifti2Image(np.zeros((2, 2, 2), np.float32), np.eye(4)).to_filename(nifti2)
    with pytest.raises(DataError, match="vol2.nii: NIfTI-2 file without a CIFTI extension"):
        cifti.read_file(nifti2)
    text = tmp_path / "notes.dscalar.nii"
    text.write_text("hello, I am not an image at all")
    with pytest.raises(DataError, match="notes.dscalar.nii: not a NIfTI file"):
        cifti.read_file(text)
    with pytest.raises(MissingInputError, match="nothing.dscalar.nii: file not found"):
        cifti.read_file(tmp_path / "nothing.dscalar.nii")


def test_truncated(tmp_path, template):
    blob = template.read_bytes()
    for size in (len(blob) - 4, 200_000, 300):  # data, XML, NIfTI header cut short
        path = tmp_path / f"cut{size}.dscalar.nii"
        path.write_bytes(blob[:size])
        with pytest.raises(DataError, match=f"{path.name}: .*truncated|{path.name}: corrupt"):
            cifti.read_file(path)


def test_cifti1_is_refused(tmp_path, template, wb_command):
    old = tmp_path / "old.dscalar.nii"
    wb_command("-file-convert", "-cifti-version-convert", template, "1", old)
    with pytest.raises(DataError, match=r"old.dscalar.nii: is a CIFTI-1.* -cifti-version-convert"):
        cifti.read_file(old)


def shifted_geometry(geometry: cifti.Geometry, shift_mm: float = 0, swap_vertex0: bool = False):
    """The 91k geometry with its volume moved by ``shift_mm`` or vertices 0 and 1 swapped."""
    axis = geometry.axes[0]
    affine, vertex = axis.affine.copy(), axis.vertex.copy()
    affine[0, 3] += shift_mm
    if swap_vertex0:
        vertex[[0, 1]] = vertex[[1, 0]]
    moved = cifti2_axes.BrainModelAxis(
        axis.name, axis.voxel, vertex, affine, axis.volume_shape, axis.nvertices
    )
    return cifti.Geometry.from_axes("dscalar", (moved,))


def test_geometry_difference_is_described(geometry91k):
    assert geometry91k.difference(geometry91k) is None
    # same elements, different bytes (nibabel serialises the XML differently from Workbench)
    same = cifti.Geometry.from_axes("dscalar", geometry91k.axes)
    assert same.xml != geometry91k.xml and geometry91k.difference(same) is None
    assert "volume affine differs" in geometry91k.difference(shifted_geometry(geometry91k, 2.0))
    vertex = geometry91k.difference(shifted_geometry(geometry91k, swap_vertex0=True))
    assert vertex.startswith("2 surface vertex indices differ, first at greyordinate 0")
    other = cifti.read_file(CONTE32K).geometry
    assert geometry91k.difference(other) == "60951 greyordinates, the first file has 91282"
    kinds = geometry91k.difference(cifti.read_file(PSCALAR).geometry)
    assert kinds == "it is a pscalar file, the first file is a dscalar file"


@pytest.mark.parametrize("path", [None, PSCALAR, PCONN], ids=["dscalar91k", "pscalar", "pconn"])
def test_writer_output_read_by_nibabel(tmp_path, path, template):
    geometry = cifti.read_file(path or template).geometry
    values = np.random.default_rng(3).normal(size=geometry.n_elements).astype(np.float32)
    values[5] = np.nan
    out = tmp_path / f"out{cifti.EXTENSIONS[geometry.kind]}"
    cifti.CiftiWriter(geometry).write(out, values, 'age.p<0.05 & "x"')
    image = nb.load(out)
    data = np.asarray(image.dataobj)
    assert data.dtype == np.float32
    assert np.array_equal(data.ravel(), values, equal_nan=True)
    assert image.nifti_header["intent_code"] == cifti.INTENTS[geometry.kind][0]
    axes = tuple(image.header.get_axis(i) for i in range(2))
    if geometry.kind == "pconn":
        assert axes == geometry.axes
    else:
        assert axes[1] == geometry.axes[0] and list(axes[0].name) == ['age.p<0.05 & "x"']
    assert not list(tmp_path.glob(".*tmp"))


def test_writer_output_read_by_workbench(tmp_path, writer91k, template, wb_command):
    """Workbench reads our file, rewrites it its own way; both agree with the template exactly."""
    values = np.random.default_rng(4).normal(size=91282).astype(np.float32)
    ours = tmp_path / "ours.dscalar.nii"
    writer91k.write(ours, values, "mymap")
    info = wb_command("-file-information", ours)
    assert (
        "CIFTI - Dense Scalar" in info and "CortexLeft:                 29696 out of 32492" in info
    )
    wb_command("-cifti-convert", "-to-text", ours, tmp_path / "t.txt")
    text = np.loadtxt(tmp_path / "t.txt")
    assert np.allclose(text, values, rtol=1e-5, atol=1e-6)
    rewritten = tmp_path / "wb.dscalar.nii"
    wb_command("-cifti-math", "x", rewritten, "-var", "x", ours)
    image = nb.load(rewritten)
    assert np.array_equal(np.asarray(image.dataobj)[0], values)
    assert image.header.get_axis(1) == nb.load(template).header.get_axis(1)
    assert wb_command("-file-information", rewritten, "-only-map-names").split() == ["mymap"]


def test_own_nifti2_tables_equal_nibabels():
    """GreyArray reads and writes headers with its own copy of the standard's tables (importing
    nibabel costs ~50 ms of every export); nibabel's are the reference."""
    from nibabel.cifti2.cifti2 import CIFTI_BRAIN_STRUCTURES

    from greyarray.io.formats import ciftixml, nifti2

    assert nb.nifti2.header_dtype == nifti2.HEADER
    assert nifti2.HEADER.itemsize == nifti2.SIZE
    codes = nb.nifti1.data_type_codes
    assert {c for c in codes.value_set() if isinstance(c, int)} == nifti2.KNOWN_CODES
    real = {c for c in nifti2.KNOWN_CODES if np.dtype(codes.dtype[c]).kind in "iuf"}
    assert set(nifti2.REAL_DTYPES) == real
    assert all(nifti2.REAL_DTYPES[c] == np.dtype(codes.dtype[c]) for c in real)
    assert set(CIFTI_BRAIN_STRUCTURES.value_set("ciftiname")) == ciftixml.STRUCTURES


@pytest.mark.parametrize("kind", sorted(cifti.INTENTS))
def test_written_header_equals_nibabels(kind):
    from greyarray.io.formats import nifti2

    shape = (7, 5) if kind == "pconn" else (1, 91282)
    reference = nb.Nifti2Header()
    reference.set_data_shape((1, 1, 1, 1, *shape))
    reference.set_data_dtype(np.float32)
    reference["intent_code"], reference["intent_name"] = cifti.INTENTS[kind]
    assert nifti2.float32_header(shape, *cifti.INTENTS[kind]).tobytes() == reference.binaryblock
