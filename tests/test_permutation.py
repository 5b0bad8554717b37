"""fit-lm --permutations: against PALM (live, and stored exhaustive runs made by
tests/palm/make_fixtures.py), an independent Freedman-Lane refit per permutation, and a slow
obviously-correct TFCE (explicit thresholds, connected components by breadth-first search)."""

from __future__ import annotations

import itertools
import os
from collections import deque
from pathlib import Path

import h5py
import nibabel as nb
import numpy as np
import palm_reference
import pandas as pd
import pytest
from conftest import require
from scipy import stats
from test_lm import make_h5, read_results

from greyarray import cli
from greyarray.io import mesh
from greyarray.stats import design as design_layer
from greyarray.stats import lm, permutation, tfce
from greyarray.stats.permutation import PermutationOptions, PermutationSet

PALM_DATA = Path(__file__).parent / "data" / "palm"


def fit(folder: Path, phenotypes, values, formula, **options) -> pd.DataFrame:
    """fit-lm with permutations, every element fitted (no ModelArray threshold). The HDF5
    keeps the cohort's order (make_h5 stores rows reversed: give it them reversed), so the
    design's rows are in the order PALM gets them."""
    h5 = make_h5(folder, phenotypes.iloc[::-1], np.asarray(values)[::-1])
    lm.fit_lm(
        h5,
        folder / "cohort.csv",
        formula,
        "lm",
        lthr_abs=0,
        lthr_rel=0,
        overwrite=True,
        permutations=PermutationOptions(**options),
    )
    return read_results(h5)


def cohort(rng, n: int, **columns) -> pd.DataFrame:
    table = pd.DataFrame({"source_file": [f"s{i:03d}" for i in range(n)]})
    table["age"] = rng.uniform(20, 70, n).round(1)
    return table.assign(**columns)


def float32(values: np.ndarray) -> np.ndarray:
    """What the (float32) HDF5 stores, so that PALM sees the same numbers."""
    return values.astype(np.float32).astype(np.float64)


# -- slow references ---------------------------------------------------------------------


def components(above: np.ndarray, neighbours: list[list[int]]) -> list[list[int]]:
    """Connected components of the elements where ``above`` is true (breadth-first search)."""
    seen, found = np.zeros(above.size, bool), []
    for start in np.flatnonzero(above):
        if seen[start]:
            continue
        seen[start], queue, component = True, deque([start]), [start]
        while queue:
            for other in neighbours[queue.popleft()]:
                if above[other] and not seen[other]:
                    seen[other] = True
                    queue.append(other)
                    component.append(other)
        found.append(component)
    return found


def slow_tfce(values, edges, weight, exponent, steps: int | None = None, height=2.0):
    """TFCE by explicit thresholds: every distinct value (the exact integral, piece by piece),
    or PALM's ``steps`` thresholds dh, 2 dh, ..., max (dh = max / steps, right-endpoint sum)."""
    neighbours = [[] for _ in values]
    for a, b in edges:
        neighbours[a].append(b)
        neighbours[b].append(a)
    out = np.zeros(values.size)
    if steps is None:
        levels = np.append(np.unique(values[values > 0])[::-1], 0.0)
        pieces = [
            (hi, (hi ** (height + 1) - lo ** (height + 1)) / (height + 1))
            for hi, lo in itertools.pairwise(levels)
        ]
    else:
        dh = np.nanmax(values) / steps
        pieces = [(k * dh, (k * dh) ** height * dh) for k in range(1, steps + 1)]
    for level, integral in pieces:
        for component in components(values >= level, neighbours):
            out[component] += weight[component].sum() ** exponent[component[0]] * integral
    return out


def brute_force_t(x: np.ndarray, y: np.ndarray, term: int, units, pi, kept_units) -> float:
    """|t| of column ``term`` after Freedman-Lane by hand: residuals of the nuisance model by
    lstsq, unit b's residuals moved to the rows of unit pi[b] (units restricted to those kept,
    in their relative order), full model refitted by lstsq."""
    kept = sorted(kept_units)
    order = [b for b in pi if b in kept_units]
    target = dict(zip(kept, order, strict=True))
    rows = np.sort(np.concatenate([units[b] for b in kept]))
    local = {r: i for i, r in enumerate(rows)}
    xs, ys = x[rows], y[rows]
    z = np.delete(xs, term, axis=1)
    u = ys - z @ np.linalg.lstsq(z, ys, rcond=None)[0]
    moved = np.empty_like(u)
    for b in kept:
        for source, dest in zip(units[b], units[target[b]], strict=True):
            moved[local[dest]] = u[local[source]]
    beta, rss, *_ = np.linalg.lstsq(xs, moved, rcond=None)
    df = len(rows) - xs.shape[1]
    return abs(beta[term]) / np.sqrt(rss[0] / df * np.linalg.inv(xs.T @ xs)[term, term])


