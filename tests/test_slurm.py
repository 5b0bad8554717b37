"""The SLURM job scripts (slurm/), submitted to a real scheduler: the outputs of the participant
array, the group job and the permutation shards equal a local run's; a failed task stops the
jobs after it and is named in its log; a cancelled job leaves nothing half-written; two
arrays share one OUTPUT_DIR.

Needs a slurmctld that answers (`.ci/slurm/start.sh` starts a one-node cluster on localhost; CI
runs it): skipped without one, failed under CI=1. The jobs run this checkout's greyarray
(GREYARRAY_CMD) instead of the Apptainer image, which `.ci/containers.sh` tests. Every scenario
is submitted at once (module fixture) so that the jobs run side by side; each test then waits
for its own jobs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import require, run_greyarray

from greyarray.demo import write_bids_demo

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
MODEL = ["--model", "thickness ~ age", "--permutations", "50", "--seed", "3"]
TMP = ".greyarray-tmp"
ENV = {
    **os.environ,
    "GREYARRAY_CMD": f"{sys.executable} -m greyarray",
    "PYTHONPATH": str(REPO / "src"),
}


def scheduler() -> None:
    """Skip (laptop) or fail (CI=1) unless sbatch is installed and a slurmctld answers."""
    require("sbatch")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if "is UP" not in ping.stdout:
        message = "no slurmctld answers (start one with .ci/slurm/start.sh, as root)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}, and CI must run this check")
        pytest.skip(message)


def submit(*args: object) -> dict[str, str]:
    """slurm/submit.sh ARGS; returns its job ids by name (participant, group, shards, merge)."""
    done = subprocess.run(
        ["bash", SLURM / "submit.sh", *map(str, args)], capture_output=True, text=True, env=ENV
    )
    assert done.returncode == 0, done.stderr
    return dict(word.split("=") for word in done.stdout.split())


def sbatch(*args: object) -> str:
    done = subprocess.run(
        ["sbatch", "--parsable", *map(str, args)], capture_output=True, text=True, env=ENV
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def states(job: str) -> dict[str, dict[str, str]]:
    """Each task of ``job`` (or the job itself) -> its JobState, Reason, ExitCode, StartTime."""
    shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
    tasks = {}
    for line in shown.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        tasks[fields.get("ArrayTaskId", fields["JobId"])] = fields
    return tasks


def wait(*jobs: str, timeout: float = 180) -> dict[str, dict[str, dict[str, str]]]:
    """Wait until every task of ``jobs`` has ended; their final states."""
    deadline = time.monotonic() + timeout
    while True:
        found = {job: states(job) for job in jobs}
        running = [
            f"{job}_{task}"
            for job, tasks in found.items()
            for task, fields in tasks.items()
            if fields["JobState"] in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")
        ]
        if not running:
            return found
        assert time.monotonic() < deadline, f"jobs {running} still running after {timeout} s"
        time.sleep(0.25)


def completed(found: dict) -> bool:
    return all(
        fields["JobState"] == "COMPLETED" for tasks in found.values() for fields in tasks.values()
    )


def slurm_logs(out: Path) -> str:
    return "\n".join(
        f"== {path.name}\n{path.read_text()}" for path in sorted((out / "logs/slurm").glob("*"))
    )


def temporaries(out: Path) -> list[Path]:
    return [path for path in out.rglob(f"{TMP}*")]


def local(bids: Path, out: Path, *levels: list[str]) -> None:
    """The same levels run here, one after the other, as one user would on one machine."""
    for level in levels:
        done = run_greyarray(bids, out, *level, "--no-report", "-q")
        assert done.returncode == 0, done.stderr


def assert_same_hdf5(slurm_out: Path, local_out: Path, results: bool = True) -> list[str]:
    """Every group HDF5 holds the same scalars, subject names, sources (and results)."""
    names = sorted(path.name for path in (local_out / "group").glob("*_modelarray.h5"))
    assert names and names == sorted(p.name for p in (slurm_out / "group").glob("*.h5"))
    for name in names:
        with h5py.File(slurm_out / "group" / name) as a, h5py.File(local_out / "group" / name) as b:
            for scalar in b["scalars"]:
                for key in ("values", "column_names"):
                    np.testing.assert_array_equal(
                        a[f"scalars/{scalar}/{key}"][()], b[f"scalars/{scalar}/{key}"][()]
                    )
                np.testing.assert_array_equal(
                    a[f"greyarray/sources/{scalar}/sha256"][()],
                    b[f"greyarray/sources/{scalar}/sha256"][()],
                )
            if not results:
                continue
            assert sorted(a.get("results", {})) == sorted(b.get("results", {}))
            for analysis in b.get("results", {}):
                for key in ("results_matrix", "column_names"):
                    np.testing.assert_array_equal(
                        a[f"results/{analysis}/{key}"][()], b[f"results/{analysis}/{key}"][()]
                    )
        assert (
            slurm_out / "group" / name.replace("_modelarray.h5", "_cohort.csv")
        ).read_bytes() == (
            local_out / "group" / name.replace("_modelarray.h5", "_cohort.csv")
        ).read_bytes()
    return names


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Every scenario's data, submitted at once; the local runs to compare with."""
    scheduler()
    root = tmp_path_factory.mktemp("slurm")
    runs = {}

    # The whole pipeline: 12 participants (ModelArray fits an element only with more than 10),
    # two per task (a line may list several), the group level, 2 permutation shards, the merge.
    bids12 = write_bids_demo(root / "bids12", 12)
    subjects = root / "subjects12.txt"
    subjects.write_text("".join(f"sub-{i:03d} {i + 1:03d}\n" for i in range(1, 13, 2)))
    runs["pipeline"] = submit(
        bids12, root / "pipeline", subjects, "--shards", 2, *MODEL, "--no-report"
    )

    # One participant's map is broken: its task fails, the group job never starts.
    bad = write_bids_demo(root / "bad", 3)
    broken = next(bad.glob("derivatives/fmriprep/sub-002/anat/*thickness.dscalar.nii"))
    os.truncate(broken, broken.stat().st_size // 2)
    (root / "subjects3.txt").write_text("001\n002\n\n003\n")
    runs["failed"] = submit(bad, root / "failed", root / "subjects3.txt", "--no-report")

    # Two arrays (overlapping participants) and their group jobs on one OUTPUT_DIR.
    bids3 = write_bids_demo(root / "bids3", 3)
    (root / "first.txt").write_text("001\n002\n")
    (root / "second.txt").write_text("002\n003\n")
    runs["first"] = submit(bids3, root / "shared", root / "first.txt", "--no-report")
    runs["second"] = submit(bids3, root / "shared", root / "second.txt", "--no-report")

    yield root, runs
    for scenario in runs.values():
        subprocess.run(["scancel", *scenario.values()], capture_output=True)


@pytest.fixture(scope="module")
def local3(jobs) -> Path:
    """The small dataset's group level run here, in this process."""
    root, _ = jobs
    local(root / "bids3", root / "local3", ["group"])
    return root / "local3"


@pytest.fixture(scope="module")
def local12(jobs) -> Path:
    """The pipeline's data through the same levels here, unsharded, with the same seed."""
    root, _ = jobs
    local(root / "bids12", root / "local12", ["group"], ["group", *MODEL])
    return root / "local12"


def _tmp_writer(out: Path, job: str, timeout: float = 60) -> int:
    """The PID of the job's greyarray process, stopped (SIGSTOP) while it writes an output in
    a temporary folder (named .greyarray-tmp-<host>-<pid>-...)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in temporaries(out):
            pid = int(path.name.split("-")[-2])
            try:  # the job's greyarray, never another process that took a dead one's PID
                if b"greyarray" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    continue
                os.kill(pid, signal.SIGSTOP)
            except (FileNotFoundError, ProcessLookupError):
                continue
            if path.exists():
                return pid
            os.kill(pid, signal.SIGCONT)  # finished that file meanwhile: catch the next
        if states(job)[job]["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING"):
            break
        time.sleep(0.01)
    pytest.fail(f"job {job} wrote no temporary output that could be caught")


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie, ended but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_cancelled_mid_write_then_the_next_run_cleans_up(jobs, local3):
    """scancel during the group level's write: the run removes its temporary files itself
    (SLURM sends SIGTERM; exit 143) and publishes nothing half-written. A process killed
    outright (SIGKILL: SLURM's last resort after KillWait, or the OOM killer) cannot clean up:
    the next run removes what it left and writes the outputs, equal to a local run's."""
    root, _ = jobs
    bids, out = root / "bids3", root / "cancelled"
    group = SLURM / "group.sbatch"
    logs = f"--output={out}-%j.log"
    first = sbatch(logs, group, bids, out, "--no-report", "--nprocs", 1)
    pid = _tmp_writer(out, first)
    subprocess.run(["scancel", first], check=True)
    (state,) = wait(first)[first].values()
    assert state["JobState"] == "CANCELLED"
    # SLURM may mark the job CANCELLED once the batch shell has died, while greyarray (its
    # child) still removes its temporaries (proctrack/linuxproc does not wait for it): wait
    # for greyarray itself, which SLURM kills outright after KillWait (5 s here)
    deadline = time.monotonic() + 30
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(pid)
    assert not temporaries(out)
    assert "greyarray: error: interrupted by SIGTERM" in Path(f"{out}-{first}.log").read_text()
    for h5 in (out / "group").glob("*.h5"):  # those published before the signal are whole
        with h5py.File(h5) as file:
            assert file["scalars"]

    second = sbatch(logs, group, bids, out, "--no-report", "--nprocs", 1)
    pid = _tmp_writer(out, second)
    left = temporaries(out)
    os.kill(pid, signal.SIGKILL)
    (state,) = wait(second)[second].values()
    assert state["JobState"] == "FAILED" and left and all(p.exists() for p in left)

    third = sbatch(logs, group, bids, out, "--no-report")
    (state,) = wait(third)[third].values()
    assert state["JobState"] == "COMPLETED", Path(f"{out}-{third}.log").read_text()
    assert not temporaries(out)
    run_logs = "".join(p.read_text() for p in (out / "logs").glob("greyarray-group-*.log"))
    assert all(
        f"Removed {path}, left by a process that no longer runs" in run_logs for path in left
    )
    assert len(assert_same_hdf5(out, local3)) == 4  # the demo: 3 CIFTI scalars and fa (NIfTI)


def test_pipeline_equals_a_local_run(jobs, local12):
    """participant array -> group -> permutation shards -> merge: the HDF5 values, cohorts,
    results (FWE p-values of the merged shards included) and every exported map equal one
    local, unsharded run with the same seed."""
    root, runs = jobs
    found = wait(*runs["pipeline"].values())
    out = root / "pipeline"
    assert completed(found), slurm_logs(out)
    assert len(found[runs["pipeline"]["participant"]]) == 6
    assert sorted(p.name for p in out.glob("sub-*/*_greyarray.json")) == [
        f"sub-{i:03d}_greyarray.json" for i in range(1, 13)
    ]
    assert len(found[runs["pipeline"]["shards"]]) == 2
    assert_same_hdf5(out, local12)
    with h5py.File(out / "group/desc-thickness_modelarray.h5") as h5:
        names = list(h5["results/lm/column_names"].asstr()[()])
        fwe = h5["results/lm/results_matrix"][()][names.index("age.p.value.fwe")]
    assert np.isfinite(fwe).all() and 0.02 <= fwe.min() < 0.5 and fwe.max() == 1  # not trivial
    maps = sorted(p.name for p in (local12 / "group").glob("*_statmap.dscalar.nii"))
    assert len(maps) == 19 and any("stat-pfwe" in name for name in maps)
    for name in maps:
        assert (out / "group" / name).read_bytes() == (local12 / "group" / name).read_bytes()
    shards = sorted(p.name for p in (out / "group").glob("*.perm-shard-*.npz"))
    assert shards == [f"desc-thickness_modelarray.lm.perm-shard-{i}-of-2.npz" for i in (1, 2)]
    assert "*.perm-shard-*.npz" in (out / ".bidsignore").read_text().split()
    assert not temporaries(out)


def test_failed_task_stops_the_group_job(jobs):
    """A participant whose map is truncated fails its task (exit 65); the group job is
    cancelled without starting (its dependency can never be met) and nothing of the group
    level is written; the failed task's log names the participant and the file."""
    root, runs = jobs
    found = wait(*runs["failed"].values())
    participant, group = found[runs["failed"]["participant"]], found[runs["failed"]["group"]]
    assert {task: fields["JobState"] for task, fields in participant.items()} == {
        "1": "COMPLETED",
        "2": "FAILED",
        "3": "COMPLETED",
    }
    assert participant["2"]["ExitCode"] == "65:0"
    (fields,) = group.values()
    assert fields["JobState"] == "CANCELLED" and fields["Reason"] == "DependencyNeverSatisfied"
    assert fields["StartTime"] in ("None", "Unknown") or fields["RunTime"] == "00:00:00"
    out = root / "failed"
    assert not (out / "group").exists()
    log = out / f"logs/slurm/greyarray-participant-{runs['failed']['participant']}_2.log"
    text = log.read_text()
    assert text.startswith("participant 002 (line 2 of ")
    errors = [line for line in text.splitlines() if line.startswith("greyarray: error:")]
    assert len(errors) == 1 and "sub-002_space-fsLR_den-91k_thickness.dscalar.nii" in errors[0]
    assert sorted(p.name for p in out.glob("sub-*")) == ["sub-001", "sub-003"]


def test_two_arrays_share_one_output_dir(jobs, local3):
    """Two participant arrays with overlapping participants and their two group jobs, at the
    same time on one OUTPUT_DIR: every job succeeds (a group run that finds the HDF5 written
    meanwhile from the same inputs keeps it), and the outputs equal one local run's."""
    root, runs = jobs
    found = wait(*runs["first"].values(), *runs["second"].values())
    out = root / "shared"
    assert completed(found), slurm_logs(out)
    assert_same_hdf5(out, local3)
    assert sorted(p.name for p in out.glob("sub-*")) == ["sub-001", "sub-002", "sub-003"]
    assert not temporaries(out)
    logs = slurm_logs(out)
    assert logs.count("GreyArray group level done") == 2


# ---- the BIDS-App's shard options, without a scheduler ---------------------------------------
def errors(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("greyarray: error:")]


def test_shard_options_refuse_what_cannot_work(tmp_path):
    """Model options without --model, a shard before the group level, a shard written twice and
    a merge with a shard missing: one error line each, the right exit code, nothing written."""
    bids, out = write_bids_demo(tmp_path / "bids", 3), tmp_path / "out"
    quiet = ["--no-report", "-q"]
    done = run_greyarray(bids, out, "group", "--permutations", "10", "--tfce", *quiet)
    assert done.returncode == 64 and not out.exists()
    assert errors(done) == [
        "greyarray: error: --permutations, --tfce needs --model FORMULA (group level)"
    ]
    done = run_greyarray(bids, out, "group", *MODEL, "--permutation-shard", "1/2", *quiet)
    assert done.returncode == 66 and not out.exists()
    (line,) = errors(done)
    assert "desc-thickness_modelarray.h5: not found" in line and "group level first" in line

    assert run_greyarray(bids, out, "group", *quiet).returncode == 0
    shard = out / "group/desc-thickness_modelarray.lm.perm-shard-1-of-2.npz"
    done = run_greyarray(bids, out, "group", *MODEL, "--permutation-shard", "1/2", *quiet)
    assert done.returncode == 0 and shard.is_file(), done.stderr
    written = shard.read_bytes()
    done = run_greyarray(bids, out, "group", *MODEL, "--permutation-shard", "1/2", *quiet)
    assert done.returncode == 73 and shard.read_bytes() == written
    (line,) = errors(done)
    assert line.endswith("perm-shard-1-of-2.npz exists; use --overwrite")
    done = run_greyarray(bids, out, "group", *MODEL, "--merge-shards", "2", *quiet)
    assert done.returncode == 66
    (line,) = errors(done)
    assert line.endswith("perm-shard-2-of-2.npz: permutation shard not found")
    with h5py.File(out / "group/desc-thickness_modelarray.h5") as h5:
        assert "results" not in h5
    assert not list((out / "group").glob("*statmap*")) and not temporaries(out)


def test_scripts_refuse_bad_arguments(tmp_path):
    """The scripts' own checks, before anything is submitted or written: one error line each,
    exit 64 (usage) or 66 (no participants), no OUTPUT_DIR."""
    out, empty, two = tmp_path / "out", tmp_path / "empty.txt", tmp_path / "two.txt"
    empty.write_text("\n  \n")
    two.write_text("001\n002\n")
    cases = [
        (["submit.sh", tmp_path, out], {}, 64, "usage"),
        (["submit.sh", tmp_path, out, empty], {}, 66, "lists no participant"),
        (
            ["submit.sh", tmp_path, out, two, "--shards", "2", "--model", "y ~ x"],
            {},
            64,
            "--shards needs --model FORMULA --permutations N",
        ),
        (
            [
                "submit.sh",
                tmp_path,
                out,
                two,
                "--shards",
                "2",
                "--model",
                "y ~ x",
                "--permutations=10",
                "--harmonize=site",
            ],
            {},
            64,
            "--shards with --harmonize needs --harmonize-covariates TERMS",
        ),
        (["participant.sbatch", tmp_path], {}, 64, "usage: sbatch"),
        (
            ["participant.sbatch", tmp_path, out, two],
            {"SLURM_ARRAY_TASK_ID": "3"},
            64,
            "has no line 3 (--array must be 1-N for N lines)",
        ),
        (
            ["permutation-shards.sbatch", tmp_path, out, "--model", "y ~ x"],
            {
                "SLURM_ARRAY_TASK_ID": "2",
                "SLURM_ARRAY_TASK_COUNT": "2",
                "SLURM_ARRAY_TASK_MIN": "2",
                "SLURM_ARRAY_TASK_MAX": "3",
            },
            64,
            "submit the shards as --array=1-K (not 2-3)",
        ),
    ]
    for (script, *args), env, code, says in cases:
        done = subprocess.run(
            ["bash", SLURM / script, *map(str, args)],
            capture_output=True,
            text=True,
            env={**ENV, "GREYARRAY_CMD": "false", **env},
        )
        assert done.returncode == code, (script, done.stderr)
        assert says in done.stderr and len(errors(done)) == 1, (script, done.stderr)
        assert not out.exists()


def test_submit_routes_each_option_to_its_jobs(tmp_path):
    """With a stand-in sbatch that records its arguments: the harmonization's options go to
    the group job, the shards and the merge, never to the participant array (which refuses
    them); the model's go to the group job, or with --shards to the shards and the merge;
    --flag=value is routed as --flag value."""
    calls = tmp_path / "calls"
    calls.mkdir()
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(
        '#!/bin/bash\nn=$(( $(ls "$CALLS" | wc -l) + 1 ))\n'
        'printf "%s\\n" "$@" > "$CALLS/$n"\necho "$n;cluster"\n'
    )
    fake.chmod(0o755)
    (tmp_path / "subjects.txt").write_text("001\n002\n")
    env = {**ENV, "PATH": f"{fake.parent}:{os.environ['PATH']}", "CALLS": str(calls)}

    def jobs(*extra: str) -> dict[str, list[str]]:
        for old in calls.iterdir():
            old.unlink()
        done = subprocess.run(
            ["bash", SLURM / "submit.sh", tmp_path, tmp_path / "out", tmp_path / "subjects.txt",
             "--no-report", *extra],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        found = {}
        for call in sorted(calls.iterdir(), key=lambda p: int(p.name)):
            args = call.read_text().splitlines()
            script = next(Path(a).stem for a in args if a.endswith(".sbatch"))
            found[script] = args[args.index(next(a for a in args if a.endswith(".sbatch"))) :]
        return found

    harmonize = ["--harmonize", "site", "--harmonize-covariates=age"]
    found = jobs(*harmonize, "--model", "thickness ~ age")
    assert sorted(found) == ["group", "participant"]
    assert "--harmonize" not in found["participant"] and "--model" not in found["participant"]
    assert found["participant"][-1] == "--no-report"
    assert found["group"][-5:] == [*harmonize, "--model", "thickness ~ age"]
    found = jobs("--shards", "2", "--model=thickness ~ age", "--permutations", "9", *harmonize)
    assert sorted(found) == ["group", "merge", "participant", "permutation-shards"]
    assert not [a for a in found["participant"] if a.startswith(("--harmonize", "--model"))]
    assert found["group"][-3:] == harmonize and "--permutations" not in found["group"]
    for script in ("permutation-shards", "merge"):
        assert found[script][-6:] == [*harmonize, "--model=thickness ~ age", "--permutations", "9"]
