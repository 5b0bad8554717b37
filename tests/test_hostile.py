"""Hostile or broken input files end in one clear line (issue 11): exit 65 (bad data) or 66
(missing/unreadable), one stderr line naming the file, no output written, inputs unchanged.

Hostile files are the real 91k template (and the real pscalar/pconn) with bytes edited. Each
family is one parametrised test over its variants; FIFO cases run in a subprocess with a timeout.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from bids_datasets import xcpd
from conftest import PCONN, PSCALAR
from test_export import NAMES, fake_results, write_results

from greyarray.demo import template_path
from greyarray.errors import MissingInputError
from greyarray.io import export, store
from greyarray.io.cohort import load_cohort
from greyarray.io.formats import cifti

TEMPLATE = template_path()
SRC = str(Path(__file__).resolve().parents[1] / "src")


def split(blob: bytes) -> tuple[np.ndarray, bytes, bytes]:
    """(NIfTI-2 header, CIFTI XML, data) of a little-endian CIFTI file."""
    header = np.frombuffer(blob[:540], cifti.NIFTI2_HEADER, 1).copy()
    esize = struct.unpack("<i", blob[544:548])[0]
    return header, blob[552 : 544 + esize].rstrip(b"\x00"), blob[int(header["vox_offset"][0]) :]


BASE = {path: split(path.read_bytes()) for path in (TEMPLATE, PSCALAR, PCONN)}
XML = BASE[TEMPLATE][1]


def build(xml: bytes | None = None, data: bytes | None = None, edit=None, base=TEMPLATE) -> bytes:
    """A CIFTI file from ``base`` with another XML and/or data; ``edit(header)`` runs last."""
    header, old_xml, old_data = BASE[base]
    xml = old_xml if xml is None else xml
    pad = -(8 + len(xml)) % 16
    extension = struct.pack("<ii", 8 + len(xml) + pad, 32) + xml + b"\x00" * pad
    header = header.copy()
    header["vox_offset"] = 544 + len(extension)
    if edit:
        edit(header)
    return header.tobytes() + b"\x01\x00\x00\x00" + extension + (old_data if data is None else data)


def sub(old: bytes, new: bytes, last: bool = False, xml: bytes = XML) -> bytes:
    """``xml`` with the first (or last) ``old`` replaced by ``new``."""
    i = xml.rindex(old) if last else xml.index(old)
    return xml[:i] + new + xml[i + len(old) :]


def field(name: str, value, index: int | None = None):
    def edit(header):
        if index is None:
            header[name] = value
        else:
            header[name][0][index] = value

    return edit


def digest(paths) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


def check_refused(result, code: int, pattern: str, out_dir: Path, inputs=()) -> None:
    """Exit ``code``, one ``greyarray: error:`` line matching ``pattern``, nothing in out_dir."""
    status, err, before = result
    lines = [line for line in err.splitlines() if not line.startswith(("INFO:", "WARNING:"))]
    assert "Traceback" not in err, err
    assert status == code, err
    assert len(lines) == 1 and lines[0].startswith("greyarray: error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert not out_dir.exists() or not list(out_dir.iterdir()), list(out_dir.iterdir())
    assert digest(inputs) == before


def run(run_cli, args, inputs=()) -> tuple[int, str, dict]:
    before = digest(inputs)
    code, _, err = run_cli(*args, "--log-level", "ERROR")
    return code, err, before


def cohort(folder: Path, *files: tuple[str, bytes], base: Path = TEMPLATE) -> tuple[Path, list]:
    """A cohort of the untouched ``base`` then ``files`` (name, bytes); returns (csv, inputs)."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = cifti.EXTENSIONS[cifti.read_file(base).kind]
    paths = [folder / f"good{ext}"]
    shutil.copy(base, paths[0])
    for name, blob in files:
        paths.append(folder / f"{name}{ext}")
        paths[-1].write_bytes(blob)
    csv = folder / "cohort.csv"
    rows = [
        {"scalar_name": "thickness", "source_file": p.name, "age": i} for i, p in enumerate(paths)
    ]
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv, [csv, *paths]


def convert(csv: Path, out_dir: Path) -> list:
    return ["to-modelarray", "--cohort-file", csv, "--output", out_dir / "out.h5"]


# ---------------------------------------------------------------- 1. hostile CIFTI XML

