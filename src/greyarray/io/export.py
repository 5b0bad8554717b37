"""Export ModelArray's results from the HDF5 back to CIFTI-2, one file per result column.

Reads ``results/<analysis>/results_matrix`` as ModelArray's ``writeResults`` (and its streaming
writer) leave it: either orientation, names in the ``colnames`` attribute or the ``column_names``
dataset, fixed- or variable-length strings. ``element_id`` places the rows (a partial fit from
``element.subset`` gets NaN elsewhere) and is not exported itself. The geometry comes from what
GreyArray stored at conversion, or from a template file, which must then match it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from greyarray.errors import DataError, MissingInputError, OutputError
from greyarray.io import cifti, store
from greyarray.io.cifti import CiftiWriter, Geometry
from greyarray.io.names import safe_name, unique_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Results:
    """One analysis's result columns, each a full-length map (NaN where not fitted)."""

    analysis: str
    names: list[str]
    maps: np.ndarray  # (n_results, n_elements) float64
    levels: dict[str, list[str]]  # factor columns' lookup tables (lut_forcol<i>)


def read_results(h5: h5py.File, analysis: str, n_elements: int) -> Results:
    """The analysis's results, rows placed by ``element_id``; every inconsistency is an error."""
    analyses = sorted(h5["results"]) if "results" in h5 else []
    if analysis not in analyses:
        present = ", ".join(analyses) if analyses else "none"
        raise DataError(f"{h5.filename}: no analysis {analysis!r} (analyses present: {present})")
    group = h5["results"][analysis]
    if "results_matrix" not in group:
        raise DataError(f"{h5.filename}: results/{analysis} has no results_matrix")
    matrix = group["results_matrix"]
    names = _column_names(group, matrix)
    data = matrix[()].astype(np.float64)
    data[np.isnan(data)] = np.nan  # R's NA is a signalling NaN: store plain (quiet) NaNs
    if data.ndim != 2 or len(names) not in data.shape:
        raise DataError(
            f"{h5.filename}: results/{analysis}/results_matrix has shape {matrix.shape}, which "
            f"fits none of its {len(names)} column names"
        )
    if data.shape[0] != len(names):  # the transposed orientation
        data = data.T
    maps = _place(h5.filename, analysis, names, data, n_elements)
    levels = {
        names[i - 1]: _decode(group[f"lut_forcol{i}"][()])
        for i in range(1, len(names) + 1)
        if f"lut_forcol{i}" in group
    }
    keep = [i for i, name in enumerate(names) if name != "element_id"]
    return Results(analysis, [names[i] for i in keep], maps[keep], levels)


def _column_names(group: h5py.Group, matrix: h5py.Dataset) -> list[str]:
    if "colnames" in matrix.attrs:
        return _decode(matrix.attrs["colnames"])
    if "column_names" in group:
        return _decode(group["column_names"][()])
    raise DataError(
        f"{group.file.filename}: {group.name} has no column names "
        "(neither a colnames attribute nor a column_names dataset)"
    )


def _decode(values) -> list[str]:
    """Strings from vlen or fixed-length (NUL-padded) HDF5 strings, trimmed as ModelArray does."""
    out = []
    for value in np.atleast_1d(values).ravel():
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        out.append(text.rstrip("\x00").strip())
    return out


def _place(filename, analysis: str, names: list[str], data: np.ndarray, n_elements: int):
    if "element_id" not in names:
        if data.shape[1] != n_elements:
            raise DataError(
                f"{filename}: results/{analysis} has {data.shape[1]} rows but the geometry has "
                f"{n_elements} elements, and no element_id column says where they go"
            )
        return data
    ids = data[names.index("element_id")]
    if not np.isfinite(ids).all() or (ids != np.round(ids)).any():
        raise DataError(f"{filename}: results/{analysis} element_id has non-integer values")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= n_elements):
        raise DataError(
            f"{filename}: results/{analysis} element_id spans {ids.min()}..{ids.max()}, outside "
            f"the geometry's 0..{n_elements - 1}"
        )
    if ids.size and np.bincount(ids, minlength=n_elements).max() > 1:
        raise DataError(f"{filename}: results/{analysis} element_id has duplicates")
    maps = np.full((data.shape[0], n_elements), np.nan)
    maps[:, ids] = data
    return maps


