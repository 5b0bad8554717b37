"""The user's HDF5 survives any crash (io/h5update.py: copy, write the copy, fsync, rename).

fit-lm, fit-gam and any other writer (``updating_hdf5``) are killed with SIGKILL at more than 20
moments of their update each (tests/kill_points.py: deterministic moments, from the lock to the
rename), one run after another on the same file as a user's reruns would be. After every kill
the file opens without h5clear, in Python and in R as ModelArray opens it (rhdf5's reads, then
hdf5r for writing, as writeResults does); the scalars and every earlier result are
byte-identical, and the killed analysis is absent or complete. A disk filled by another process
in the middle, a file replaced or changed meanwhile, an exception in the writer: the same.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import PSCALAR, require, run_greyarray, subject_values, write_cohort
from test_export import fake_results, write_results
from test_faults import one_error_line, tmpfs

from greyarray.errors import BusyError
from greyarray.io import fileio, h5update
from greyarray.io.formats import cifti

HERE = Path(__file__).parent
MODELARRAY_OPEN = HERE / "r" / "modelarray_open.R"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 12-subject pscalar HDF5 (54 elements: a fit takes milliseconds) holding an analysis
    GreyArray fitted earlier and one written as ModelArray's writeResults writes it."""
    folder = tmp_path_factory.mktemp("small")
    values = subject_values(12, 54, seed=5)
    values[:4, :3] = np.nan  # three elements below ModelArray's threshold
    csv = write_cohort(folder, cifti.CiftiWriter(cifti.read_file(PSCALAR).geometry), values)
    table = pd.read_csv(csv)
    table["site"] = ["a", "b", "c"] * 4
    table.to_csv(csv, index=False)
    h5 = folder / "data.h5"
    assert run_greyarray("to-modelarray", "--cohort-file", csv, "--output", h5).returncode == 0
    fit = ["fit-lm", "--input-hdf5", h5, "--cohort-file", csv, "--log-level", "ERROR"]
    done = run_greyarray(*fit, "--formula", "thickness ~ age", "--analysis-name", "earlier")
    assert done.returncode == 0, done.stderr
    write_results(h5, "fromR", fake_results(54), "writeResults")
    return h5, csv


def contents(path: Path) -> dict[str, str]:
    """Every dataset's bytes, type and shape, and every attribute, by HDF5 path (read once for
    byte-identical files: most runs leave the same file)."""
    key = sha256(path)
    if key not in SEEN:
        SEEN[key] = _contents(path)
    return dict(SEEN[key])


SEEN: dict[str, dict] = {}


def _contents(path: Path) -> dict:
    found = {}

    def visit(name, item):
        for key, value in item.attrs.items():
            found[f"{name}@{key}"] = repr(value)
        if isinstance(item, h5py.Dataset):
            data = item[()]
            plain = isinstance(data, np.ndarray) and data.dtype.kind != "O"  # not pointers
            raw = data.tobytes() if plain else repr(np.asarray(data).tolist()).encode()
            found[name] = f"{item.dtype}{item.shape}" + hashlib.sha256(raw).hexdigest()

    with h5py.File(path, "r") as h5:
        h5.visititems(visit)
    return found