LAUGHS = (
    b'<?xml version="1.0"?>\n<!DOCTYPE CIFTI [<!ENTITY lol "lol">'
    + b"".join(
        f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i > 1 else "&lol;" * 10}">'.encode()
        for i in range(1, 10)
    )
    + b"]>"
)
XML_CASES = {
    "mismatched-tag-late-in-element-axis": (
        sub(b"</VoxelIndicesIJK>", b"</VoxelIndicesIJX>", last=True),
        "malformed CIFTI XML element axis \\(mismatched tag\\)",
    ),
    "mismatched-tag-in-map-name": (sub(b"</MapName>", b"</MapNam>"), "mismatched tag"),
    "mismatched-tag-in-metadata": (sub(b"</Value>", b"</Valeu>", last=True), "mismatched tag"),
    "unclosed-root": (XML.replace(b"</CIFTI>", b""), "malformed CIFTI XML"),
    "undefined-entity-in-map-name": (sub(b"<MapName>", b"<MapName>&nope;"), "undefined entity"),
    "undefined-entity-in-element-axis": (
        sub(b"<VertexIndices>", b"<VertexIndices>&nope;", last=True),
        "undefined entity",
    ),
    "billion-laughs": (
        LAUGHS + sub(b"<MapName>", b"<MapName>&lol9;"),
        "declares a DOCTYPE or ENTITY",
    ),
    "xxe-local-file": (
        b'<!DOCTYPE CIFTI [<!ENTITY x SYSTEM "file:///etc/hostname">]>'
        + sub(b"<MapName>", b"<MapName>&x;"),
        "declares a DOCTYPE or ENTITY",
    ),
    "external-dtd": (
        b'<!DOCTYPE CIFTI SYSTEM "file:///etc/hostname">' + XML,
        "declares a DOCTYPE or ENTITY",
    ),
    "entity-in-element-axis": (
        sub(b"<VertexIndices>", b'<!ENTITY x "1"><VertexIndices>', last=True),
        "declares a DOCTYPE or ENTITY",
    ),
    "lowercase-doctype": (
        b'<!doctype CIFTI [<!entity x "y">]>' + XML,
        "malformed CIFTI XML",
    ),
    "element-axis-in-a-comment": (
        sub(b"</MatrixIndicesMap>", b"</MatrixIndicesMap>-->", last=True).replace(
            b'<MatrixIndicesMap AppliesToMatrixDimension="1"',
            b'<!--<MatrixIndicesMap AppliesToMatrixDimension="1"',
        ),
        "MatrixIndicesMap inside a comment",
    ),
    "deeply-nested-element-axis": (
        sub(b"</BrainModel>", b"<a>" * 100_000 + b"</a>" * 100_000 + b"</BrainModel>"),
        "unexpected <a> in <BrainModel>",
    ),
    "namespace": (
        XML.replace(b'<CIFTI Version="2">', b'<CIFTI xmlns="urn:x" Version="2">'),
        "root element is <\\{urn:x\\}CIFTI>",
    ),
}


@pytest.mark.parametrize("position", ["second", "only"])
@pytest.mark.parametrize("case", sorted(XML_CASES))
def test_hostile_xml(run_cli, tmp_path, case, position):
    xml, pattern = XML_CASES[case]
    csv, inputs = cohort(tmp_path / "in", ("bad", build(xml)))
    if position == "only":
        inputs = [csv, inputs[2]]
        csv.write_text(f"scalar_name,source_file\nthickness,{inputs[1].name}\n")
    out = tmp_path / "out"
    result = run(run_cli, convert(csv, out), inputs)
    check_refused(result, 65, f"bad.dscalar.nii: .*{pattern}", out, inputs)


def test_nibabel_never_sees_unchecked_xml(monkeypatch):
    """Geometry.axes hands nibabel only XML that defusedxml parsed: a stored geometry with an
    entity bomb is refused before nibabel, and comments are gone from what nibabel reads."""
    from nibabel.cifti2 import parse_cifti2

    seen = []
    real = parse_cifti2.Cifti2Extension

    def spy(code, content):
        seen.append(content)
        return real(code=code, content=content)

    monkeypatch.setattr(parse_cifti2, "Cifti2Extension", spy)
    element = XML[XML.index(b'<MatrixIndicesMap AppliesToMatrixDimension="1"') :]
    element = element[: element.rindex(b"</MatrixIndicesMap>") + len(b"</MatrixIndicesMap>")]
    hostile = cifti.Geometry("dscalar", LAUGHS[22:] + element, 91282, "stored")
    with pytest.raises(cifti.DataError, match="stored: .*DOCTYPE or ENTITY"):
        hostile.axes  # noqa: B018
    commented = cifti.Geometry("dscalar", b"<!-- hello -->" + element, 91282, "c")
    assert len(commented.axes[0]) == 91282 and seen and b"hello" not in seen[-1]


