"""Names users choose (scalars, analyses) and the file names made from them.

A scalar or analysis name becomes an HDF5 group (``scalars/<name>``, ``results/<name>``) and part
of file names, so ``.``, ``..``, an empty name or a ``/`` would create other groups or folders than
the user meant: they are refused everywhere with the same message. Two names that become the same
file name are an error naming both, never one output silently replacing another.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from greyarray.errors import DataError, OutputError, UsageError
from greyarray.io.remote import S3Url


def check_name(what: str, name: str, where: str = "", error: type = UsageError) -> str:
    """``name`` if it can be an HDF5 group and part of a file name, else a one-line error."""
    problem = None
    if not name or not name.strip():
        problem = "is empty"
    elif name in (".", ".."):
        problem = "is not a name"
    elif "/" in name:
        problem = "contains '/' (an HDF5 group separator)"
    elif re.search(r"[\x00-\x1f\x7f]", name):
        problem = "contains a control character"
    if problem:
        prefix = f"{where}: " if where else ""
        raise error(f"{prefix}{what} name {name!r} {problem}")
    return name


def check_data_name(what: str, name: str, where: str) -> str:
    """``check_name`` for names read from a file (exit 65, bad data)."""
    return check_name(what, name, where, DataError)


def safe_name(name: str) -> str:
    """A name usable in a file name: anything but letters, digits, '.', '-' becomes '_'."""
    return re.sub(r"[^A-Za-z0-9.\-]", "_", name)


def unique_files(items: Iterable[str], to_path: Callable[[str], Path], what: str) -> dict:
    """{path: item}; two items mapping to one path is an error naming both."""
    paths: dict[Path, str] = {}
    for item in items:
        path = to_path(item)
        if path in paths:
            raise DataError(
                f"{what} {paths[path]!r} and {item!r} would both be written to {path}; "
                "rename one of them"
            )
        paths[path] = item
    return paths


def refuse_inputs(outputs: Iterable[Path], inputs: Iterable[Path]) -> None:
    """An output that is one of the inputs is refused, even with --overwrite."""
    outputs = {Path(os.path.realpath(p)): p for p in outputs}
    names = {p.name for p in outputs}
    for source in inputs:
        if isinstance(source, S3Url) or Path(source).name not in names:  # cheap filter first
            continue
        real = Path(os.path.realpath(source))
        if real in outputs:
            raise OutputError(
                f"{outputs[real]}: is one of the inputs ({source}); choose another output"
            )
