"""Check every file of a cohort before anything is written, and remember how to read it.

First every path is stat'ed (a cohort of missing files fails at once). Then one pass over the
files: parse each header, compare its element space with the first file's (CIFTI: raw bytes
first, nibabel only for headers whose bytes differ, once per distinct header; NIfTI and fixel
data: against the group mask's grid or the index's fixel count), hash what is read for
provenance and count non-finite values (ModelArray treats them as missing).

CIFTI files are read again by stripes of elements at their offsets when the HDF5 is written; each
file's identity is recorded, and the write pass reads only a file that is still the one checked.
A compressed or volumetric file cannot be read by stripes, so its values (masked, in element
order) go to a temporary file (``Spill``, in TMPDIR, deleted when closed or when the process
dies) during the check pass: every input is read and inflated exactly once, in bounded memory.
An S3 object of these (a NIfTI map or subject mask, fixel data) is first copied whole into the
spool folder by remote.py, read there as a local file, and its copy deleted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from greyarray.errors import DataError, OutputError
from greyarray.io import inputs, remote
from greyarray.io.formats import cifti
from greyarray.io.spaces import ElementSpace
from greyarray.io.spaces.fixels import FixelSet
from greyarray.io.spaces.voxels import VoxelGrid, grid_difference

log = logging.getLogger(__name__)

BLOCK_BYTES = 16 * 2**20  # data read per call while checking (memory bound per thread)


@dataclass(frozen=True)
class MapFile:
    """A NIfTI or MRtrix map: its path, its data type and the space it was checked against."""

    path: Path | remote.S3Url
    kind: str  # nifti | mif
    geometry: ElementSpace
    map_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class SubjectMask:
    """A subject's own mask (cohort column ``source_mask_file``) and what it left out."""

    path: Path | remote.S3Url
    sha256: str
    outside: int  # group-mask voxels outside this subject's mask (NaN in the HDF5)


class Spill:
    """Rows of values in a temporary file (subjects x elements, the storage dtype): written once
    by the check pass, read back by stripes when the HDF5 is written."""

    def __init__(self, n_rows: int, n_elements: int, dtype: np.dtype):
        self.dtype, self.n_elements = np.dtype(dtype), n_elements
        self.row_bytes = n_elements * self.dtype.itemsize
        folder = tempfile.gettempdir()
        need = n_rows * self.row_bytes
        free = shutil.disk_usage(folder).free
        if free < need:
            raise OutputError(
                f"{folder}: the temporary folder has {free / 2**20:,.0f} MB free; converting "
                f"{n_rows:,} maps of {n_elements:,} elements needs {need / 2**20:,.0f} MB there "
                "(set TMPDIR to a folder on a larger disk)"
            )
        self.file = tempfile.TemporaryFile(prefix="greyarray-values-")  # noqa: SIM115 (closed by close())

    def write(self, row: int, values: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(values, self.dtype)).cast("B")
        offset, done = row * self.row_bytes, 0
        try:
            while done < len(data):
                done += os.pwrite(self.file.fileno(), data[done:], offset + done)
        except OSError as err:
            raise OutputError(
                f"{tempfile.gettempdir()}: cannot write the temporary values file "
                f"({err.strerror or err}; set TMPDIR to a folder with room)"
            ) from None

    def read(self, row: int, start: int, stop: int) -> np.ndarray:
        size = (stop - start) * self.dtype.itemsize
        offset = row * self.row_bytes + start * self.dtype.itemsize
        data = os.pread(self.file.fileno(), size, offset)
        if len(data) != size:
            raise OSError(f"temporary values file ended early (row {row})")
        return np.frombuffer(data, self.dtype)

    def close(self) -> None:
        self.file.close()