def z_of(t: float, df: int) -> float:
    return stats.norm.isf(stats.t.sf(t, df))


# -- PALM ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def palm_live(tmp_path_factory):
    """Small cases PALM runs in seconds, all in one Octave session: exhaustive (6! = 720) with
    continuous covariates; a binary term (10 choose 5 = 252 distinct rearrangements); whole
    blocks (6 participants x 2 sessions); TFCE scores on a patch of the fsLR midthickness."""
    require("octave-cli")
    palm_reference.require_palm()
    rng = np.random.default_rng(11)
    cases = {}
    ph = cohort(rng, 6, w=rng.normal(0, 1, 6).round(3))
    cases["free"] = (ph, "y ~ age + w", None, float32(rng.normal(0, 1, (6, 8))))
    ph = cohort(rng, 10, g=["a", "b"] * 5)
    cases["ties"] = (ph, "y ~ g + age", None, float32(rng.normal(0, 1, (10, 8))))
    participant = rng.permutation(np.repeat(np.arange(1, 7), 2))
    ph = cohort(rng, 12, participant_id=participant, group=np.where(participant % 2, "a", "b"))
    cases["blocks"] = (ph, "y ~ age + group", participant, float32(rng.normal(0, 1, (12, 8))))
    analyses = []
    for name, (ph, formula, blocks, values) in cases.items():
        design = design_layer.build_design(formula, ph)
        contrasts = np.eye(design.matrix.shape[1])[1:]
        analyses.append(
            palm_reference.Analysis(name, values, design.matrix, contrasts, blocks=blocks)
        )
    coords, faces, _ = surface_patch(120)
    x = rng.normal(0, 1, 8)
    values = rng.normal(0, 1, (8, len(coords))) + np.outer(x, np.sin(coords[:, 0] / 3)) * 1.5
    design = np.column_stack([np.ones(8), x])
    analyses.append(
        palm_reference.Analysis(
            "tfce",
            values,
            design,
            np.array([[0, 1]]),
            ("-T", "-tfce2D"),
            surface=(coords, faces),
            permutations=2,  # only the scores are compared; PALM's TFCE takes ~20 ms a map
        )
    )
    mask, volume = small_volume(rng, x)
    volumes = palm_reference.has_image_package()
    for connectivity in (6, 18, 26) if volumes else ():  # PALM's default (6) without option
        options = ("-T",) if connectivity == 6 else ("-T", "-tfce_C", str(connectivity))
        analyses.append(
            palm_reference.Analysis(
                f"tfce{connectivity}",
                volume,
                design,
                np.array([[0, 1]]),
                options,
                volume=mask,
                permutations=2,
            )
        )
    folder = tmp_path_factory.mktemp("palm")
    palm_reference.run(folder, analyses)
    return folder, cases, (coords, faces, values, design), (mask, volume)


