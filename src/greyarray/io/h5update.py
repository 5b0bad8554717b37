"""Updating the user's HDF5 so that no crash can cost it: copy, write the copy, swap.

That file holds the converted data and the results R took hours to fit. HDF5 adds an object by
rewriting metadata in place (superblock, B-trees, heaps, free space), so a process killed in the
middle, a disk that fills or a power cut can leave a file that no reader opens (or that needs
``h5clear``). Every in-place change GreyArray makes (results of fit-lm, fit-gam, fit-lmm; a new
scalar of harmonize) goes through ``updating_hdf5`` instead:

1. **Lock.** The original is opened as a checked regular file and locked with ``flock``
   (exclusive), the lock HDF5 1.10 itself takes: R (hdf5r, rhdf5) or another GreyArray run
   cannot open it for writing until the update is published (and the update waits, up to
   ``GREYARRAY_LOCK_WAIT``, while one of them has it open). A path that no longer names the
   locked file (another run published meanwhile) is locked again. A file system without locks
   (Lustre mounted ``noflock``: ENOSYS, ENOLCK, EOPNOTSUPP) is updated unlocked, said once.
2. **Copy.** The bytes go to a private temporary folder beside the file (same file system):
   a reflink where the file system shares blocks (btrfs, XFS, ...: instant, no space used),
   else ``copy_file_range`` (in the kernel). The copy gets the original's mode, owner, group
   and extended attributes (ACLs). The space the caller's writes need (``need``, an upper
   bound) is allocated at once (``posix_fallocate``): a disk that another process fills later
   cannot fail a write of HDF5's midway. Without room, nothing is written (exit 73).
3. **Write.** The caller writes into the copy through h5py.
4. **Publish.** The copy is closed and fsync'ed, the original checked unchanged (a writer that
   ignores locks), then renamed over it and the folder fsync'ed.

At every instant the path names either the old file, untouched, or the new one, complete:
SIGKILL, a full disk or a power cut at any moment costs at most the interrupted analysis. A
temporary left by a killed process is removed by the next GreyArray run in that folder. A
symlinked path updates the file it points to. Cost: one copy of the file per update (measured
in ``benchmarks/update_benchmark.py``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from greyarray.errors import BusyError, DataError, OutputError, check_interrupted
from greyarray.io.fileio import (
    check_free_space,
    output_failure,
    private_folder,
    remove_stale_temporaries,
    try_lock,
    when_free,
)
from greyarray.io.inputs import FileStamp, _h5_reason, _missing, _refuse_irregular

log = logging.getLogger(__name__)

FICLONE = 0x40049409  # ioctl: share every block of a file (btrfs, XFS, bcachefs, OCFS2, ...)
COPY_STEP = 1 << 30  # bytes per copy_file_range call
COPY_BLOCK = 8 << 20  # bytes per read and write where copy_file_range cannot copy
UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTTY, errno.EBADF}


@contextlib.contextmanager
def updating_hdf5(path: Path, need: int = 0, what: str = "results") -> Iterator:
    """An h5py.File (mode r+) of a private copy of ``path``, which replaces ``path`` when the
    block succeeds; on any error, signal or kill the file at ``path`` is left as it was.

    ``need`` is an upper bound of the bytes the block adds (the free-space check); ``what``
    names them in messages. Close any other handle of ``path`` first: its lock would make the
    update wait. Errors of the block's h5py calls (a full disk) become one line naming ``path``.
    """
    import h5py

    from greyarray.io.store import LIBVER  # R's HDF5 1.10 must read what is added

    path = Path(path)
    target = Path(os.path.realpath(path))  # a symlink: update the file it names
    with _locked(path, target) as (fd, before):
        for stale in remove_stale_temporaries(target.parent):
            log.info("Removed %s, left by a process that no longer runs", stale)
        with private_folder(target.parent) as private:
            copy = private / target.name
            _copy(fd, copy, path, need, what)
            try:
                h5 = h5py.File(copy, "r+", libver=LIBVER, locking=False)  # private: unlocked
            except OSError as err:
                raise DataError(f"{path}: damaged HDF5 file ({_h5_reason(err)})") from None
            try:
                with h5:
                    yield h5
                _sync(copy)
            except (OSError, RuntimeError) as err:
                raise _failure(path, err, what) from None
            if change := before.change(FileStamp.of(os.fstat(fd))) or _replaced(target, fd):
                raise BusyError(
                    f"{path}: {change} by another program while {what} was being written (it "
                    "ignores HDF5's file lock); nothing was written: run again"
                )
            links = os.fstat(fd).st_nlink
            check_interrupted()
            try:
                os.replace(copy, target)
            except OSError as err:
                raise _failure(path, err, what) from None
            _sync(target.parent, folder=True)
    if links > 1:
        log.warning(
            "%s had %d hard links: the other names still show the file as it was before",
            path,
            links,
        )


@contextlib.contextmanager
def _locked(path: Path, target: Path) -> Iterator[tuple[int, FileStamp]]:
    """(descriptor, stamp) of the regular file ``target``, locked (flock, exclusive) until the
    block ends; waits while another process holds it (HDF5 holds it while a file is open)."""

    def attempt() -> int | None:
        while True:
            try:  # for writing: a file the user made read-only is not updated either
                fd = os.open(target, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            except FileNotFoundError as err:
                raise _missing(path, err, "HDF5 file") from None
            except OSError as err:
                raise output_failure(path, err) or _missing(path, err, "HDF5 file") from None
            try:
                _refuse_irregular(path, os.fstat(fd).st_mode)
                if try_lock(fd, path) is None:  # False: no locks on this file system
                    os.close(fd)
                    return None
            except BaseException:
                os.close(fd)
                raise
            if not _replaced(target, fd):
                return fd
            os.close(fd)  # another writer published a new file while we waited: lock that one

    fd = when_free(attempt, path, "in use by another process")
    try:
        yield fd, FileStamp.of(os.fstat(fd))
    finally:
        os.close(fd)  # releases the lock


def _replaced(target: Path, fd: int) -> str | None:
    """What happened to the path since ``fd`` was opened, if it no longer names that file."""
    try:
        now, held = os.stat(target), os.fstat(fd)
    except FileNotFoundError:
        return "was removed"
    return None if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino) else "was replaced"


def _copy(fd: int, copy: Path, path: Path, need: int, what: str) -> None:
    """The original's bytes, mode, owner and extended attributes into the new file ``copy``."""
    st = os.fstat(fd)
    try:
        out = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise _failure(path, err, what) from None
    try:
        if _reflink(fd, out):
            _reserve(out, st.st_size, need)
        else:
            check_free_space(path, st.st_size + need, f"{what} (into a copy of the file)")
            _reserve(out, 0, st.st_size + need)
            _copy_bytes(fd, out, st.st_size)
        _copy_identity(fd, out, st, path)
    except OSError as err:
        raise _failure(path, err, what) from None
    finally:
        os.close(out)