@dataclass(frozen=True)
class Source:
    """One subject's map of one scalar: where it is, how to read it, what it held when checked."""

    column_name: str  # the cohort's source_file string, stored as the HDF5 column name
    file: cifti.CiftiFile | MapFile
    map_index: int
    sha256: str
    n_nonfinite: int
    stamp: inputs.FileStamp | remote.Spooled | None = None  # how to read it again, checked
    spill: Spill | None = field(default=None, compare=False, repr=False)
    row: int = 0  # its row in the spill
    mask: SubjectMask | None = None

    @property
    def map_name(self) -> str:
        return self.file.map_names[self.map_index] if self.file.map_names else ""

    def read_into(self, out: np.ndarray, start: int, stop: int) -> None:
        """Fill ``out`` with elements [start, stop), cast to its dtype, from the file as it was
        checked (a changed, truncated or deleted file is an error)."""
        if self.spill is not None:
            out[:] = self.spill.read(self.row, start, stop)
        else:
            out[:] = self.file.elements(self._read, self.map_index, start, stop)

    def _read(self, offset: int, size: int) -> bytes:
        if self.stamp is None:
            return cifti.pread_from(self.file.path)(offset, size)
        return self.stamp.read(self.file.path, offset, size)


def inspect(
    path: Path | remote.S3Url,
    column_name: str,
    wanted_map: str | None,
    spool: Path | None = None,
    s3_workers: int = remote.DEFAULT_WORKERS,
) -> Source:
    """Parse, hash and scan one file, reading only what its header promises (header and
    extensions, then the data block), in blocks of bounded size. An S3 object is streamed
    once and its data kept in ``spool`` for the write pass (remote.py)."""
    remote_ = isinstance(path, remote.S3Url)
    with remote.opened(path, spool, s3_workers) if remote_ else inputs.opened(path) as file:
        head = cifti.read_head(file.read, path, file.size)
        parsed = cifti.parse(path, head, file.size)
        index = parsed.select_map(wanted_map)
        digest = hashlib.sha256(head)
        n_bad = 0
        step = parsed.block_unit * max(1, BLOCK_BYTES // parsed.block_unit)
        for start in range(0, parsed.data_size, step):
            raw = file.read(parsed.offset + start, min(step, parsed.data_size - start))
            digest.update(raw)
            n_bad += parsed.count_nonfinite(raw, index)
            file.keep(raw)
        stamp = file.done(parsed.offset)  # a local file: not rewritten while being read
    return Source(column_name, parsed, index, digest.hexdigest(), n_bad, stamp)


class GeometryCheck:
    """Compares geometries with the first file's, parsing each distinct header only once.

    A checked source gets the first file's space object, so the cohort holds one copy of it
    (a 91k CIFTI's ~600 KB element XML) instead of one per subject.
    """

    def __init__(self, first: Source):
        self.first = first
        self._verdicts: dict[bytes, str | None] = {}  # sha256 of other XML -> difference

    def __call__(self, source: Source) -> Source:
        ref, geometry = self.first.file.geometry, source.file.geometry
        if geometry.identity != ref.identity:
            key = hashlib.sha256(geometry.identity).digest()
            if key not in self._verdicts:
                self._verdicts[key] = ref.difference(geometry)
            if problem := self._verdicts[key]:
                raise DataError(
                    f"{source.file.path}: does not match the first file ({self.first.file.path}):"
                    f" {problem}"
                )
        return replace(source, file=replace(source.file, geometry=ref))


def _read_map(reader, path: Path | remote.S3Url, spool: Path | None, workers: int):
    """``reader(path)`` of a local file; an S3 object is copied into ``spool`` and read there
    (the copy is deleted once read)."""
    if not remote.is_url(path):
        return reader(path)
    with remote.fetched(path, spool, workers) as copy:
        return reader(copy.path, path)


def inspect_volume(
    path: Path | remote.S3Url,
    column_name: str,
    grid: VoxelGrid,
    spill: Spill,
    row: int,
    mask: Path | remote.S3Url | None,
    spool: Path | None = None,
    s3_workers: int = remote.DEFAULT_WORKERS,
) -> Source:
    """Read one NIfTI map (and its subject mask), check both against the group mask's grid,
    and put the group mask's voxels in the spill: NaN outside the subject's mask, as
    ModelArrayIO does. S3 objects are copied into ``spool`` to be read."""
    from greyarray.io.formats import nifti

    volume = _read_map(nifti.read_volume, path, spool, s3_workers)
    if problem := grid.grid_difference(volume.shape, volume.affine):
        raise DataError(f"{path}: does not match the group mask ({grid.source}): {problem}")
    values = volume.values(grid.flat)
    finite = np.isfinite(values)
    subject = None
    if mask is not None:
        own = _read_map(nifti.read_volume, mask, spool, s3_workers)
        if problem := grid.grid_difference(own.shape, own.affine):
            raise DataError(
                f"{mask}: the subject mask of {path.name} does not match the group mask "
                f"({grid.source}): {problem}"
            )
        inside = own.positive(grid.flat)
        values[~inside] = np.nan
        finite &= inside
        subject = SubjectMask(mask, own.sha256, int(inside.size - np.count_nonzero(inside)))
        n_bad = int(np.count_nonzero(inside) - np.count_nonzero(finite))
    else:
        n_bad = int(finite.size - np.count_nonzero(finite))
    spill.write(row, values)
    return Source(
        column_name,
        MapFile(path, "nifti", grid),
        0,
        volume.sha256,
        n_bad,
        None,
        spill,
        row,
        subject,
    )


def inspect_fixels(
    path: Path | remote.S3Url,
    column_name: str,
    fixels: FixelSet,
    spill: Spill,
    row: int,
    mask: Path | remote.S3Url | None,
    spool: Path | None = None,
    s3_workers: int = remote.DEFAULT_WORKERS,
) -> Source:
    """Read one fixel data file (F x 1 x 1) of the index's F fixels into the spill (an S3
    object is copied into ``spool`` to be read)."""
    from greyarray.io.formats import mif

    if mask is not None:
        raise DataError(f"{mask}: source_mask_file is for NIfTI maps, not fixel data")
    image = _read_map(mif.read_image, path, spool, s3_workers)
    dim = image.header.dim
    if dim[0] != fixels.n_elements or any(d != 1 for d in dim[1:]):
        raise DataError(
            f"{path}: has dims {' x '.join(map(str, dim))}; fixel data of the index "
            f"({fixels.source}) are {fixels.n_elements:,} x 1 x 1"
        )
    values = image.values().reshape(-1)
    n_bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    spill.write(row, values)
    return Source(
        column_name, MapFile(path, "mif", fixels), 0, image.sha256, n_bad, None, spill, row
    )


READERS = {VoxelGrid: inspect_volume, FixelSet: inspect_fixels}


def inspect_alone(
    path: Path, column_name: str, wanted_map: str | None, mask: Path | None = None
) -> Source:
    """One map checked on its own (the BIDS-App's participant level): a CIFTI file; or a NIfTI
    map within its subject mask (or all its voxels), whose non-finite values are counted there."""
    from greyarray.io.formats import data_type, nifti

    if data_type(str(path), sniff=True) != "nifti":
        return inspect(path, column_name, wanted_map)
    volume = nifti.read_volume(path)
    inside = np.ones(volume.shape, bool)
    subject = None
    if mask is not None:
        own = nifti.read_volume(mask)
        if problem := grid_difference(
            volume.shape, volume.affine, own.shape, own.affine, path.name
        ):
            raise DataError(
                f"{mask}: the subject mask of {path.name} is on another grid: {problem}"
            )
        inside = own.positive().reshape(own.shape, order="F")
        subject = SubjectMask(mask, own.sha256, 0)
    grid = VoxelGrid.from_mask(volume.shape, volume.affine, inside, b"", str(path))
    values = volume.values(grid.flat)
    n_bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    return Source(column_name, MapFile(path, "nifti", grid), 0, volume.sha256, n_bad, mask=subject)


def majority_mask(maps: Sequence[Path], masks: Sequence[Path | None], name: str):
    """A group mask: the voxels inside at least half of the maps' subject masks (a map without
    one counts its finite, non-zero voxels). Returns (VoxelGrid, the mask as .nii.gz bytes,
    named ``name`` in messages). Every mask and map must be on the first one's grid."""
    import nibabel as nb

    from greyarray.io.formats import nifti
    from greyarray.io.formats.stream import gzip_bytes

    counts, first = None, None
    for path, mask in zip(maps, masks, strict=True):
        volume = nifti.read_volume(mask or path)
        if first is None:
            first, counts = volume, np.zeros(volume.data.size, np.int32)
        elif problem := grid_difference(
            first.shape, first.affine, volume.shape, volume.affine, first.path.name
        ):
            raise DataError(f"{volume.path}: is not on the grid of {first.path}: {problem}")
        if mask is not None:
            counts += volume.positive()
        else:
            values = volume.values()
            counts += np.isfinite(values) & (values != 0)
    inside = (2 * counts >= len(maps)).reshape(first.shape, order="F")
    image = nb.Nifti1Image(inside.astype(np.uint8), first.affine)
    image.header.set_xyzt_units("mm")
    blob = image.to_bytes()
    head = nifti.result_header(blob)
    grid = VoxelGrid.from_mask(first.shape, first.affine, inside, head, name)
    return grid, gzip_bytes(blob, 6)


def check_sources(
    files: Iterable[tuple[str, Path | remote.S3Url]],
    wanted_map: str | None,
    nprocs: int = 1,
    label: str = "",
    spool: Path | None = None,
    s3_workers: int = remote.DEFAULT_WORKERS,
    *,
    space: ElementSpace | None = None,
    masks: Sequence[Path | remote.S3Url | None] | None = None,
    dtype: str = "float32",
) -> list[Source]:
    """Inspect (column name, path) pairs in parallel; all must share the first file's space
    (CIFTI), or be on ``space`` (the group mask's voxels, an index's fixels), with ``masks``
    (each file's subject mask, or None). ``s3_workers`` threads when some files or masks are
    S3 objects, whose data go to ``spool``."""
    files = list(files)
    inputs.check_present(path for _, path in files if not remote.is_url(path))
    masks = list(masks) if masks is not None else [None] * len(files)
    if any(m is not None and not remote.is_url(m) for m in masks):
        local = (m for m in masks if m is not None and not remote.is_url(m))
        inputs.check_present(local, "subject mask")
    urls = any(remote.is_url(p) for p in [*(p for _, p in files), *masks])
    threads = max(1, s3_workers if urls else nprocs)
    if space is None:
        read = partial(inspect, wanted_map=wanted_map, spool=spool, s3_workers=threads)
        jobs = [partial(read, path, name) for name, path in files]
    else:
        spill = Spill(len(files), space.n_elements, np.dtype(dtype))
        read = partial(READERS[type(space)], spool=spool, s3_workers=threads)
        jobs = [
            partial(read, path, name, space, spill, row, mask)
            for row, ((name, path), mask) in enumerate(zip(files, masks, strict=True))
        ]
    sources: list[Source] = []
    check: GeometryCheck | None = None
    for source in tqdm(
        _run_all(jobs, threads),
        total=len(files),
        desc=f"Checking {label}".strip(),
        unit="file",
        disable=None,
        leave=False,
    ):
        if check is None:
            check = GeometryCheck(source)
            source.file.geometry.check()  # e.g. nibabel's verdict, before anything is written
        sources.append(check(source))
    _report_nonfinite(sources, label)
    return sources


def _run_all(jobs: list[Callable[[], Source]], nprocs: int) -> Iterator[Source]:
    """Sources in order, at most a few files ahead of the consumer: the first error stops the
    pass at once (queued files are cancelled, not inspected)."""
    with ThreadPoolExecutor(nprocs) as pool:
        queue: deque = deque()
        try:
            for job in jobs:
                queue.append(pool.submit(job))
                if len(queue) >= 4 * nprocs:
                    yield queue.popleft().result()
            while queue:
                yield queue.popleft().result()
        finally:
            for job in queue:
                job.cancel()


def _report_nonfinite(sources: list[Source], label: str) -> None:
    bad = [s for s in sources if s.n_nonfinite]
    if not bad:
        return
    shown = "; ".join(f"{s.file.path.name}: {s.n_nonfinite}" for s in bad[:10])
    more = f"; and {len(bad) - 10} more" if len(bad) > 10 else ""
    log.warning(
        "%s%d of %d files have non-finite values (ModelArray treats them as missing subjects "
        "for those elements): %s%s",
        f"{label}: " if label else "",
        len(bad),
        len(sources),
        shown,
        more,
    )
