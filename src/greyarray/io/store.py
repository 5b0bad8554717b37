"""Write the HDF5 file ModelArray reads, streaming subjects with bounded memory.

Layout (see DEVELOPERS.md): ``scalars/<s>/values`` (subjects x elements),
``scalars/<s>/column_names``, the element tables exactly as ModelArrayIO writes them and
``greyarray/geometry`` (both written by the element space: ``spaces/``), and ``greyarray/`` with
provenance.

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
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from greyarray.errors import DataError, GreyArrayError, OutputError
from greyarray.io import remote
from greyarray.io.fileio import check_output, remove_stale_temporaries, replacing
from greyarray.io.formats import SpaceFiles
from greyarray.io.formats.stream import deflate
from greyarray.io.h5read import read_scalar
from greyarray.io.inputs import open_hdf5
from greyarray.io.names import refuse_inputs, safe_name, unique_files
from greyarray.io.sources import Source, check_sources
from greyarray.io.spaces import ElementSpace, copy_space, read_geometry
from greyarray.io.spaces.base import write_strings
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
    s3_workers: int = 8  # parallel S3 reads (remote.py)

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
    space_files: SpaceFiles | None = None,
) -> list[Path]:
    """Check every cohort file, then write the HDF5 file(s); nothing is written if a check fails.
    ``space_files``: the group mask (NIfTI) or fixel index and directions the files are on.

    Without ``overwrite``, an output that appears while this runs (another run) is not replaced.
    """
    space_files = space_files or SpaceFiles()
    plan = output_plan(cohort, output, split)
    kind = cohort.data_type()
    cohort.check_files()
    sources = [cohort.resolve(s) for s in cohort.table["source_file"]]
    masks = {name: cohort.masks(name) if kind == "nifti" else None for name in cohort.scalars}
    given = [m for ms in masks.values() for m in ms or () if m is not None]
    refuse_inputs(plan, [cohort.path, *sources, *space_files.paths, *given])
    for path in plan:
        check_output(path, overwrite)
        remove_stale_temporaries(path.parent)
        if overwrite and (analyses := analyses_in(path)):
            log.warning(
                "%s: --overwrite replaces it with its results (%s), which ModelArray or "
                "GreyArray fitted to the values it held",
                path,
                ", ".join(analyses),
            )
    space = space_files.load(kind, f"{cohort.path} lists")
    checked = {}
    needed = any(map(remote.is_url, [*sources, *given]))  # source files or subject masks
    with remote.spool_folder(next(iter(plan)).parent, needed) as spool:  # S3 objects' data
        for path, names in plan.items():
            files = [(name, src) for name in names for src in cohort.scalars[name]]
            n_files = {name: len(cohort.scalars[name]) for name in names}
            sources = check_sources(
                [(src, cohort.resolve(src)) for _, src in files],
                wanted_map,
                options.nprocs,
                label=", ".join(names),
                spool=spool,
                s3_workers=options.s3_workers,
                space=space,
                masks=[m for name in names for m in masks[name] or [None] * n_files[name]],
                dtype=options.dtype,
            )
            checked[path] = {
                name: [s for (n, _), s in zip(files, sources, strict=True) if n == name]
                for name in names
            }
        for path, scalars in checked.items():
            write_modelarray(path, scalars, options, command_line, overwrite)
            log.info("Wrote %s", path)
    return list(checked)


def analyses_in(path: Path) -> list[str]:
    """The results/ analyses of an existing HDF5 ([] when there is none or it is unreadable)."""
    if not path.is_file():
        return []
    try:
        with open_hdf5(path) as h5:
            results = h5.get("results")
            return sorted(results) if isinstance(results, h5py.Group) else []
    except GreyArrayError:
        return []


def write_modelarray(
    path: Path,
    scalars: Mapping[str, Sequence[Source]],
    options: StoreOptions,
    command_line: str | None = None,
    overwrite: bool = True,
) -> None:
    """Write all scalars (which share one geometry) to ``path`` atomically."""
    space = next(iter(scalars.values()))[0].file.geometry
    with replacing(path, overwrite) as tmp, h5py.File(tmp, "w", libver=LIBVER) as h5:
        space.to_hdf5(h5)
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
    write_strings(h5, f"scalars/{name}/column_names", [s.column_name for s in sources])
    prov = f"greyarray/sources/{name}"
    write_strings(h5, f"{prov}/path", [s.file.path.resolve() for s in sources])
    write_strings(h5, f"{prov}/sha256", [s.sha256 for s in sources])
    write_strings(h5, f"{prov}/map_name", [s.map_name for s in sources])
    h5.create_dataset(f"{prov}/nonfinite_count", data=[s.n_nonfinite for s in sources], dtype="i8")
    if any(s.mask is not None for s in sources):  # subject masks (NIfTI's source_mask_file)
        masks = [s.mask for s in sources]
        write_strings(h5, f"{prov}/mask_path", [m.path.resolve() if m else "" for m in masks])
        write_strings(h5, f"{prov}/mask_sha256", [m.sha256 if m else "" for m in masks])
        outside = [m.outside if m else 0 for m in masks]
        h5.create_dataset(f"{prov}/outside_mask_count", data=outside, dtype="i8")
    _fill(values, sources, options)


def _fill(dset: h5py.Dataset, sources: Sequence[Source], options: StoreOptions) -> None:
    from tqdm import tqdm  # here, not at the top: export-results imports this module

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
        return deflate(piece.tobytes(), options.compression_level)

    for (r, c), data in zip(corners, pool.map(encode, corners), strict=True):
        dset.id.write_direct_chunk((r, start + c), data)


# ---- a scalar added to an HDF5 file (harmonize) ---------------------------------------------
def options_like(values: h5py.Dataset, nprocs: int = 1) -> StoreOptions:
    """The storage of an existing scalar (dtype, compression and level, shuffle), for a scalar
    derived from it."""
    compression = values.compression if values.compression in ("gzip", "lzf") else "none"
    return StoreOptions(
        dtype=values.dtype.name,
        compression=compression,
        compression_level=int(values.compression_opts or 4) if compression == "gzip" else 4,
        shuffle=bool(values.shuffle),
        nprocs=nprocs,
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
    """A scalar being written by ``scalar_output``: ``h5`` is the output file (readable: in
    place, the input scalar is read from it), ``write`` stores a stripe of elements
    (chunk-aligned), ``group`` makes a group that is published with the scalar."""

    h5: h5py.File
    values: h5py.Dataset
    options: StoreOptions
    pool: ThreadPoolExecutor

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
        """A new group at ``path`` (one there before is replaced)."""
        if path in self.h5:
            del self.h5[path]
        return self.h5.create_group(path)


@contextlib.contextmanager
def scalar_output(
    path: Path,
    name: str,
    column_names: Sequence[str],
    n_elements: int,
    options: StoreOptions,
    *,
    extra: int = 0,
    overwrite: bool = False,
    template: Path | None = None,
    command_line: str | None = None,
) -> Iterator[ScalarOutput]:
    """Add ``scalars/<name>`` (values written stripe by stripe in the block, column_names) to
    the HDF5 file at ``path``, with the groups the block makes: the one place GreyArray adds a
    scalar to a file, existing or new.

    An existing file (the user's, with hours of results) is updated through
    ``h5update.updating_hdf5``: written in a private copy that replaces it only when the block
    succeeds, so no failure, signal or kill can cost it. An existing ``scalars/<name>`` is
    replaced only with ``overwrite``. A new file gets the element space of ``template`` and is
    written in a private temporary, renamed into place at the end. ``extra``: an upper bound of
    the bytes the block's groups add beside the values (the free-space check)."""
    from greyarray.io.h5update import updating_hdf5

    n = len(column_names)
    itemsize = np.dtype(options.dtype).itemsize
    with contextlib.ExitStack() as stack:
        if path.exists():
            need = n * n_elements * itemsize + extra + 2**22
            h5 = stack.enter_context(updating_hdf5(path, need, f"scalars/{name}"))
            if f"scalars/{name}" in h5 and not overwrite:
                raise OutputError(f"{path}: scalars/{name} exists; use --overwrite to replace it")
        else:
            tmp = stack.enter_context(replacing(path, overwrite))
            h5 = stack.enter_context(h5py.File(tmp, "w", libver=LIBVER))
            if template is not None:
                with open_hdf5(template) as source:
                    copy_space(source, h5)
            _write_provenance(h5.require_group("greyarray"), options, command_line or "")
        pool = stack.enter_context(thread_pool(options.nprocs))
        output = ScalarOutput(h5, None, options, pool)  # type: ignore[arg-type]
        scalar = output.group(f"scalars/{name}")
        output.values = scalar.create_dataset(
            "values",
            shape=(n, n_elements),
            dtype=options.dtype,
            chunks=chunk_shape(n, n_elements, itemsize, options),
            **options.filters,
        )
        write_strings(scalar, "column_names", column_names)
        yield output


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


@dataclass(frozen=True)
class StoredInputs:
    """What an existing HDF5 was converted from, and the analyses written into it since."""

    column_names: list[str]
    sha256: list[str]
    storage: str
    analyses: list[str]
    mask_sha256: list[str] = field(default_factory=list)  # subject masks (NIfTI), if any
    space: ElementSpace | None = None  # the stored element space (group mask, ...)

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
        if changed:
            return f"{changed} of {len(names)} files changed"
        masks = [s.mask.sha256 if s.mask else "" for s in sources]
        if masks != (self.mask_sha256 or [""] * len(masks)):
            return "subject masks changed"
        if self.space is not None and sources and self.space.difference(sources[0].file.geometry):
            return "the elements (e.g. the group mask) changed"
        return None


def stored_inputs(h5_path: Path, scalar: str) -> StoredInputs:
    """The sources of ``scalars/<scalar>`` recorded at conversion, and results/ analyses
    (DataError when the file is not such an HDF5; waits while another process writes it)."""
    with open_hdf5(h5_path) as h5:
        prov = f"greyarray/sources/{scalar}"
        names = read_scalar(h5, scalar).names
        sha = list(h5[f"{prov}/sha256"].asstr()[()]) if f"{prov}/sha256" in h5 else []
        masks = f"{prov}/mask_sha256"
        mask_sha = list(h5[masks].asstr()[()]) if masks in h5 else []
        storage = str(h5["greyarray"].attrs.get("storage", "")) if "greyarray" in h5 else ""
        results = h5.get("results")
        analyses = (
            sorted(name for name in (results or {}) if not name.startswith("."))
            if isinstance(results, h5py.Group)
            else []
        )
        try:
            space = read_geometry(h5)
        except DataError:  # a damaged geometry: the sources decide
            space = None
    return StoredInputs(names, sha, storage, analyses, mask_sha, space)
