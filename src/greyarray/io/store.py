"""Write the HDF5 file ModelArray reads, streaming subjects with bounded memory.

Layout (see DEVELOPERS.md): ``scalars/<s>/values`` (subjects x elements),
``scalars/<s>/column_names``, ``greyordinates`` or ``parcels/...`` exactly as ModelArrayIO writes
them, and ``greyarray/`` with the full geometry (the element axis's CIFTI XML plus decoded arrays)
and provenance.

Chunks hold all subjects for a run of elements and are at most 1 MiB by default: ModelArray in R
reads one element at a time through HDF5's 1 MiB chunk cache, and a larger chunk is re-read and
re-inflated for every element. Writing such chunks needs every subject's values for those elements,
so the matrix is filled in stripes of elements: each stripe reads its slice of every file (a pread
at the right offset) into a buffer of at most ``STRIPE_BYTES``, whatever the cohort size. For gzip
and no compression the chunks are encoded here (shuffle + zlib, the same bytes HDF5's filters
produce) on ``nprocs`` threads and stored with ``write_direct_chunk``; zlib releases the GIL.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import platform
import shlex
import sys
import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from greyarray.errors import DataError, OutputError
from greyarray.io import ciftixml
from greyarray.io.cifti import Geometry, checked_geometry
from greyarray.io.fileio import (
    check_free_space,
    check_output,
    remove_stale_temporaries,
    replacing,
)
from greyarray.io.h5read import read_scalar
from greyarray.io.inputs import open_hdf5
from greyarray.io.names import refuse_inputs, safe_name, unique_files
from greyarray.io.sources import Source, check_sources
from greyarray.io.threads import thread_pool

if TYPE_CHECKING:
    from greyarray.io.cohort import Cohort

log = logging.getLogger(__name__)

STRIPE_BYTES = 64 * 2**20
# HDF5 1.10 (R's hdf5r/rhdf5) must read what h5py's HDF5 2.x writes: cap the object formats.
LIBVER = ("earliest", "v110")


@dataclass(frozen=True)
class StoreOptions:
    """How values are stored: ModelArrayIO's flags, with a 1 MiB chunk target (see module doc)."""

    dtype: str = "float32"
    compression: str = "gzip"  # gzip | lzf | none
    compression_level: int = 4
    shuffle: bool = True
    chunk_elements: int = 0  # 0: derive from target_chunk_mb
    target_chunk_mb: float = 1.0
    nprocs: int = 1
    encoder: str = "zlib"  # zlib: HDF5's own bytes; isal: ISA-L's deflate (levels 0-3, ~10x faster)

    @property
    def description(self) -> str:
        """E.g. ``float32, gzip level 4, shuffle`` (provenance and methods text)."""
        level = f" level {self.compression_level}" if self.compression == "gzip" else ""
        shuffle = ", shuffle" if self.shuffle and self.compression != "none" else ""
        return f"{self.dtype}, {self.compression}{level}{shuffle}"

    @property
    def filters(self) -> dict:
        """h5py create_dataset keywords for the compression filters."""
        if self.compression == "none":
            return {}
        level = self.compression_level if self.compression == "gzip" else None
        return {"compression": self.compression, "compression_opts": level, "shuffle": self.shuffle}