# ---------------------------------------------------------------- 2. inconsistent headers


def _parcel_name_twice(xml: bytes) -> bytes:
    names = re.findall(rb'<Parcel Name="([^"]*)"', xml)
    return xml.replace(b'Name="' + names[1] + b'"', b'Name="' + names[0] + b'"', 1)


def _dims(rows: int, cols: int):
    def edit(header):
        header["dim"][0][5], header["dim"][0][6] = rows, cols

    return edit


SEMANTIC_CASES = {
    "offset-inside-nifti-header": (
        build(edit=field("vox_offset", 100)),
        "data offset 100 lies inside the NIfTI-2 header",
    ),
    "offset-inside-xml": (
        build(edit=field("vox_offset", 4000)),
        "data offset 4000 lies inside the CIFTI XML extension",
    ),
    "fewer-columns-than-greyordinates": (
        build(data=BASE[TEMPLATE][2][:4000], edit=_dims(1, 1000)),
        "NIfTI dims say 1000 columns but the CIFTI XML defines 91282 greyordinates",
    ),
    "more-columns-than-greyordinates": (
        build(data=BASE[TEMPLATE][2] + b"\x00" * 4, edit=_dims(1, 91283)),
        "NIfTI dims say 91283 columns",
    ),
    "two-maps-one-named": (
        build(data=BASE[TEMPLATE][2] * 2, edit=_dims(2, 91282)),
        "header has 2 maps but the XML names 1",
    ),
    "negative-index-offset": (
        build(sub(b'IndexOffset="29696"', b'IndexOffset="-29696"')),
        "IndexOffset='-29696' is not a non-negative integer",
    ),
    "float-index-offset": (
        build(sub(b'IndexOffset="29696"', b'IndexOffset="29696.0"')),
        "IndexOffset='29696.0' is not",
    ),
    "gap-between-models": (
        build(sub(b'IndexOffset="29696"', b'IndexOffset="29697"')),
        "IndexOffset=29697, but the models before it end at 29696",
    ),
    "index-count-not-list-length": (
        build(sub(b'IndexCount="135"', b'IndexCount="136"')),
        "IndexCount=136 but it lists 135 indices",
    ),
    "hex-index-count": (build(sub(b'IndexCount="135"', b'IndexCount="0x87"')), "IndexCount"),
    "surface-smaller-than-its-vertices": (
        build(sub(b'SurfaceNumberOfVertices="32492"', b'SurfaceNumberOfVertices="100"')),
        "outside its surface of 100 vertices",
    ),
    "negative-surface-size": (
        build(sub(b'SurfaceNumberOfVertices="32492"', b'SurfaceNumberOfVertices="-1"')),
        "SurfaceNumberOfVertices='-1' is not a positive integer",
    ),
    "zero-surface-size": (
        build(sub(b'SurfaceNumberOfVertices="32492"', b'SurfaceNumberOfVertices="0"')),
        "SurfaceNumberOfVertices='0' is not a positive integer",
    ),
    "vertex-out-of-range": (
        build(sub(b"<VertexIndices>0 ", b"<VertexIndices>99999 ")),
        "has vertex 99999, outside its surface of 32492",
    ),
    "negative-vertex": (
        build(sub(b"<VertexIndices>0 ", b"<VertexIndices>-1 ")),
        "'-1', not a non-negative integer index",
    ),
    "fractional-vertex": (build(sub(b"<VertexIndices>0 ", b"<VertexIndices>0.5 ")), "'0.5'"),
    "vertex-twice": (build(sub(b"<VertexIndices>0 1 ", b"<VertexIndices>0 0 ")), "twice"),
    "negative-voxel": (build(sub(b"38 55 46\n<", b"38 55 -46\n<", last=True)), "'-46'"),
    "voxel-outside-volume": (
        build(sub(b'VolumeDimensions="91,109,91"', b'VolumeDimensions="10,10,10"')),
        "outside the volume \\[10, 10, 10\\]",
    ),
    "two-volume-dimensions": (
        build(sub(b'VolumeDimensions="91,109,91"', b'VolumeDimensions="91,109"')),
        "VolumeDimensions='91,109' is not three integers",
    ),
    "negative-volume-dimension": (
        build(sub(b'VolumeDimensions="91,109,91"', b'VolumeDimensions="-91,109,91"')),
        "VolumeDimensions",
    ),
    "unknown-structure": (
        build(sub(b"CIFTI_STRUCTURE_CORTEX_RIGHT", b"CIFTI_STRUCTURE_NOSE")),
        "unknown BrainStructure 'CIFTI_STRUCTURE_NOSE'",
    ),
    "structure-twice": (
        build(sub(b"CIFTI_STRUCTURE_CORTEX_RIGHT", b"CIFTI_STRUCTURE_CORTEX_LEFT")),
        "repeats a brain structure",
    ),
    "unknown-model-type": (
        build(sub(b"CIFTI_MODEL_TYPE_VOXELS", b"CIFTI_MODEL_TYPE_BLOB")),
        "unknown ModelType",
    ),
    "bad-dimension-attribute": (
        build(sub(b'AppliesToMatrixDimension="1"', b'AppliesToMatrixDimension="one"')),
        "MatrixIndicesMap without dimension",
    ),
    "pscalar-columns-not-parcels": (
        build(base=PSCALAR, edit=_dims(2, 50)),
        "NIfTI dims say 50 columns but the CIFTI XML defines 54 parcels",
    ),
    "pscalar-parcel-name-twice": (
        build(_parcel_name_twice(BASE[PSCALAR][1]), base=PSCALAR),
        "repeats a parcel name",
    ),
    "pscalar-vertex-out-of-range": (
        build(BASE[PSCALAR][1].replace(b">20 21 22 ", b">20 21 99999 ", 1), base=PSCALAR),
        "outside its surface of 32492",
    ),
    "pconn-rows-not-parcels": (
        build(base=PCONN, edit=_dims(53, 54)),
        "NIfTI dims say a 53 x 54 matrix but the CIFTI XML defines 54 x 54 parcels",
    ),
}


