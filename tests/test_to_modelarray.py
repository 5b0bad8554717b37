"""to-modelarray: values bit for bit, ModelArray's layout, chunks, geometry and provenance."""

from __future__ import annotations

import hashlib

import h5py
import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from conftest import CONTE91K, PCONN, PSCALAR, run_greyarray, subject_values, write_cohort

from greyarray import cli
from greyarray.io import spaces, store
from greyarray.io.cohort import load_cohort
from greyarray.io.formats import cifti
from greyarray.io.store import StoreOptions, to_modelarray

N = 30


@pytest.fixture(scope="module")
def cohort30(tmp_path_factory, writer91k):
    folder = tmp_path_factory.mktemp("cohort30")
    values = subject_values(N, 91282)
    return write_cohort(folder, writer91k, values), values


@pytest.fixture(scope="module")
def converted(cohort30, tmp_path_factory):
    """The cohort converted through the command line, as a user runs it."""
    csv, values = cohort30
    out = tmp_path_factory.mktemp("out") / "thickness.h5"
    assert (
        cli.main(
            ["to-modelarray", "--cohort-file", str(csv), "--output", str(out), "--nprocs", "2"]
        )
        == 0
    )
    return out, values, csv


def test_values_bit_for_bit(converted):
    out, values, csv = converted
    with h5py.File(out, "r") as h5:
        stored = h5["scalars/thickness/values"]
        assert stored.dtype == np.float32 and stored.shape == (N, 91282)
        assert np.array_equal(stored[()], values)
        names = list(h5["scalars/thickness/column_names"].asstr()[()])
    assert names == list(pd.read_csv(csv)["source_file"])  # exactly the cohort's strings


def test_chunks_fit_modelarray_cache(converted):
    out, _, _ = converted
    with h5py.File(out, "r") as h5:
        stored = h5["scalars/thickness/values"]
        rows, width = stored.chunks
        assert rows == N and rows * width * 4 <= 2**20 and (rows * (width + 1) * 4 > 2**20)
        assert stored.compression == "gzip" and stored.compression_opts == 4 and stored.shuffle


def test_modelarrayio_layout(converted, geometry91k):
    out, _, _ = converted
    with h5py.File(out, "r") as h5:
        table = h5["greyordinates"]
        assert table.shape == (2, 91282) and table.dtype == np.int64
        assert list(table.attrs["column_names"]) == ["vertex_id", "structure_id"]
        names = list(table.attrs["structure_names"])
        axis = geometry91k.axes[0]
        assert np.array_equal(table[0], np.arange(91282))
        assert [names[c] for c in table[1]] == list(axis.name)
        assert names[0] == "CIFTI_STRUCTURE_CORTEX_LEFT" and len(names) == 21


def test_full_geometry_and_provenance(converted, geometry91k):
    out, _, csv = converted
    axis = geometry91k.axes[0]
    with h5py.File(out, "r") as h5:
        geometry = spaces.read_geometry(h5)
        assert geometry.difference(geometry91k) is None and geometry.axes[0] == axis
        group = h5["greyarray/geometry"]
        names = group.attrs["structure_names"]
        assert list(names[group["structure"][()]]) == list(axis.name)
        assert np.array_equal(group["vertex"][()], axis.vertex)
        assert np.array_equal(group["voxel_ijk"][()], axis.voxel)
        assert np.array_equal(group.attrs["volume_affine"], axis.affine)
        assert tuple(group.attrs["volume_shape"]) == (91, 109, 91)
        assert list(group.attrs["surface_vertex_counts"]) == [32492, 32492]
        prov = h5["greyarray"].attrs
        assert prov["greyarray_version"] and "to-modelarray" in prov["command_line"]
        assert prov["storage"] == "float32, gzip level 4, shuffle"
        sources = h5["greyarray/sources/thickness"]
        first = csv.parent / pd.read_csv(csv)["source_file"][0]
        assert sources["sha256"].asstr()[0] == hashlib.sha256(first.read_bytes()).hexdigest()
        assert sources["path"].asstr()[0] == str(first.resolve())
        assert list(sources["nonfinite_count"][()]) == [0] * N