@pytest.fixture(scope="module")
def killed(small, tmp_path_factory) -> dict[str, list[dict]]:
    """tests/kill_points.py's runs, one process for all: fit-lm killed before every write of
    its update, fit-gam and a generic writer before 20 of them spread over it (forked where the
    update starts, each on the file as it was), and a kill -9 loop of whole fit-lm runs, one
    after another on one file.
    Per scenario its runs (moment 0: the counting run, not killed); "R": what R read."""
    folder = tmp_path_factory.mktemp("killed")
    h5, csv = small
    lm = ["fit-lm", "--formula", "thickness ~ age + site", "--analysis-name", "lm{moment}"]
    commands = {
        "lm": ("entry", lm),
        "gam": ("entry", ["fit-gam", "--formula", "thickness ~ s(age, k=4, fx=TRUE)"]),
        "generic": ("entry", None),
        "loop": ("whole", lm),
    }
    scenarios = []
    for name, (mode, args) in commands.items():
        (folder / name).mkdir()
        path = folder / name / "data.h5"
        shutil.copyfile(h5, path)
        scenarios.append(
            {
                "name": name,
                "mode": mode,
                "args": args and [*args, "--input-hdf5", str(path), "--cohort-file", str(csv)],
                "path": str(path),
                "pristine": str(h5) if mode == "entry" else None,
                "moments": {"lm": "all", "loop": 8}.get(name, 20),
            }
        )
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"scenarios": scenarios, "snapshots": str(folder / "snapshots")}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)])}
    done = subprocess.run(
        [sys.executable, str(HERE / "kill_points.py"), str(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    runs: dict[str, list[dict]] = {}
    for line in done.stdout.splitlines():
        run = json.loads(line)
        runs.setdefault(run["scenario"], []).append(run)
    # R opens every file the loop left, and each distinct file the other runs left (one R run)
    files = [Path(run["snapshot"]) for run in runs["loop"]]
    distinct = {sha256(Path(r["snapshot"])): r for s in ("lm", "gam", "generic") for r in runs[s]}
    files += [Path(run["snapshot"]) for run in distinct.values()]
    runs["R"] = r_reads(files)
    return runs


def sha256(path: Path) -> str:
    st = path.stat()
    return _sha256(path, st.st_ino, st.st_size, st.st_mtime_ns)


@functools.cache
def _sha256(path: Path, *_identity: int) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def r_reads(files: list[Path]) -> dict[tuple[str, str], tuple[int, int, float]]:
    """What R (rhdf5, then hdf5r for writing) reads from each file, as ModelArray does."""
    done = subprocess.run(
        [require("Rscript"), str(MODELARRAY_OPEN), "thickness", *map(str, files)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    seen = {}
    for line in done.stdout.splitlines():
        file, name, size, finite, total = line.rstrip("\t").split("\t")
        seen[file, name] = (int(size), int(finite), float(total))
    return seen


def python_reads(path: Path) -> dict[tuple[str, str], tuple[int, int, float]]:
    with h5py.File(path, "r") as h5:
        arrays = {"values": h5["scalars/thickness/values"][()]}
        for name, group in h5.get("results", {}).items():
            arrays[name] = group["results_matrix"][()]
    return {
        (str(path), name): (a.size, int(np.isfinite(a).sum()), float(a[np.isfinite(a)].sum()))
        for name, a in arrays.items()
    }


def check_runs(runs: list[dict], adds: str, minimum: int = 20) -> list[str]:
    """After every run: what was in the file is byte-identical, and what the run adds (the
    objects whose path contains ``adds``, with the run's moment) is all there, equal to what
    the unkilled run added, or not at all. Returns each run's outcome."""
    counted, runs = runs[0], runs[1:]
    assert counted["status"] == 0, counted
    reference = adds.format(moment=0)
    snapshot = contents(Path(counted["snapshot"]))
    complete = {k: v for k, v in snapshot.items() if reference in k}
    follow = "{moment}" in adds  # runs follow each other on one file: what a run added stays
    before = snapshot if follow else {k: v for k, v in snapshot.items() if k not in complete}
    outcomes = []
    for run in runs:
        after = contents(Path(run["snapshot"]))  # opens without h5clear
        assert {k: after.get(k) for k in before} == before, f"moment {run['moment']}: changed"
        name = adds.format(moment=run["moment"])
        added = {
            k.replace(name, reference): v.replace(name, reference)
            for k, v in after.items()
            if k not in before
        }
        assert added in ({}, complete), f"moment {run['moment']}: {name} is half-written"
        outcomes.append("complete" if added else "absent")
        assert added or run["status"] == "killed", run
        if follow:
            before = after
    assert len(outcomes) >= minimum and {"absent", "complete"} <= set(outcomes), outcomes
    return outcomes


def test_fit_lm_killed_at_every_write(killed):
    """fit-lm killed before each of the 20+ writes of its update (locks, copy, HDF5's writes,
    fsync, rename, cleanup): the file opens, in R too, earlier results are byte-identical,
    the new one absent or complete; killed after the rename, it is complete."""
    runs = killed["lm"]
    labels = runs[0]["labels"]
    assert {"flock", "copy_file_range", "posix_fallocate", "hdf5 write", "fsync", "replace"} <= (
        set(labels)
    )
    outcomes = check_runs(runs, "results/lm")
    assert outcomes.index("complete") == labels.index("replace") + 1  # killed after the rename
    for run in runs:
        assert_r_read(killed["R"], Path(run["snapshot"]))


def test_kill_9_loop_over_fit_lm(killed, small):
    """Whole fit-lm runs killed one after another on one file (each a new analysis): after
    each, R opens the file as ModelArray does (and for writing, as writeResults does), every
    earlier result is byte-identical; the next run removes what the killed one left."""
    runs = killed["loop"]
    check_runs(runs, "results/lm{moment}", minimum=8)
    for run in runs:
        assert_r_read(killed["R"], Path(run["snapshot"]))
    folder = Path(runs[0]["snapshot"]).parent.parent / "loop"
    assert [p.name for p in folder.iterdir() if p.name.startswith(fileio.TMP_PREFIX)]
    done = run_greyarray(
        "fit-lm", "--input-hdf5", folder / "data.h5", "--cohort-file", small[1],
        "--formula", "thickness ~ age", "--analysis-name", "next",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [p.name for p in folder.iterdir()] == ["data.h5"]  # no temporary left


def test_fit_gam_killed_at_20_moments(killed):
    check_runs(killed["gam"], "results/gam")
    for run in killed["gam"]:
        assert_r_read(killed["R"], Path(run["snapshot"]))


def test_any_writer_killed_at_20_moments(killed):
    """The mechanism every writer inherits (here a new scalar, as harmonize writes one)."""
    check_runs(killed["generic"], "harmoniz")
    for run in killed["generic"]:
        assert_r_read(killed["R"], Path(run["snapshot"]))


def assert_r_read(seen: dict, snapshot: Path) -> None:
    """R read this file (or a byte-identical one) and saw what h5py sees."""
    by_content = {sha256(Path(file)): file for file in {file for file, _ in seen}}
    read_as = by_content[sha256(snapshot)]
    for (_, name), (size, finite, total) in python_reads(snapshot).items():
        r_size, r_finite, r_total = seen[read_as, name]
        assert (r_size, r_finite) == (size, finite) and np.isclose(r_total, total), name


# ---- full disks, other writers, identity --------------------------------------------------------
def test_disk_filled_by_another_process_mid_update(small, tmp_path, monkeypatch):
    """The disk fills right after the free-space check, during the copy: refused (73), the
    file byte-identical. Then it fills once the copy is made: HDF5's writes go to the space
    reserved beforehand, and the results are written. R opens the file both times."""
    h5, csv = small
    room = f"{(h5.stat().st_size >> 10) * 2 + 1536}k"
    with tmpfs(tmp_path / "disk", room) as disk:
        path = disk / "data.h5"
        shutil.copyfile(h5, path)
        before, sha = contents(path), sha256(path)
        fit = ["fit-lm", "--input-hdf5", path, "--cohort-file", csv, "--formula", "thickness ~ age"]
        for when in ("check_free_space", "_copy_identity"):
            original = getattr(h5update, when)

            def then_fill(*args, original=original):
                original(*args)
                with open(disk / "filler", "wb") as filler, pytest.raises(OSError):
                    while True:
                        filler.write(b"\0" * 65536)

            monkeypatch.setattr(h5update, when, then_fill)
            done = run_greyarray(*fit, "--analysis-name", "new")
            monkeypatch.undo()
            (disk / "filler").unlink()
            assert sorted(p.name for p in disk.iterdir()) == ["data.h5"]
            if when == "check_free_space":
                assert done.returncode == 73, done.stderr
                line = one_error_line(done.stderr)
                assert "no space left on device" in line and "the file is unchanged" in line
                assert sha256(path) == sha
                shutil.copyfile(path, tmp_path / "refused.h5")
        assert done.returncode == 0, done.stderr
        after = contents(path)
        assert {k: after[k] for k in before} == before and "results/new/results_matrix" in after
        shutil.copyfile(path, tmp_path / "written.h5")
    seen = r_reads([tmp_path / "refused.h5", tmp_path / "written.h5"])
    for name in ("refused.h5", "written.h5"):
        assert_r_read(seen, tmp_path / name)


def test_no_room_for_the_copy_is_refused_before_fitting(small, tmp_path):
    h5, csv = small
    with tmpfs(tmp_path / "disk", f"{(h5.stat().st_size >> 10) + 200}k") as disk:
        path = disk / "data.h5"
        shutil.copyfile(h5, path)
        sha = sha256(path)
        fit = ["fit-gam", "--input-hdf5", path, "--cohort-file", csv, "--formula"]
        done = run_greyarray(*fit, "thickness ~ s(age, k=4, fx=TRUE)")
        assert done.returncode == 73
        assert "not enough free space to write an updated copy" in one_error_line(done.stderr)
        assert "Fitting" not in done.stderr
        assert sha256(path) == sha
        assert sorted(p.name for p in disk.iterdir()) == ["data.h5"]


def test_an_update_keeps_mode_owner_attributes_and_symlinks(small, tmp_path, caplog):
    caplog.set_level("WARNING")
    real = tmp_path / "real" / "data.h5"
    real.parent.mkdir()
    shutil.copyfile(small[0], real)
    os.chmod(real, 0o640)
    if os.geteuid() == 0:
        os.chown(real, 1234, 2345)
    with contextlib.suppress(OSError):  # a file system without user attributes
        os.setxattr(real, "user.note", b"mine")
    link = tmp_path / "link.h5"
    link.symlink_to(real)
    (tmp_path / "hard.h5").hardlink_to(real)
    with h5update.updating_hdf5(link) as h5:
        h5.attrs["touched"] = 1
    assert link.is_symlink() and link.resolve() == real
    st = real.stat()
    assert oct(st.st_mode & 0o7777) == "0o640"
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (1234, 2345)
    if "user.note" in os.listxattr(tmp_path / "hard.h5"):
        assert os.getxattr(real, "user.note") == b"mine"
    with h5py.File(real) as file:
        assert file.attrs["touched"] == 1
    assert "had 2 hard links: the other names still show the file as it was" in caplog.text
    with h5py.File(tmp_path / "hard.h5") as file:
        assert "touched" not in file.attrs


def test_a_failed_writer_leaves_the_file_as_it_was(small, tmp_path):
    h5 = tmp_path / "data.h5"
    shutil.copyfile(small[0], h5)
    sha = sha256(h5)
    with pytest.raises(ZeroDivisionError), h5update.updating_hdf5(h5) as file:
        del file["results/earlier"]
        file.create_group("half")
        raise ZeroDivisionError
    assert sha256(h5) == sha
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]


def test_a_writer_that_ignores_the_lock_is_never_overwritten(small, tmp_path):
    """Another program that ignores HDF5's lock changes the file while the copy is written:
    its change is kept, the update refused (75, run again)."""
    h5 = tmp_path / "data.h5"
    shutil.copyfile(small[0], h5)
    with pytest.raises(BusyError, match="by another program while results"):  # noqa: SIM117
        with h5update.updating_hdf5(h5) as file:
            file.attrs["mine"] = 1
            with open(h5, "ab") as other:
                other.write(b"theirs")
    assert h5.read_bytes().endswith(b"theirs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]


def test_nobody_writes_the_old_file_while_it_is_updated(small, tmp_path):
    """During the update the original is locked as HDF5 1.10 locks it: a writer (h5py here,
    hdf5r in R the same) cannot open it, so no write lands in the file being replaced."""
    h5 = tmp_path / "data.h5"
    shutil.copyfile(small[0], h5)
    script = f"import h5py; h5py.File({str(h5)!r}, 'a')"
    with h5update.updating_hdf5(h5) as file:
        file.attrs["mine"] = 1
        other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert other.returncode != 0 and "unable to lock file" in other.stderr
    with h5py.File(h5) as done:
        assert done.attrs["mine"] == 1


def test_a_file_replaced_while_waiting_for_the_lock_is_locked_again(small, tmp_path, monkeypatch):
    """Another run publishes a new file between this run's open and its lock: the update
    applies to the new file (never to the old one: the other run's results would be lost)."""
    h5 = tmp_path / "data.h5"
    shutil.copyfile(small[0], h5)
    original, calls = h5update._refuse_irregular, []

    def publish_meanwhile(path, mode):
        original(path, mode)
        if not calls:
            calls.append(1)
            newer = tmp_path / "newer.h5"
            shutil.copyfile(h5, newer)
            with h5py.File(newer, "a") as other:
                other.attrs["theirs"] = 1
            os.replace(newer, h5)

    monkeypatch.setattr(h5update, "_refuse_irregular", publish_meanwhile)
    with h5update.updating_hdf5(h5) as file:
        file.attrs["mine"] = 1
    with h5py.File(h5) as done:
        assert done.attrs["theirs"] == 1 and done.attrs["mine"] == 1


@pytest.mark.parametrize("code", sorted(fileio.NO_LOCKS))
def test_a_file_system_without_locks(small, tmp_path, monkeypatch, code):
    """Lustre mounted noflock (flock fails with ENOSYS, ENOLCK or EOPNOTSUPP): the update and
    a shared folder's lock go ahead unlocked, said in one warning, instead of a crash at the
    end of the work."""
    import fcntl

    def no_locks(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(fileio, "_UNLOCKED_DEVICES", set())
    h5 = tmp_path / "data.h5"
    shutil.copyfile(small[0], h5)
    fit = ["fit-lm", "--input-hdf5", h5, "--cohort-file", small[1], "--formula", "thickness ~ age"]
    done = run_greyarray(*fit, "--analysis-name", "unlocked")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("does not support file locks") == 1, done.stderr
    assert "not protected" in done.stderr
    with fileio.locked(tmp_path / ".lock"), h5py.File(h5) as file:
        assert "results/unlocked" in file


def test_an_update_where_the_kernel_cannot_copy(small, tmp_path, monkeypatch):
    """No reflink, no copy_file_range (another file system, another kernel): read and write."""
    import errno

    h5 = tmp_path / "data.h5"
    shutil.copyfile(small[0], h5)
    before = contents(h5)

    def cross_device(*args):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", cross_device)
    monkeypatch.setattr(h5update, "COPY_BLOCK", 4096)
    with h5update.updating_hdf5(h5) as file:
        file.attrs["touched"] = 1
    after = contents(h5)
    assert {k: after[k] for k in before} == before
    with h5py.File(h5) as file:
        assert file.attrs["touched"] == 1
