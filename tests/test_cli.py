"""Command line: ModelArrayIO's flags; one clear line and exit code for each kind of bad input."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import CONTE32K, CONTE91K, PSCALAR, WRONG_TYPES, subject_values, write_cohort
from test_cifti import shifted_geometry

from greyarray.io.formats import cifti


@pytest.fixture
def cohort(tmp_path, writer91k):
    """A 3-subject 91k cohort in tmp_path/cohort.csv; returns (csv path, table)."""
    csv = write_cohort(tmp_path, writer91k, subject_values(3, 91282))
    return csv, pd.read_csv(csv)


def expect_error(run_cli, args, code: int, pattern: str, tmp_path) -> None:
    """The command fails with ``code`` and one stderr line matching ``pattern``; no output."""
    before = set(tmp_path.rglob("*"))
    status, _, err = run_cli(*args)
    lines = [line for line in err.splitlines() if not line.startswith(("INFO", "WARNING"))]
    assert status == code, err
    assert len(lines) == 1 and lines[0].startswith("greyarray: error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert set(tmp_path.rglob("*")) == before  # nothing written, not even a temporary file


def convert(csv, out, *extra):
    return ["to-modelarray", "--cohort-file", csv, "--output", out, *extra]


def with_row(cohort, tmp_path, source_file: str, scalar: str = "thickness"):
    csv, table = cohort
    row = {"scalar_name": scalar, "source_file": source_file, "age": 50}
    pd.concat([table, pd.DataFrame([row])]).to_csv(csv, index=False)
    return csv


def test_both_flag_spellings_and_help(run_cli, cohort, tmp_path):
    csv, _ = cohort
    code, _, err = run_cli(
        "to-modelarray",
        "--cohort_file",
        csv,
        "--output",
        tmp_path / "a.h5",
        "--compression_level",
        "1",
        "--target_chunk_mb",
        "0.5",
        "--log_level",
        "WARNING",
    )
    assert code == 0 and err == ""
    code, out, _ = run_cli("to-modelarray", "--help")
    assert code == 0 and "in the CSV's folder, then in the current folder" in " ".join(out.split())
    code, out, _ = run_cli("--version")
    assert code == 0 and out.startswith("greyarray ")
    code, _, err = run_cli("export-results", "--analysis-name", "x")
    assert code == 64 and "required" in err
    code, _, err = run_cli(
        "to-modelarray", "--cohort-file", csv, "--chunk-voxels", "5", "--target-chunk-mb", "1"
    )
    assert code == 64 and "not allowed with argument" in err


def test_console_script_prints_no_traceback(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "greyarray",
            "to-modelarray",
            "--cohort-file",
            str(tmp_path / "missing.csv"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 66
    assert (
        done.stderr.strip()
        == f"greyarray: error: {tmp_path / 'missing.csv'}: cohort file not found"
    )


def test_missing_cohort_file(run_cli, tmp_path):
    expect_error(
        run_cli,
        convert(tmp_path / "nope.csv", tmp_path / "o.h5"),
        66,
        r"nope.csv: cohort file not found",
        tmp_path,
    )


def test_missing_cohort_column(run_cli, cohort, tmp_path):
    csv, table = cohort
    table.rename(columns={"source_file": "file"}).to_csv(csv, index=False)
    expect_error(
        run_cli,
        convert(csv, tmp_path / "o.h5"),
        65,
        r"cohort.csv: no column 'source_file' \(columns: 'scalar_name', 'file', 'age'\)",
        tmp_path,
    )


def test_missing_wide_column(run_cli, cohort, tmp_path):
    csv, _ = cohort
    expect_error(
        run_cli,
        convert(csv, tmp_path / "o.h5", "--scalar-columns", "FA"),
        65,
        r"cohort.csv: no column 'FA'",
        tmp_path,
    )


def test_empty_source_file(run_cli, cohort, tmp_path):
    csv = with_row(cohort, tmp_path, "")
    expect_error(
        run_cli,
        convert(csv, tmp_path / "o.h5"),
        65,
        r"cohort.csv: line 5 has an empty source_file",
        tmp_path,
    )


def test_duplicate_source_file(run_cli, cohort, tmp_path):
    csv = with_row(cohort, tmp_path, "maps/sub-002_thickness.dscalar.nii")
    expect_error(
        run_cli,
        convert(csv, tmp_path / "o.h5"),
        65,
        r"'maps/sub-002_thickness.dscalar.nii' is listed twice for scalar 'thickness' "
        r"\(lines 3, 5\)",
        tmp_path,
    )


def test_missing_source_file(run_cli, cohort, tmp_path):
    csv = with_row(cohort, tmp_path, "maps/sub-009_thickness.dscalar.nii")
    expect_error(
        run_cli,
        convert(csv, tmp_path / "o.h5"),
        66,
        r"cohort.csv: source_file 'maps/sub-009_thickness.dscalar.nii' not found \(neither .*"
        r"/maps/sub-009_thickness.dscalar.nii nor .*/maps/sub-009_thickness.dscalar.nii\)$",
        tmp_path,
    )


def test_unreadable_source_file(run_cli, cohort, tmp_path):
    (tmp_path / "maps" / "folder.dscalar.nii").mkdir()
    csv = with_row(cohort, tmp_path, "maps/folder.dscalar.nii")
    expect_error(
        run_cli,
        convert(csv, tmp_path / "o.h5"),
        66,
        r"folder.dscalar.nii: is a directory",
        tmp_path,
    )


def test_truncated_source_file(run_cli, cohort, tmp_path):
    blob = (tmp_path / "maps" / "sub-001_thickness.dscalar.nii").read_bytes()
    (tmp_path / "maps" / "cut.dscalar.nii").write_bytes(blob[:-1000])
    csv = with_row(cohort, tmp_path, "maps/cut.dscalar.nii")
    expect_error(
        run_cli,
        convert(csv, tmp_path / "o.h5"),
        65,
        r"cut.dscalar.nii: file is truncated",
        tmp_path,
    )


@pytest.mark.parametrize("name", ["t1.nii", "t.nii.gz", "fd.mif"])
def test_cohort_mixing_data_types(run_cli, cohort, tmp_path, name):
    """CIFTI maps and a NIfTI or MRtrix file in one cohort: one line naming both types."""
    (tmp_path / name).write_bytes(b"")
    csv = with_row(cohort, tmp_path, name)
    expect_error(
        run_cli,
        convert(csv, tmp_path / "o.h5"),
        65,
        rf"cohort.csv: the cohort mixes data types: CIFTI-2 \('maps/sub-001_thickness.dscalar.nii"
        rf"'\), (NIfTI|MRtrix fixel data) \('{name}'\)",
        tmp_path,
    )


def test_cifti1(run_cli, cohort, tmp_path, template, wb_command):
    wb_command(
        "-file-convert", "-cifti-version-convert", template, "1", tmp_path / "v1.dscalar.nii"
    )
    csv = with_row(cohort, tmp_path, "v1.dscalar.nii")
    expect_error(
        run_cli, convert(csv, tmp_path / "o.h5"), 65, r"v1.dscalar.nii: is a CIFTI-1", tmp_path
    )


@pytest.mark.parametrize("kind", sorted(WRONG_TYPES))
def test_wrong_cifti_type(run_cli, cohort, tmp_path, kind):
    csv = with_row(cohort, tmp_path, str(WRONG_TYPES[kind]))
    expect_error(
        run_cli,
        convert(csv, tmp_path / "o.h5"),
        65,
        rf"{WRONG_TYPES[kind].name}: is a CIFTI [a-z -]+ \({kind}\) file",
        tmp_path,
    )


def test_multimap_without_map(run_cli, tmp_path):
    pd.DataFrame({"scalar_name": ["t"], "source_file": [str(CONTE91K)]}).to_csv(
        tmp_path / "c.csv", index=False
    )
    expect_error(
        run_cli,
        convert(tmp_path / "c.csv", tmp_path / "o.h5"),
        65,
        r"has 2 maps \('MyelinMap_BC_decurv', 'corrThickness'\); choose one with --map",
        tmp_path,
    )


@pytest.mark.parametrize(
    ("variant", "pattern"),
    [
        ("32k", r"does not match the first file .*: 60951 greyordinates, the first file has 91282"),
        (
            "shift",
            r"volume affine differs \(voxel-to-mm translation \[92.0, -126.0, -72.0\], "
            r"in the first file \[90.0, -126.0, -72.0\]\)",
        ),
        (
            "vertex",
            r"2 surface vertex indices differ, first at greyordinate 0 "
            r"\(CIFTI_STRUCTURE_CORTEX_LEFT\): 1, in the first file 0",
        ),
        ("pscalar", r"it is a pscalar file, the first file is a dscalar file"),
    ],
)
def test_greyordinates_differ(run_cli, cohort, tmp_path, geometry91k, variant, pattern):
    name = f"{variant}.dscalar.nii"
    if variant in ("shift", "vertex"):
        geometry = shifted_geometry(
            geometry91k, 2.0 if variant == "shift" else 0, swap_vertex0=variant == "vertex"
        )
        cifti.CiftiWriter(geometry).write(tmp_path / name, np.ones(91282))
        source = name
    else:
        source = str({"32k": CONTE32K, "pscalar": PSCALAR}[variant])
    csv = with_row(cohort, tmp_path, source)
    extra = ["--map", "1"] if variant in ("32k", "pscalar") else []
    expect_error(run_cli, convert(csv, tmp_path / "o.h5", *extra), 65, pattern, tmp_path)


def test_scalar_name_with_slash(run_cli, cohort, tmp_path):
    csv = with_row(cohort, tmp_path, "maps/sub-001_thickness.dscalar.nii", scalar="a/b")
    expect_error(
        run_cli, convert(csv, tmp_path / "o.h5"), 65, r"scalar name 'a/b' contains '/'", tmp_path
    )


def test_existing_output_needs_overwrite(run_cli, cohort, tmp_path):
    csv, _ = cohort
    out = tmp_path / "o.h5"
    out.write_text("precious")
    expect_error(run_cli, convert(csv, out), 73, r"o.h5: output exists; use --overwrite", tmp_path)
    assert out.read_text() == "precious"
    assert run_cli(*convert(csv, out, "--overwrite"))[0] == 0
    assert out.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"


def test_nonfinite_values_are_reported_not_refused(run_cli, tmp_path, writer91k):
    values = subject_values(2, 91282)
    values[0, :3] = np.nan
    csv = write_cohort(tmp_path, writer91k, values)
    code, _, err = run_cli(*convert(csv, tmp_path / "o.h5"))
    assert code == 0
    assert "WARNING: thickness: 1 of 2 files have non-finite values" in err
    assert "sub-001_thickness.dscalar.nii: 3" in err


@pytest.fixture
def exported_setup(run_cli, cohort, tmp_path):
    import h5py

    csv, _ = cohort
    out = tmp_path / "o.h5"
    assert run_cli(*convert(csv, out))[0] == 0
    with h5py.File(out, "a") as h5:
        h5.create_dataset("results/lm/results_matrix", data=np.ones((2, 91282)))
        h5.create_dataset(
            "results/lm/column_names", data=["a.estimate", "b.p.value"], dtype=h5py.string_dtype()
        )
    return out, csv


def test_export_cli(run_cli, exported_setup, tmp_path):
    out, csv = exported_setup
    code, _, err = run_cli(
        "export-results",
        "--analysis_name",
        "lm",
        "--input_hdf5",
        out,
        "--output_dir",
        tmp_path / "res",
        "--cohort_file",
        csv,
        "--no-compress",
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == [
        "lm_a.estimate.dscalar.nii",
        "lm_b.1m.p.value.dscalar.nii",
        "lm_b.p.value.dscalar.nii",
    ]
    code, _, err = run_cli(
        "export-results",
        "--analysis-name",
        "lm",
        "--input-hdf5",
        out,
        "--output-dir",
        tmp_path / "res",
    )
    assert code == 0 and "WARNING: Output directory exists" in err


def test_export_unknown_analysis(run_cli, exported_setup, tmp_path):
    out, _ = exported_setup
    expect_error(
        run_cli,
        [
            "export-results",
            "--analysis-name",
            "gam",
            "--input-hdf5",
            out,
            "--output-dir",
            tmp_path / "res",
        ],
        65,
        r"o.h5: no analysis 'gam' \(analyses present: lm\)",
        tmp_path,
    )


def test_export_template_mismatch(run_cli, exported_setup, tmp_path):
    out, _ = exported_setup
    expect_error(
        run_cli,
        [
            "export-results",
            "--analysis-name",
            "lm",
            "--input-hdf5",
            out,
            "--output-dir",
            tmp_path / "res",
            "--example-file",
            PSCALAR,
        ],
        65,
        r"pscalar.nii: does not match the geometry stored in .*o.h5: it is a pscalar",
        tmp_path,
    )


def test_export_missing_inputs(run_cli, tmp_path):
    expect_error(
        run_cli,
        [
            "export-results",
            "--analysis-name",
            "lm",
            "--input-hdf5",
            tmp_path / "none.h5",
            "--output-dir",
            tmp_path / "res",
        ],
        66,
        r"none.h5: HDF5 file not found",
        tmp_path,
    )
    (tmp_path / "bad.h5").write_text("not hdf5")
    expect_error(
        run_cli,
        [
            "export-results",
            "--analysis-name",
            "lm",
            "--input-hdf5",
            tmp_path / "bad.h5",
            "--output-dir",
            tmp_path / "res",
        ],
        65,
        r"bad.h5: cannot read as HDF5",
        tmp_path,
    )