@pytest.mark.parametrize("case", sorted(SEMANTIC_CASES))
def test_inconsistent_header(run_cli, tmp_path, case):
    blob, pattern = SEMANTIC_CASES[case]
    base = (
        PSCALAR if case.startswith("pscalar") else PCONN if case.startswith("pconn") else TEMPLATE
    )
    csv, inputs = cohort(tmp_path / "in", ("bad", blob), base=base)
    out = tmp_path / "out"
    result = run(run_cli, [*convert(csv, out), "--map", "1"], inputs)
    check_refused(
        result, 65, f"bad{cifti.EXTENSIONS[cifti.read_file(base).kind]}: .*{pattern}", out, inputs
    )


# ---------------------------------------------------------------- 3. not a regular file


@pytest.fixture(scope="module")
def results_file(tmp_path_factory) -> Path:
    """A converted 2-subject 91k HDF5 with ModelArray-like results ``lm``."""
    folder = tmp_path_factory.mktemp("results")
    csv, _ = cohort(folder, ("sub2", TEMPLATE.read_bytes()))
    store.to_modelarray(load_cohort(csv), folder / "data.h5", store.StoreOptions())
    write_results(folder / "data.h5", "lm", fake_results(91282), "writeResults")
    return folder / "data.h5"


def _fifo_case(case: str, folder: Path, results: Path) -> tuple[list, int, str]:
    """(command line, expected code, expected pattern) of a special-file case."""
    fifo = folder / "pipe.dscalar.nii"
    os.mkfifo(fifo)
    out = folder / "out"
    csv = folder / "cohort.csv"
    if case == "bids-dataset":
        data = xcpd(folder / "xcpd", TEMPLATE, subjects=("01", "02"), sessions=("1",))
        victim = sorted(data.root.rglob("*stat-reho_boldmap.dscalar.nii"))[1]
        victim.unlink()
        os.mkfifo(victim)
        args = [data.root, out, "group", "--scalar", "reho", "--quiet"]
        return args, 66, f"{victim.name}: is a FIFO"
    source = "/dev/zero" if case == "dev-zero" else fifo.name
    csv.write_text(f"scalar_name,source_file,age\nthickness,{source},1\n")
    convert_args = ["to-modelarray", "--cohort-file", csv, "--output", out / "o.h5"]
    export_args = ["export-results", "--analysis-name", "lm", "--output-dir", out]
    cases = {
        "fifo-source-file": (convert_args, "pipe.dscalar.nii: is a FIFO"),
        "dev-zero": (convert_args, "/dev/zero: is a character device"),
        "fifo-cohort": (
            [*convert_args[:2], fifo, *convert_args[3:]],
            "pipe.dscalar.nii: is a FIFO",
        ),
        "fifo-cohort-fit-lm": (
            ["fit-lm", "--input-hdf5", results, "--cohort-file", fifo, "--formula", "t ~ age"],
            "pipe.dscalar.nii: is a FIFO",
        ),
        "fifo-hdf5": ([*export_args, "--input-hdf5", fifo], "pipe.dscalar.nii: is a FIFO"),
        "fifo-template": (
            [*export_args, "--input-hdf5", results, "--example-file", fifo],
            "pipe.dscalar.nii: is a FIFO",
        ),
    }
    args, pattern = cases[case]
    return [*args, "--log-level", "ERROR"], 66, pattern


