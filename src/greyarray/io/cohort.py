"""The cohort CSV: which file holds each subject's map of each scalar.

Long format (ModelArray's): one row per subject and scalar, columns ``scalar_name`` and
``source_file``, any others free. Wide format (``--scalar-columns``): one row per subject, one
column of file paths per scalar. The ``source_file`` strings are kept exactly as written, because
ModelArray matches cohort rows to the HDF5's ``column_names`` by these strings; a relative path
is opened relative to the CSV's folder, never the current directory.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

from greyarray.errors import DataError
from greyarray.io import inputs

log = logging.getLogger(__name__)

REQUIRED = ("scalar_name", "source_file")


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

    @classmethod
    def from_table(cls, path: Path, table: pd.DataFrame) -> Cohort:
        """A cohort built in memory (the BIDS-App's), checked as a CSV would be; ``path`` is
        where its CSV goes, so relative source files resolve against that folder."""
        _check(path, table)
        first = list(REQUIRED)
        return cls(path, table[first + [c for c in table.columns if c not in first]])

    def resolve(self, source_file: str) -> Path:
        """Where a ``source_file`` is on disk: relative paths are relative to the CSV's folder."""
        return Path(self._resolve(source_file))

    def _resolve(self, source_file: str) -> str:
        if source_file.startswith("~"):
            source_file = os.path.expanduser(source_file)
        return os.path.join(self._folder, source_file)  # an absolute path stays as it is

    def check_files(self) -> int:
        """Stat every source file before any is opened, so a cohort whose files are missing
        fails at once naming how many and the first (strings, not Path objects: a million
        files take ~2.5 s). Returns the number of files."""
        return inputs.check_present(map(self._resolve, self.table["source_file"]))

    @cached_property
    def _folder(self) -> str:
        return str(self.path.parent)


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
    a regular file (66); empty, garbled or not UTF-8 (65). ``options`` go to pandas.read_csv."""
    kind = "TSV" if sep == "\t" else "CSV"
    with inputs.open_regular(Path(path), what) as (fd, _), os.fdopen(os.dup(fd), "rb") as handle:
        try:
            table = pd.read_csv(handle, sep=sep, encoding="utf-8", **options)
        except UnicodeDecodeError:
            raise DataError(f"{path}: cannot read as {kind} (not UTF-8 text)") from None
        except (ValueError, csv.Error) as err:  # pandas' ParserError, EmptyDataError
            reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
            raise DataError(f"{path}: cannot read as {kind} ({reason})") from None
    if table.empty and not allow_empty:
        raise DataError(f"{path}: {'cohort' if 'cohort' in what else kind} has no rows")
    return table


def _require(path: Path, table: pd.DataFrame, columns, hint: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(
            f"{path}: no column {', '.join(map(repr, missing))} "
            f"(columns: {', '.join(map(repr, table.columns))}); {hint}"
        )


def _melt(path: Path, table: pd.DataFrame, scalar_columns: list[str]) -> pd.DataFrame:
    _require(path, table, scalar_columns, "check --scalar-columns")
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
    bad = table.loc[table["scalar_name"].str.contains("/", regex=False), "scalar_name"]
    if len(bad):
        raise DataError(
            f"{path}: scalar name {bad.iloc[0]!r} contains '/' (an HDF5 group separator)"
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


def read_table(path: Path) -> pd.DataFrame:
    """A BIDS TSV (participants.tsv, sessions.tsv) as text, with BIDS's ``n/a`` as missing."""
    return read_csv_table(
        path, sep="\t", allow_empty=True, dtype=str, keep_default_na=False, na_values=["n/a"]
    )


def build_cohort(
    scalars: dict[str, list],
    folder: Path,
    participants: pd.DataFrame | None,
    sessions: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The cohort table GreyArray writes for the user: one row per subject, session and scalar.

    Columns: scalar_name, source_file (relative to ``folder``, where the CSV goes), participant_id,
    session_id (when there are sessions), then the participants.tsv and sessions.tsv columns
    (a sessions.tsv column wins over a participants.tsv column of the same name).
    """
    rows = [
        {
            "scalar_name": name,
            "source_file": os.path.relpath(item.path, folder),
            "participant_id": f"sub-{item.subject}",
            "session_id": f"ses-{item.session}" if item.session else None,
        }
        for name, files in scalars.items()
        for item in files
    ]
    table = pd.DataFrame(rows)
    if table["session_id"].isna().all():
        table = table.drop(columns="session_id")
    if participants is not None:
        participants = participants.assign(
            participant_id=participants["participant_id"].map(_with_prefix("sub-"))
        )
        table = table.merge(
            participants.drop_duplicates("participant_id"), how="left", on="participant_id"
        )
    if sessions is not None and "session_id" in table:
        sessions = sessions.assign(session_id=sessions["session_id"].map(_with_prefix("ses-")))
        overlap = [
            c
            for c in sessions.columns
            if c in table.columns and c not in ("participant_id", "session_id")
        ]
        table = table.drop(columns=overlap).merge(
            sessions, how="left", on=["participant_id", "session_id"]
        )
    return table.sort_values(
        ["scalar_name", "participant_id"] + (["session_id"] if "session_id" in table else []),
        kind="stable",
    ).reset_index(drop=True)


def _with_prefix(prefix: str):
    return lambda label: label if str(label).startswith(prefix) else f"{prefix}{label}"


def report_mismatch(with_files: set[str], with_phenotypes: set[str]) -> None:
    """Say which participants have maps but no phenotypes, and which have phenotypes only."""
    if missing := sorted(with_files - with_phenotypes):
        log.warning(
            "%d participants have maps but no row in participants.tsv (their phenotype "
            "columns are empty): %s",
            len(missing),
            ", ".join(missing),
        )
    if unused := sorted(with_phenotypes - with_files):
        log.warning(
            "%d participants in participants.tsv have no maps: %s", len(unused), ", ".join(unused)
        )
