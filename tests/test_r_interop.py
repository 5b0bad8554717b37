"""R's HDF5 1.10 stack (rhdf5, hdf5r, h5dump), as ModelArray runs it, reads what GreyArray writes;
GreyArray exports what R writes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from conftest import require, subject_values, write_cohort

from greyarray.io.cohort import load_cohort
from greyarray.io.export import export_results
from greyarray.io.store import StoreOptions, to_modelarray

SCRIPT = Path(__file__).parent / "r" / "modelarray_io.R"


def rscript(*args: object) -> str:
    done = subprocess.run(
        [require("Rscript"), str(SCRIPT), *map(str, args)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def converted(tmp_path_factory, writer91k):
    folder = tmp_path_factory.mktemp("r")
    values = subject_values(12, 91282, seed=9)
    values[3, 10:20] = np.nan
    csv = write_cohort(folder, writer91k, values)
    out = folder / "data.h5"
    to_modelarray(load_cohort(csv), out, StoreOptions(nprocs=2))
    return out, values, csv


@pytest.mark.parametrize("compression", ["gzip", "lzf", "none"])
def test_r_reads_values_and_names(tmp_path, writer91k, compression):
    values = subject_values(5, 91282, seed=compression.__len__())
    csv = write_cohort(tmp_path, writer91k, values)
    out = tmp_path / "data.h5"
    to_modelarray(load_cohort(csv), out, StoreOptions(compression=compression))
    dims = rscript("read", out, "thickness", tmp_path / "v.bin").split()
    assert dims == ["91282", "5"]  # R: elements x subjects, as ModelArray expects
    seen = np.fromfile(tmp_path / "v.bin", "<f4").reshape(5, 91282)  # column-major in R
    assert np.array_equal(seen, values)
    names = (tmp_path / "v.bin.names").read_text().split("\n")[:-1]
    assert names == list(pd.read_csv(csv)["source_file"])


def test_h5dump_110_reads_values(converted, tmp_path):
    out, values, _ = converted
    done = subprocess.run(
        [
            require("h5dump"),
            "-d",
            "/scalars/thickness/values",
            "-b",
            "LE",
            "-o",
            str(tmp_path / "d.bin"),
            str(out),
        ],
        capture_output=True,
    )
    assert done.returncode == 0, done.stderr
    dumped = np.fromfile(tmp_path / "d.bin", "<f4").reshape(values.shape)
    assert np.array_equal(dumped, values, equal_nan=True)
    version = subprocess.run(["h5dump", "--version"], capture_output=True, text=True).stdout
    assert "1.10" in version


@pytest.mark.parametrize("mode", ["writeResults", "streaming"])
def test_results_written_by_r_export_exactly(converted, tmp_path, mode):
    out, _, _ = converted
    h5 = tmp_path / "data.h5"
    h5.write_bytes(out.read_bytes())
    rng = np.random.default_rng(1)
    ids = np.sort(rng.choice(91282, 3000, replace=False))  # a partial fit (element.subset)
    table = pd.DataFrame(
        {
            "element_id": ids,
            "age.estimate": rng.normal(size=ids.size),
            "age.p.value": rng.uniform(size=ids.size),
            "model.nobs": rng.integers(11, 13, ids.size),
        }
    )
    table.loc[:4, ["age.estimate", "age.p.value"]] = np.nan  # too few subjects: NA in R
    if mode == "writeResults":
        table["site"] = rng.choice(["b", "a"], ids.size)  # a factor column -> lut_forcol5
    table.to_csv(tmp_path / "res.csv", index=False, na_rep="NA", float_format="%.17g")
    rscript("write", h5, "lm", tmp_path / "res.csv", mode)
    files = {p.name for p in export_results(h5, "lm", tmp_path / "out")}
    assert "lm_age.1m.p.value.dscalar.nii" in files and "lm_element_id.dscalar.nii" not in files
    for column in ("age.estimate", "age.p.value", "model.nobs"):
        got = np.asarray(nb.load(tmp_path / "out" / f"lm_{column}.dscalar.nii").dataobj)[0]
        expected = np.full(91282, np.nan, np.float32)
        expected[ids] = table[column].to_numpy(float)
        assert np.array_equal(got, expected, equal_nan=True), column
    if mode == "writeResults":
        site = np.asarray(nb.load(tmp_path / "out" / "lm_site.dscalar.nii").dataobj)[0]
        assert np.array_equal(site[ids], np.where(table["site"] == "a", 1.0, 2.0))