@pytest.mark.parametrize(
    ("options", "label"),
    [
        ({"compression": "lzf"}, "lzf"),
        ({"compression": "none"}, "none"),
        ({"shuffle": False, "compression_level": 9}, "gzip9-noshuffle"),
        ({"dtype": "float64", "chunk_elements": 1000}, "float64"),
        ({"target_chunk_mb": 0.01, "nprocs": 1}, "tiny-chunks"),
    ],
)
def test_storage_options_round_trip(cohort30, tmp_path, options, label):
    csv, values = cohort30
    out = tmp_path / f"{label}.h5"
    to_modelarray(load_cohort(csv), out, StoreOptions(**options))
    with h5py.File(out, "r") as h5:
        stored = h5["scalars/thickness/values"]
        assert np.array_equal(stored[()], values.astype(options.get("dtype", "float32")))
        assert stored.compression == {"lzf": "lzf", "none": None}.get(label, "gzip")
        if label == "float64":
            assert stored.chunks == (N, 1000)


def test_split_files_and_wide_cohort(tmp_path, writer91k):
    values = subject_values(4, 91282, seed=7)
    write_cohort(tmp_path, writer91k, values[:2], scalar="alff", csv_name="a.csv")
    write_cohort(tmp_path, writer91k, values[2:], scalar="reho", csv_name="b.csv")
    wide = pd.DataFrame(
        {
            "participant_id": ["sub-001", "sub-002"],
            "alff": ["maps/sub-001_alff.dscalar.nii", "maps/sub-002_alff.dscalar.nii"],
            "reho": ["maps/sub-001_reho.dscalar.nii", "maps/sub-002_reho.dscalar.nii"],
        }
    )
    wide.to_csv(tmp_path / "wide.csv", index=False)
    cohort = load_cohort(tmp_path / "wide.csv", ["alff", "reho"])
    paths = to_modelarray(cohort, tmp_path / "out" / "data.h5", StoreOptions(), split=True)
    assert [p.name for p in paths] == ["alff_data.h5", "reho_data.h5"]
    for path, expected in zip(paths, (values[:2], values[2:]), strict=True):
        with h5py.File(path, "r") as h5:
            (scalar,) = h5["scalars"]
            assert np.array_equal(h5[f"scalars/{scalar}/values"][()], expected)
    combined = to_modelarray(cohort, tmp_path / "all.h5", StoreOptions())
    with h5py.File(combined[0], "r") as h5:
        assert sorted(h5["scalars"]) == ["alff", "reho"]


def test_map_selection_from_multimap_files(tmp_path):
    pd.DataFrame(
        {"scalar_name": ["t", "t"], "source_file": [str(CONTE91K), "conte_copy.dscalar.nii"]}
    ).to_csv(tmp_path / "c.csv", index=False)
    (tmp_path / "conte_copy.dscalar.nii").write_bytes(CONTE91K.read_bytes())
    expected = np.asarray(nb.load(CONTE91K).dataobj)
    for wanted, row in (("corrThickness", 1), ("1", 0)):
        out = tmp_path / f"{wanted}.h5"
        to_modelarray(load_cohort(tmp_path / "c.csv"), out, StoreOptions(), wanted_map=wanted)
        with h5py.File(out, "r") as h5:
            assert np.array_equal(h5["scalars/t/values"][()], expected[[row, row]])
            assert (
                list(h5["greyarray/sources/t/map_name"].asstr()[()])
                == [["MyelinMap_BC_decurv", "corrThickness"][row]] * 2
            )


