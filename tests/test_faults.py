"""Faults of the environment and hostile names end in one clear line, the right exit code, no
temporary file left behind and the inputs unchanged (disk full, read-only folders, signals,
kill -9, races between runs, planted symlinks, names that are not names, outputs that are inputs).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_greyarray, subject_values, write_cohort

from greyarray.errors import OutputError
from greyarray.io import fileio

GREYARRAY = [sys.executable, "-m", "greyarray"]


def digest(folder: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if "tmp" in p.name or p.name.startswith(".")]


def one_error_line(stderr: str) -> str:
    """The single 'greyarray: error:' line; no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("greyarray: error: ")]
    others = [
        line
        for line in stderr.splitlines()
        if line.strip() and not line.startswith(("INFO:", "WARNING:", "greyarray: error: "))
    ]
    assert len(lines) == 1 and not others, stderr
    return lines[0]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, writer91k):
    folder = tmp_path_factory.mktemp("cohort")
    return write_cohort(folder, writer91k, subject_values(12, 91282))


@pytest.fixture(scope="module")
def big_cohort(tmp_path_factory, writer91k):
    """Enough subjects that writing the HDF5 takes a moment (for signals)."""
    folder = tmp_path_factory.mktemp("big")
    return write_cohort(folder, writer91k, subject_values(60, 91282))


@pytest.fixture(scope="module")
def exported(cohort, tmp_path_factory):
    """An HDF5 with results/lm (fit here), and its cohort CSV."""
    from greyarray import cli

    h5 = tmp_path_factory.mktemp("h5") / "thickness.h5"
    quiet = ["--log-level", "ERROR"]
    root = __import__("logging").getLogger()
    level, handlers = root.level, list(root.handlers)  # set up before _restore_logging runs
    assert (
        cli.main(["to-modelarray", "--cohort-file", str(cohort), "--output", str(h5), *quiet]) == 0
    )
    fit = ["fit-lm", "--input-hdf5", str(h5), "--cohort-file", str(cohort), "--formula"]
    assert cli.main([*fit, "thickness ~ age", *quiet]) == 0
    root.setLevel(level)
    root.handlers[:] = handlers
    return h5, cohort