def small_volume(rng, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 7 x 6 x 5 mask with a hole and a missing corner, and 8 subjects' values with an
    effect of ``x`` in a blob."""
    shape = (7, 6, 5)
    mask = np.ones(shape, bool)
    mask[0, 0, :] = False
    mask[3, 2, 2] = False
    grid = np.indices(shape)
    blob = np.exp(-((grid[0] - 4) ** 2 + (grid[1] - 2) ** 2 + (grid[2] - 2) ** 2) / 5)
    values = rng.normal(0, 1, (8, int(mask.sum()))) + np.outer(x, blob[mask]) * 1.5
    return mask, values


def surface_patch(size: int, centre: int = 5000):
    """A patch of the left midthickness around ``centre``: coordinates, triangles (patch
    indices) and the fsLR vertex numbers."""
    surface = mesh.surface("L", "midthickness")
    neighbours = [[] for _ in range(len(surface.coords))]
    for a, b in mesh.edges(surface.faces):
        neighbours[a].append(b)
        neighbours[b].append(a)
    chosen, queue = {centre}, deque([centre])
    while len(chosen) < size:
        for other in neighbours[queue.popleft()]:
            if other not in chosen and len(chosen) < size:
                chosen.add(other)
                queue.append(other)
    vertices = np.array(sorted(chosen))
    lookup = np.full(len(surface.coords), -1)
    lookup[vertices] = np.arange(vertices.size)
    faces = lookup[surface.faces[np.isin(surface.faces, vertices).all(axis=1)]]
    return surface.coords[vertices].astype(np.float64), faces, vertices


@pytest.mark.parametrize("name", ["free", "ties", "blocks"])
def test_fwe_equals_palm_live(palm_live, tmp_path, name):
    """Exhaustive permutations: the same p-values as PALM, within its CSV's 4 decimals."""
    folder, cases, *_ = palm_live
    ph, formula, blocks, values = cases[name]
    ours = fit(
        tmp_path,
        ph,
        values,
        formula,
        permutations=1000,
        blocks="participant_id" if blocks is not None else None,
    )
    terms = design_layer.build_design(formula, ph).columns[1:]
    for i, term in enumerate(terms):
        if name == "ties" and term == "age":
            continue  # 10! > 1000: random permutations, which no two programs draw alike
        palm = palm_reference.read(folder, name, "dat_tstat_fwep", i + 1)
        assert np.abs(ours[f"{term}.p.value.fwe"] - palm).max() < 1e-4, term


def test_tfce_scores_against_palm_live(palm_live):
    """PALM's TFCE is a 100-step sum over |z|: the slow reference with those steps matches it
    (same neighbours, areas, H, E, t -> z); ours is the exact integral, which differs from the
    sum by less than the bound of a Riemann sum: 3 dh e^E h^H at most per element."""
    folder, _, (coords, faces, values, design), _ = palm_live
    palm = palm_reference.read(folder, "tfce", "tfce_tstat", 1)
    beta, rss, *_ = np.linalg.lstsq(design, values, rcond=None)
    df = len(values) - 2
    t = np.abs(beta[1]) / np.sqrt(rss / df * np.linalg.inv(design.T @ design)[1, 1])
    z = np.array([z_of(v, df) for v in t])
    areas = np.bincount(
        faces.ravel(), weights=np.repeat(tri_areas(coords, faces) / 3, 3), minlength=len(coords)
    )
    edges = mesh.edges(faces)
    ones = np.ones(len(coords))
    discrete = slow_tfce(z, edges, areas, ones, steps=100)
    assert np.abs(discrete - palm).max() <= 1e-6 * palm.max()
    graph = tfce.from_edges(len(coords), edges, areas, ones)
    ours = tfce.tfce(permutation.to_z(t, df), graph)
    bound = 3 * z.max() / 100 * areas.sum() * z**2
    assert (np.abs(ours - palm) <= bound).all()
    assert np.abs(ours - palm).max() > 1e-3 * palm.max()  # they are different sums


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_volume_tfce_against_palm_live(palm_live, run_cli, tmp_path, connectivity):
    """TFCE on NIfTI voxels with PALM's volume settings (H = 2, E = 0.5; 6 neighbours by
    default, 18 or 26 with --tfce-connectivity): PALM's 100-step sum equals the slow reference
    on GreyArray's voxel graph, and fit-lm's <term>.tfce on the converted maps (the exact
    integral) is within that sum's bound of PALM's."""
    import nibabel

    folder, _, (_, _, _, design), (mask, volume) = palm_live
    if not list(folder.glob(f"tfce{connectivity}_*")):
        message = (
            "Octave's image package (octave-image) is missing: PALM cannot run TFCE on volumes"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    palm = palm_reference.read_volume(folder, f"tfce{connectivity}", "tfce_tstat", 1, mask)
    nibabel.save(nibabel.Nifti1Image(mask.astype(np.uint8), np.eye(4)), tmp_path / "mask.nii")
    rows = []
    for i, subject in enumerate(volume):
        data = np.zeros(mask.shape, np.float32)
        data[mask] = subject
        nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), tmp_path / f"s{i}.nii.gz")
        rows.append({"scalar_name": "y", "source_file": f"s{i}.nii.gz", "x": design[i, 1]})
    pd.DataFrame(rows).to_csv(tmp_path / "cohort.csv", index=False)
    h5, csv = tmp_path / "y.h5", tmp_path / "cohort.csv"
    convert = ["to-modelarray", "--cohort-file", csv, "--output", h5]
    assert run_cli(*convert, "--mask", tmp_path / "mask.nii")[0] == 0
    fit = ["fit-lm", "--input-hdf5", h5, "--cohort-file", csv, "--formula", "y ~ x"]
    fit += ["--num-subj-lthr-abs", "0", "--permutations", "2", "--tfce"]
    code, _, err = run_cli(*fit, "--tfce-connectivity", str(connectivity))
    assert code == 0, err
    ours = read_results(h5)["x.tfce"].to_numpy()
    stored = volume.astype(np.float32).astype(float)
    beta, rss, *_ = np.linalg.lstsq(design, stored, rcond=None)
    df = len(volume) - 2
    t = np.abs(beta[1]) / np.sqrt(rss / df * np.linalg.inv(design.T @ design)[1, 1])
    z = permutation.to_z(t, df)
    with h5py.File(h5) as file:
        graph = tfce.element_graph(file, connectivity)
    source = np.repeat(np.arange(graph.size), np.diff(graph.indptr))
    edges = np.column_stack([source, graph.indices])[source < graph.indices]
    discrete = slow_tfce(z, edges, np.ones(graph.size), np.full(graph.size, 0.5), steps=100)
    assert np.abs(discrete - palm).max() <= 1e-5 * palm.max()
    bound = 3 * z.max() / 100 * np.sqrt(graph.size) * z**2
    assert (np.abs(ours - palm) <= bound).all()
    assert np.diff(graph.indptr).max() == connectivity  # an inner voxel has all its neighbours


