"""Kill GreyArray runs with SIGKILL at chosen moments of their HDF5 update (tests only).

    python3 tests/kill_points.py SPEC.json

SPEC (JSON): ``snapshots`` (a folder) and ``scenarios``, each with ``name``; ``args``
(greyarray's arguments, ``{moment}`` replaced by the moment; or null for ``generic_update``
below, a writer as harmonize's: a new scalar group); ``path`` (the HDF5); ``spread`` (how many
moments spread evenly over the update, besides those around its landmarks); and ``mode``:

- ``whole``: every run is the whole command, forked from this process, one after another on
  the same file as a user's reruns would be (a kill -9 loop);
- ``entry``: the command runs once up to the update, then every run is forked there, each on
  the file as it was (``pristine`` restores it first). The fit is not repeated: fast.

A moment k kills the run at the k-th event of the update: every Python function call and
builtin call and return (``sys.setprofile``), from the moment ``updating_hdf5`` is entered
until it returns (between any two h5py operations, before and after each copy, fsync and
rename). A first run, not killed, counts the events and where the landmarks are (lock, copy,
fsync, rename); the moments are spread over them and set around each landmark. Moments are
deterministic, so a failure is reproduced by its number. What the previous killed run left
(its temporary folder) is removed before each run, as the run itself would do first (which
would shift its moments); the tests check that a real next run removes it.

Prints one JSON line per run: scenario, moment (0 for the counting run), status ("killed" or
the exit code), and a snapshot of the file as the run left it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # no BLAS threads across fork()
os.environ.setdefault("OMP_NUM_THREADS", "1")

from greyarray.io import fileio, h5update

LANDMARKS = ("flock", "copy_file_range", "fsync", "replace")
STATE: dict = {"hook": None, "entry": None}
_original = h5update.updating_hdf5


@contextlib.contextmanager
def _counted(*args, **kwargs):
    if STATE["entry"] is not None:  # mode entry: the runs are forked here
        fork_at_entry(STATE.pop("entry"))
    sys.setprofile(STATE["hook"])
    try:
        with _original(*args, **kwargs) as h5:
            yield h5
    finally:
        sys.setprofile(None)


h5update.updating_hdf5 = _counted  # before any writer imports it

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


def install_hook(moment: int | None, told: dict) -> None:
    """Count events; die at ``moment`` (None: count, and note where the landmarks are)."""
    count = [0]
    told["events"], told["landmarks"] = 0, {}

    def hook(frame, event, arg):
        count[0] += 1
        told["events"] = count[0]
        if count[0] == moment:
            os.kill(os.getpid(), signal.SIGKILL)
        if moment is None and event == "c_call":
            name = getattr(arg, "__name__", "")
            if name in LANDMARKS:
                told["landmarks"].setdefault(name, count[0])

    STATE["hook"] = hook


def moments(counted: dict, spread: int) -> list[int]:
    events = counted["events"]
    chosen = {round(1 + i * (events - 1) / max(1, spread - 1)) for i in range(spread)}
    for at in counted["landmarks"].values():
        chosen |= {at - 1, at, at + 1}
    return sorted(m for m in chosen if 1 <= m <= events)


def run_forked(child) -> dict:
    """``child()`` in a forked process (its exit code, or 'killed'), and what it told."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        told: dict = {}
        try:
            code = child(told)
        except BaseException:  # reported as exit 99
            code = 99
        os.write(write, json.dumps(told).encode())
        os._exit(code if isinstance(code, int) else 98)
    os.close(write)
    with os.fdopen(read) as pipe:
        told = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return {"status": "killed"}
    return {"status": os.waitstatus_to_exitcode(status), **json.loads(told or "{}")}


def report(scenario: dict, moment: int, done: dict, snapshots: Path) -> dict:
    path = Path(scenario["path"])
    snapshot = snapshots / f"{scenario['name']}-{moment:06d}.h5"
    shutil.copyfile(path, snapshot)
    line = {"scenario": scenario["name"], "moment": moment, **done, "snapshot": str(snapshot)}
    os.write(1, (json.dumps(line) + "\n").encode())  # fd 1: Python's stdout is captured
    return done


def prepare(scenario: dict) -> None:
    path = Path(scenario["path"])
    if scenario.get("pristine"):
        shutil.copyfile(scenario["pristine"], path)
    fileio.remove_stale_temporaries(path.parent)


def whole_runs(scenario: dict, snapshots: Path) -> None:
    def run(moment):
        def child(told):
            install_hook(moment, told)
            return command(scenario, moment or 0)

        return run_forked(child)

    prepare(scenario)
    counted = report(scenario, 0, run(None), snapshots)
    for moment in moments(counted, scenario["spread"]):
        prepare(scenario)
        report(scenario, moment, run(moment), snapshots)


def fork_at_entry(job: tuple) -> None:
    """In the command, where its update starts: fork every run from here, then end."""
    scenario, snapshots = job
    parent = os.getpid()

    def run(moment):
        prepare(scenario)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the run: goes on with the update, then ends in entry_runs
            os.close(read)
            told: dict = {}
            install_hook(moment, told)
            STATE["pipe"], STATE["told"] = write, told
            return None
        os.close(write)
        with os.fdopen(read) as pipe:
            told = pipe.read()
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            return report(scenario, moment or 0, {"status": "killed"}, snapshots)
        code = os.waitstatus_to_exitcode(status)
        return report(scenario, moment or 0, {"status": code, **json.loads(told)}, snapshots)

    counted = run(None)
    if os.getpid() != parent:
        return
    for moment in moments(counted, scenario["spread"]):
        if run(moment) is None:
            return
    os._exit(0)


def entry_runs(scenario: dict, snapshots: Path) -> None:
    def runner(_told):
        STATE["entry"] = (scenario, snapshots)
        prepare(scenario)
        code = command(scenario, 0)
        if "pipe" in STATE:  # a run forked at the entry: report and end
            os.write(STATE["pipe"], json.dumps(STATE["told"]).encode())
        os._exit(code)

    run_forked(runner)


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