def chunk_shape(n_subjects: int, n_elements: int, itemsize: int, options: StoreOptions):
    """(all subjects, as many elements as fit the target), as ModelArrayIO computes it."""
    if options.chunk_elements > 0:
        width = options.chunk_elements
    else:
        width = int(options.target_chunk_mb * 2**20 // (n_subjects * itemsize))
    return n_subjects, max(1, min(width, n_elements))


def output_plan(cohort: Cohort, output: Path, split: bool) -> dict[Path, list[str]]:
    """{HDF5 file: scalars it holds}; split files are named ``<scalar>_<output name>``."""
    scalars = list(cohort.scalars)
    if not split:
        return {output: scalars}
    files = unique_files(
        scalars, lambda s: output.with_name(f"{safe_name(s)}_{output.name}"), "scalars"
    )
    return {path: [scalar] for path, scalar in files.items()}


def to_modelarray(
    cohort: Cohort,
    output: Path,
    options: StoreOptions,
    *,
    split: bool = False,
    wanted_map: str | None = None,
    overwrite: bool = False,
    command_line: str | None = None,
) -> list[Path]:
    """Check every cohort file, then write the HDF5 file(s); nothing is written if a check fails.

    Without ``overwrite``, an output that appears while this runs (another run) is not replaced.
    """
    plan = output_plan(cohort, output, split)
    cohort.check_files()
    sources = (cohort.resolve(s) for s in cohort.table["source_file"])
    refuse_inputs(plan, [cohort.path, *sources])
    for path in plan:
        check_output(path, overwrite)
        remove_stale_temporaries(path.parent)
    checked = {}
    for path, names in plan.items():
        files = [(name, src) for name in names for src in cohort.scalars[name]]
        sources = check_sources(
            [(src, cohort.resolve(src)) for _, src in files],
            wanted_map,
            options.nprocs,
            label=", ".join(names),
        )
        checked[path] = {
            name: [s for (n, _), s in zip(files, sources, strict=True) if n == name]
            for name in names
        }
    for path, scalars in checked.items():
        write_modelarray(path, scalars, options, command_line, overwrite)
        log.info("Wrote %s", path)
    return list(checked)


def write_modelarray(
    path: Path,
    scalars: Mapping[str, Sequence[Source]],
    options: StoreOptions,
    command_line: str | None = None,
    overwrite: bool = True,
) -> None:
    """Write all scalars (which share one geometry) to ``path`` atomically."""
    geometry = next(iter(scalars.values()))[0].file.geometry
    with replacing(path, overwrite) as tmp, h5py.File(tmp, "w", libver=LIBVER) as h5:
        _write_modelarrayio_geometry(h5, geometry)
        _write_geometry(h5.create_group("greyarray/geometry"), geometry)
        _write_provenance(h5["greyarray"], options, command_line or shlex.join(sys.argv))
        for name, sources in scalars.items():
            _write_scalar(h5, name, sources, options)


def _write_scalar(h5: h5py.File, name: str, sources: Sequence[Source], options: StoreOptions):
    dtype = np.dtype(options.dtype)
    n, g = len(sources), sources[0].file.geometry.n_elements
    chunks = chunk_shape(n, g, dtype.itemsize, options)
    log.info(
        "Writing scalars/%s/values: %d subjects x %d elements, chunks %s, %s",
        name,
        n,
        g,
        chunks,
        options.compression,
    )
    values = h5.create_dataset(
        f"scalars/{name}/values", shape=(n, g), dtype=dtype, chunks=chunks, **options.filters
    )
    _strings(h5, f"scalars/{name}/column_names", [s.column_name for s in sources])
    prov = f"greyarray/sources/{name}"
    _strings(h5, f"{prov}/path", [s.file.path.resolve() for s in sources])
    _strings(h5, f"{prov}/sha256", [s.sha256 for s in sources])
    _strings(h5, f"{prov}/map_name", [s.map_name for s in sources])
    h5.create_dataset(f"{prov}/nonfinite_count", data=[s.n_nonfinite for s in sources], dtype="i8")
    _fill(values, sources, options)


def _fill(dset: h5py.Dataset, sources: Sequence[Source], options: StoreOptions) -> None:
    from tqdm import tqdm  # here, not at the top: export-results reads geometry from this module

    n, g = dset.shape
    width = dset.chunks[1]
    stripe = width * max(1, STRIPE_BYTES // (n * width * dset.dtype.itemsize))
    buffer = np.empty((n, min(stripe, g)), dset.dtype)
    direct = options.compression in ("gzip", "none")
    with (
        thread_pool(options.nprocs) as pool,
        tqdm(
            total=g,
            desc=f"Writing {dset.parent.name.rsplit('/', 1)[-1]}",
            unit="element",
            disable=None,
            leave=False,
        ) as bar,
    ):
        for start in range(0, g, stripe):
            stop = min(start + stripe, g)
            block = buffer[:, : stop - start]
            for i, source in enumerate(sources):
                source.read_into(block[i], start, stop)
            if direct:
                _write_chunks(dset, block, start, pool, options)
            else:  # lzf: let HDF5 filter whole chunks (the stripe is chunk-aligned)
                dset[:, start:stop] = block
            bar.update(stop - start)


def _write_chunks(dset, block: np.ndarray, start: int, pool, options: StoreOptions) -> None:
    rows, width = dset.chunks
    corners = [
        (r, c) for r in range(0, block.shape[0], rows) for c in range(0, block.shape[1], width)
    ]

    def encode(corner: tuple[int, int]) -> bytes:
        r, c = corner
        piece = block[r : r + rows, c : c + width]
        if piece.shape != (rows, width):  # edge chunks are stored full size
            padded = np.zeros((rows, width), block.dtype)
            padded[: piece.shape[0], : piece.shape[1]] = piece
            piece = padded
        piece = np.ascontiguousarray(piece)
        if options.compression == "none":
            return piece.tobytes()
        if options.shuffle:  # HDF5's shuffle filter: byte k of every value, for k in order
            piece = piece.view(np.uint8).reshape(-1, block.dtype.itemsize).T
        if options.encoder == "isal":  # a zlib stream like any other: every reader inflates it
            from isal import isal_zlib

            return isal_zlib.compress(piece.tobytes(), min(options.compression_level, 3))
        return zlib.compress(piece.tobytes(), options.compression_level)

    for (r, c), data in zip(corners, pool.map(encode, corners), strict=True):
        dset.id.write_direct_chunk((r, start + c), data)


# ---- a scalar added to an HDF5 file (harmonize) ---------------------------------------------
GEOMETRY_OBJECTS = ("greyordinates", "parcels", "greyarray/geometry")


def options_like(values: h5py.Dataset, nprocs: int = 1) -> StoreOptions:
    """The storage of an existing scalar (dtype, compression), for a scalar derived from it;
    gzip is written by ISA-L at level 1 (the same ratio as zlib's level 4 on maps, whose low
    mantissa bytes do not compress, ~10x faster)."""
    compression = values.compression if values.compression in ("gzip", "lzf") else "none"
    return StoreOptions(
        dtype=values.dtype.name,
        compression=compression,
        compression_level=1,
        shuffle=bool(values.shuffle),
        nprocs=nprocs,
        encoder="isal" if compression == "gzip" else "zlib",
    )


def read_stripe(values: h5py.Dataset, start: int, stop: int, pool=None) -> np.ndarray:
    """``values[:, start:stop]``; chunks of all subjects compressed with gzip (+ shuffle), as
    GreyArray and ModelArrayIO store scalars, are read raw and inflated by ISA-L on ``pool``'s
    threads; any other layout goes through h5py."""
    rows, width = values.chunks or (0, 0)
    plain = values.compression == "gzip" and not values.fletcher32 and values.scaleoffset is None
    if pool is None or rows != values.shape[0] or not plain:
        return values[:, start:stop]
    from isal import isal_zlib

    first = start // width * width
    corners = list(range(first, stop, width))
    try:
        raw = [values.id.read_direct_chunk((0, c)) for c in corners]
    except (OSError, KeyError, ValueError):  # a chunk never written: HDF5's fill value
        return values[:, start:stop]
    if any(mask for mask, _ in raw):  # a filter was skipped for some chunk
        return values[:, start:stop]
    dtype, size = values.dtype, values.dtype.itemsize

    def decode(data: bytes) -> np.ndarray:
        flat = np.frombuffer(isal_zlib.decompress(data), np.uint8)
        if values.shuffle:  # byte k of every value is plane k (a column copy per plane is 2x
            planes = flat.reshape(size, -1)  # faster than transposing)
            flat = np.empty((planes.shape[1], size), np.uint8)
            for k in range(size):
                flat[:, k] = planes[k]
        return flat.view(dtype).reshape(rows, width)

    out = np.empty((rows, stop - start), dtype)
    for corner, piece in zip(corners, pool.map(decode, [d for _, d in raw]), strict=True):
        lo, hi = max(corner, start), min(corner + width, stop)
        out[:, lo - start : hi - start] = piece[:, lo - corner : hi - corner]
    return out


@dataclass
class ScalarOutput:
    """A scalar being written by ``scalar_output``: ``h5`` is the output file (readable),
    ``write`` stores a stripe of elements (chunk-aligned), ``group`` makes a group published
    with the scalar."""

    h5: h5py.File
    values: h5py.Dataset
    options: StoreOptions
    pool: ThreadPoolExecutor
    staged: list[tuple[str, str]]  # (staging name, final name)

    @property
    def chunk_width(self) -> int:
        return int(self.values.chunks[1])

    def write(self, start: int, block: np.ndarray) -> None:
        """Columns start, start+1, ... (start is a multiple of the chunk width)."""
        block = np.ascontiguousarray(block, dtype=self.values.dtype)
        if self.options.compression in ("gzip", "none"):
            _write_chunks(self.values, block, start, self.pool, self.options)
        else:
            self.values[:, start : start + block.shape[1]] = block

    def group(self, path: str) -> h5py.Group:
        """A new group that appears at ``path`` (replacing one there) with the scalar."""
        return _staging_group(self.h5, path, self.staged)


def _staging_group(h5: h5py.File, path: str, staged: list[tuple[str, str]]) -> h5py.Group:
    parent, name = path.rsplit("/", 1)
    staging = f"{parent}/.{name}.incomplete"
    if staging in h5:  # left by a run that was killed
        del h5[staging]
    staged.append((staging, path))
    return h5.require_group(parent).create_group(f".{name}.incomplete")


@contextlib.contextmanager
def scalar_output(
    path: Path,
    name: str,
    column_names: Sequence[str],
    n_elements: int,
    options: StoreOptions,
    *,
    overwrite: bool = False,
    template: Path | None = None,
    command_line: str | None = None,
) -> Iterator[ScalarOutput]:
    """Add ``scalars/<name>`` (values written stripe by stripe in the block, column_names) to
    the HDF5 file at ``path``, with the groups the block makes: the one place GreyArray adds a
    scalar to a file, existing or new.

    An existing file (the user's, with hours of results) is opened once; everything is written
    under staging names (``scalars/.<name>.incomplete``) and moved into place when the block
    succeeds, so a failure leaves every existing object as it was (the staging groups are
    removed, or by the next run). An existing ``scalars/<name>`` is replaced only with
    ``overwrite``. A new file gets the geometry of ``template`` and is written in a private
    temporary, renamed into place at the end."""
    n = len(column_names)
    itemsize = np.dtype(options.dtype).itemsize
    with contextlib.ExitStack() as stack:
        if path.exists():
            check_free_space(path, n * n_elements * itemsize + 2**22, f"scalars/{name}")
            h5 = stack.enter_context(open_hdf5(path, "a", libver=LIBVER))
            if f"scalars/{name}" in h5 and not overwrite:
                raise OutputError(f"{path}: scalars/{name} exists; use --overwrite to replace it")
        else:
            tmp = stack.enter_context(replacing(path, overwrite))
            h5 = stack.enter_context(h5py.File(tmp, "w", libver=LIBVER))
            if template is not None:
                _copy_geometry(template, h5)
            _write_provenance(h5.require_group("greyarray"), options, command_line or "")
        staged: list[tuple[str, str]] = []
        scalar = _staging_group(h5, f"scalars/{name}", staged)
        values = scalar.create_dataset(
            "values",
            shape=(n, n_elements),
            dtype=options.dtype,
            chunks=chunk_shape(n, n_elements, itemsize, options),
            **options.filters,
        )
        _strings(scalar, "column_names", column_names)
        pool = stack.enter_context(thread_pool(options.nprocs))
        try:
            yield ScalarOutput(h5, values, options, pool, staged)
        except BaseException:
            with contextlib.suppress(Exception):
                for staging, _ in staged:
                    if staging in h5:
                        del h5[staging]
            raise
        for staging, final in staged:
            if final in h5:
                if final.startswith("scalars/") and not overwrite:
                    raise OutputError(
                        f"{path}: {final} was written meanwhile by another run; use --overwrite"
                    )
                del h5[final]
            h5.move(staging, final)


def _copy_geometry(template: Path, h5: h5py.File) -> None:
    """The element geometry (ModelArrayIO's and GreyArray's) of another ModelArray file."""
    with open_hdf5(template) as source:
        for name in GEOMETRY_OBJECTS:
            if name in source:
                parent = h5.require_group(name.rsplit("/", 1)[0]) if "/" in name else h5
                source.copy(source[name], parent, name=name.rsplit("/", 1)[-1])


def _write_modelarrayio_geometry(h5: h5py.File, geometry: Geometry) -> None:
    """``greyordinates`` / ``parcels`` exactly as ModelArrayIO 26 writes them."""
    if geometry.kind == "dscalar":
        codes, names = factorize(geometry.axes[0].name)
        table = np.vstack([np.arange(len(codes)), codes])
        dset = h5.create_dataset("greyordinates", data=table)
        dset.attrs["column_names"] = ["vertex_id", "structure_id"]
        dset.attrs["structure_names"] = [str(n) for n in names]
    elif geometry.kind == "pscalar":
        _strings(h5, "parcels/parcel_id", geometry.axes[0].name)
    else:
        _strings(h5, "parcels/parcel_id_from", geometry.axes[0].name)
        _strings(h5, "parcels/parcel_id_to", geometry.axes[1].name)


def _write_geometry(group: h5py.Group, geometry: Geometry) -> None:
    """The full geometry: the CIFTI XML (what export rebuilds files from) and, for dense data,
    decoded arrays so R or Python users can map elements without a CIFTI library."""
    group.attrs["cifti_kind"] = geometry.kind
    group.attrs["n_elements"] = geometry.n_elements
    document = geometry.document()  # fixed-length, so gzip applies (91k: 600 KB -> ~100 KB)
    group.create_dataset(
        "cifti_xml", data=np.array([document], f"S{len(document)}"), compression="gzip"
    )
    if geometry.kind != "dscalar":
        return
    axis = geometry.axes[0]
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


def _write_provenance(group: h5py.Group, options: StoreOptions, command_line: str) -> None:
    from importlib.metadata import version

    from greyarray import __version__

    group.attrs.update(
        {
            "greyarray_version": __version__,
            "command_line": command_line,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
            "python": platform.python_version(),
            "nibabel": version("nibabel"),
            "h5py": h5py.__version__,
            "hdf5": h5py.version.hdf5_version,
            "storage": options.description,
        }
    )


def factorize(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(0-based codes, unique values in order of first appearance), as pandas.factorize."""
    uniques, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse], [str(u) for u in uniques[order]]


def _strings(h5: h5py.File, name: str, values) -> None:
    h5.create_dataset(name, data=[str(v) for v in values], dtype=h5py.string_dtype())


@dataclass(frozen=True)
class StoredInputs:
    """What an existing HDF5 was converted from, and the analyses written into it since."""

    column_names: list[str]
    sha256: list[str]
    storage: str
    analyses: list[str]

    def difference(self, sources: Sequence[Source], storage: str) -> str | None:
        """None when ``sources`` (stored as ``storage``) are what this file holds, else how
        they differ, in words."""
        names = [s.column_name for s in sources]
        if storage != self.storage:
            return f"storage {storage}, the file has {self.storage}"
        if names != self.column_names:
            added = len(set(names) - set(self.column_names))
            removed = len(set(self.column_names) - set(names))
            return f"{added} files added, {removed} removed" if added or removed else "new order"
        if len(self.sha256) != len(names):
            return "the file records no checksums of its sources"
        changed = sum(s.sha256 != old for s, old in zip(sources, self.sha256, strict=True))
        return f"{changed} of {len(names)} files changed" if changed else None


def stored_inputs(h5_path: Path, scalar: str) -> StoredInputs:
    """The sources of ``scalars/<scalar>`` recorded at conversion, and results/ analyses
    (DataError when the file is not such an HDF5; waits while another process writes it)."""
    with open_hdf5(h5_path) as h5:
        prov = f"greyarray/sources/{scalar}"
        names = read_scalar(h5, scalar).names
        sha = list(h5[f"{prov}/sha256"].asstr()[()]) if f"{prov}/sha256" in h5 else []
        storage = str(h5["greyarray"].attrs.get("storage", "")) if "greyarray" in h5 else ""
        results = h5.get("results")
        analyses = (
            sorted(name for name in (results or {}) if not name.startswith("."))
            if isinstance(results, h5py.Group)
            else []
        )
    return StoredInputs(names, sha, storage, analyses)


def read_geometry(h5: h5py.File) -> Geometry | None:
    """The geometry GreyArray stored, or None for files written by other tools.

    Checked as a source file's XML is, and against the stored element count: export writes
    this XML into every file, so a damaged one must stop it, not produce invalid CIFTI files.
    """
    top = h5.get("greyarray")
    group = top.get("geometry") if isinstance(top, h5py.Group) else None
    where = f"{h5.filename}: greyarray/geometry"
    if group is not None and not isinstance(group, h5py.Group):
        raise DataError(f"{where} is not a group (damaged file?)")
    if group is None or "cifti_xml" not in group:
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
    if kind not in ("dscalar", "pscalar", "pconn"):
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