def tri_areas(coords, faces):
    corners = coords[faces]
    cross = np.cross(corners[:, 0] - corners[:, 2], corners[:, 1] - corners[:, 2])
    return np.linalg.norm(cross, axis=1) / 2


@pytest.mark.parametrize("name", ["exhaustive", "blocks"])
def test_fwe_equals_stored_palm(tmp_path, name):
    """8! = 40,320 permutations (PALM: ~3 min each): free, and whole blocks of 2 sessions with
    a between-participant group (70 distinct rearrangements of tied blocks)."""
    folder = PALM_DATA / name
    ph = pd.read_csv(folder / "cohort.csv")
    values = pd.read_csv(folder / "values.csv").to_numpy()
    blocks = "participant_id" if "participant_id" in ph.columns else None
    formula = (folder / "formula.txt").read_text().strip()
    ours = fit(tmp_path, ph, values, formula, permutations=50000, blocks=blocks)
    palm = pd.read_csv(folder / "palm_fwep.csv")
    for term in palm.columns:
        assert np.abs(ours[f"{term}.p.value.fwe"] - palm[term]).max() < 1e-4, term


# -- independent refits ----------------------------------------------------------------------


@pytest.mark.parametrize("blocks", [None, "participant_id"])
def test_equals_brute_force_refits(tmp_path, blocks):
    """Every permutation refitted by lstsq, missing values included (each element with its own
    subjects; with blocks, a participant with a missing session is left out of that element),
    maxima of |z| over elements, FWE p-values counted by hand."""
    rng = np.random.default_rng(5)
    participant = np.repeat(np.arange(12), 2)
    ph = cohort(rng, 24, participant_id=participant, sex=rng.choice(["F", "M"], 24))
    values = float32(rng.normal(0, 1, (24, 7)) + 0.03 * ph["age"].to_numpy()[:, None])
    values[3, 1] = np.nan
    values[[0, 5, 17], 2] = np.nan
    values[[5, 17], 3] = np.nan
    values[[2, 3], 4] = np.nan  # a whole participant
    ours = fit(tmp_path, ph, values, "y ~ age + sex", permutations=60, blocks=blocks, seed=3)
    design = design_layer.build_design("y ~ age + sex", ph)
    units = permutation.exchangeable_units(ph, design.rows, blocks, "cohort")
    for term in (1, 2):
        signature = permutation.unit_signatures(design.matrix[:, term], units)
        perms = np.concatenate(list(PermutationSet(signature, 60, 3).batches(0, 99)))
        assert len(perms) == 60
        scores = np.zeros((60, values.shape[1]))
        for e in range(values.shape[1]):
            observed = np.isfinite(values[:, e])
            kept = {b for b, members in enumerate(units) if observed[members].all()}
            rows = np.concatenate([units[b] for b in sorted(kept)])
            df = len(rows) - 3
            for k, pi in enumerate(perms):
                t = brute_force_t(design.matrix, values[:, e], term, units, pi, kept)
                scores[k, e] = z_of(t, df)
        maxima = scores.max(axis=1)
        expected = [(maxima >= s * (1 - 1e-10)).mean() for s in scores[0]]
        name = design.columns[term]
        assert np.allclose(ours[f"{name}.p.value.fwe"], expected, rtol=0, atol=1e-12), name
        assert 0 < np.min(expected) < 1