def root_only() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root and must run this check")
        pytest.skip("needs root to mount a small tmpfs")


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A small (or read-only) file system mounted at ``path``."""
    root_only()
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


run = run_greyarray


# ---- disk full and read-only folders ---------------------------------------------------------
def test_disk_full_while_converting(cohort, tmp_path):
    before = digest(cohort.parent)
    with tmpfs(tmp_path / "small", "1m") as small:
        done = run("to-modelarray", "--cohort-file", cohort, "--output", small / "out.h5")
        assert done.returncode == 73
        assert "out.h5: cannot write (no space left on device)" in one_error_line(done.stderr)
        assert list(small.iterdir()) == []  # no temporary file, no half-written output
    assert digest(cohort.parent) == before


def test_disk_full_while_exporting(exported, tmp_path):
    h5, _ = exported
    with tmpfs(tmp_path / "small", "300k") as small:
        done = run(
            "export-results", "--analysis-name", "lm", "--input-hdf5", h5, "--output-dir", small
        )
        assert done.returncode == 73
        assert "cannot write (no space left on device)" in one_error_line(done.stderr)
        assert temporaries(small) == []


def test_disk_full_in_group_level(tmp_path, template):
    from bids_datasets import xcpd

    data = xcpd(tmp_path / "xcpd", template, subjects=("01", "02"), sessions=("1",))
    with tmpfs(tmp_path / "small", "1m") as small:
        args = [data.root, small / "out", "group", "--scalar", "reho", "alff"]
        done = run(*args, "-q", "--no-report")
        assert done.returncode == 73, done.stderr
        assert "no space left on device" in one_error_line(done.stderr)
        assert temporaries(small / "out" / "group") == []


@pytest.mark.parametrize("command", ["to-modelarray", "export-results"])
def test_read_only_folder(command, cohort, exported, tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        if command == "to-modelarray":
            args = ["--cohort-file", cohort, "--output", ro / "out.h5"]
        else:
            args = ["--analysis-name", "lm", "--input-hdf5", exported[0], "--output-dir", ro]
        done = run(command, *args)
        assert done.returncode == 73
        assert "read-only file system" in one_error_line(done.stderr)


def test_permission_denied_is_an_output_error():
    err = fileio.output_failure(Path("/x/out.h5"), PermissionError(13, "Permission denied"))
    assert (
        isinstance(err, OutputError) and str(err) == "/x/out.h5: cannot write (permission denied)"
    )
    hdf5 = OSError("Unable to create file (unable to open file: name = 'x', errno = 28, ...)")
    assert "no space left" in str(fileio.output_failure(Path("x"), hdf5))
    assert fileio.output_failure(Path("x"), OSError("something else")) is None


def test_output_is_an_existing_folder(cohort, tmp_path):
    (tmp_path / "taken.h5").mkdir()
    for extra in ([], ["--overwrite"]):
        done = run(
            "to-modelarray", "--cohort-file", cohort, "--output", tmp_path / "taken.h5", *extra
        )
        assert done.returncode == 73
        assert "taken.h5: is a folder; give a file name" in one_error_line(done.stderr)


# ---- signals and kill -9 ---------------------------------------------------------------------
def start_and_wait_for_temporary(args: list, folder: Path) -> subprocess.Popen:
    """Start a command; return once it is writing (its temporary folder exists)."""
    job = subprocess.Popen([*GREYARRAY, *map(str, args)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(folder.glob(f"{fileio.TMP_PREFIX}-*")):
        assert job.poll() is None, job.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    return job


@pytest.mark.parametrize(
    ("signum", "code", "name"),
    [
        (signal.SIGTERM, 143, "SIGTERM"),
        (signal.SIGINT, 130, "SIGINT"),
        (signal.SIGHUP, 129, "SIGHUP"),
    ],
)
def test_signal_mid_write_cleans_up(big_cohort, tmp_path, signum, code, name):
    out = tmp_path / "out"
    out.mkdir()
    args = ["to-modelarray", "--cohort-file", big_cohort, "--output", out / "x.h5"]
    job = start_and_wait_for_temporary([*args, "--compression-level", "9", "--nprocs", "1"], out)
    job.send_signal(signum)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == code, stderr
    assert f"interrupted by {name}" in one_error_line(stderr)
    assert list(out.iterdir()) == []  # neither the output nor its temporary folder


def test_a_later_run_removes_what_kill_9_left(big_cohort, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    args = ["to-modelarray", "--cohort-file", big_cohort, "--output", out / "x.h5"]
    job = start_and_wait_for_temporary([*args, "--compression-level", "9", "--nprocs", "1"], out)
    job.kill()
    job.wait()
    (left,) = out.glob(f"{fileio.TMP_PREFIX}-*")
    assert not (out / "x.h5").exists()
    done = run(*args, "--log-level", "ERROR")
    assert done.returncode == 0, done.stderr
    assert not left.exists() and sorted(p.name for p in out.iterdir()) == ["x.h5"]


def test_live_processes_keep_their_temporaries(tmp_path):
    mine = tmp_path / f"{fileio.TMP_PREFIX}-{fileio._HOST}-{os.getpid()}-abc"
    other_host = tmp_path / f"{fileio.TMP_PREFIX}-elsewhere-1-abc"
    mine.mkdir(), other_host.mkdir()
    assert fileio.remove_stale_temporaries(tmp_path) == []
    assert mine.exists() and other_host.exists()


# ---- races and planted symlinks --------------------------------------------------------------
def test_second_run_never_replaces_the_first_runs_output(tmp_path):
    """Two runs create one new output: the one that finishes second fails at the final step,
    even though the output did not exist when it started (link, not rename)."""
    target = tmp_path / "out.h5"
    with pytest.raises(OutputError, match="another run wrote it meanwhile"):  # noqa: SIM117
        with fileio.replacing(target, overwrite=False) as tmp:
            tmp.write_bytes(b"second")
            target.write_bytes(b"first")  # the other run publishes meanwhile
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]


def test_planted_symlinks_are_never_followed(cohort, tmp_path):
    """A symlink planted at any name the run might use for its temporary file (the old
    predictable one, or one guessed from the new pattern) is never written through."""
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for pid in range(os.getpid(), os.getpid() + 200):
        (out / f".x.h5.{pid}.tmp").symlink_to(victim)
    (out / f"{fileio.TMP_PREFIX}-{fileio._HOST}-{os.getpid() + 1}-x").symlink_to(tmp_path)
    done = run(
        "to-modelarray", "--cohort-file", cohort, "--output", out / "x.h5", "--log-level", "ERROR"
    )
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "precious"
    assert (out / "x.h5").is_file() and not (out / "x.h5").is_symlink()


# ---- names and paths -------------------------------------------------------------------------
BAD_NAMES = [".", "..", "", " ", "a/b", "tab\there"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_scalar_names(name, cohort, tmp_path):
    table = pd.read_csv(cohort)
    table["source_file"] = [str(cohort.parent / s) for s in table["source_file"]]
    table["scalar_name"] = name
    table.to_csv(tmp_path / "c.csv", index=False)
    done = run("to-modelarray", "--cohort-file", tmp_path / "c.csv", "--output", tmp_path / "o.h5")
    line = one_error_line(done.stderr)
    assert done.returncode == 65 and ("scalar name" in line or "empty scalar_name" in line), line
    assert not (tmp_path / "o.h5").exists() and temporaries(tmp_path) == []


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_analysis_names(name, exported, tmp_path):
    h5, cohort = exported
    before = digest(h5.parent)
    for args in (
        ["fit-lm", "--input-hdf5", h5, "--cohort-file", cohort, "--formula", "thickness ~ age"],
        ["export-results", "--input-hdf5", h5, "--output-dir", tmp_path / "e"],
    ):
        done = run(*args, "--analysis-name", name)
        assert done.returncode == 64, done.stderr
        assert f"analysis name {name!r}" in one_error_line(done.stderr)
    assert digest(h5.parent) == before and not (tmp_path / "e").exists()


def test_bad_analysis_name_in_bids_app(tmp_path, template):
    from bids_datasets import xcpd

    data = xcpd(tmp_path / "xcpd", template, subjects=("01",), sessions=("1",))
    done = run(data.root, tmp_path / "out", "group", "--analysis-name", "..")
    assert done.returncode == 64 and "analysis name '..' is not a name" in one_error_line(
        done.stderr
    )
    assert not (tmp_path / "out").exists()


def test_wide_columns_that_collide_after_sanitising(cohort, tmp_path):
    table = pd.read_csv(cohort)
    files = [str(cohort.parent / s) for s in table["source_file"]]
    pd.DataFrame({"fa md": files, "fa_md": files, "age": table["age"]}).to_csv(
        tmp_path / "wide.csv", index=False
    )
    done = run(
        "to-modelarray",
        "--cohort-file",
        tmp_path / "wide.csv",
        "--scalar-columns",
        "fa md",
        "fa_md",
        "--output",
        tmp_path / "o.h5",
    )
    assert done.returncode == 65
    assert "scalars 'fa md' and 'fa_md' would both be written to" in one_error_line(done.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.csv"]


@pytest.mark.parametrize("which", ["source", "cohort"])
def test_output_that_is_an_input_is_refused_even_with_overwrite(which, cohort, tmp_path):
    before = digest(cohort.parent)
    target = cohort if which == "cohort" else cohort.parent / pd.read_csv(cohort)["source_file"][0]
    done = run("to-modelarray", "--cohort-file", cohort, "--output", target, "--overwrite")
    assert done.returncode == 73
    assert "is one of the inputs" in one_error_line(done.stderr)
    assert digest(cohort.parent) == before


def test_disk_full_before_fit_lm_writes_its_results(exported, tmp_path):
    """fit-lm writes into the user's HDF5 through an updated copy beside it: with too little
    room for that copy it must not start (a minutes-long fit must not find out at the end)."""
    h5, cohort = exported
    room = f"{(h5.stat().st_size >> 10) + 2048}k"  # the file and 2 MB; results need ~7 MB
    with tmpfs(tmp_path / "small", room) as small:
        copy = small / "thickness.h5"
        copy.write_bytes(h5.read_bytes())
        with __import__("h5py").File(copy, "a") as file:
            del file["results"]
        before = digest(small)
        fit = ["fit-lm", "--input-hdf5", copy, "--cohort-file", cohort, "--formula"]
        done = run(*fit, "thickness ~ age", "--analysis-name", "new")
        assert done.returncode == 73, done.stderr
        assert "not enough free space to write an updated copy" in one_error_line(done.stderr)
        assert digest(small) == before


@pytest.mark.parametrize("which", ["hdf5", "cohort", "source", "folder", "fifo"])
def test_report_path_is_checked_before_any_work(which, exported, tmp_path):
    """--report over an input (or a folder, a FIFO) is refused before anything is written."""
    h5, cohort = exported
    work = tmp_path / "work"
    work.mkdir()
    copy = work / "thickness.h5"
    copy.write_bytes(h5.read_bytes())
    report = {
        "hdf5": copy,
        "cohort": cohort,
        "source": cohort.parent / pd.read_csv(cohort)["source_file"][0],
        "folder": work,
        "fifo": work / "pipe.html",
    }[which]
    if which == "fifo":
        os.mkfifo(report)
    before, inputs = digest(work), digest(cohort.parent)
    fit = ["fit-lm", "--input-hdf5", copy, "--cohort-file", cohort, "--formula", "thickness ~ age"]
    export = ["export-results", "--analysis-name", "lm", "--input-hdf5", copy]
    for args in ([*fit, "--analysis-name", "new"], [*export, "--output-dir", work / "maps"]):
        done = run(*args, "--report", report)
        assert done.returncode in (64, 73), done.stderr
        one_error_line(done.stderr)
        assert digest(work) == before and digest(cohort.parent) == inputs
        assert not (work / "maps").exists()
    if which == "fifo":
        assert report.is_fifo()


def test_a_device_or_fifo_is_never_replaced_by_an_output(cohort, tmp_path):
    fifo = tmp_path / "out.h5"
    os.mkfifo(fifo)
    done = run("to-modelarray", "--cohort-file", cohort, "--output", fifo, "--overwrite")
    assert done.returncode == 73
    assert "is not a regular file (a device, FIFO or socket)" in one_error_line(done.stderr)
    assert fifo.is_fifo()


def test_a_signal_python_swallows_still_ends_the_run_with_its_code(monkeypatch, capsys):
    """A SIGTERM raised inside a __del__ or weakref callback is swallowed by Python; the run
    then goes on to its end, and must still exit 143 with one line (no 'Exception ignored')."""
    import argparse

    from greyarray import cli

    class DiesOnCollection:
        def __del__(self):
            cli.signals._raise_interrupted(signal.SIGTERM, None)

    def command(args) -> int:
        DiesOnCollection()  # collected at once: the exception is unraisable
        return 0

    def parser() -> argparse.ArgumentParser:
        made = argparse.ArgumentParser()
        made.add_argument("--log-level", default="INFO")
        return made

    monkeypatch.setitem(cli.COMMANDS, "export-results", (parser, command, "test"))
    assert cli.main(["export-results"]) == 143
    err = capsys.readouterr().err
    assert "interrupted by SIGTERM as the run ended" in one_error_line(err)
    assert "Exception ignored" not in err


def test_a_swallowed_signal_publishes_nothing(monkeypatch, tmp_path, capsys):
    """A SIGTERM swallowed inside a __del__ before the output is published: the run stops at
    the publishing step, with the temporary removed and no output (seen under load)."""
    import argparse

    from greyarray import cli
    from greyarray.io.fileio import atomic_write

    class DiesOnCollection:
        def __del__(self):
            cli.signals._raise_interrupted(signal.SIGTERM, None)

    def command(args) -> int:
        DiesOnCollection()
        atomic_write(tmp_path / "out.txt", b"x")
        return 0

    def parser() -> argparse.ArgumentParser:
        made = argparse.ArgumentParser()
        made.add_argument("--log-level", default="INFO")
        return made

    monkeypatch.setitem(cli.COMMANDS, "export-results", (parser, command, "test"))
    assert cli.main(["export-results"]) == 143
    assert "interrupted by SIGTERM; temporary files removed" in one_error_line(
        capsys.readouterr().err
    )
    assert list(tmp_path.iterdir()) == []


def test_pattern_whose_subject_captures_a_slash(tmp_path, template):
    from bids_datasets import hcp

    hcp(tmp_path / "hcp", template)
    (tmp_path / "c.yaml").write_text("patterns:\n  thickness: '(?P<subject>.+)\\.thickness'\n")
    done = run(tmp_path / "hcp", tmp_path / "out", "group", "--config", tmp_path / "c.yaml")
    assert done.returncode == 65
    assert "its subject group captured" in one_error_line(done.stderr)
    assert not (tmp_path / "out").exists()


# ---- the safety net ----------------------------------------------------------------------------
def test_a_bug_gives_one_line_and_a_log_with_the_traceback(tmp_path, template):
    """An unexpected exception (here: a broken installation) ends in one line pointing to the
    log, which holds the traceback."""
    from bids_datasets import xcpd

    data = xcpd(tmp_path / "xcpd", template, subjects=("01",), sessions=("1",))
    sabotage = tmp_path / "sabotage"
    sabotage.mkdir()
    (sabotage / "sitecustomize.py").write_text(
        "import greyarray.bids.citation as c\n"
        "def broken(*a, **k):\n    raise ZeroDivisionError('planted bug')\n"
        "c.update = broken\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{sabotage}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = run(data.root, tmp_path / "out", "group", "--scalar", "reho", env=env)
    assert done.returncode == 1
    line = one_error_line(done.stderr)
    assert "unexpected ZeroDivisionError: planted bug (details in " in line
    log = Path(line.split("(details in ")[1].rstrip(")"))
    text = log.read_text()
    assert "Traceback" in text and "planted bug (exit code 1)" in text
    assert log.parent == tmp_path / "out" / "logs"


# ---- two runs on one HDF5 --------------------------------------------------------------------
def test_fit_lm_waits_for_another_process_holding_the_file(exported, tmp_path):
    """A writer (another fit-lm, ModelArray in R) holds the HDF5: fit-lm says it waits, then
    finishes; with a short wait limit it fails in one line (75, try again)."""
    h5, cohort = exported
    hold = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import h5py, sys, time; f = h5py.File({str(h5)!r}, 'a'); "
            "print('held', flush=True); time.sleep(4)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert hold.stdout.readline().strip() == "held"
    fit = ["fit-lm", "--input-hdf5", h5, "--cohort-file", cohort, "--formula", "thickness ~ age"]
    short = run(*fit, "--analysis-name", "short", env={**os.environ, "GREYARRAY_LOCK_WAIT": "0.5"})
    assert short.returncode == 75
    assert "in use by another process for more than 0.5 s" in one_error_line(short.stderr)
    done = run(*fit, "--analysis-name", "waited")
    hold.wait()
    assert done.returncode == 0, done.stderr
    assert "is in use by another process: waiting for it to finish" in done.stderr


def test_two_fit_lm_runs_on_one_file(exported):
    """Run together, both analyses land; the same analysis twice: the later one is refused."""
    h5, cohort = exported
    fit = ["fit-lm", "--input-hdf5", h5, "--cohort-file", cohort, "--log-level", "ERROR"]
    jobs = [
        subprocess.Popen(
            [*GREYARRAY, *map(str, fit), "--formula", "thickness ~ age", "--analysis-name", name],
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("one", "two", "two")
    ]
    results = [(job.wait(), job.stderr.read()) for job in jobs]
    assert [code for code, _ in results[:1]] == [0]
    assert sorted(code for code, _ in results[1:]) == [0, 73]
    refused = next(err for code, err in results if code == 73)
    assert "results/two exists; use --overwrite" in one_error_line(refused)
    import h5py

    with h5py.File(h5) as file:
        assert {"one", "two"} <= set(file["results"])


def test_result_columns_that_collide_after_sanitising(exported, tmp_path):
    """'a b.estimate' and 'a_b.estimate' would both be <analysis>_a_b.estimate.dscalar.nii."""
    import h5py
    import numpy as np

    h5 = tmp_path / "copy.h5"
    h5.write_bytes(exported[0].read_bytes())
    with h5py.File(h5, "a") as file:
        group = file.create_group("results/clash")
        group.create_dataset("results_matrix", data=np.zeros((2, 91282)))
        group.create_dataset(
            "column_names", data=["a b.estimate", "a_b.estimate"], dtype=h5py.string_dtype()
        )
    args = ["export-results", "--analysis-name", "clash", "--input-hdf5", h5]
    done = run(*args, "--output-dir", tmp_path / "out")
    assert done.returncode == 65
    line = one_error_line(done.stderr)
    assert "columns 'a b.estimate' and 'a_b.estimate' would both be written to" in line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_second_signal_never_interrupts_the_cleanup_of_the_first():
    from greyarray import cli

    with cli.signals_end_the_run():
        with pytest.raises(cli.Interrupted):
            cli.signals._raise_interrupted(signal.SIGTERM, None)
        cli.signals._raise_interrupted(signal.SIGTERM, None)  # during cleanup: recorded, not raised
        assert [s.name for s in cli.signals.RECEIVED] == ["SIGTERM", "SIGTERM"]


def test_a_held_output_lock_is_waited_for_then_busy(tmp_path, template, monkeypatch):
    """A lock on OUTPUT_DIR held by a hung process ends the run with 75 after
    GREYARRAY_LOCK_WAIT seconds (said while waiting), never a silent wait forever."""
    import fcntl

    from bids_datasets import xcpd

    data = xcpd(tmp_path / "xcpd", template, subjects=("01",), sessions=("1",))
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("GREYARRAY_LOCK_WAIT", "0.3")
    with open(out / ".greyarray.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        done = run(data.root, out, "group", "--scalar", "reho", "--no-report")
    assert done.returncode == 75, done.stderr
    assert "held by another GreyArray run for more than 0.3 s" in one_error_line(done.stderr)
    assert "is held by another GreyArray run: waiting for it to finish" in done.stderr


@pytest.mark.parametrize("which", ["output-dir", "parent-is-a-file"])
def test_report_that_cannot_be_written_is_refused_before_export(which, exported, tmp_path):
    h5, cohort = exported
    report = tmp_path / "maps.html" if which == "output-dir" else cohort / "x.html"
    done = run(
        "export-results", "--analysis-name", "lm", "--input-hdf5", h5,
        "--output-dir", tmp_path / "maps.html", "--report", report,
    )  # fmt: skip
    assert done.returncode in (64, 73), done.stderr
    one_error_line(done.stderr)
    assert not (tmp_path / "maps.html").exists()


def test_a_signal_during_the_cleanup_still_removes_the_temporary_folder(monkeypatch, tmp_path):
    """SLURM's SIGTERM can land while a finished write removes its emptied private folder
    (seen in CI: scancel left one behind). The removal finishes, then the signal ends the run."""
    from greyarray.errors import Interrupted

    real, calls = fileio.shutil.rmtree, []

    def interrupted_once(path, ignore_errors=False):
        calls.append(path)
        if len(calls) == 1:
            raise Interrupted(signal.SIGTERM, "SIGTERM")
        real(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(fileio.shutil, "rmtree", interrupted_once)
    with pytest.raises(Interrupted), fileio.private_folder(tmp_path) as private:
        (private / "written").write_bytes(b"x")
    assert list(tmp_path.iterdir()) == []
