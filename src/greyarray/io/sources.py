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
from pathlib import Path

import numpy as np
from tqdm import tqdm

from greyarray.errors import DataError
from greyarray.io import inputs
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
    stamp: inputs.FileStamp | None = None  # the file's identity when checked

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
        return inputs.read_checked(self.file.path, self.stamp, offset, size)


def inspect(path: Path, column_name: str, wanted_map: str | None) -> Source:
    """Parse, hash and scan one file, reading only what its header promises (header and
    extensions, then the data block), in blocks of bounded size."""
    with inputs.open_regular(path) as (fd, stamp):
        head = cifti.read_head(fd, path, stamp.size)
        parsed = cifti.parse(path, head, stamp.size)
        index = parsed.select_map(wanted_map)
        digest = hashlib.sha256(head)
        n_bad = 0
        step = parsed.block_unit * max(1, BLOCK_BYTES // parsed.block_unit)
        for start in range(0, parsed.data_size, step):
            size = min(step, parsed.data_size - start)
            raw = inputs.pread_exact(fd, size, parsed.offset + start, path)
            digest.update(raw)
            n_bad += parsed.count_nonfinite(raw, index)
        inputs.verify(path, fd, stamp)  # not rewritten while being read
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
    files: Iterable[tuple[str, Path]], wanted_map: str | None, nprocs: int = 1, label: str = ""
) -> list[Source]:
    """Inspect (column name, path) pairs in parallel; all must share the first file's geometry."""
    files = list(files)
    inputs.check_present(path for _, path in files)
    sources: list[Source] = []
    check: GeometryCheck | None = None
    for source in tqdm(
        _inspect_all(files, wanted_map, max(1, nprocs)),
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


def _inspect_all(
    files: list[tuple[str, Path]], wanted_map: str | None, nprocs: int
) -> Iterator[Source]:
    """Sources in order, at most a few files ahead of the consumer: the first error stops the
    pass at once (queued files are cancelled, not inspected)."""
    with ThreadPoolExecutor(nprocs) as pool:
        queue: deque = deque()
        try:
            for name, path in files:
                queue.append(pool.submit(inspect, path, name, wanted_map))
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