def test_statistics_equal_brute_force(tmp_path):
    """The batched |t| of one batch, element by element and permutation by permutation."""
    rng = np.random.default_rng(9)
    ph = cohort(rng, 15, sex=rng.choice(["F", "M"], 15))
    values = float32(rng.normal(0, 1, (15, 5)))
    values[[1, 4], 2] = np.nan
    h5 = make_h5(tmp_path, ph.iloc[::-1], values[::-1])  # stored in the cohort's order
    design = design_layer.build_design("y ~ age * sex", ph)
    units = permutation.exchangeable_units(ph, design.rows, None, "cohort")
    with h5py.File(h5) as file:
        problem = permutation.load_problem(file["scalars/y/values"], design, units, 0, {})
    for term in range(1, 4):
        fits = permutation.fit_term(problem, term)
        signature = permutation.unit_signatures(design.matrix[:, term], units)
        perms = next(PermutationSet(signature, 500, 1).batches(0, 1))
        t = permutation.batch_t(problem, fits, perms)
        for e in range(values.shape[1]):
            kept = set(np.flatnonzero(np.isfinite(values[:, e])))
            for k in range(0, len(perms), 7):
                expected = brute_force_t(design.matrix, values[:, e], term, units, perms[k], kept)
                assert np.isclose(t[k, e], expected, rtol=1e-10)


# -- permutation sets ----------------------------------------------------------------------


