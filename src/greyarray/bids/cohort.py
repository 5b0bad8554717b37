"""The BIDS-App's cohort tables: one row per participant (and session) with its map and the
phenotypes of ``participants.tsv`` and ``sub-*/sub-*_sessions.tsv``."""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from greyarray.errors import DataError, MissingInputError
from greyarray.io import inputs
from greyarray.io.cohort import read_csv_table

log = logging.getLogger(__name__)

# columns the cohort CSV writes itself; participant_id and session_id are join keys instead
RESERVED = ("scalar_name", "source_file")


@dataclass(frozen=True)
class Participants:
    """participants.tsv with its ids normalised for the join, and its path for messages."""

    path: Path
    table: pd.DataFrame
    written: dict[str, str]  # normalised participant_id -> as written in the file

    @property
    def keys(self) -> list[str]:
        """Join keys: a long table (a session_id column) is merged per participant and session."""
        return ["participant_id"] + (["session_id"] if "session_id" in self.table else [])


def find_participants(bids_dir: Path) -> Path | None:
    """participants.tsv of BIDS_DIR, or of the raw dataset around a derivatives BIDS_DIR."""
    for folder in (
        bids_dir,
        bids_dir.parent.parent if bids_dir.parent.name == "derivatives" else None,
    ):
        if folder is not None and (folder / "participants.tsv").is_file():
            return folder / "participants.tsv"
    return None


def load_phenotypes(
    participants_file: Path | None, bids_dir: Path
) -> tuple[Participants | None, pd.DataFrame | None]:
    """(participants table, sessions table), either may be None."""
    if participants_file is not None and not participants_file.is_file():
        raise MissingInputError(f"{participants_file}: participants file not found")
    path = participants_file or find_participants(bids_dir)
    if path is None:
        log.warning("No participants.tsv found: the cohort has no phenotype columns")
    participants = load_participants(path) if path else None
    tables = [_load_sessions(p) for p in sorted(bids_dir.glob("sub-*/sub-*_sessions.tsv"))]
    sessions = pd.concat(tables, ignore_index=True) if tables else None
    return participants, sessions


def _load_sessions(path: Path) -> pd.DataFrame:
    """One participant's sessions.tsv, checked as participants.tsv is: a session_id in every
    row, one row per session (``1`` and ``ses-1`` are one session)."""
    table = _refuse_reserved(path, read_table(path))
    if "session_id" not in table:
        raise DataError(f"{path}: no session_id column")
    _refuse_missing(path, table, "session_id")
    table = table.assign(
        session_id=table["session_id"].map(_with_prefix("ses-")), participant_id=path.parent.name
    )
    _refuse_duplicates(path, table, ["session_id"], "session")
    return table


def _refuse_missing(path: Path, table: pd.DataFrame, key: str) -> None:
    """Why: a row without its id would become ``sub-nan`` and its phenotypes silently lost."""
    missing = table[key].isna() | (table[key].str.strip() == "")
    if missing.any():
        raise DataError(
            f"{path}: {int(missing.sum())} row(s) without a {key} (the first is data row "
            f"{int(missing.to_numpy().argmax()) + 1}); every row needs one"
        )


def load_participants(path: Path) -> Participants:
    """participants.tsv checked for what would make the merge wrong, ids with their prefixes."""
    table = _refuse_reserved(path, read_table(path))
    if "participant_id" not in table:
        raise DataError(f"{path}: no participant_id column")
    for key in ("participant_id", "session_id"):
        if key in table:
            _refuse_missing(path, table, key)
    written = table["participant_id"]
    table = table.assign(participant_id=written.map(_with_prefix("sub-")))
    if "session_id" in table:
        table = table.assign(session_id=table["session_id"].map(_with_prefix("ses-")))
    as_written = dict(zip(table["participant_id"], written, strict=True))
    participants = Participants(path, table, as_written)
    unit = "participant and session" if "session_id" in table else "participant"
    _refuse_duplicates(path, table, participants.keys, unit)
    return participants


def read_table(path: Path) -> pd.DataFrame:
    """A BIDS TSV (participants.tsv, sessions.tsv) as text, with BIDS's ``n/a`` as missing."""
    _check_field_counts(path)
    return read_csv_table(
        path,
        sep="\t",
        allow_empty=True,
        dtype=str,
        keep_default_na=False,
        na_values=["n/a"],
        index_col=False,
    )