def _reflink(fd: int, out: int) -> bool:
    try:
        fcntl.ioctl(out, FICLONE, fd)
        return True
    except OSError:
        return False


def _reserve(out: int, offset: int, length: int) -> None:
    """Allocate the blocks the copy and HDF5's writes will use, now: a disk that another
    process fills meanwhile can then not fail a write of HDF5's (HDF5 2.0 crashes when it
    closes a file after a failed write). HDF5 trims the file to its end when it closes it.
    A file system that cannot reserve (ZFS) is written without."""
    if length > 0 and hasattr(os, "posix_fallocate"):  # not on macOS
        try:
            os.posix_fallocate(out, offset, length)
        except OSError as err:
            if err.errno not in UNSUPPORTED:
                raise


def _copy_bytes(fd: int, out: int, size: int) -> None:
    """``size`` bytes: copy_file_range (in the kernel; Linux), else read and write."""
    done = 0
    try:
        while done < size:
            step = os.copy_file_range(fd, out, min(COPY_STEP, size - done), done, done)
            if step == 0:
                break
            done += step
    except AttributeError:  # not Linux
        pass
    except OSError as err:
        if err.errno not in UNSUPPORTED:  # a full disk is the caller's error
            raise
    while done < size:  # another file system or system
        block = os.pread(fd, min(COPY_BLOCK, size - done), done)
        if not block:
            raise OSError(errno.EIO, f"the file ended at byte {done} of {size}")
        done += os.pwrite(out, block, done)


def _copy_identity(fd: int, out: int, st: os.stat_result, path: Path) -> None:
    """Owner and group (as far as this user may), extended attributes (ACLs), then the mode
    (last: changing the owner clears set-id bits)."""
    try:
        os.fchown(out, st.st_uid, st.st_gid)
    except PermissionError:
        with contextlib.suppress(PermissionError):
            os.fchown(out, -1, st.st_gid)
    mine = os.fstat(out)
    if (mine.st_uid, mine.st_gid) != (st.st_uid, st.st_gid):
        log.warning(
            "%s is owned by uid %d gid %d; the updated file is owned by uid %d gid %d (only "
            "root can give a file away)",
            path,
            st.st_uid,
            st.st_gid,
            mine.st_uid,
            mine.st_gid,
        )
    with contextlib.suppress(OSError, AttributeError):  # no extended attributes (macOS)
        for name in os.listxattr(fd):
            with contextlib.suppress(OSError):
                os.setxattr(out, name, os.getxattr(fd, name))
    os.fchmod(out, stat.S_IMODE(st.st_mode))


def _sync(path: Path, folder: bool = False) -> None:
    """fsync a file (its data must be on disk before the rename publishes it) or a folder (the
    rename itself; a folder some network file systems cannot sync is left as it is)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if folder else 0))
    try:
        os.fsync(fd)
    except OSError:
        if not folder:
            raise
    finally:
        os.close(fd)


def _failure(path: Path, err: BaseException, what: str) -> OutputError | DataError:
    """One line naming the user's file (never the temporary), which is unchanged."""
    failure = output_failure(path, err)
    if failure is not None:
        return OutputError(f"{failure} while writing {what}; the file is unchanged")
    return DataError(f"{path}: cannot write {what} ({_h5_reason(err)}); the file is unchanged")