def test_permutation_sets():
    distinct = np.arange(5)
    full = np.concatenate(list(PermutationSet(distinct, 120, 0).batches(0, 99)))
    assert len(full) == 120 and len({p.tobytes() for p in full}) == 120  # 5! exhaustive
    assert (full[0] == distinct).all()
    drawn = np.concatenate(list(PermutationSet(distinct, 119, 4).batches(0, 99)))
    assert len(drawn) == 119 and len({p.tobytes() for p in drawn}) == 119  # random, distinct
    assert (drawn[0] == distinct).all() and not PermutationSet(distinct, 119, 4).exhaustive
    again = np.concatenate(list(PermutationSet(distinct, 119, 4).batches(0, 99)))
    other = np.concatenate(list(PermutationSet(distinct, 119, 5).batches(0, 99)))
    assert (again == drawn).all() and not (other == drawn).all()  # the seed decides
    tied = np.array([0, 1, 0, 1, 1])
    ties = np.concatenate(list(PermutationSet(tied, 10, 0).batches(0, 99)))
    assert len(ties) == 10 and len({tied[p].tobytes() for p in ties}) == 10  # 5! / (2! 3!)
    big = PermutationSet(np.arange(7), 5040, 0)  # 7! = 5040: several batches; shards split them
    whole = np.concatenate(list(big.batches(0, big.n_batches)))
    cuts = [0, big.n_batches // 3, big.n_batches // 2, big.n_batches]
    parts = [np.concatenate(list(big.batches(a, b))) for a, b in itertools.pairwise(cuts)]
    assert len({p.tobytes() for p in whole}) == 5040 and (np.concatenate(parts) == whole).all()


def test_blocks_must_have_one_size():
    ph = pd.DataFrame({"participant_id": ["a", "a", "b", "b", "c"]})
    with pytest.raises(permutation.DataError, match="blocks of one size.*'c': 1"):
        permutation.exchangeable_units(ph, np.arange(5), "participant_id", "cohort.csv")
    units = permutation.exchangeable_units(ph.iloc[:4], np.arange(4), "participant_id", "c")
    assert units.tolist() == [[0, 1], [2, 3]]


# -- TFCE ----------------------------------------------------------------------------------


def test_tfce_is_the_exact_integral():
    """Against the slow reference on a graph with area-weighted (E = 1) and counted (E = 0.5)
    parts, ties, NaN and negative values; and PALM-style sums converge to it."""
    rng = np.random.default_rng(0)
    n = 80
    edges = [(i, i + 1) for i in range(n - 1) if i != 39] + [
        (i, i + 5) for i in range(n - 5) if i < 35 or i >= 40
    ]
    weight = np.where(np.arange(n) < 40, rng.uniform(0.5, 2, n), 1.0)
    exponent = np.where(np.arange(n) < 40, 1.0, 0.5)
    values = rng.normal(1, 1.5, n).round(1)  # rounding makes ties
    values[[3, 50]] = np.nan
    graph = tfce.from_edges(n, np.array(edges), weight, exponent)
    ours = tfce.tfce(values, graph)
    exact = slow_tfce(values, edges, weight, exponent)
    assert np.abs(ours - exact).max() <= 1e-12 * exact.max()
    assert (ours[~(values > 0)] == 0).all()
    fine = slow_tfce(values, edges, weight, exponent, steps=4000)
    assert np.abs(fine - exact).max() < 2e-3 * exact.max()


def test_tfce_fwe_equals_brute_force():
    """TFCE FWE p-values on a 30-vertex patch, 5 subjects (all 120 permutations): refits by
    lstsq, |z|, the slow TFCE of every permutation, maxima, counts."""
    coords, faces, _ = surface_patch(30)
    areas = np.bincount(
        faces.ravel(), weights=np.repeat(tri_areas(coords, faces) / 3, 3), minlength=30
    )
    edges = mesh.edges(faces)
    graph = tfce.from_edges(30, edges, areas, np.ones(30))
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, 5)
    values = rng.normal(0, 1, (5, 30)) + np.outer(x, np.sin(coords[:, 1] / 4)) * 2
    design = np.column_stack([np.ones(5), x])
    everyone = np.arange(5)[:, None]
    problem = permutation.Problem(
        values,
        design,
        ["Intercept", "x"],
        everyone,
        [permutation.Pattern(np.packbits(np.ones(5, np.uint8)), 5, np.arange(30))],
        30,
        "",
    )
    (term,) = permutation.tested_terms(problem, PermutationOptions(1000))
    engine = permutation.Engine(problem, graph, nprocs=1)
    _, tfce_maxima = engine.null(term, 0, term.permutations.n_batches)
    _, scores = engine.observed(term)
    residuals = values - values.mean(axis=0)  # the nuisance is the intercept
    slow = []
    for pi in np.concatenate(list(term.permutations.batches(0, 99))):
        moved = np.empty_like(residuals)
        moved[pi] = residuals  # subject b's residuals go to subject pi[b]'s row
        beta, rss, *_ = np.linalg.lstsq(design, moved, rcond=None)
        t = np.abs(beta[1]) / np.sqrt(rss / 3 * np.linalg.inv(design.T @ design)[1, 1])
        slow.append(slow_tfce(stats.norm.isf(stats.t.sf(t, 3)), edges, areas, np.ones(30)))
    slow = np.array(slow)
    assert len(slow) == 120
    assert np.allclose(scores, slow[0], rtol=1e-9)
    assert np.allclose(tfce_maxima, slow.max(axis=1), rtol=1e-9)
    expected = [(slow.max(axis=1) >= s * (1 - 1e-10)).mean() for s in slow[0]]
    assert np.array_equal(permutation.fwe_p(scores, tfce_maxima), expected)


# -- the command line ----------------------------------------------------------------------


