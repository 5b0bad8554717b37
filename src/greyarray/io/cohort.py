"""The cohort CSV: which file holds each subject's map of each scalar.

Long format (ModelArray's): one row per subject and scalar, columns ``scalar_name`` and
``source_file``, any others free. Wide format (``--scalar-columns``): one row per subject, one
column of file paths per scalar. The ``source_file`` strings are kept exactly as written, because
ModelArray matches cohort rows to the HDF5's ``column_names`` by these strings; a relative path
is opened relative to the CSV's folder, never the current directory.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from greyarray.errors import DataError, MissingInputError, UsageError
from greyarray.io import inputs, remote
from greyarray.io.names import check_data_name

if TYPE_CHECKING:  # pandas costs 0.3 s to import: only the functions that read tables
    import pandas as pd

log = logging.getLogger(__name__)

REQUIRED = ("scalar_name", "source_file")
MASK_COLUMN = "source_mask_file"  # ModelArrayIO's optional per-file mask (NIfTI)


@dataclass(frozen=True)
class Cohort:
    """A validated long-format cohort table and the CSV it came from."""

    path: Path
    table: pd.DataFrame  # columns scalar_name, source_file, then the rest, one row per file

    @cached_property
    def scalars(self) -> dict[str, list[str]]:
        """{scalar name: its source_file strings, in cohort order}, scalars in first-seen order."""
        groups = self.table.groupby("scalar_name", sort=False)["source_file"]
        return {name: list(files) for name, files in groups}

    def masks(self, scalar: str) -> list[Path | remote.S3Url | None]:
        """Each file's subject mask (column ``source_mask_file``, resolved as source files
        are; None where empty or without the column), in the order of ``scalars[scalar]``."""
        if MASK_COLUMN not in self.table:
            return [None] * len(self.scalars[scalar])
        rows = self.table[self.table["scalar_name"] == scalar][MASK_COLUMN].fillna("")
        return [self.resolve(m) if str(m).strip() else None for m in rows.astype(str)]

    def data_type(self) -> str:
        """The cohort's data type from its files' names, as ModelArrayIO detects it: cifti,
        nifti or mif (plain ``.nii`` files are CIFTI when the first one's header is CIFTI-2's;
        S3 objects are told by name only, as ModelArrayIO tells every file: ``.nii`` is NIfTI).
        A cohort mixing types is refused."""
        from greyarray.io.formats import NAMES, data_type

        first: dict[str, str] = {}
        plain = None  # CIFTI files named .nii: the first such file's header tells
        for source in self.table["source_file"]:
            kind = data_type(source)
            if kind == "nifti" and source.endswith(".nii") and not remote.is_url(source):
                plain = plain or data_type(self._resolve(source), sniff=True)
                kind = plain
            first.setdefault(kind, source)
        if len(first) > 1:
            found = ", ".join(f"{NAMES[k]} ({f!r})" for k, f in first.items())
            raise DataError(
                f"{self.path}: the cohort mixes data types: {found}; convert one data type per "
                "cohort"
            )
        return next(iter(first))

    @classmethod
    def from_table(cls, path: Path, table: pd.DataFrame) -> Cohort:
        """A cohort built in memory (the BIDS-App's), checked as a CSV would be; ``path`` is
        where its CSV goes, so relative source files resolve against that folder."""
        _check(path, table)
        first = list(REQUIRED)
        return cls(path, table[first + [c for c in table.columns if c not in first]])

    def resolve(self, source_file: str) -> Path | remote.S3Url:
        """Where a ``source_file`` is on disk: as written if absolute, else in the CSV's folder,
        then in the current folder (ModelArrayIO's rule, so its cohorts work unchanged); an
        ``s3://bucket/key`` is an S3 object, never a path."""
        if remote.is_url(source_file):
            return remote.S3Url.parse(source_file)
        return Path(self._resolve(source_file))

    def _candidates(self, source_file: str) -> tuple[str, ...]:
        return source_candidates(self._folder, source_file)

    def _resolve(self, source_file: str) -> str:
        return resolve_source(self._folder, source_file)

    def check_files(self) -> int:
        """Stat every source file before any is opened, so a cohort whose files are missing
        fails at once naming how many, the first and where it was looked for (strings, not
        Path objects: a million files take seconds). Returns the number of files."""
        missing, first = 0, None
        local = [s for s in self.table["source_file"] if not remote.is_url(s)]  # read later
        for source in local:
            if not any(os.path.lexists(c) for c in self._candidates(source)):
                missing, first = missing + 1, first or source
        if missing:
            message = missing_source(self.path, first, self._candidates(first))
            count = f"; {missing:,} of {len(self.table):,} source files are missing"
            raise MissingInputError(message + (count if missing > 1 else ""))
        inputs.check_present(map(self._resolve, local))
        return len(self.table)

    @cached_property
    def _folder(self) -> str:
        return str(self.path.parent)


def missing_source(csv: Path, source_file: str, places: tuple[str, ...]) -> str:
    """The one-line message for a source_file found nowhere, naming every place looked in."""
    where = f"neither {' nor '.join(places)}" if len(places) > 1 else places[0]
    return f"{csv}: source_file {source_file!r} not found ({where})"


def source_candidates(folder: str, source_file: str) -> tuple[str, ...]:
    """Where a source_file may be: as written if absolute, else in the CSV's ``folder``, then
    in the current folder."""
    path = os.path.expanduser(source_file) if source_file.startswith("~") else source_file
    if os.path.isabs(path):
        return (path,)
    return os.path.join(folder, path), os.path.join(os.getcwd(), path)


def resolve_source(folder: str, source_file: str) -> str:
    """The first place where ``source_file`` exists; the CSV-relative one when none does."""
    candidates = source_candidates(folder, source_file)
    return next((c for c in candidates if os.path.lexists(c)), candidates[0])


def first_source(csv: Path) -> Path | remote.S3Url:
    """The first ``source_file`` of a cohort CSV, without pandas (export's template: a small
    export must start fast)."""
    import csv as csvlib

    table = Path(csv)
    if not table.is_file():
        raise MissingInputError(f"{table}: cohort file not found")
    try:
        with open(table, newline="", encoding="utf-8-sig") as handle, _any_field_size():
            reader = csvlib.DictReader(handle)
            if not reader.fieldnames or "source_file" not in reader.fieldnames:
                raise DataError(f"{table}: no column 'source_file'")
            check_header(table, reader.fieldnames)
            row = next(reader, None)
    except (UnicodeDecodeError, csvlib.Error) as err:
        raise DataError(f"{table}: cannot read as CSV ({err})") from None
    if row is None or not (row["source_file"] or "").strip():
        raise DataError(f"{table}: cohort has no source_file in its first row")
    if remote.is_url(row["source_file"]):
        return remote.S3Url.parse(row["source_file"])
    folder = str(table.parent)
    path = Path(resolve_source(folder, row["source_file"]))
    if not os.path.exists(path):  # False, not OSError, for a name too long for the system
        places = source_candidates(folder, row["source_file"])
        raise MissingInputError(missing_source(table, row["source_file"], places))
    return path


def load_cohort(path: Path, scalar_columns: list[str] | None = None) -> Cohort:
    """Read and check a cohort CSV; wide cohorts are melted to the long format."""
    path = Path(path)
    table = read_csv_table(path, "cohort file", dtype=str, keep_default_na=False)
    if scalar_columns:
        table = _melt(path, table, scalar_columns)
    else:
        _require(path, table, REQUIRED, "add them, or give --scalar-columns for a wide cohort")
    return Cohort.from_table(path, table)


def read_csv_table(
    path: Path, what: str = "file", *, sep: str = ",", allow_empty: bool = False, **options
) -> pd.DataFrame:
    """A CSV (or TSV) read by pandas, with one-line errors every command shares: missing or not
    a regular file (66); empty, garbled or not UTF-8 (65). ``options`` go to pandas.read_csv;
    without them, the values are read as R's ``read.csv`` reads them (``r_types``: what
    ModelArray's users do with a cohort), so every model sees the columns R would."""
    import pandas as pd

    like_r = not options
    if like_r:
        options = {"dtype": str, "keep_default_na": False, "na_values": R_NA_STRINGS}
    kind = "TSV" if sep == "\t" else "CSV"
    with inputs.open_regular(Path(path), what) as (fd, _), os.fdopen(os.dup(fd), "rb") as handle:
        try:
            table = pd.read_csv(handle, sep=sep, encoding="utf-8", **options)
            if options.get("header", "infer") == "infer" and "names" not in options:
                handle.seek(0)
                check_header(path, _header(handle, sep))
        except UnicodeDecodeError:
            raise DataError(f"{path}: cannot read as {kind} (not UTF-8 text)") from None
        except (ValueError, csv.Error) as err:  # pandas' ParserError, EmptyDataError
            reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
            raise DataError(f"{path}: cannot read as {kind} ({reason})") from None
    if table.empty and not allow_empty:
        raise DataError(f"{path}: {'cohort' if 'cohort' in what else kind} has no rows")
    return r_types(table) if like_r else table


# --- R's read.csv: na.strings = "NA", then type.convert(as.is = TRUE) per column -----------

R_NA_STRINGS = ["NA"]  # read.csv's na.strings: "NA" only (also quoted); "", n/a, NaN are data
R_LOGICAL = {"T": True, "TRUE": True, "F": False, "FALSE": False}  # exactly (not true, True)
_R_NUMBER = re.compile(  # R_strtod as type.convert uses it (checked against R 4.2: test_cohort)
    r"\s*[+-]?(?:(?P<dec>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d*)?)"
    r"|0[xX](?P<hex>[0-9a-fA-F]+\.?[0-9a-fA-F]*)(?:[pP](?P<exp>[+-]?\d+))?"
    r"|(?P<nan>[nN][aA][nN])|(?P<inf>[iI][nN][fF](?:[iI][nN][iI][tT][yY])?))\s*"
)


def r_number(text: str) -> float | None:
    """R's reading of a field as a number (``type.convert``), or None if R would not: decimal
    and hexadecimal numbers (``0x1A``, ``0x1p3``), ``NaN``/``nan``, ``Inf``/``-inf``/
    ``infinity``, with white space around; R's quirks kept (``1.5e`` is 1.5; a hexadecimal
    point is ignored, ``0x1.8`` is 24; anything starting ``NA`` is not a number)."""
    match = _R_NUMBER.fullmatch(text)
    if match is None or text.startswith("NA"):
        return None
    sign = -1.0 if text.strip().startswith("-") else 1.0
    if match["dec"] is not None:
        return sign * float(re.sub(r"[eE][+-]?$", "", match["dec"]))
    if match["hex"] is not None:
        return sign * math.ldexp(
            float(int(match["hex"].replace(".", ""), 16)), int(match["exp"] or 0)
        )
    return float("nan") if match["nan"] is not None else sign * math.inf


def read_csv_text(text: str) -> pd.DataFrame:
    """CSV text (a table written in memory) read as ``read_csv_table`` reads a file."""
    import pandas as pd

    return r_types(
        pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=R_NA_STRINGS)
    )


def r_types(table: pd.DataFrame) -> pd.DataFrame:
    """A table read as text (NaN for R's NA) with each column typed as ``read.csv`` types it:
    logical (only T, F, TRUE, FALSE: bools, None for NA), numeric (float, or int without
    missing values) or character (text; empty fields stay ""). In logical and numeric columns
    a blank field is NA, as in R."""
    import numpy as np
    import pandas as pd

    columns = {}
    for name, column in table.items():
        values = column.to_numpy(object)
        missing = pd.isna(column).to_numpy()
        blank = missing | np.array(
            [not m and not str(v).strip() for v, m in zip(values, missing, strict=True)]
        )
        filled = {str(v) for v in values[~blank]}
        if filled <= R_LOGICAL.keys():
            columns[name] = [
                None if b else R_LOGICAL[str(v)] for v, b in zip(values, blank, strict=True)
            ]
            if not blank.any():
                columns[name] = np.array(columns[name], bool)
            continue
        numbers = {text: r_number(text) for text in filled}
        if all(number is not None for number in numbers.values()):
            out = np.array(
                [np.nan if b else numbers[str(v)] for v, b in zip(values, blank, strict=True)]
            )
            integral = not blank.any() and np.isfinite(out).all() and (out == np.round(out)).all()
            columns[name] = (
                out.astype(np.int64) if integral and np.abs(out).max(initial=0) < 2**53 else out
            )
            continue
        columns[name] = [None if m else str(v) for v, m in zip(values, missing, strict=True)]
    return pd.DataFrame(
        {
            name: pd.Series(v, table.index, dtype=None if isinstance(v, np.ndarray) else object)
            for name, v in columns.items()
        }
    )


def check_header(path: Path, names: Sequence[str]) -> None:
    """Refuse a header that names a column twice: readers disagree on which copy counts (the
    csv module keeps the last, pandas the first, renaming the other), so neither is safe."""
    seen: dict[str, int] = {}
    for number, name in enumerate(names, 1):
        if name in seen:
            raise DataError(
                f"{path}: column {name!r} appears twice in the header (columns {seen[name]} "
                f"and {number}); rename or remove one"
            )
        seen[name] = number


def _header(handle: BinaryIO, sep: str) -> list[str]:
    """The header fields of a table pandas has read (first non-blank record, as pandas skips
    blank lines; a BOM dropped as pandas drops it)."""
    text = io.TextIOWrapper(handle, encoding="utf-8-sig", newline="")
    try:
        with _any_field_size():
            return next((row for row in csv.reader(text, delimiter=sep) if row), [])
    finally:
        text.detach()  # the caller closes the handle


@contextlib.contextmanager
def _any_field_size() -> Iterator[None]:
    """Lift the csv module's 128 KiB field limit, which pandas does not have: both readers
    must see the same fields (a huge one is then reported as a missing file, shortened)."""
    limit = csv.field_size_limit(sys.maxsize)
    try:
        yield
    finally:
        csv.field_size_limit(limit)


def _require(path: Path, table: pd.DataFrame, columns, hint: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(
            f"{path}: no column {', '.join(map(repr, missing))} "
            f"(columns: {', '.join(map(repr, table.columns))}); {hint}"
        )


def _melt(path: Path, table: pd.DataFrame, scalar_columns: list[str]) -> pd.DataFrame:
    repeated = next((c for i, c in enumerate(scalar_columns) if c in scalar_columns[:i]), None)
    if repeated is not None:
        raise UsageError(f"--scalar-columns names {repeated!r} twice; give each column once")
    _require(path, table, scalar_columns, "check --scalar-columns")
    reserved = [c for c in table.columns if c in REQUIRED]
    if reserved:  # melting writes these two columns: an existing one would be ambiguous
        raise DataError(
            f"{path}: a wide cohort (--scalar-columns) cannot have a column "
            f"{' or '.join(map(repr, reserved))}, the long format's; rename it, or drop "
            "--scalar-columns for a long cohort"
        )
    rest = [c for c in table.columns if c not in scalar_columns and c not in REQUIRED]
    long = table.melt(
        id_vars=rest, value_vars=scalar_columns, var_name="scalar_name", value_name="source_file"
    )
    # keep the CSV line of each row for error messages
    long.index = list(table.index) * len(scalar_columns)
    return long


def _check(path: Path, table: pd.DataFrame) -> None:
    if table.empty:
        raise DataError(f"{path}: cohort has no rows")
    for column in REQUIRED:
        empty = table.index[table[column].str.strip() == ""]
        if len(empty):
            raise DataError(f"{path}: line {empty[0] + 2} has an empty {column}")
    for name in table["scalar_name"].unique():
        check_data_name("scalar", name, str(path))
    sources = table["source_file"]
    bad = (sources.str.startswith(remote.SCHEME) & ~sources.str.match(remote.OBJECT)).to_numpy()
    if bad.any():
        first = int(bad.argmax())
        raise UsageError(
            f"{path}: line {table.index[first] + 2}: {sources.iloc[first]!r} is not an S3 "
            "object (expected s3://bucket/key)"
        )
    urls = (
        sources.str.match(r"[A-Za-z][A-Za-z0-9+.-]*://") & ~sources.str.startswith(remote.SCHEME)
    ).to_numpy()
    if urls.any():
        first = int(urls.argmax())
        raise UsageError(
            f"{path}: line {table.index[first] + 2}: {table['source_file'].iloc[first]!r} is a "
            "remote path GreyArray cannot read; it reads local files and s3://bucket/key "
            "objects"
        )
    duplicated = table[table.duplicated(["scalar_name", "source_file"], keep=False)]
    if len(duplicated):
        first = duplicated.iloc[0]
        lines = (
            duplicated.index[
                (duplicated["source_file"] == first["source_file"])
                & (duplicated["scalar_name"] == first["scalar_name"])
            ]
            + 2
        )
        raise DataError(
            f"{path}: source_file {first['source_file']!r} is listed twice for scalar "
            f"{first['scalar_name']!r} (lines {', '.join(map(str, lines))}); ModelArray needs "
            "one file per subject"
        )
