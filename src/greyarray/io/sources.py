"""Check every file of a cohort before anything is written, and remember how to read it.

First every path is stat'ed (a cohort of missing files fails at once). Then one pass over the
files: parse each header (cifti.parse), compare its element axis with the first file's (raw bytes
first; nibabel only for headers whose bytes differ, once per distinct header), hash what is read
for provenance and count non-finite values (ModelArray treats them as missing). Each file's
identity is recorded, and the write pass reads only a file that is still the one checked.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from greyarray.errors import DataError
from greyarray.io import inputs, remote
from greyarray.io.formats import cifti

log = logging.getLogger(__name__)

BLOCK_BYTES = 16 * 2**20  # data read per call while checking (memory bound per thread)


@dataclass(frozen=True)
class Source:
    """One subject's map of one scalar: where it is, how to read it, what it held when checked."""

    column_name: str  # the cohort's source_file string, stored as the HDF5 column name
    file: cifti.CiftiFile
    map_index: int
    sha256: str
    n_nonfinite: int
    stamp: inputs.FileStamp | remote.Spooled | None = None  # how to read it again, checked

    @property
    def map_name(self) -> str:
        return self.file.map_names[self.map_index] if self.file.map_names else ""

    def read_into(self, out: np.ndarray, start: int, stop: int) -> None:
        """Fill ``out`` with elements [start, stop), cast to its dtype, from the file as it was
        checked (a changed, truncated or deleted file is an error)."""
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


def check_sources(
    files: Iterable[tuple[str, Path | remote.S3Url]],
    wanted_map: str | None,
    nprocs: int = 1,
    label: str = "",
    spool: Path | None = None,
    s3_workers: int = remote.DEFAULT_WORKERS,
) -> list[Source]:
    """Inspect (column name, path) pairs in parallel (``s3_workers`` threads when some are S3
    objects, whose data go to ``spool``); all must share the first file's geometry."""
    files = list(files)
    inputs.check_present(path for _, path in files if not remote.is_url(path))
    threads = max(1, s3_workers if any(remote.is_url(p) for _, p in files) else nprocs)
    read = partial(inspect, wanted_map=wanted_map, spool=spool, s3_workers=threads)
    sources: list[Source] = []
    check: GeometryCheck | None = None
    for source in tqdm(
        _inspect_all(files, read, threads),
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


def _inspect_all(files: list[tuple[str, Path]], read, nprocs: int) -> Iterator[Source]:
    """Sources in order, at most a few files ahead of the consumer: the first error stops the
    pass at once (queued files are cancelled, not inspected)."""
    with ThreadPoolExecutor(nprocs) as pool:
        queue: deque = deque()
        try:
            for name, path in files:
                queue.append(pool.submit(read, path, name))
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