@pytest.fixture
def small_cohort(tmp_path):
    """12 maps (6 participants x 2 sessions) on a small greyordinate geometry (two cortical
    patches, two touching subcortical structures), a few missing values, converted by
    to-modelarray: (HDF5, cohort CSV)."""
    from nibabel import cifti2

    mask = np.zeros((8, 8, 8), bool)
    mask[1:4, 1:4, 1:4] = True
    other = np.roll(mask, 3, axis=0)  # touches the first block, but is another structure
    axis = (
        cifti2.BrainModelAxis.from_surface(surface_patch(150)[2], 32492, "CortexLeft")
        + cifti2.BrainModelAxis.from_surface(surface_patch(60, 8000)[2], 32492, "CortexRight")
        + cifti2.BrainModelAxis.from_mask(mask, "ThalamusLeft", np.eye(4))
        + cifti2.BrainModelAxis.from_mask(other, "CaudateLeft", np.eye(4))
    )
    rng = np.random.default_rng(4)
    rows = []
    for i in range(12):
        age = rng.uniform(20, 70)
        values = rng.normal(0, 1, len(axis)) + 0.05 * age * (np.arange(len(axis)) < 100)
        values[[7, 8]] = np.nan if i == 3 else values[[7, 8]]
        name = f"sub-{i // 2}_ses-{i % 2}.dscalar.nii"
        image = nb.Cifti2Image(values[None].astype(np.float32), (cifti2.ScalarAxis(["t"]), axis))
        nb.save(image, tmp_path / name)
        rows.append((name, f"sub-{i // 2}", age, "FM"[i // 2 % 2]))
    csv = tmp_path / "cohort.csv"
    pd.DataFrame(rows, columns=["source_file", "participant_id", "age", "sex"]).assign(
        scalar_name="thickness"
    ).to_csv(csv, index=False)
    h5 = tmp_path / "t.h5"
    assert cli.main(["to-modelarray", "--cohort-file", str(csv), "--output", str(h5)]) == 0
    return h5, csv


def fit_args(h5, csv, *more) -> list:
    return [
        "fit-lm",
        "--input-hdf5",
        h5,
        "--cohort-file",
        csv,
        "--formula",
        "thickness ~ age + sex",
        "--num-subj-lthr-abs",
        "0",
        "--permutations",
        "100",
        "--tfce",
        "--seed",
        "7",
        "--exchangeability-blocks",
        "participant_id",
        *more,
    ]


def test_cli_columns_export_and_shards(small_cohort, run_cli, tmp_path):
    """New columns after ModelArray's, exported by export-results; three shards merged give
    exactly the one-run result; the seed decides the random permutations."""
    h5, csv = small_cohort
    assert run_cli(*fit_args(h5, csv, "--nprocs", "2"))[0] == 0
    one_run = read_results(h5)
    added = [
        f"{t}.{s}" for t in ("age", "sexM") for s in ("p.value.fwe", "tfce", "tfce.p.value.fwe")
    ]
    assert list(one_run.columns[-6:]) == added
    assert list(one_run.columns[:-6]) == [
        "element_id",
        *lm.output_columns(design_layer.build_design("y ~ age + sex", pd.read_csv(csv)))[1:],
    ]
    assert one_run["age.tfce.p.value.fwe"].iloc[:100].min() <= 0.05  # the age effect
    assert one_run.loc[[7, 8], added].notna().all().all()  # missing in one map: still fitted
    assert (one_run[added].min() >= 0).all() and (one_run.filter(like="fwe").max() <= 1).all()

    assert (
        run_cli(
            "export-results",
            "--analysis-name",
            "lm",
            "--input-hdf5",
            h5,
            "--output-dir",
            tmp_path / "maps",
        )[0]
        == 0
    )
    for column in added:
        exported = nb.load(tmp_path / "maps" / f"lm_{column}.dscalar.nii").get_fdata()[0]
        assert np.allclose(exported, one_run[column].astype(np.float32), equal_nan=True)
    assert (tmp_path / "maps" / "lm_age.tfce.1m.p.value.fwe.dscalar.nii").exists()

    shards = []
    for i in (1, 2, 3):
        code, _, err = run_cli(
            *fit_args(
                h5,
                csv,
                "--analysis-name",
                "split",
                "--permutation-shard",
                f"{i}/3",
                "--nprocs",
                "1",
            )
        )
        assert code == 0, err
        shards.append(h5.with_name(f"t.split.perm-shard-{i}-of-3.npz"))
    with h5py.File(h5) as file:
        assert "split" not in file["results"]  # shards write no results
    code, _, err = run_cli(
        *fit_args(h5, csv, "--analysis-name", "split", "--merge-shards", *shards)
    )
    assert code == 0, err
    merged = read_results(h5, "split")
    assert np.array_equal(merged.to_numpy(), one_run.to_numpy(), equal_nan=True)

    assert run_cli(*fit_args(h5, csv, "--analysis-name", "other"), "--seed", "8")[0] == 0
    other = read_results(h5, "other")
    assert not np.array_equal(other["age.p.value.fwe"], one_run["age.p.value.fwe"])
    # sexM is constant within participants: 6! / (3! 3!) = 20 rearrangements, all of them
    assert np.array_equal(other["sexM.p.value.fwe"], one_run["sexM.p.value.fwe"])


def test_cli_errors(small_cohort, run_cli, tmp_path):
    h5, csv = small_cohort
    base = ["fit-lm", "--input-hdf5", h5, "--cohort-file", csv, "--formula", "thickness ~ age"]
    code, _, err = run_cli(*base, "--tfce")
    assert code == 64 and "--tfce needs --permutations N > 0" in err
    code, _, err = run_cli(*base, "--permutations", "9", "--permutation-shard", "4/3")
    assert code == 64 and "between 1 and K" in err
    pd.read_csv(csv).iloc[1:].to_csv(tmp_path / "odd.csv", index=False)
    h5_odd = tmp_path / "odd.h5"
    assert (
        run_cli("to-modelarray", "--cohort-file", tmp_path / "odd.csv", "--output", h5_odd)[0] == 0
    )
    code, _, err = run_cli(
        "fit-lm",
        "--input-hdf5",
        h5_odd,
        "--cohort-file",
        tmp_path / "odd.csv",
        "--formula",
        "thickness ~ age",
        "--permutations",
        "9",
        "--exchangeability-blocks",
        "participant_id",
    )
    assert code == 65 and "blocks of one size" in err and "'sub-0': 1" in err
    assert run_cli(*fit_args(h5, csv, "--permutation-shard", "1/2"))[0] == 0
    shard = h5.with_name("t.lm.perm-shard-1-of-2.npz")
    code, _, err = run_cli(*fit_args(h5, csv, "--merge-shards", shard))
    assert code == 65 and "shard(s) [2] of 2 missing" in err
    code, _, err = run_cli(*fit_args(h5, csv, "--merge-shards", shard), "--seed", "1")
    assert code == 65 and "made from other data or options" in err
    (tmp_path / "plain").mkdir()
    plain = make_h5(tmp_path / "plain", pd.read_csv(csv), np.ones((12, 3)), scalar="thickness")
    code, _, err = run_cli(
        "fit-lm",
        "--input-hdf5",
        plain,
        "--cohort-file",
        plain.with_name("cohort.csv"),
        "--formula",
        "thickness ~ age",
        "--permutations",
        "9",
        "--tfce",
    )
    assert code == 65 and "TFCE needs" in err
    errors = [line for line in err.splitlines() if line.startswith("greyarray: error:")]
    assert len(errors) == 1 and "Traceback" not in err  # beside the repeated-sessions warning


def test_greyordinate_graph(small_cohort, tmp_path):
    """Mesh edges between the vertices present, 6 voxel neighbours (PALM's volume default;
    26 when asked), nothing across structures, midthickness areas; parcellated data have no
    graph."""
    h5, _ = small_cohort
    with h5py.File(h5) as file:
        graph = tfce.element_graph(file)
        corners = tfce.element_graph(file, 26)
        structure = file["greyarray/geometry/structure"][()]
        vertex = file["greyarray/geometry/vertex"][()]
    source = np.repeat(np.arange(graph.size), np.diff(graph.indptr))
    assert (structure[source] == structure[graph.indices]).all()
    left = np.flatnonzero(structure == 0)
    lookup = dict(zip(vertex[left], left, strict=True))
    expected = {
        tuple(sorted((lookup[a], lookup[b])))
        for a, b in mesh.edges(mesh.surface("L", "midthickness").faces)
        if a in lookup and b in lookup
    }
    found = {(a, b) for a, b in zip(source, graph.indices, strict=True) if a < b and a in left}
    assert found == expected and len(found) > 300
    assert np.allclose(graph.weight[left], mesh.vertex_areas("L")[vertex[left]])
    degree = np.diff(graph.indptr)
    thalamus = np.flatnonzero(structure == 2)  # a 3 x 3 x 3 block: the centre has 6
    assert sorted(degree[thalamus])[-1] == 6 and sorted(degree[thalamus])[0] == 3
    degree = np.diff(corners.indptr)  # ... or 26 (corners 7)
    assert sorted(degree[thalamus])[-1] == 26 and sorted(degree[thalamus])[0] == 7
    assert (graph.exponent[thalamus] == 0.5).all() and (graph.exponent[left] == 1).all()
    with h5py.File(tmp_path / "p.h5", "w") as file:
        file.create_group("greyarray/geometry").attrs["cifti_kind"] = "pscalar"
        with pytest.raises(permutation.DataError, match="pscalar data are parcellated"):
            tfce.element_graph(file)
