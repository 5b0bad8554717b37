"""The BIDS-App's cohort tables: one row per participant (and session) with its map and the
phenotypes of ``participants.tsv`` and ``sub-*/sub-*_sessions.tsv``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from greyarray.errors import DataError, MissingInputError
from greyarray.io.cohort import read_csv_table

log = logging.getLogger(__name__)


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
) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """(participants table, sessions table), either may be None."""
    if participants_file is not None and not participants_file.is_file():
        raise MissingInputError(f"{participants_file}: participants file not found")
    path = participants_file or find_participants(bids_dir)
    participants = read_table(path) if path else None
    if participants is not None and "participant_id" not in participants:
        raise DataError(f"{path}: no participant_id column")
    if path is None:
        log.warning("No participants.tsv found: the cohort has no phenotype columns")
    tables = [
        read_table(p).assign(participant_id=p.parent.name)
        for p in sorted(bids_dir.glob("sub-*/sub-*_sessions.tsv"))
    ]
    sessions = pd.concat(tables, ignore_index=True) if tables else None
    if sessions is not None and "session_id" not in sessions:
        raise DataError(f"{bids_dir}: a sub-*_sessions.tsv has no session_id column")
    return participants, sessions


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
