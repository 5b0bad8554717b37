"""Reading HDF5 objects another tool (or a damaged disk) may have written.

Every object's kind, shape and type is checked before a value is read, so that a malformed file
ends in one line naming the file and the object (DataError, exit 65), never in h5py's KeyError
or a numpy error halfway through a fit. ``read_scalar`` is the one reader of
``scalars/<scalar>`` (values and subject names) that every command uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np

from greyarray.errors import DataError


def member(group: h5py.Group, name: str, where: str) -> h5py.Group | h5py.Dataset | None:
    """``group[name]``, or None when there is no such link; a link that leads nowhere (an
    external link to a missing file, a dangling soft link) is named, not a KeyError."""
    if group.get(name, getlink=True) is None:
        return None
    try:
        return group[name]
    except (KeyError, OSError, RuntimeError, ValueError):
        raise DataError(
            f"{where}/{name} cannot be read (a link to a missing file or object?)"
        ) from None


def dtype_of(dataset: h5py.Dataset, where: str) -> np.dtype:
    """The dataset's type; an HDF5 type NumPy has no equivalent for is a one-line error."""
    try:
        return dataset.dtype
    except TypeError:
        raise DataError(f"{where} has a data type that is not numbers or strings") from None


def strings(
    dataset, where: str, limit: int, *, strict: bool = False, trim: bool = True
) -> list[str]:
    """A 1-D dataset of at most ``limit`` strings, checked before it is read."""
    if not isinstance(dataset, h5py.Dataset):
        raise DataError(f"{where} is a group, not a dataset of names")
    if dataset.shape is None or dataset.size > limit or len(dataset.shape) > 1:
        raise DataError(f"{where} has shape {dataset.shape}, not a list of names")
    dtype = dtype_of(dataset, where)
    if dtype.kind != "S" and h5py.check_string_dtype(dtype) is None:
        raise DataError(f"{where} holds {dtype}, not strings")
    return decode(dataset[()], where, strict=strict, trim=trim)


def decode(values, where: str, *, strict: bool = False, trim: bool = True) -> list[str]:
    """Strings from vlen or fixed-length HDF5 strings; ``trim`` strips NUL padding and spaces
    as ModelArray does for result names; ``strict`` refuses bytes that are not UTF-8 (names
    that must match a cohort exactly)."""
    out = []
    for value in np.atleast_1d(values).ravel():
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8", "strict" if strict else "replace")
            except UnicodeDecodeError:
                raise DataError(f"{where} holds names that are not UTF-8 text") from None
        if not isinstance(value, str):
            raise DataError(f"{where} holds {type(value).__name__} values, not strings")
        out.append(value.rstrip("\x00").strip() if trim else value)
    return out


@dataclass(frozen=True)
class Scalar:
    """``scalars/<name>``: values (subjects x elements, numbers; read lazily, block by block)
    and the subjects' names, one per row."""

    name: str
    values: h5py.Dataset
    names: list[str]

    @property
    def n_elements(self) -> int:
        return int(self.values.shape[1])


def scalar_group(h5: h5py.File) -> h5py.Group | None:
    """``scalars`` (None when the file has none); a dataset of that name is an error."""
    group = member(h5, "scalars", f"{h5.filename}:")
    if group is not None and not isinstance(group, h5py.Group):
        raise DataError(
            f"{h5.filename}: scalars is a dataset, not a group (not a ModelArray file?)"
        )
    return group


def scalar_names(h5: h5py.File) -> list[str]:
    """The scalars the file holds, by name."""
    group = scalar_group(h5)
    return list(group) if group is not None else []


def read_scalar(h5: h5py.File, scalar: str) -> Scalar:
    """``scalars/<scalar>``, checked: a 2-D numeric values dataset and exactly one UTF-8 name
    per row, each once (reading a wrong shape would fail or misalign subjects mid-fit)."""
    where = f"{h5.filename}: scalars/{scalar}"
    group = scalar_group(h5)
    if group is None or group.get(scalar, getlink=True) is None:
        present = ", ".join(group) if group is not None and len(group) else "none"
        raise DataError(f"{h5.filename}: no scalar {scalar!r} (scalars: {present})")
    group = member(group, scalar, f"{h5.filename}: scalars")
    if not isinstance(group, h5py.Group):
        raise DataError(f"{where} is a dataset, not a group holding values and column_names")
    values = _values(group, where)
    stored = stored_element_count(h5)
    if stored is not None and stored[0] != values.shape[1]:
        raise DataError(
            f"{where}/values has {values.shape[1]} elements but the file's geometry "
            f"({stored[1]}) has {stored[0]}: its columns cannot be placed on the elements"
        )
    names_dataset = member(group, "column_names", where)
    if names_dataset is None:
        raise DataError(f"{where} has no column_names (the subjects' names)")
    rows, shape = values.shape[0], getattr(names_dataset, "shape", None)
    if shape is not None and len(shape) == 1 and shape[0] != rows:
        raise DataError(
            f"{where}/column_names has {shape[0]} names but values has {rows} rows (subjects)"
        )
    names = strings(names_dataset, f"{where}/column_names", rows, strict=True, trim=False)
    if len(set(names)) < len(names):
        twice = sorted(n for n in set(names) if names.count(n) > 1)[0]
        raise DataError(f"{where}/column_names names subject {twice!r} twice")
    return Scalar(scalar, values, names)


def _values(group: h5py.Group, where: str) -> h5py.Dataset:
    """``values``: a subjects x elements dataset of numbers."""
    values = member(group, "values", where)
    if values is None:
        raise DataError(f"{where} has no values dataset")
    if not isinstance(values, h5py.Dataset):
        raise DataError(f"{where}/values is a group, not a dataset of values")
    if values.shape is None or len(values.shape) != 2:
        raise DataError(f"{where}/values has shape {values.shape}, not subjects x elements (2-D)")
    dtype = dtype_of(values, f"{where}/values")
    if dtype.kind not in "fiu" or dtype.names is not None:
        raise DataError(f"{where}/values holds {dtype}, not numbers")
    return values


def stored_element_count(h5: h5py.File) -> tuple[int, str] | None:
    """(number of elements, where it is recorded) of the file's geometry: GreyArray's
    ``greyarray/geometry`` (its ``n_elements``), else ModelArrayIO's ``greyordinates`` or
    ``parcels``; None when the file records none (a malformed record is the export's to
    report)."""
    try:
        count = h5["greyarray/geometry"].attrs.get("n_elements")
        if isinstance(count, (int, np.integer)) and not isinstance(count, (bool, np.bool_)):
            return int(count), "greyarray/geometry"
    except (KeyError, OSError, RuntimeError, TypeError, ValueError, AttributeError):
        pass
    shapes = {}
    for name in (
        "greyordinates",
        "parcels/parcel_id",
        "parcels/parcel_id_from",
        "parcels/parcel_id_to",
    ):
        try:
            item = h5[name]
        except (KeyError, OSError, RuntimeError, ValueError):
            continue
        if isinstance(item, h5py.Dataset) and item.shape:
            shapes[name] = item.shape
    if len(shapes.get("greyordinates", ())) == 2:
        return shapes["greyordinates"][1], "greyordinates"
    if len(shapes.get("parcels/parcel_id", ())) == 1:
        return shapes["parcels/parcel_id"][0], "parcels/parcel_id"
    pair = shapes.get("parcels/parcel_id_from"), shapes.get("parcels/parcel_id_to")
    if all(shape is not None and len(shape) == 1 for shape in pair):
        return pair[0][0] * pair[1][0], "parcels/parcel_id_from x parcel_id_to"
    return None