@pytest.mark.parametrize(
    "case",
    [
        "fifo-source-file",
        "fifo-cohort",
        "fifo-cohort-fit-lm",
        "fifo-hdf5",
        "fifo-template",
        "dev-zero",
        "bids-dataset",
    ],
)
def test_not_a_regular_file(tmp_path, results_file, case):
    """Never blocks (a subprocess with a timeout: a regression fails, it cannot hang). A folder
    as source file: tests/test_cli.py::test_unreadable_source_file."""
    args, code, pattern = _fifo_case(case, tmp_path, results_file)
    before = digest([results_file])
    done = subprocess.run(
        [sys.executable, "-m", "greyarray", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=20,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    out = tmp_path / "out"
    if case == "bids-dataset":  # the BIDS-App's logs may be there: no HDF5 may be
        assert not list(out.rglob("*.h5")) and not list(out.rglob("*.tmp"))
        out = tmp_path / "nothing"
    check_refused((done.returncode, done.stderr, before), code, pattern, out, [results_file])


def test_sparse_file_reads_only_what_the_header_promises(run_cli, tmp_path):
    """A file 64 GiB longer than its header says (sparse): only header and data are read and
    hashed; the trailing bytes are ignored, as nibabel and Workbench ignore them."""
    csv, inputs = cohort(tmp_path / "in", ("sparse", TEMPLATE.read_bytes()))
    sparse = inputs[2]
    with open(sparse, "r+b") as handle:
        handle.truncate(2**36)
    start = time.perf_counter()
    code, _, err = run_cli(*convert(csv, tmp_path / "out"), "--log-level", "ERROR")
    assert code == 0 and err == "" and time.perf_counter() - start < 10
    with h5py.File(tmp_path / "out" / "out.h5") as h5:
        assert (
            h5["greyarray/sources/thickness/sha256"].asstr()[1]
            == hashlib.sha256(TEMPLATE.read_bytes()).hexdigest()
        )
        assert np.array_equal(h5["scalars/thickness/values"][1], np.ones(91282))


# ---------------------------------------------------------------- 4. changed after the check


def _delete(path: Path, other: Path) -> None:
    path.unlink()


def _truncate(path: Path, other: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _append(path: Path, other: Path) -> None:
    with open(path, "ab") as handle:
        handle.write(b"\x00" * 16)


def _replace(path: Path, other: Path) -> None:
    os.replace(other, path)


def _rewrite_same_size_and_mtime(path: Path, other: Path) -> None:
    st = path.stat()
    path.write_bytes(other.read_bytes())  # same geometry and size, other values
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


CHANGES = {
    "deleted": (_delete, 66, "deleted since it was checked"),
    "truncated": (_truncate, 65, "changed size from [0-9]+ to [0-9]+ bytes since it was checked"),
    "appended": (_append, 65, "changed size from [0-9]+ to [0-9]+ bytes"),
    "replaced": (_replace, 65, "was replaced by another file since it was checked"),
    "rewritten-same-size-and-mtime": (_rewrite_same_size_and_mtime, 65, "was modified since"),
}


@pytest.mark.parametrize("case", sorted(CHANGES))
def test_file_changed_between_check_and_read(run_cli, tmp_path, monkeypatch, case):
    change, code, pattern = CHANGES[case]
    csv, inputs = cohort(tmp_path / "in", ("victim", TEMPLATE.read_bytes()))
    other = tmp_path / "other.dscalar.nii"  # same geometry and size, other values
    other.write_bytes(build(data=np.full(91282, 7.0, "<f4").tobytes()))
    assert other.stat().st_size == inputs[2].stat().st_size
    real = store.check_sources

    def check_then_change(*args, **kwargs):
        sources = real(*args, **kwargs)
        change(inputs[2], other)
        return sources

    monkeypatch.setattr(store, "check_sources", check_then_change)
    out = tmp_path / "out"
    result = run(run_cli, convert(csv, out))
    check_refused(result, code, f"victim.dscalar.nii: {pattern}", out)


# ---------------------------------------------------------------- 5. XML far too large


def _huge_extension_size(header):
    header["vox_offset"] = 2**30 + 560


SIZE_CASES = {
    "xml-over-the-cap": (
        build(sub(b"<Matrix>", b"<!--" + b"x" * (33 * 2**20) + b"--><Matrix>")),
        "CIFTI XML is 34 MiB, larger than any real CIFTI file",
    ),
    "data-offset-far-away": (build(edit=_huge_extension_size), "data offset 1073742384 is"),
    "extension-size-over-the-cap": (None, "CIFTI XML is 1024 MiB"),
}


@pytest.mark.parametrize("case", sorted(SIZE_CASES))
def test_xml_too_large(run_cli, tmp_path, case):
    blob, pattern = SIZE_CASES[case]
    if blob is None:  # declared 1 GiB extension in a small file: refused before reading it
        blob = bytearray(build(edit=_huge_extension_size))
        blob[544:548] = struct.pack("<i", 2**30 + 8)
        blob = bytes(blob)
    csv, inputs = cohort(tmp_path / "in", ("bad", blob))
    out = tmp_path / "out"
    start = time.perf_counter()
    result = run(run_cli, convert(csv, out), inputs)
    check_refused(result, 65, f"bad.dscalar.nii: {pattern}", out, inputs)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("where", [b"<Matrix>", b"<BrainModel "])
def test_large_comment_is_read_in_linear_time(run_cli, tmp_path, where):
    """An 8 MB comment (in the per-file XML or in the element axis) is legal XML: converted,
    in seconds (nibabel's own parser took ~25 s, growing with the square of the size)."""
    xml = sub(where, b"<!--" + b"x" * (8 * 2**20) + b"-->" + where)
    csv, _ = cohort(tmp_path / "in", ("comment", build(xml)))
    start = time.perf_counter()
    code, _, err = run_cli(*convert(csv, tmp_path / "out"), "--log-level", "ERROR")
    assert code == 0 and err == "", err
    assert time.perf_counter() - start < 10


# ---------------------------------------------------------------- 6. broken results in the HDF5


def _matrix(group, **kwargs):
    del group["results_matrix"]
    group.create_dataset("results_matrix", **kwargs)


def _names(group, data, **kwargs):
    del group["column_names"]
    group.create_dataset("column_names", data=data, **kwargs)


def _stored_xml(h5, document: bytes):
    del h5["greyarray/geometry/cifti_xml"]
    h5["greyarray/geometry"].create_dataset(
        "cifti_xml", data=np.array([document], f"S{len(document)}")
    )


def _document(h5) -> bytes:
    return bytes(h5["greyarray/geometry/cifti_xml"][0])


RESULT_CASES = {
    "compound-matrix": (
        lambda h5, g: _matrix(g, data=np.zeros((len(NAMES), 10), "f8,i4")),
        "results_matrix holds .*, not numbers",
    ),
    "string-matrix": (
        lambda h5, g: _matrix(g, data=np.full((len(NAMES), 10), b"x")),
        "results_matrix holds \\|S1, not numbers",
    ),
    "analysis-is-a-dataset": (
        lambda h5, g: (h5.__delitem__("results/lm"), h5.create_dataset("results/lm", data=[1])),
        "results/lm is a dataset, not a group",
    ),
    "results-is-a-dataset": (
        lambda h5, g: (h5.__delitem__("results"), h5.create_dataset("results", data=[1])),
        "no analysis 'lm' \\(analyses present: none\\)",
    ),
    "matrix-is-a-group": (
        lambda h5, g: (g.__delitem__("results_matrix"), g.create_group("results_matrix")),
        "has no results_matrix dataset",
    ),
    "three-dimensional-matrix": (
        lambda h5, g: _matrix(g, shape=(len(NAMES), 2, 3), dtype="f8"),
        "shape \\(9, 2, 3\\), which fits none",
    ),
    "too-few-column-names": (
        lambda h5, g: _names(g, NAMES[:-1], dtype=h5py.string_dtype()),
        "fits none of its 8 column names",
    ),
    "numeric-column-names": (lambda h5, g: _names(g, np.arange(9)), "column_names holds int64"),
    "duplicate-column-names": (
        lambda h5, g: _names(g, [*NAMES[:-1], NAMES[1]], dtype=h5py.string_dtype()),
        "names column 'Intercept.estimate' twice",
    ),
    "column-names-is-a-group": (
        lambda h5, g: (g.__delitem__("column_names"), g.create_group("column_names")),
        "column_names is a group",
    ),
    "huge-column-names": (
        lambda h5, g: (
            g.__delitem__("column_names"),
            g.create_dataset("column_names", shape=(10**9,), dtype="S4"),
        ),
        "column_names has shape \\(1000000000,\\)",
    ),
    "declared-10x10e10-matrix": (
        lambda h5, g: _matrix(g, shape=(len(NAMES), 10**10), dtype="f8", chunks=(9, 4096)),
        "has 10000000000 rows, more than the geometry's 91282",
    ),
    "declared-transposed-without-element-id": (
        lambda h5, g: (
            _matrix(g, shape=(10**10, 2), dtype="f8", chunks=(4096, 2)),
            _names(g, ["a.estimate", "b.p.value"], dtype=h5py.string_dtype()),
        ),
        "has 10000000000 rows, more than the geometry's 91282 elements",
    ),
    "element-id-not-integer": (
        lambda h5, g: g["results_matrix"].__setitem__((0, 3), 2.5),
        "element_id has non-integer values",
    ),
    "junk-stored-xml": (
        lambda h5, g: _stored_xml(h5, b"hello, not XML"),
        "greyarray/geometry/cifti_xml is not the CIFTI XML GreyArray stores",
    ),
    "truncated-stored-xml": (
        lambda h5, g: _stored_xml(h5, _document(h5)[:300000] + b"</Matrix></CIFTI>"),
        "greyarray/geometry/cifti_xml: malformed CIFTI XML element axis",
    ),
    "entity-bomb-in-stored-xml": (
        lambda h5, g: _stored_xml(
            h5, _document(h5).replace(b"<Matrix>", b"<Matrix>" + LAUGHS[22:], 1)
        ),
        "DOCTYPE or ENTITY",
    ),
    "stored-count-disagrees": (
        lambda h5, g: h5["greyarray/geometry"].attrs.__setitem__("n_elements", 1000),
        "n_elements is 1000 but its CIFTI XML defines 91282 elements",
    ),
    "stored-count-not-integer": (
        lambda h5, g: h5["greyarray/geometry"].attrs.__setitem__("n_elements", "many"),
        "n_elements 'many' is not an integer",
    ),
    "stored-kind-unknown": (
        lambda h5, g: h5["greyarray/geometry"].attrs.__setitem__("cifti_kind", "dconn"),
        "unknown stored CIFTI kind 'dconn'",
    ),
    "factor-levels-are-a-group": (
        lambda h5, g: g.create_group("lut_forcol2"),
        "lut_forcol2 is a group",
    ),
}


@pytest.mark.parametrize("case", sorted(RESULT_CASES))
def test_broken_results(run_cli, tmp_path, results_file, case):
    edit, pattern = RESULT_CASES[case]
    h5_path = tmp_path / "in.h5"
    shutil.copy(results_file, h5_path)
    with h5py.File(h5_path, "a") as h5:
        edit(h5, h5.get("results/lm"))
    out = tmp_path / "out"
    args = ["export-results", "--analysis-name", "lm", "--input-hdf5", h5_path, "--output-dir", out]
    result = run(run_cli, args, [h5_path])
    check_refused(result, 65, f"in.h5: .*{pattern}", out, [h5_path])


def test_export_reads_one_column_at_a_time(results_file, tmp_path):
    """40 result columns (a 29 MB matrix) export with a few MB of Python memory; R's NA (a
    signalling NaN) becomes a quiet NaN; a transposed partial fit is placed by element_id."""
    h5_path = tmp_path / "in.h5"
    shutil.copy(results_file, h5_path)
    names = ["element_id"] + [f"x{i}.estimate" for i in range(39)]
    rows = np.arange(0, 91282, 2)
    data = np.random.default_rng(0).normal(size=(40, rows.size))
    data[0] = rows
    na = np.array([0x7FF00000000007A2], np.uint64).view(np.float64)[0]  # R's NA_real_
    data[5, 3] = na
    with h5py.File(h5_path, "a") as h5:
        group = h5.create_group("results/big")
        group.create_dataset("results_matrix", data=data.T, chunks=(4096, 40))
        group.create_dataset("column_names", data=names, dtype=h5py.string_dtype())
    tracemalloc.start()
    files = export.export_results(h5_path, "big", tmp_path / "out")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(files) == 39 and peak < 12 * 2**20, peak / 2**20
    written = cifti.read_file(tmp_path / "out" / "big_x4.estimate.dscalar.nii")
    values = written.elements(cifti.pread_from(written.path), 0, 0, 91282)
    assert np.isnan(values[1::2]).all() and np.isnan(values[6])
    with np.errstate(invalid="ignore"):
        expected = data[5].astype(np.float32)
    expected[3] = np.nan
    assert np.array_equal(values[rows], expected, equal_nan=True)


# ---------------------------------------------------------------- 7. one loader, same errors

CSV_CASES = {
    "empty": (b"", "cannot read as CSV \\(No columns to parse from file\\)"),
    "header-only": (b"scalar_name,source_file,age\n", "cohort has no rows"),
    "garbled": (b'scalar_name,source_file\n"unclosed,x\n' + b"a,b\n" * 3, "cannot read as CSV"),
    "not-utf8": (
        "scalar_name,source_file,age\nthickness,caf\xe9.dscalar.nii,1\n".encode("latin-1"),
        "cannot read as CSV \\(not UTF-8 text\\)",
    ),
    "binary": (bytes(range(256)) * 4, "cannot read as CSV"),
}


@pytest.mark.parametrize("case", sorted(CSV_CASES))
def test_cohort_csv_same_error_everywhere(run_cli, tmp_path, results_file, case):
    content, pattern = CSV_CASES[case]
    csv = tmp_path / "in" / "cohort.csv"
    csv.parent.mkdir()
    csv.write_bytes(content)
    out = tmp_path / "out"
    lines = []
    for args in (
        convert(csv, out),
        ["fit-lm", "--input-hdf5", results_file, "--cohort-file", csv, "--formula", "t ~ age"],
    ):
        result = run(run_cli, args, [csv, results_file])
        check_refused(result, 65, f"cohort.csv: {pattern}", out, [csv, results_file])
        lines.append(result[1])
    assert lines[0] == lines[1]


def _hdf5_case(case: str, path: Path, results: Path) -> None:
    if case == "text":
        path.write_text("not hdf5\n")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(results.read_bytes()[: results.stat().st_size // 2])
    elif case == "directory":
        path.mkdir()


HDF5_CASES = {
    "text": (65, "cannot read as HDF5 \\(not an HDF5 file\\)"),
    "empty": (65, "cannot read as HDF5"),
    "truncated": (65, "cannot read as HDF5 \\(truncated\\)"),
    "missing": (66, "HDF5 file not found"),
    "directory": (66, "is a directory, not a regular file"),
}


@pytest.mark.parametrize("case", sorted(HDF5_CASES))
def test_hdf5_input_same_error_everywhere(run_cli, tmp_path, results_file, case):
    code, pattern = HDF5_CASES[case]
    h5_path = tmp_path / "in" / "data.h5"
    h5_path.parent.mkdir()
    _hdf5_case(case, h5_path, results_file)
    csv, _ = cohort(tmp_path / "cohort")
    out = tmp_path / "out"
    lines = []
    for args in (
        ["fit-lm", "--input-hdf5", h5_path, "--cohort-file", csv, "--formula", "t ~ age"],
        ["export-results", "--analysis-name", "lm", "--input-hdf5", h5_path, "--output-dir", out],
    ):
        result = run(run_cli, args, [h5_path])
        check_refused(result, code, f"data.h5: {pattern}", out, [h5_path])
        lines.append(result[1])
    assert lines[0] == lines[1]


# ---------------------------------------------------------------- 8. many missing files


@pytest.mark.parametrize("n_rows, present", [(50_000, 0), (6, 3)])
def test_missing_files_reported_at_once(run_cli, tmp_path, n_rows, present):
    folder = tmp_path / "in"
    folder.mkdir()
    names = [f"maps/sub-{i:06d}.dscalar.nii" for i in range(n_rows)]
    (folder / "maps").mkdir()
    for name in names[:: n_rows // present] if present else []:
        shutil.copy(TEMPLATE, folder / name)
    csv = folder / "cohort.csv"
    pd.DataFrame({"scalar_name": "t", "source_file": names}).to_csv(csv, index=False)
    first = names[1] if present else names[0]
    out = tmp_path / "out"
    start = time.perf_counter()
    result = run(run_cli, convert(csv, out))
    missing = n_rows - present
    check_refused(
        result,
        66,
        f"^greyarray: error: .*cohort.csv: source_file {re.escape(repr(first))} not found "
        rf"\(neither .*{re.escape(first)} nor .*{re.escape(first)}\); {missing:,} of "
        f"{n_rows:,} source files are missing$",
        out,
    )
    assert time.perf_counter() - start < 15
    with pytest.raises(MissingInputError) as raised:  # the up-front check store may call first
        load_cohort(csv).check_files()
    assert f"greyarray: error: {raised.value}" == result[1].strip()
