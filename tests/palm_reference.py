"""Run PALM (Octave) on CSV inputs (or NIfTI volumes) and read its outputs: for the live tests
and for tests/palm/make_fixtures.py. PALM itself is in ../shared/reference/palm beside the
repository (GPL, a test reference: never shipped); PALM_DIR points elsewhere. Volumes need
Octave's image package (bwconncomp; Debian's octave-image)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "palm"
PALM = Path(os.environ.get("PALM_DIR", SHARED))


def require_palm() -> Path:
    """PALM's folder: a test skips without it (a fresh clone has no ../shared beside it), as
    tests of any missing program do, and fails in CI (CI=1), which must run it."""
    import pytest

    if (PALM / "palm.m").is_file():
        return PALM
    message = f"PALM is not in {PALM} (PALM_DIR says where it is)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}, and CI must run this check")
    pytest.skip(message)


@dataclass
class Analysis:
    """One palm() call: data (subjects x elements), design, t contrasts (rows), options."""

    name: str
    data: np.ndarray
    design: np.ndarray
    contrasts: np.ndarray
    options: tuple[str, ...] = ()
    blocks: np.ndarray | None = None  # -eb ... -whole
    surface: tuple[np.ndarray, np.ndarray] | None = None  # (coords, faces): -s patch.srf
    volume: np.ndarray | None = None  # mask (x, y, z): data columns are its voxels, C order
    permutations: int = 1000  # -n (PALM runs all of them when there are no more)


def run(folder: Path, analyses: list[Analysis]) -> None:
    """Run every analysis in one Octave session (one start-up), outputs in ``folder``."""
    calls = []
    for analysis in analyses:
        stem = folder / analysis.name
        _csv(f"{stem}_design.csv", analysis.design)
        _csv(f"{stem}_con.csv", analysis.contrasts)
        if analysis.volume is None:
            _csv(f"{stem}_Y.csv", analysis.data)
            args = ["-i", f"{stem}_Y.csv"]
        else:  # a 4-D NIfTI and its mask, read by PALM's own NIfTI code (-noniiclass)
            write_volumes(stem, analysis.data, analysis.volume)
            args = ["-i", f"{stem}_Y.nii", "-m", f"{stem}_mask.nii", "-noniiclass"]
        args += ["-d", f"{stem}_design.csv", "-t", f"{stem}_con.csv"]
        args += ["-o", str(stem), "-n", str(analysis.permutations), "-twotail", "-quiet"]
        if analysis.blocks is not None:
            np.savetxt(f"{stem}_eb.csv", analysis.blocks, fmt="%d")
            args += ["-eb", f"{stem}_eb.csv", "-whole"]
        if analysis.surface is not None:
            write_srf(Path(f"{stem}_patch.srf"), *analysis.surface)
            args += ["-s", f"{stem}_patch.srf"]
        args += list(analysis.options)
        calls.append("palm(" + ",".join(f"'{a}'" for a in args) + ");")
    script = f"addpath('{PALM}'); " + " ".join(calls)
    done = subprocess.run(
        ["octave-cli", "--no-gui", "-q", "--eval", script], capture_output=True, text=True
    )
    for analysis in analyses:  # Octave may exit non-zero on shutdown even when PALM succeeded
        if not list(folder.glob(f"{analysis.name}_*_fwep*")):
            raise RuntimeError(f"PALM failed on {analysis.name}:\n{done.stdout}\n{done.stderr}")


def read(folder: Path, name: str, what: str, contrast: int) -> np.ndarray:
    """An output row, e.g. what='dat_tstat_fwep' (FWE p), 'tfce_tstat' (TFCE scores)."""
    suffix = f"_c{contrast}" if (folder / f"{name}_{what}_c{contrast}.csv").exists() else ""
    return np.loadtxt(folder / f"{name}_{what}{suffix}.csv", delimiter=",", ndmin=1)


def has_image_package() -> bool:
    """Whether Octave's image package loads (PALM's TFCE on volumes needs its bwconncomp)."""
    done = subprocess.run(
        ["octave-cli", "--no-gui", "-q", "--eval", "pkg load image"], capture_output=True
    )
    return done.returncode == 0


def write_volumes(stem: Path, data: np.ndarray, mask: np.ndarray) -> None:
    import nibabel as nb

    volume = np.zeros((*mask.shape, len(data)))
    volume[mask] = data.T
    nb.save(nb.Nifti1Image(volume, np.eye(4)), f"{stem}_Y.nii")
    nb.save(nb.Nifti1Image(mask.astype(np.uint8), np.eye(4)), f"{stem}_mask.nii")


def read_volume(folder: Path, name: str, what: str, contrast: int, mask: np.ndarray):
    """An output volume (e.g. what='tfce_tstat'), at the mask's voxels in C order."""
    import nibabel as nb

    suffix = f"_c{contrast}" if (folder / f"{name}_{what}_c{contrast}.nii.gz").exists() else ""
    return nb.load(folder / f"{name}_{what}{suffix}.nii.gz").get_fdata().reshape(mask.shape)[mask]


def write_srf(path: Path, coords: np.ndarray, faces: np.ndarray) -> None:
    """FreeSurfer's ASCII surface, which PALM reads without any toolbox."""
    lines = ["#!ascii", f"{len(coords)} {len(faces)}"]
    lines += [f"{x:.9g} {y:.9g} {z:.9g} 0" for x, y, z in coords]
    lines += [f"{a} {b} {c} 0" for a, b, c in faces]
    path.write_text("\n".join(lines) + "\n")


def _csv(path: str, values: np.ndarray) -> None:
    np.savetxt(path, np.atleast_2d(values), delimiter=",", fmt="%.17g")
