"""Shared fixtures: real CIFTI files, synthetic cohorts on the real 91k geometry, wb_command."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from greyarray import cli
from greyarray.demo import template_path
from greyarray.io.formats import cifti

DATA = Path(__file__).parent / "data"
CONTE91K = DATA / "Conte69.MyelinAndCorrThickness.91k_fs_LR.dscalar.nii"
CONTE32K = DATA / "Conte69.MyelinAndCorrThickness.32k_fs_LR.dscalar.nii"
PSCALAR = DATA / "Conte69.MyelinAndCorrThickness.VGD11b.32k_fs_LR.pscalar.nii"
PCONN = DATA / "Conte69.MyelinAndCorrThickness.VGD11b.32k_fs_LR.pconn.nii"
WRONG_TYPES = {
    "dtseries": DATA / "Conte69.MyelinAndCorrThickness.32k_fs_LR.dtseries.nii",
    "ptseries": DATA / "Conte69.MyelinAndCorrThickness.32k_fs_LR.ptseries.nii",
    "dlabel": DATA / "Conte69.parcellations_VGD11b.32k_fs_LR.dlabel.nii",
    "dconn": DATA / "nibabel_row_major.dconn.nii",
}


def require(tool: str) -> str:
    """Path of a real third-party tool: skip on a laptop without it, fail in CI (CI=1)."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed"
        if os.environ.get("CI"):
            pytest.fail(f"{message}, and CI must run this check")
        pytest.skip(message)
    return path


def r_environment() -> dict:
    """The environment to run R in: a UTF-8 locale, as users run R (R orders factor levels by
    the locale's collation); en_US.UTF-8 when installed (CI generates it), else C.UTF-8."""
    listed = subprocess.run(["locale", "-a"], capture_output=True, text=True).stdout.split()
    return {**os.environ, "LC_ALL": "en_US.UTF-8" if "en_US.utf8" in listed else "C.UTF-8"}


@pytest.fixture(scope="session")
def wb_command():
    """Run Connectome Workbench's wb_command (the reference CIFTI reader); returns stdout."""
    exe = require("wb_command")
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}

    def run(*args: object) -> str:
        done = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    return run


@pytest.fixture(scope="session")
def template() -> Path:
    return template_path()


@pytest.fixture(scope="session")
def geometry91k(template) -> cifti.Geometry:
    return cifti.read_file(template).geometry


@pytest.fixture(scope="session")
def writer91k(geometry91k) -> cifti.CiftiWriter:
    return cifti.CiftiWriter(geometry91k)


def subject_values(n_subjects: int, n_elements: int, seed: int = 0) -> np.ndarray:
    """Distinct, known float32 values: subject i's map differs from every other subject's."""
    rng = np.random.default_rng(seed)
    base = rng.normal(2.5, 0.5, n_elements).astype(np.float32)
    return np.stack(
        [
            base
            + np.float32(i) * np.float32(0.01)
            + rng.normal(0, 0.1, n_elements).astype(np.float32)
            for i in range(n_subjects)
        ]
    ).astype(np.float32)


def write_cohort(
    folder: Path,
    writer: cifti.CiftiWriter,
    values: np.ndarray,
    scalar: str = "thickness",
    csv_name: str = "cohort.csv",
    subdir: str = "maps",
) -> Path:
    """One file per row of ``values`` under folder/subdir, and a long cohort CSV with relative
    paths and an age column."""
    (folder / subdir).mkdir(parents=True, exist_ok=True)
    ext = cifti.EXTENSIONS[writer.geometry.kind]
    rows = []
    for i, row in enumerate(values):
        name = f"{subdir}/sub-{i + 1:03d}_{scalar}{ext}"
        writer.write(folder / name, row, f"sub-{i + 1:03d} {scalar}")
        rows.append({"scalar_name": scalar, "source_file": name, "age": 20 + i})
    path = folder / csv_name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def run_cli(capsys):
    """Run ``greyarray ARGS`` in-process; returns (exit code, stdout, stderr)."""

    def run(*args: object) -> tuple[int, str, str]:
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as exit_:  # argparse
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(autouse=True)
def _restore_logging():
    """Commands run in-process configure logging (level, log files): undo it after each test,
    so that no test depends on which ran before it."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


def run_greyarray(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """``greyarray ARGS`` in this process (fast: no start-up, imports done once), or as a child
    process when it needs another folder or environment. Returns exit code, stdout, stderr."""
    if cwd is not None or env is not None:
        command = [sys.executable, "-m", "greyarray", *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
