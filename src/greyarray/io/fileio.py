"""Writing outputs safely: whole files or nothing; one writer at a time in a shared folder."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed to it when the block succeeds, removed if not:
    readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: Path, content: object, indent: int = 1) -> None:
    atomic_write(path, (json.dumps(content, indent=indent) + "\n").encode())


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """An exclusive lock (flock) held for the block: parallel participant jobs take turns."""
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