@pytest.mark.parametrize("path", [PSCALAR, PCONN], ids=["pscalar", "pconn"])
def test_parcellated_round_trip(tmp_path, path):
    geometry = cifti.read_file(path).geometry
    values = subject_values(5, geometry.n_elements, seed=11)
    csv = write_cohort(tmp_path, cifti.CiftiWriter(geometry), values)
    out = tmp_path / "p.h5"
    to_modelarray(load_cohort(csv), out, StoreOptions())
    names = list(geometry.axes[0].name)
    with h5py.File(out, "r") as h5:
        assert np.array_equal(h5["scalars/thickness/values"][()], values)
        if geometry.kind == "pscalar":
            assert list(h5["parcels/parcel_id"].asstr()[()]) == names
        else:
            assert list(h5["parcels/parcel_id_from"].asstr()[()]) == names
            assert list(h5["parcels/parcel_id_to"].asstr()[()]) == list(geometry.axes[1].name)
        assert "greyordinates" not in h5
        assert spaces.read_geometry(h5).axes == geometry.axes
    # pconn elements are the row-major flattening of nibabel's (rows, cols) matrix
    first = np.asarray(nb.load(csv.parent / pd.read_csv(csv)["source_file"][0]).dataobj)
    assert np.array_equal(first.ravel(), values[0])


def test_overwrite_names_the_results_it_removes(tmp_path):
    """--overwrite replaces the whole file, results included (as documented): one warning
    names the analyses removed."""
    geometry = cifti.read_file(PSCALAR).geometry
    csv = write_cohort(
        tmp_path, cifti.CiftiWriter(geometry), subject_values(3, geometry.n_elements)
    )
    out = tmp_path / "p.h5"
    assert run_greyarray("to-modelarray", "--cohort-file", csv, "--output", out).returncode == 0
    with h5py.File(out, "a") as h5:
        h5.create_group("results/lm")
        h5.create_group("results/gam")
    done = run_greyarray("to-modelarray", "--cohort-file", csv, "--output", out, "--overwrite")
    assert done.returncode == 0, done.stderr
    (line,) = [x for x in done.stderr.splitlines() if "--overwrite replaces it" in x]
    assert line.startswith("WARNING: ") and "with its results (gam, lm)" in line
    with h5py.File(out) as h5:
        assert "results" not in h5


def test_nonfinite_values_are_counted_and_reported(tmp_path, writer91k, caplog):
    values = subject_values(3, 91282, seed=5)
    values[1, :7] = np.nan
    values[2, 100] = np.inf
    csv = write_cohort(tmp_path, writer91k, values)
    out = tmp_path / "nan.h5"
    to_modelarray(load_cohort(csv), out, StoreOptions())
    with h5py.File(out, "r") as h5:
        assert list(h5["greyarray/sources/thickness/nonfinite_count"][()]) == [0, 7, 1]
        assert np.array_equal(h5["scalars/thickness/values"][()], values, equal_nan=True)
    assert "2 of 3 files have non-finite values" in caplog.text
    assert "sub-002_thickness.dscalar.nii: 7" in caplog.text


def test_values_exact_across_many_stripes(cohort30, tmp_path, monkeypatch):
    """With a stripe budget far below the matrix size (memory bounded whatever N), values are
    still exact: stripe and chunk edges are handled."""
    csv, values = cohort30
    monkeypatch.setattr(store, "STRIPE_BYTES", 3 * 2**20)  # matrix is 11 MB -> several stripes
    out = tmp_path / "striped.h5"
    to_modelarray(load_cohort(csv), out, StoreOptions(target_chunk_mb=0.25, nprocs=2))
    with h5py.File(out, "r") as h5:
        assert np.array_equal(h5["scalars/thickness/values"][()], values)


def test_same_file_whatever_nprocs(cohort30, tmp_path):
    csv, _ = cohort30
    outs = []
    for nprocs in (1, 2):
        out = tmp_path / f"n{nprocs}.h5"
        to_modelarray(load_cohort(csv), out, StoreOptions(nprocs=nprocs))
        with h5py.File(out, "r") as h5:
            dset = h5["scalars/thickness/values"]
            outs.append(
                [dset.id.read_direct_chunk((0, c))[1] for c in range(0, 91282, dset.chunks[1])]
            )
    assert outs[0] == outs[1]
