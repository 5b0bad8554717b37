"""Writing outputs safely: whole files or nothing, never through a planted link, never over a
file another run published meanwhile; one writer at a time in a shared folder.

Every output is written inside a private temporary folder beside it (created by ``mkdtemp``:
mode 0700, unpredictable name, so nobody else can plant a symlink inside) and then renamed into
place. Without ``overwrite`` the last step is a hard link, which fails if the target appeared in
the meantime (two runs racing to create one output), instead of a rename, which would replace it.
The folder's name records host and PID, so a later run on the same host removes what a killed
process (kill -9) left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from greyarray.errors import BusyError, OutputError, check_interrupted

T = TypeVar("T")
log = logging.getLogger(__name__)

TMP_PREFIX = ".greyarray-tmp"
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
_STALE = re.compile(rf"^{re.escape(TMP_PREFIX)}-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-\w+$")
# errno values that mean "this output cannot be written here", not a bug
OUTPUT_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large",
    errno.EIO: "input/output error",
    errno.ENOTDIR: "a parent is not a folder",
    errno.EISDIR: "is a folder",
    errno.ENAMETOOLONG: "name too long",
}


def output_errno(err: BaseException) -> int | None:
    """The errno of an OSError, also when h5py/HDF5 only wrote it into the message."""
    if isinstance(err, OSError) and err.errno:
        return err.errno
    match = re.search(r"errno\s*=\s*(\d+)", str(err))
    if match:
        return int(match.group(1))
    for code in OUTPUT_ERRNOS:
        if os.strerror(code).lower() in str(err).lower():
            return code
    return None


def output_failure(path: Path, err: BaseException) -> OutputError | None:
    """An OutputError (exit 73) for ``err`` when it means ``path`` cannot be written."""
    code = output_errno(err)
    if code in OUTPUT_ERRNOS:
        return OutputError(f"{path}: cannot write ({OUTPUT_ERRNOS[code]})")
    return None


def check_free_space(path: Path, need: int, what: str) -> None:
    """Refuse before writing beside an existing file (the user's HDF5) when its disk cannot
    hold ``need`` more bytes (an upper bound): better said at once than found out midway."""
    try:
        free = shutil.disk_usage(Path(path).resolve().parent).free
    except OSError:
        return  # the write itself reports what is wrong
    if free < need:
        raise OutputError(
            f"{path}: not enough free space to write {what} (needs up to "
            f"{need / 2**20:.1f} MB, {free / 2**20:.1f} MB free); nothing was written"
        )


def check_writable(path: Path) -> None:
    """Fail before any work when an existing file cannot be updated (results written into the
    user's HDF5): a read-only file or file system, no permission, a folder that cannot take
    the updated copy (h5update writes one beside the file, then renames it), or no room for
    that copy. A fit that runs for minutes must not find out at the end. Opening for writing
    without truncating changes nothing; a missing or irregular file is left for the reader."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as err:
        raise output_failure(path, err) or OutputError(
            f"{path}: cannot write ({err.strerror or err})"
        ) from None
    os.close(fd)
    folder = Path(os.path.realpath(path)).parent
    try:
        with private_folder(folder):
            pass
    except OutputError as err:
        raise OutputError(
            f"{path}: cannot be updated safely: {err} (the updated file is written beside it, "
            "then renamed over it)"
        ) from None
    check_free_space(path, st.st_size + 2**20, "an updated copy of it")


def make_folder(folder: Path) -> None:
    """mkdir -p, with a one-line error naming the folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{folder}: cannot create output folder (a file is in the way)") from None
    except OSError as err:
        code = output_errno(err)
        reason = OUTPUT_ERRNOS.get(code) or err.strerror
        raise OutputError(f"{folder}: cannot create output folder ({reason})") from None


def check_output(path: Path, overwrite: bool) -> None:
    """Fail early (before any work) when ``path`` cannot be an output file."""
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name")
    if path.exists() and not path.is_file():  # a device, FIFO or socket is never replaced
        raise OutputError(f"{path}: is not a regular file (a device, FIFO or socket)")
    if not overwrite and (path.exists() or path.is_symlink()):
        raise OutputError(f"{path}: output exists; use --overwrite to replace it")


@contextlib.contextmanager
def private_folder(folder: Path) -> Iterator[Path]:
    """A new folder inside ``folder`` that only this process uses (mode 0700, unpredictable
    name recording host and PID), removed on the way out whatever happens. Its name is chosen
    before it is created, so a signal arriving just after the mkdir still removes it."""
    made = None
    try:
        for _ in range(100):
            made = folder / f"{TMP_PREFIX}-{_HOST}-{os.getpid()}-{secrets.token_hex(6)}"
            try:
                os.mkdir(made, 0o700)
                break
            except FileExistsError:  # not ours: never removed
                made = None
            except OSError as err:
                made = None
                raise output_failure(folder, err) or OutputError(
                    f"{folder}: cannot write ({err.strerror})"
                ) from None
        else:
            raise OutputError(f"{folder}: cannot create a temporary folder")
        yield made
    finally:
        if made is not None:
            _remove_tree(made)


def _remove_tree(path: Path) -> None:
    """rmtree that a signal cannot cut short: the signal's exception (SLURM's SIGTERM landing
    while a finished write removes its emptied folder) waits until the folder is gone."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # later signals are recorded, never raised
        raise


@contextlib.contextmanager
def replacing(path: Path, overwrite: bool = True) -> Iterator[Path]:
    """A temporary path for ``path``, published when the block succeeds, removed if not.

    Readers never see half a file. Errors of the file system (disk full, read-only, no
    permission) become one-line OutputErrors naming ``path``.
    """
    check_output(path, overwrite)
    make_folder(path.parent)
    with private_folder(path.parent) as private:
        tmp = private / path.name
        try:
            yield tmp
            _publish(tmp, path, overwrite)
        except OSError as err:
            raise output_failure(path, err) or err from None


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    check_interrupted()
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name")
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if another run published ``path`` meanwhile
    except FileExistsError:
        raise OutputError(
            f"{path}: output exists (another run wrote it meanwhile); use --overwrite to replace it"
        ) from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists():  # no hard links on this file system: check, then rename
            raise OutputError(f"{path}: output exists; use --overwrite to replace it") from None
        os.replace(tmp, path)


@contextlib.contextmanager
def staging(folder: Path) -> Iterator[Path]:
    """A private temporary folder for a set of outputs: what is written into it moves into
    ``folder`` (replacing files of the same names) only when the whole block succeeds, so a
    full disk or a signal midway leaves the earlier set of files as it was."""
    make_folder(folder)
    with private_folder(folder) as private:
        try:
            yield private
            check_interrupted()
            for entry in sorted(private.iterdir()):
                if (folder / entry.name).is_dir():
                    raise OutputError(f"{folder / entry.name}: is a folder; cannot replace it")
                os.replace(entry, folder / entry.name)
        except OSError as err:
            raise output_failure(folder, err) or err from None


def atomic_write(path: Path, data: bytes, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` whole or not at all."""
    with replacing(path, overwrite) as tmp, open(tmp, "xb") as handle:
        handle.write(data)


def write_json(path: Path, content: object, indent: int = 1) -> None:
    atomic_write(path, (json.dumps(content, indent=indent) + "\n").encode())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary folders that dead processes of this host left in ``folder``."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _STALE.match(entry.name)
        if match and match["host"] == _HOST and not _alive(int(match["pid"])):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


# flock's errno where the file system has no locks (Lustre mounted noflock, some NFS and FUSE)
NO_LOCKS = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP}
_UNLOCKED_DEVICES: set[int] = set()  # file systems already said to have no locks


def try_lock(fd: int, path: Path) -> bool | None:
    """flock(fd) exclusive, without waiting: True when locked, None when another process holds
    it, False on a file system without locks (said once per file system: the run goes on,
    but concurrent runs on its files are then not protected from each other)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return None
    except OSError as err:
        if err.errno not in NO_LOCKS:
            raise
        device = os.fstat(fd).st_dev
        if device not in _UNLOCKED_DEVICES:
            _UNLOCKED_DEVICES.add(device)
            log.warning(
                "%s: this file system does not support file locks (flock: %s); GreyArray runs "
                "at the same time on these files are not protected from each other",
                path,
                os.strerror(err.errno),
            )
        return False


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """An exclusive lock (flock) held for the block: parallel participant jobs take turns (on
    a file system without locks, the block runs unlocked: ``try_lock``)."""
    with open(lock_file, "a") as handle:
        held = when_free(lambda: try_lock(handle.fileno(), lock_file), lock_file,
                         "held by another GreyArray run")  # fmt: skip
        try:
            yield
        finally:
            if held:
                fcntl.flock(handle, fcntl.LOCK_UN)


def when_free(attempt: Callable[[], T | None], path: Path, holder: str) -> T:
    """``attempt()`` until it returns a value (None: ``path`` is busy). The wait is said once
    and bounded (GREYARRAY_LOCK_WAIT): a file or lock held by a hung process ends in
    BusyError (75), never in a run that waits forever in silence."""
    deadline, pause, said = time.monotonic() + lock_wait(), 0.05, False
    while (done := attempt()) is None:
        if time.monotonic() >= deadline:
            raise BusyError(
                f"{path}: {holder} for more than {lock_wait():g} s; try again when it has "
                "finished (GREYARRAY_LOCK_WAIT sets the wait)"
            )
        if not said:
            log.warning("%s is %s: waiting for it to finish", path, holder)
            said = True
        time.sleep(pause)
        pause = min(2.0, pause * 1.5)
    return done


def lock_wait() -> float:
    """Seconds to wait for another process's lock (GREYARRAY_LOCK_WAIT, default 600)."""
    try:
        return max(0.0, float(os.environ.get("GREYARRAY_LOCK_WAIT", "600")))
    except ValueError:
        return 600.0
