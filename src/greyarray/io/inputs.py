"""Opening the user's input files so that a hostile or broken file ends in one clear line.

- Only regular files are read: a FIFO, a device or a folder is refused after ``fstat`` on a
  descriptor opened with ``O_NONBLOCK`` (opening a FIFO that way never waits for a writer).
- A file's identity (device, inode, size, modification and change times) is recorded when it is
  checked; reading it later verifies the identity on the opened descriptor, so a file deleted,
  truncated or replaced between the check and the read is an error, not wrong provenance.
- ``open_hdf5`` turns h5py's OSError (not HDF5, truncated, no permission) into one line, and
  waits while another process holds the file's lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from greyarray.errors import DataError, MissingInputError
from greyarray.io.fileio import output_failure, when_free

log = logging.getLogger(__name__)

OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


@dataclass(frozen=True)
class FileStamp:
    """What identifies a file's content without reading it: a replaced file has another inode,
    a rewritten one other times (ctime cannot be set back by the writer)."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def read(self, path: Path, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of ``path``, still this file (see ``read_checked``)."""
        return read_checked(path, self, offset, size)

    def change(self, other: FileStamp) -> str | None:
        """None when ``other`` is the same file unchanged, else what happened to it."""
        if (self.device, self.inode) != (other.device, other.inode):
            return "was replaced by another file"
        if other.size != self.size:
            return f"changed size from {self.size} to {other.size} bytes"
        if (self.mtime_ns, self.ctime_ns) != (other.mtime_ns, other.ctime_ns):
            return "was modified"
        return None