def load_template(path: Path) -> Geometry:
    """The geometry of a template CIFTI file (``--example-file`` or the cohort's first file)."""
    if not path.is_file():
        raise MissingInputError(f"{path}: template file not found")
    return cifti.read_file(path).geometry


def resolve_geometry(h5: h5py.File, template: Path | None) -> Geometry:
    """Stored geometry, checked against the template when one is given."""
    stored = store.read_geometry(h5)
    if template is None:
        if stored is None:
            raise DataError(
                f"{h5.filename}: holds no GreyArray geometry (written by another tool?); "
                "give --example-file or --cohort-file"
            )
        return stored
    geometry = load_template(template)
    if stored is not None:
        problem = stored.difference(geometry)
        if problem:
            raise DataError(
                f"{template}: does not match the geometry stored in {h5.filename}: {problem}"
            )
        return stored
    _check_modelarrayio_geometry(h5, geometry, template)
    return geometry


def _check_modelarrayio_geometry(h5: h5py.File, geometry: Geometry, template: Path) -> None:
    """Files from ModelArrayIO record element counts and names: the template must agree."""
    if "greyordinates" in h5:
        count = h5["greyordinates"].shape[-1]
        names = _decode(h5["greyordinates"].attrs.get("structure_names", []))
        if (
            geometry.kind != "dscalar"
            or count != geometry.n_elements
            or (names and set(names) != set(map(str, geometry.axes[0].name)))
        ):
            raise DataError(
                f"{template}: does not match the {count} greyordinates stored in {h5.filename}"
            )
    for key in ("parcel_id", "parcel_id_from"):
        if f"parcels/{key}" in h5:
            names = _decode(h5[f"parcels/{key}"][()])
            if list(map(str, geometry.axes[0].name)) != names:
                raise DataError(
                    f"{template}: its parcels differ from those stored in {h5.filename}"
                )


def result_maps(results: Results) -> list[tuple[str, np.ndarray]]:
    """(map name, values) of each result, and the ``1m.p.value`` companion (1 - p) of p-values."""
    maps = []
    for name, values in zip(results.names, results.maps, strict=True):
        maps.append((name, values))
        if "p.value" in name:
            maps.append((name.replace("p.value", "1m.p.value"), 1.0 - values))
    return maps


def output_files(results: Results, kind: str, output_dir: Path) -> dict[Path, tuple]:
    """{file: (map name, values)}, named ``<analysis>_<result><ext>`` as ModelArrayIO does; two
    columns that would share a file name are an error naming both."""
    ext = cifti.EXTENSIONS[kind]
    maps = dict(result_maps(results))
    files = unique_files(
        maps, lambda name: output_dir / f"{results.analysis}_{safe_name(name)}{ext}", "columns"
    )
    return {path: (name, maps[name]) for path, name in files.items()}


def export_results(
    h5_path: Path, analysis: str, output_dir: Path, template: Path | None = None
) -> list[Path]:
    """Write every result of ``analysis`` as a CIFTI file in ``output_dir``; return the paths."""
    if not h5_path.is_file():
        raise MissingInputError(f"{h5_path}: HDF5 file not found")
    try:
        with h5py.File(h5_path, "r") as h5:
            geometry = resolve_geometry(h5, template)
            results = read_results(h5, analysis, geometry.n_elements)
    except OSError as err:
        raise DataError(f"{h5_path}: cannot read as HDF5 ({err})") from None
    for name, levels in results.levels.items():
        log.info("%s is a factor; values are codes 1..%d for %s", name, len(levels), levels)
    if output_dir.exists():
        log.warning("Output directory exists: %s", output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(
            f"{output_dir}: cannot create output directory ({err.strerror})"
        ) from None
    writer = CiftiWriter(geometry)
    files = output_files(results, geometry.kind, output_dir)
    for path, (name, values) in files.items():
        writer.write(path, values, name)
    log.info("Wrote %d files to %s", len(files), output_dir)
    return list(files)
