"""Check every file of a cohort before anything is written, and remember how to read it.

One pass over the files: parse each header (cifti.parse), compare its element axis with the first
file's (raw bytes first; nibabel only for headers whose bytes differ, once per distinct header),
hash it for provenance and count its non-finite values (ModelArray treats them as missing).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from greyarray.errors import DataError
from greyarray.io import cifti

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """One subject's map of one scalar: where it is, how to read it, what it held when checked."""

    column_name: str  # the cohort's source_file string, stored as the HDF5 column name
    file: cifti.CiftiFile
    map_index: int
    sha256: str
    n_nonfinite: int

    @property
    def map_name(self) -> str:
        return self.file.map_names[self.map_index] if self.file.map_names else ""

    def read_into(self, out: np.ndarray, start: int, stop: int) -> None:
        """Fill ``out`` with elements [start, stop), cast to its dtype."""
        out[:] = self.file.elements(cifti.pread_from(self.file.path), self.map_index, start, stop)


def inspect(path: Path, column_name: str, wanted_map: str | None) -> Source:
    """Parse, hash and scan one file (the whole file is read once, from the page cache)."""
    blob = cifti.read_bytes(path)
    parsed = cifti.parse(path, blob)
    index = parsed.select_map(wanted_map)
    values = parsed.elements(cifti.bytes_reader(blob), index, 0, parsed.geometry.n_elements)
    n_bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    return Source(column_name, parsed, index, hashlib.sha256(blob).hexdigest(), n_bad)


class GeometryCheck:
    """Compares geometries with the first file's, parsing each distinct header only once.

    A checked source gets the first file's Geometry object, so the cohort holds one copy of the
    ~600 KB element XML instead of one per subject.
    """

    def __init__(self, first: Source):
        self.first = first
        self._verdicts: dict[bytes, str | None] = {}  # sha256 of other XML -> difference

    def __call__(self, source: Source) -> Source:
        ref, geometry = self.first.file.geometry, source.file.geometry
        if geometry.xml != ref.xml:
            key = hashlib.sha256(geometry.xml).digest()
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
    sources: list[Source] = []
    check: GeometryCheck | None = None
    with ThreadPoolExecutor(max(1, nprocs)) as pool:
        jobs = pool.map(lambda item: inspect(item[1], item[0], wanted_map), files)
        for source in tqdm(
            jobs,
            total=len(files),
            desc=f"Checking {label}".strip(),
            unit="file",
            disable=None,
            leave=False,
        ):
            check = check or GeometryCheck(source)
            sources.append(check(source))
    _report_nonfinite(sources, label)
    return sources


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
