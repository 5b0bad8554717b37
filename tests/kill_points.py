"""Kill GreyArray runs with SIGKILL at every write of their HDF5 update (tests only).

    python3 tests/kill_points.py SPEC.json

Every operation of a run that changes a file is a moment: each write, truncate and open for
writing that HDF5 makes (h5py is given a Python file object for files opened for writing, so
that each of HDF5's writes is a call here), and each os-level change (open for writing,
mkdir, unlink, rmdir, rename, fsync, copy_file_range, fallocate, chmod, chown, flock, ...).
A run killed at moment k dies just before its k-th such operation, as a kill between two
system calls would leave it. Moments are deterministic: a failure is reproduced by its number.

SPEC (JSON): ``snapshots`` (a folder) and ``scenarios``, each with ``name``; ``args``
(greyarray's arguments, ``{moment}`` replaced by the moment; or null for ``generic_update``
below, a writer as harmonize's: a new scalar group); ``path`` (the HDF5); ``moments``
("all", or how many, spread evenly); ``mode``:

- ``entry``: the command runs once up to ``updating_hdf5``; there a first run (not killed)
  counts the moments of the update, then one run per moment is forked, each on the file as it
  was (``pristine`` is copied to ``path`` first). The fit is not repeated: fast.
- ``whole``: every run is the whole command forked from this process (moments counted from
  its start), one after another on the same file, as a user's reruns would be (a kill -9 loop).
  Works with any writer, also one that writes the user's file in place.

What a killed run left (its temporary folder) is removed before the next run, as the run would
itself do first; the tests check that a real next run removes it. Prints one JSON line per
run: scenario, moment (0 for the counting run), status ("killed" or the exit code), the
operations counted (the counting run: each one's label), a snapshot of the file it left.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import signal
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # no BLAS threads across fork()
os.environ.setdefault("OMP_NUM_THREADS", "1")

import h5py

STATE: dict = {"count": None, "moment": None, "labels": None, "entry": None}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
ORIGINAL = {}


def event(label: str) -> None:
    """One operation that changes a file is about to happen."""
    if STATE["count"] is None:
        return
    STATE["count"] += 1
    if STATE["count"] == STATE["moment"]:
        os.kill(os.getpid(), signal.SIGKILL)
    if STATE["labels"] is not None:
        STATE["labels"].append(label)


def counted(module, name: str, when=None):
    original = getattr(module, name)
    ORIGINAL[name] = original

    def call(*args, **kwargs):
        if when is None or when(*args, **kwargs):
            event(name)
        return original(*args, **kwargs)

    setattr(module, name, call)


for _name in (
    "mkdir", "rmdir", "unlink", "remove", "rename", "replace", "link", "fsync", "ftruncate",
    "copy_file_range", "sendfile", "posix_fallocate", "fchmod", "fchown", "setxattr",
):  # fmt: skip
    counted(os, _name)
counted(os, "open", lambda path, flags, *a, **k: bool(flags & WRITE_FLAGS))
counted(fcntl, "flock")
counted(fcntl, "ioctl")


class Written(io.FileIO):
    """The file HDF5 writes, as a Python file object: each write is a moment."""

    def write(self, data):
        event("hdf5 write")
        return super().write(data)

    def truncate(self, size=None):
        event("hdf5 truncate")
        return super().truncate(size)


class File(h5py.File):
    """h5py.File; a file opened for writing is written through ``Written``."""

    def __init__(self, name, mode="r", *args, **kwargs):
        if isinstance(name, (str, os.PathLike)) and mode != "r":
            event("hdf5 open")
            exists = os.path.exists(name) and mode in ("a", "r+")
            name = Written(name, "r+" if exists else "w+")
            kwargs.pop("locking", None)  # HDF5 does not lock a Python file object
        super().__init__(name, mode, *args, **kwargs)


h5py.File = File

from greyarray.io import fileio, h5update  # noqa: E402

_update = h5update.updating_hdf5


@contextlib.contextmanager
def _entered(*args, **kwargs):
    if STATE["entry"] is not None:  # mode entry: the runs are forked here
        fork_at_entry(STATE.pop("entry"))
    with _update(*args, **kwargs) as h5:
        yield h5


h5update.updating_hdf5 = _entered  # before any writer imports it

from greyarray import cli  # noqa: E402
from greyarray.stats import gam, lm, results  # noqa: E402, F401 (imported before the forks)


def generic_update(path: Path) -> int:
    """A writer as harmonize is one: a new scalar (values, names, attributes) beside the data."""
    import numpy as np

    with h5update.updating_hdf5(path, 2**20, "scalars/harmonized") as h5:
        source = h5["scalars/thickness"]
        group = h5.require_group("scalars").create_group("harmonized")
        values = source["values"][()] * 2
        group.create_dataset("values", data=values, chunks=True, compression="gzip")
        group.create_dataset("column_names", data=source["column_names"][()])
        for i in range(5):
            group.attrs[f"note{i}"] = f"step {i}"
        h5.create_group("greyarray/harmonize").attrs["method"] = "test"
        group["values"][0] = np.arange(values.shape[1])
    return 0


def command(scenario: dict, moment: int) -> int:
    if scenario["args"] is None:
        return generic_update(Path(scenario["path"]))
    return cli.main([str(a).replace("{moment}", str(moment)) for a in scenario["args"]])


def start_counting(moment: int | None) -> None:
    STATE.update(count=0, moment=moment, labels=[] if moment is None else None)


def prepare(scenario: dict) -> None:
    path = Path(scenario["path"])
    if scenario.get("pristine"):
        shutil.copyfile(scenario["pristine"], path)
    fileio.remove_stale_temporaries(path.parent)


def report(scenario: dict, moment: int, status, told: dict, snapshots: Path) -> None:
    snapshot = snapshots / f"{scenario['name']}-{moment:06d}.h5"
    shutil.copyfile(scenario["path"], snapshot)
    line = {"scenario": scenario["name"], "moment": moment, "status": status, **told}
    line["snapshot"] = str(snapshot)
    os.write(1, (json.dumps(line) + "\n").encode())  # fd 1: Python's stdout is captured


def wait(pid: int, pipe: int) -> tuple[object, dict]:
    with os.fdopen(pipe) as read:
        told = read.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed", {}
    return os.waitstatus_to_exitcode(status), json.loads(told or "{}")


def tell(pipe: int) -> None:
    """In a run that ends normally: what it counted, for the parent."""
    told = {"moments": STATE["count"]}
    if STATE["labels"] is not None:
        told["labels"] = STATE["labels"]
    STATE["count"] = None
    with os.fdopen(pipe, "w") as write:
        write.write(json.dumps(told))


def chosen(scenario: dict, told: dict) -> list[int]:
    """ "all" the moments the counting run had, or that many spread evenly over them."""
    wanted, last = scenario["moments"], told["moments"]
    if wanted == "all":
        return list(range(1, last + 1))
    return sorted({round(1 + i * (last - 1) / max(1, wanted - 1)) for i in range(wanted)})


def whole_runs(scenario: dict, snapshots: Path) -> None:
    def run(moment: int | None):
        prepare(scenario)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            start_counting(moment)
            try:
                code = command(scenario, moment or 0)
            except BaseException:  # reported as exit 99
                code = 99
            tell(write)
            os._exit(code if isinstance(code, int) else 98)
        os.close(write)
        status, told = wait(pid, read)
        report(scenario, moment or 0, status, told, snapshots)
        return told

    told = run(None)
    for moment in chosen(scenario, told):
        run(moment)


def fork_at_entry(job: tuple) -> None:
    """In the command, where its update starts: fork every run from here, then end."""
    scenario, snapshots = job

    def run(moment: int | None):
        prepare(scenario)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the run: goes on with the update, then ends in entry_runs
            os.close(read)
            start_counting(moment)
            STATE["pipe"] = write
            return None
        os.close(write)
        status, told = wait(pid, read)
        report(scenario, moment or 0, status, told, snapshots)
        return told

    told = run(None)
    if told is None:
        return
    for moment in chosen(scenario, told):
        if run(moment) is None:
            return
    os._exit(0)


def entry_runs(scenario: dict, snapshots: Path) -> None:
    pid = os.fork()
    if pid == 0:
        STATE["entry"] = (scenario, snapshots)
        prepare(scenario)
        try:
            code = command(scenario, 0)
        except BaseException:
            code = 99
        if "pipe" in STATE:  # a run forked at the entry: report and end
            tell(STATE["pipe"])
        os._exit(code if isinstance(code, int) else 98)
    os.waitpid(pid, 0)


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    snapshots = Path(spec["snapshots"])
    snapshots.mkdir(parents=True, exist_ok=True)
    quiet = io.StringIO()
    with contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
        for scenario in spec["scenarios"]:
            runs = whole_runs if scenario["mode"] == "whole" else entry_runs
            runs(scenario, snapshots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