def _refuse_irregular(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        what = KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise MissingInputError(f"{path}: is {what}, not a regular file")


def _missing(path: Path, err: OSError, what: str = "file") -> MissingInputError:
    if isinstance(err, FileNotFoundError):
        return MissingInputError(f"{path}: {what} not found")
    return MissingInputError(f"{path}: cannot read ({err.strerror or err})")


@contextlib.contextmanager
def open_regular(path: Path, what: str = "file") -> Iterator[tuple[int, FileStamp]]:
    """(descriptor, stamp) of a regular file, closed after the block; never blocks."""
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as err:
        raise _missing(path, err, what) from None
    try:
        st = os.fstat(fd)
        _refuse_irregular(path, st.st_mode)
        yield fd, FileStamp.of(st)
    finally:
        os.close(fd)


class LocalFile:
    """An open regular file as sources.inspect reads it (an S3 object offers the same:
    remote.RemoteObject): ``read(offset, size)``, ``keep`` (nothing: the write pass reads the
    file again) and ``done``, which verifies the file was not rewritten while being read."""

    def __init__(self, path: Path, fd: int, stamp: FileStamp):
        self.path, self.fd, self.stamp, self.size = path, fd, stamp, stamp.size

    def read(self, offset: int, size: int) -> bytes:
        return pread_exact(self.fd, size, offset, self.path)

    def keep(self, raw: bytes) -> None:
        pass

    def done(self, data_offset: int) -> FileStamp:
        verify(self.path, self.fd, self.stamp)
        return self.stamp


@contextlib.contextmanager
def opened(path: Path) -> Iterator[LocalFile]:
    with open_regular(path) as (fd, stamp):
        yield LocalFile(path, fd, stamp)


def pread_exact(fd: int, size: int, offset: int, path: Path) -> bytes:
    """Exactly ``size`` bytes at ``offset``; a file that ends sooner is truncated."""
    parts, got = [], 0
    while got < size:
        part = os.pread(fd, size - got, offset + got)
        if not part:
            raise DataError(
                f"{path}: file is truncated (ends at byte {offset + got}, its header needs "
                f"{offset + size})"
            )
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def verify(path: Path, fd: int, expected: FileStamp) -> None:
    """Refuse a descriptor whose file is not the one checked earlier."""
    change = expected.change(FileStamp.of(os.fstat(fd)))
    if change:
        raise DataError(
            f"{path}: {change} since it was checked; its data would not match the recorded "
            "checksum (run again when the inputs are stable)"
        )


def read_checked(path: Path, expected: FileStamp, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of a file, which must still be the one checked earlier."""
    try:
        fd = os.open(path, OPEN_FLAGS)
    except FileNotFoundError:
        raise MissingInputError(f"{path}: deleted since it was checked") from None
    except OSError as err:
        raise _missing(path, err) from None
    try:
        verify(path, fd, expected)
        data = pread_exact(fd, size, offset, path)
        verify(path, fd, expected)  # not rewritten while being read
        return data
    finally:
        os.close(fd)


def check_present(paths: Iterable[Path | str], what: str = "file") -> int:
    """Stat every path before any is opened: a cohort whose files are missing (or are folders,
    FIFOs, devices) fails at once, naming how many and the first. Returns the count."""
    missing, count, first, first_error = 0, 0, None, None
    for path in paths:
        count += 1
        try:
            mode = os.stat(path).st_mode
        except OSError as err:
            missing += 1
            if first is None:
                first, first_error = path, err
            continue
        if not stat.S_ISREG(mode) and first is None:
            _refuse_irregular(Path(path), mode)
    if first is not None:
        error = _missing(Path(first), first_error, what)
        if missing > 1:
            error = MissingInputError(
                f"{missing} of {count} {what}s cannot be read, first: {error}"
            )
        raise error
    return count


@contextlib.contextmanager
def open_hdf5(path: Path, mode: str = "r", **options) -> Iterator:
    """An h5py.File whose opening errors are one line: missing (66), not HDF5 or damaged (65).

    The file is opened once as a descriptor (never blocking), checked to be a regular file,
    and HDF5 opens that descriptor (``/proc/self/fd/N``), not the name again: a FIFO or
    another file swapped in after the check is never opened. ``h5.filename`` stays ``path``.
    Errors raised while reading inside the block (a damaged dataset) become DataError too.
    ``options`` go to h5py.File (e.g. chunk cache sizes). Modes: ``r`` and ``r+`` (results
    are written through ``h5update.updating_hdf5``, never in place).
    """
    path = Path(path)
    h5, fd = _open_when_free(path, mode, options)
    try:
        with h5:
            yield h5
    except (OSError, RuntimeError) as err:
        if mode != "r" and (failure := output_failure(path, err)):
            raise failure from None  # disk full, read-only: the output's problem, not damage
        raise DataError(f"{path}: damaged HDF5 file ({_h5_reason(err)})") from None
    finally:
        os.close(fd)


def _open_when_free(path: Path, mode: str, options: dict):
    """(h5py.File, descriptor), waiting while another process holds the file (a second fit-lm
    on the same file, ModelArray writing results in R): HDF5 locks a file for as long as it
    is open for writing, and refuses others at once."""
    import h5py

    class Named(h5py.File):
        """An h5py.File opened through a descriptor that still names the user's path."""

        @property
        def filename(self) -> str:
            return str(path)

    flags = OPEN_FLAGS | (0 if mode == "r" else os.O_RDWR)  # OPEN_FLAGS has O_RDONLY = 0

    def attempt():
        fd = _open_checked(path, flags, mode)
        try:
            return Named(_by_descriptor(path, fd), mode, locking="best-effort", **options), fd
        except OSError as err:
            os.close(fd)
            reason = _h5_reason(err)
            if reason == "locked by another program":
                return None
            if mode != "r" and (failure := output_failure(path, err)):
                raise failure from None  # read-only: the output's problem (73)
            if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise MissingInputError(f"{path}: cannot open ({os.strerror(err.errno)})") from None
            raise DataError(f"{path}: cannot read as HDF5 ({reason})") from None
        except BaseException:
            os.close(fd)
            raise

    return when_free(attempt, path, "in use by another process")


def _open_checked(path: Path, flags: int, mode: str) -> int:
    """A descriptor of ``path``, which must be a regular file (checked on the descriptor)."""
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno in (errno.ENXIO, errno.EISDIR):  # a socket, a folder opened for writing
            with contextlib.suppress(OSError):
                _refuse_irregular(path, os.stat(path).st_mode)
        failure = output_failure(path, err) if mode != "r" else None
        if failure is not None and not isinstance(err, FileNotFoundError):
            raise failure from None
        raise _missing(path, err, "HDF5 file") from None
    try:
        _refuse_irregular(path, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _by_descriptor(path: Path, fd: int) -> str:
    """The name under which HDF5 opens exactly the file of ``fd``: /proc/self/fd/N on Linux
    (the descriptor's file, whatever the path names now); elsewhere the path itself."""
    name = f"/proc/self/fd/{fd}"
    return name if os.path.exists(name) else str(path)


def _h5_reason(err: Exception) -> str:
    """The useful part of an h5py error, on one line."""
    text = " ".join(str(err).split())
    for known, reason in (
        ("file signature not found", "not an HDF5 file"),
        ("truncated file", "truncated"),
        ("unable to lock file", "locked by another program"),
    ):
        if known in text:
            return reason
    return text[:200]