def _check_field_counts(path: Path) -> None:
    """Every non-blank row has as many fields as the header, as BIDS requires.

    Why: pandas makes a first row with an extra field into an index (every id shifts into the
    index, every phenotype becomes missing) and pads a short row with empty values (a missing
    tab in the middle shifts the values into the wrong columns); both would pass silently. A
    short row is an error too for that reason: write ``n/a`` for a missing value.
    """
    with inputs.open_regular(path) as (fd, _), os.fdopen(os.dup(fd), "rb") as handle:
        raw = handle.read()
    try:
        rows = csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline=""), delimiter="\t")
        filled = (row for row in rows if any(field.strip() for field in row))
        header = next(filled, None)
        for row in filled if header is not None else ():
            if len(row) != len(header):
                raise DataError(
                    f"{path}: line {rows.line_num} has {len(row)} fields but the header has "
                    f"{len(header)} (one tab per column; write n/a for a missing value)"
                )
    except (UnicodeDecodeError, csv.Error):
        return  # read_csv_table gives its one-line error


def _refuse_reserved(path: Path, table: pd.DataFrame) -> pd.DataFrame:
    """Why: the cohort CSV writes these columns itself; a phenotype of the same name would
    collide with them (pandas renames both, and the cohort has no source_file)."""
    if clash := [c for c in RESERVED if c in table.columns]:
        raise DataError(
            f"{path}: column {clash[0]!r} is reserved for the cohort CSV GreyArray writes; "
            "rename it"
        )
    return table


def _refuse_duplicates(path: Path, table: pd.DataFrame, keys: list[str], unit: str) -> None:
    """Why: a merge would keep one of the rows and hide the others' phenotypes (or repeat maps)."""
    repeated = table[table.duplicated(keys, keep=False)]
    if len(repeated):
        first = repeated.drop_duplicates(keys)
        shown = ", ".join(
            " ".join(map(str, row)) for row in first[keys].head(3).itertuples(index=False)
        )
        raise DataError(
            f"{path}: {len(repeated)} rows share a {' and '.join(keys)} "
            f"({shown}{', ...' if len(first) > 3 else ''}); give one row per {unit}"
        )


def build_cohort(
    scalars: dict[str, list],
    folder: Path,
    participants: Participants | None,
    sessions: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The cohort table GreyArray writes for the user: one row per subject, session and scalar.

    Columns: scalar_name, source_file (relative to ``folder``, where the CSV goes), participant_id,
    session_id (when there are sessions), then the participants.tsv and sessions.tsv columns
    (a sessions.tsv column wins over a participants.tsv column of the same name). A
    participants.tsv with a session_id column is merged per participant and session.
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
        table = _merge_participants(table, participants)
    if sessions is not None and "session_id" in table:  # ids normalised by _load_sessions
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


def _merge_participants(table: pd.DataFrame, participants: Participants) -> pd.DataFrame:
    """The participants.tsv columns beside each map.

    A session_id column with maps that have no sessions is an error, not a warning: some row
    would have to describe maps made from every session (age at baseline or at follow-up?),
    a choice only the user can make, with a file of one row per participant.
    """
    if "session_id" in participants.table and "session_id" not in table:
        raise DataError(
            f"{participants.path}: has a session_id column but the "
            f"{table['scalar_name'].iloc[0]} maps have no sessions; give a participants file "
            "with one row per participant and no session_id (--participants-file)"
        )
    merged = table.merge(participants.table, how="left", on=participants.keys, indicator=True)
    if len(participants.keys) > 1 and (unmatched := merged["_merge"] == "left_only").any():
        rows = merged.loc[unmatched, participants.keys].drop_duplicates()
        shown = ", ".join(f"{p} {s}" for p, s in rows.head(5).itertuples(index=False))
        log.warning(
            "%d participant sessions with maps have no row in %s (their phenotype columns are "
            "empty): %s%s (session labels there: %s)",
            len(rows),
            participants.path,
            shown,
            ", ..." if len(rows) > 5 else "",
            ", ".join(sorted(map(str, participants.table["session_id"].unique()))[:5]),
        )
    return merged.drop(columns="_merge")


def _with_prefix(prefix: str):
    return lambda label: label if str(label).startswith(prefix) else f"{prefix}{label}"


def _as_written(label: str) -> str:
    """Why: an id padded with spaces must show its spaces, or the warning looks wrong."""
    return label if label == label.strip() else repr(label)


def report_mismatch(with_files: set[str], participants: Participants) -> None:
    """Say which participants have maps but no phenotypes, and which have phenotypes only."""
    with_phenotypes = set(participants.written)
    if missing := sorted(with_files - with_phenotypes):
        log.warning(
            "%d participants have maps but no row in participants.tsv (their phenotype "
            "columns are empty): %s",
            len(missing),
            ", ".join(missing),
        )
    if unused := sorted(with_phenotypes - with_files):
        shown = [_as_written(str(participants.written[i])) for i in unused]
        log.warning(
            "%d participants in participants.tsv have no maps: %s", len(unused), ", ".join(shown)
        )
