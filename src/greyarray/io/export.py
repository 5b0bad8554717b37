"""Export ModelArray's results from the HDF5 back to CIFTI-2, one file per result column.

Reads ``results/<analysis>/results_matrix`` as ModelArray's ``writeResults`` (and its streaming
writer) leave it: either orientation, names in the ``colnames`` attribute or the ``column_names``
dataset, fixed- or variable-length strings. ``element_id`` places the rows (a partial fit from
``element.subset`` gets NaN elsewhere) and is not exported itself. The geometry comes from what
GreyArray stored at conversion, or from a template file, which must then match it.

Memory stays bounded whatever the file declares: every shape, type and name is checked before
any value is read, and values are read one result column at a time (a 64 MiB chunk cache keeps
re-reading a chunked matrix cheap).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from greyarray.errors import DataError, UsageError
from greyarray.io import h5read
from greyarray.io.fileio import remove_stale_temporaries, staging
from greyarray.io.formats import SpaceFiles
from greyarray.io.inputs import open_hdf5
from greyarray.io.names import refuse_inputs, safe_name, unique_files
from greyarray.io.spaces import ElementSpace, MapWriter, read_geometry

log = logging.getLogger(__name__)

MAX_COLUMNS = 100_000  # result columns (and factor levels) an analysis may have
CACHE = {"rdcc_nbytes": 64 * 2**20, "rdcc_nslots": 100_003}
PRELOAD_BYTES = 8 * 2**20  # a matrix this small is read in one call (ModelArray.lm's defaults)
BLOCK_BYTES = 4 * 2**20  # else result columns are read in runs of at most this much


@dataclass(frozen=True)
class Results:
    """One analysis's result columns, checked but not read: ``columns`` reads them one by one
    (it reopens ``path``, so a Results outlives the h5py.File it was read from)."""

    path: Path
    analysis: str
    names: list[str]  # exported columns, element_id excluded
    levels: dict[str, list[str]]  # factor columns' lookup tables (lut_forcol<i>)
    n_elements: int
    index: dict[str, int]  # name -> position in the matrix's column dimension
    transposed: bool  # matrix is (rows, columns) instead of (columns, rows)
    element_ids: np.ndarray | None  # where each row goes (partial fits), None: row i = element i
    preloaded: np.ndarray | None = field(default=None, repr=False, compare=False)  # small: read

    def columns(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, full-length float64 map, NaN where not fitted), in the matrix's order. Runs of
        neighbouring columns are read together (one HDF5 call instead of one per column and
        chunk) up to BLOCK_BYTES, so memory stays bounded whatever the matrix."""
        if self.preloaded is not None:
            for name in self.names:
                yield name, self._place(self.preloaded[self.index[name]])
            return
        order = sorted(self.names, key=self.index.__getitem__)
        length = self.element_ids.size if self.element_ids is not None else self.n_elements
        per_block = max(1, BLOCK_BYTES // (8 * max(1, length)))
        with open_hdf5(self.path, **CACHE) as h5:
            matrix = h5[f"results/{self.analysis}/results_matrix"]
            while order:
                first = self.index[order[0]]
                run = [n for n in order if self.index[n] < first + per_block]
                block = _columns(matrix, first, self.index[run[-1]] + 1, self.transposed)
                for name in run:
                    yield name, self._place(block[self.index[name] - first])
                order = order[len(run) :]

    def _place(self, values: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            values = values.astype(np.float64)
        values[np.isnan(values)] = np.nan  # R's NA is a signalling NaN: store plain (quiet) NaNs
        if self.element_ids is None:
            return values
        placed = np.full(self.n_elements, np.nan)
        placed[self.element_ids] = values
        return placed


def _columns(matrix: h5py.Dataset, start: int, stop: int, transposed: bool) -> np.ndarray:
    """Result columns start..stop-1 as rows of a (stop - start, n) array."""
    return matrix[:, start:stop].T if transposed else matrix[start:stop, :]


def read_results(h5: h5py.File, analysis: str, n_elements: int) -> Results:
    """The analysis's results, checked (shapes, types, names, element_id) without reading more
    than the names and the element_id column."""
    where = f"{h5.filename}: results/{analysis}"
    results = h5.get("results")
    analyses = sorted(results) if isinstance(results, h5py.Group) else []
    if analysis not in analyses:
        present = ", ".join(analyses) if analyses else "none"
        raise DataError(f"{h5.filename}: no analysis {analysis!r} (analyses present: {present})")
    group = results[analysis]
    if not isinstance(group, h5py.Group):
        raise DataError(f"{where} is a dataset, not a group holding results_matrix")
    matrix = group.get("results_matrix")
    if not isinstance(matrix, h5py.Dataset):
        raise DataError(f"{where} has no results_matrix dataset")
    dtype = h5read.dtype_of(matrix, f"{where}/results_matrix")
    if dtype.kind not in "fiu" or dtype.names is not None:
        raise DataError(f"{where}/results_matrix holds {dtype}, not numbers")
    names = _column_names(group, matrix, where)
    shape = matrix.shape
    if len(shape) != 2 or len(names) not in shape:
        raise DataError(
            f"{where}/results_matrix has shape {shape}, which fits none of its {len(names)} "
            "column names"
        )
    transposed = shape[0] != len(names)
    n_rows = shape[0] if transposed else shape[1]
    index = {name: i for i, name in enumerate(names)}
    ids = None
    if n_rows > n_elements:  # checked before reading anything: the shape may be a lie
        raise DataError(
            f"{where} has {n_rows} rows, more than the geometry's {n_elements} elements"
        )
    preloaded = None
    if len(names) * n_rows * 8 <= PRELOAD_BYTES:  # small (the usual case): one read, kept
        preloaded = _columns(matrix, 0, len(names), transposed)
    if "element_id" in index:
        i = index["element_id"]
        column = (
            preloaded[i] if preloaded is not None else _columns(matrix, i, i + 1, transposed)[0]
        )
        ids = _element_ids(column, where, n_elements)
    elif n_rows != n_elements:
        raise DataError(
            f"{where} has {n_rows} rows but the geometry has {n_elements} elements, and no "
            "element_id column says where they go"
        )
    levels = {
        names[i - 1]: _strings(group[f"lut_forcol{i}"], f"{where}/lut_forcol{i}")
        for i in range(1, len(names) + 1)
        if f"lut_forcol{i}" in group
    }
    kept = [name for name in names if name != "element_id"]
    return Results(
        Path(h5.filename), analysis, kept, levels, n_elements, index, transposed, ids, preloaded
    )


def _column_names(group: h5py.Group, matrix: h5py.Dataset, where: str) -> list[str]:
    if "colnames" in matrix.attrs:
        if int(np.prod(matrix.attrs.get_id("colnames").shape)) > MAX_COLUMNS:
            raise DataError(f"{where}/results_matrix colnames has more than {MAX_COLUMNS} names")
        try:
            value = matrix.attrs["colnames"]
        except (OSError, TypeError, ValueError):
            raise DataError(f"{where}/results_matrix colnames cannot be read as strings") from None
        names = h5read.decode(value, f"{where}/results_matrix colnames")
    elif (dataset := h5read.member(group, "column_names", where)) is not None:
        names = _strings(dataset, f"{where}/column_names")
    else:
        raise DataError(
            f"{where} has no column names (neither a colnames attribute nor a column_names dataset)"
        )
    if not names or "" in names:
        raise DataError(f"{where} has an empty column name")
    twice = {n for n in names if names.count(n) > 1} if len(set(names)) < len(names) else set()
    if twice:
        raise DataError(f"{where} names column {sorted(twice)[0]!r} twice")
    return names


def _strings(dataset, where: str) -> list[str]:
    """A 1-D dataset of at most MAX_COLUMNS strings, checked before it is read."""
    return h5read.strings(dataset, where, MAX_COLUMNS)


def _element_ids(column: np.ndarray, where: str, n_elements: int) -> np.ndarray:
    """Where each result row goes: distinct integer element indices inside the geometry."""
    with np.errstate(invalid="ignore"):
        ids = column.astype(np.float64)
    if not np.isfinite(ids).all() or (ids != np.round(ids)).any():
        raise DataError(f"{where} element_id has non-integer values")
    if ids.size and (ids.min() < 0 or ids.max() >= n_elements):  # checked before the cast
        raise DataError(  # to int64, which would wrap (and warn about) a uint64's 2**64 - 1
            f"{where} element_id spans {ids.min():.0f}..{ids.max():.0f}, outside the "
            f"geometry's 0..{n_elements - 1}"
        )
    ids = ids.astype(np.int64)
    if ids.size and np.bincount(ids, minlength=n_elements).max() > 1:
        raise DataError(f"{where} element_id has duplicates")
    return ids


TYPE_OF_KIND = {"voxels": "nifti", "fixels": "mif"}  # other kinds are CIFTI's


def load_template(path: Path) -> ElementSpace:
    """The space of a template file (``--example-file`` or the cohort's first file)."""
    from greyarray.io import remote
    from greyarray.io.formats import cifti

    return (remote.read_file(path) if remote.is_url(path) else cifti.read_file(path)).geometry


def stored_type(h5: h5py.File, stored: ElementSpace | None) -> str:
    """The data type an HDF5 holds: from GreyArray's geometry, else ModelArrayIO's tables."""
    if stored is not None:
        return TYPE_OF_KIND.get(stored.kind, "cifti")
    return "mif" if "fixels" in h5 else "nifti" if "voxels" in h5 else "cifti"


def resolve_geometry(
    h5: h5py.File, template: Path | None, space_files: SpaceFiles | None = None
) -> ElementSpace:
    """The space to write maps on: the one stored, checked against what the user gives (a
    template map, a group mask, a fixel index); for files another tool wrote, what is given,
    checked against the element tables in the file."""
    stored = read_geometry(h5)
    kind = stored_type(h5, stored)
    space_files = space_files or SpaceFiles()
    given = space_files.load(kind, f"{h5.filename} holds", required=stored is None)
    if given is not None:
        if stored is not None and (problem := stored.difference(given)):
            flag = space_files.paths[0]
            raise DataError(
                f"{flag}: does not match the geometry stored in {h5.filename}: {problem}"
            )
        if stored is None:
            given.check_tables(h5, space_files.paths[0])
    space = given or stored
    if space is None:
        if template is None:
            raise DataError(
                f"{h5.filename}: holds no GreyArray geometry (written by another tool?); "
                "give --example-file or --cohort-file"
            )
        space = load_template(template)
        space.check_tables(h5, template)
        return space
    if template is not None:
        from greyarray.io import remote

        if remote.is_url(template) and kind != "cifti":
            raise UsageError(f"{template}: s3:// templates are read for CIFTI files only")
        try:
            return space.check_template(template)
        except DataError as err:
            raise DataError(
                f"{template}: does not match the geometry stored in {h5.filename}: {err}"
            ) from None
    return space


def result_maps(results: Results) -> Iterator[tuple[str, np.ndarray]]:
    """(map name, values) of each result, and the ``1m.p.value`` companion (1 - p) of p-values;
    read one column at a time."""
    for name, values in results.columns():
        yield name, values
        if "p.value" in name:
            yield name.replace("p.value", "1m.p.value"), 1.0 - values


def output_names(results: Results) -> list[str]:
    """Names of the maps ``result_maps`` yields, in order (without reading values)."""
    names = []
    for name in results.names:
        names.append(name)
        if "p.value" in name:
            names.append(name.replace("p.value", "1m.p.value"))
    return names


def output_files(results: Results, ext: str, output_dir: Path) -> dict[str, Path]:
    """{map name: file}, named ``<analysis>_<result><ext>`` as ModelArrayIO does; two names
    that would share a file are an error naming both."""
    files = unique_files(
        output_names(results),
        lambda name: output_dir / f"{results.analysis}_{safe_name(name)}{ext}",
        f"{results.path}: results/{results.analysis} columns",
    )
    return {name: path for path, name in files.items()}


def export_results(
    h5_path: Path,
    analysis: str,
    output_dir: Path,
    template: Path | None = None,
    *,
    space_files: SpaceFiles | None = None,
    compress: bool = True,
) -> list[Path]:
    """Write every result of ``analysis`` as a map file in ``output_dir`` (plus the companion
    files of fixel data); return the paths."""
    space_files = space_files or SpaceFiles()
    with open_hdf5(h5_path) as h5:
        geometry = resolve_geometry(h5, template, space_files)
        results = read_results(h5, analysis, geometry.n_elements)
    for name, levels in results.levels.items():
        log.info("%s is a factor; values are codes 1..%d for %s", name, len(levels), levels)
    writer = geometry.writer(compress=compress)
    files = output_files(results, writer.extension, output_dir)
    companions = {output_dir / name: data for name, data in writer.companions().items()}
    inputs = [h5_path, *([template] if template else []), *space_files.paths]
    refuse_inputs([*files.values(), *companions], inputs)
    if output_dir.exists():
        log.warning("Output directory exists: %s", output_dir)
    remove_stale_temporaries(output_dir)
    with staging(output_dir) as private:
        write_maps(private, writer, result_maps(results), files)
        for path, data in companions.items():
            (private / path.name).write_bytes(data)
    log.info("Wrote %d files to %s", len(files) + len(companions), output_dir)
    return [*files.values(), *companions]


def write_maps(folder: Path, writer: MapWriter, maps, files: dict[str, Path]) -> None:
    """Encode and write maps (name, values) into ``folder`` as ``files[name].name``; files
    that are compressed on threads (zlib releases the GIL), at most a few maps in memory."""
    workers = min(4, os.cpu_count() or 1) if writer.compress else 1

    def one(item: tuple[str, np.ndarray]) -> None:
        name, values = item
        (folder / files[name].name).write_bytes(writer.encode(values, name))

    if workers <= 1:
        for item in maps:
            one(item)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in maps:
            pending.append(pool.submit(one, item))
            if len(pending) > workers:
                pending.popleft().result()
        while pending:
            pending.popleft().result()
