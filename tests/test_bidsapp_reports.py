"""The BIDS-App's HTML reports: written by every level, rebuilt from what is on disk, redrawn
alone by --reports-only, skipped by --no-report; flagged subjects in the summary and the log."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from bids_datasets import description
from test_export import fake_results, write_results

from greyarray import cli, demo
from greyarray.io import mesh
from greyarray.io.formats import cifti

SCRAMBLED = "sub-007"  # its map's values are shuffled over the brain: flagged, never dropped
THICKNESS = "{0}/anat/{0}_space-fsLR_den-91k_thickness.dscalar.nii"


def anat_dataset(root: Path, template: Path, n: int = 12) -> Path:
    """fMRIPrep-like thickness and curvature maps of ``n`` participants (the demo's cohort: a
    shared pattern, thinning with age), one thickness map scrambled, and participants.tsv."""
    description(root, "fMRIPrep")
    geometry = cifti.read_file(template).geometry
    writer = cifti.CiftiWriter(geometry)
    table = demo.phenotypes(n)
    table.to_csv(root / "participants.tsv", sep="\t", index=False)
    for scalar, seed in (("thickness", 0), ("curv", 1)):
        maps = demo.thickness_maps(geometry.n_elements, table, seed)
        for subject, values in zip(table["participant_id"], maps, strict=True):
            if subject == SCRAMBLED and scalar == "thickness":
                values = np.random.default_rng(5).permutation(values)
            path = root / THICKNESS.format(subject).replace("thickness", scalar)
            path.parent.mkdir(parents=True, exist_ok=True)
            writer.write(path, values, path.name)
    return root


def app(*args: object) -> tuple[int, str, str]:
    """The BIDS-App in-process (the surfaces are rasterised once); (code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def snapshot(root: Path, *left_out: Path) -> dict[Path, int]:
    """Modification times of everything under ``root`` but ``left_out``."""
    return {
        p: p.stat().st_mtime_ns
        for p in root.rglob("*")
        if not any(p == skip or p.is_relative_to(skip) for skip in left_out)
    }


def group_logs(out: Path) -> str:
    return "".join(p.read_text() for p in sorted((out / "logs").glob("greyarray-group-*.log")))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, template):
    """participant (two participants), group --model (converts thickness and fits), group
    (converts curv alone), then ModelArray's results of a second analysis exported with
    --analysis-name; group.html kept after each step."""
    root = anat_dataset(tmp_path_factory.mktemp("bids") / "fmriprep", template)
    out = root.parent / "out"
    steps, pages = {}, {}
    steps["participant"] = app(root, out, "participant", "--participant-label", "001", "002")
    for step, args in (
        ("model", ["--model", "thickness ~ age + sex", "--ordered-factor", "sex=M"]),
        ("group", ["--scalar", "curv"]),  # converts curv only; thickness and its lm stay
    ):
        steps[step] = app(root, out, "group", *args)
        pages[step] = (out / "group.html").read_text()
    h5 = out / "group" / "desc-thickness_modelarray.h5"
    write_results(h5, "r", fake_results(91282), "writeResults")  # as ModelArray in R would
    steps["export"] = app(root, out, "group", "--analysis-name", "r")
    pages["export"] = (out / "group.html").read_text()
    for name, (code, _, err) in steps.items():
        assert code == 0, (name, err)
    return {"root": root, "out": out, "steps": steps, "pages": pages}


def test_model_reads_an_ordered_factor(pipeline):
    """group --model --ordered-factor sex=M: sex is an ordered factor (M first), coded by R's
    polynomial contrast sex.L, and the analysis records it."""
    import json

    import h5py

    with h5py.File(pipeline["out"] / "group" / "desc-thickness_modelarray.h5") as h5:
        names = list(h5["results/lm/column_names"].asstr()[()])
        about = json.loads(h5["results/lm"].attrs["greyarray_about"])
    assert "sex.L.estimate" in names and not [n for n in names if n.startswith("sexM")]
    assert about["ordered_factors"] == {"sex": "M"}


def test_participant_reports_of_the_processed_participants(pipeline):
    out = pipeline["out"]
    assert sorted(p.name for p in out.glob("sub-*.html")) == ["sub-001.html", "sub-002.html"]
    page = (out / "sub-001.html").read_text()
    assert "<title>GreyArray: sub-001</title>" in page
    assert page.index('id="curv"') < page.index('id="thickness"')  # a section per scalar
    assert THICKNESS.format("sub-001").split("/")[-1] in page
    assert page.count("data:image/png;base64,") == 4  # each map on the brain, its histogram
    stdout = pipeline["steps"]["participant"][1]
    assert stdout.splitlines()[-1] == f"Reports: {out}/sub-<label>.html (2 participants)"


def sections(page: str) -> list[str]:
    """The ids of a report's top-level sections (their title is an h2), in page order."""
    return re.findall(r'<section id="([^"]+)">\s*<h2>', page)


def test_group_report_grows_with_each_run(pipeline):
    pages, out = pipeline["pages"], pipeline["out"]
    for anchor in ("thickness", "thickness-cohort", "thickness-coverage", "thickness-outliers"):
        assert all(f'id="{anchor}"' in page for page in pages.values()), anchor
    assert sections(pages["model"]) == ["thickness", "thickness-analysis-lm"]
    # a run that converts another scalar keeps every HDF5 on disk, with its analyses
    assert sections(pages["group"]) == ["curv", "thickness", "thickness-analysis-lm"]
    assert sections(pages["export"]) == [
        "curv",
        "thickness",
        "thickness-analysis-lm",
        "thickness-analysis-r",
    ]
    for step in ("model", "group", "export"):
        assert pipeline["steps"][step][1].splitlines()[-1] == f"Report: {out}/group.html"


def test_flagged_subject_in_summary_and_log(pipeline):
    out = pipeline["out"]
    source = f"../../fmriprep/{THICKNESS.format(SCRAMBLED)}"  # relative to group/
    for step in ("model", "group", "export"):
        stdout = pipeline["steps"][step][1]
        assert "Subjects unlike the cohort (kept in every analysis" in stdout
        flagged = [line for line in stdout.splitlines() if re.match(r"  \w+: sub-", line)]
        assert len(flagged) == 1, stdout
        assert flagged[0].startswith(f"  thickness: {SCRAMBLED} ({source}): correlation with")
    warnings = [
        line for line in group_logs(out).splitlines() if "Subject unlike the cohort" in line
    ]
    assert len(warnings) == 3  # one per group run, each naming scalar, participant, file, reason
    assert all(
        f"WARNING: Subject unlike the cohort (kept): thickness: {SCRAMBLED} ({source}): "
        "correlation with the median map" in line
        for line in warnings
    )
    assert f"{SCRAMBLED} (thickness)" in pipeline["pages"]["group"]


def test_methods_text_names_the_reports(pipeline):
    citation = (pipeline["out"] / "logs" / "CITATION.md").read_text()
    assert "#### Visual reports" in citation
    assert "`sub-<label>.html` per participant" in citation and "`group.html`" in citation
    assert "more than 3 robust standard deviations" in citation
    assert mesh.ACKNOWLEDGMENT in citation  # maps were drawn on the S1200 surfaces
    assert "- [@matplotlib] Hunter (2007). Matplotlib: A 2D graphics environment." in citation
    assert "Computing in Science & Engineering" in citation and "$" not in citation


def test_reports_only_redraws_and_writes_nothing_else(pipeline, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(pipeline["out"], out, copy_function=shutil.copy2)
    (out / "group.html").unlink()
    (out / "sub-001.html").unlink()
    before = snapshot(out, out / "group.html", out / "sub-001.html", out / "logs")
    code, stdout, err = app(pipeline["root"], out, "group", "--reports-only")
    assert code == 0, err
    page = (out / "group.html").read_text()
    assert 'id="thickness-analysis-lm"' in page and 'id="thickness-analysis-r"' in page
    assert f"  thickness: {SCRAMBLED} (" in stdout
    assert stdout.splitlines()[-1] == f"Report: {out}/group.html"
    args = [pipeline["root"], out, "participant", "--participant-label", "001", "--reports-only"]
    code, stdout, err = app(*args)
    assert code == 0, err
    assert 'id="thickness"' in (out / "sub-001.html").read_text()
    assert stdout.splitlines()[-1] == f"Report: {out}/sub-001.html"
    assert snapshot(out, out / "group.html", out / "sub-001.html", out / "logs") == before
    assert "Indexing" not in err  # no discovery: the manifests say what to draw


def test_reports_only_needs_the_outputs(pipeline, tmp_path):
    root, out = pipeline["root"], tmp_path / "out"
    for level, wanted in (
        (
            "participant",
            f"{out}: no participant manifests (sub-*/sub-*_greyarray.json); run the "
            "participant level first",
        ),
        ("group", f"{out / 'group'}: no desc-*_modelarray.h5; run the group level first"),
    ):
        code, _, err = app(root, out, level, "--reports-only")
        assert code == 66 and f"greyarray: error: {wanted}\n" in err, err
        assert err.count("error") == 1 and "Traceback" not in err
    code, _, err = app(root, out, "participant", "--participant-label", "003", "--reports-only")
    assert code == 66 and "sub-003_greyarray.json: no manifest" in err
    assert not out.exists()
    manifest = out / "sub-009" / "sub-009_greyarray.json"
    manifest.parent.mkdir(parents=True)
    entry = {"scalar": "thickness", "dataset": str(root), "path": "gone.nii", "session": None}
    manifest.write_text(json.dumps({"files": [entry]}))
    code, _, err = app(root, out, "participant", "--reports-only")
    assert code == 66 and f"{root / 'gone.nii'}: listed in {manifest} but not found" in err
    assert sorted(p.name for p in out.iterdir()) == ["sub-009"]  # checked before writing
    for extra in (["--no-report"], ["--model", "thickness ~ age"]):
        code, _, err = app(root, pipeline["out"], "group", "--reports-only", *extra)
        assert code == 64, err


def test_no_report_writes_none(pipeline, tmp_path):
    root, out = pipeline["root"], tmp_path / "out"
    for level in ("participant", "group"):
        code, stdout, err = app(root, out, level, "--participant-label", "001", "--no-report")
        assert code == 0, err
        assert "Report" not in stdout and "Subjects unlike" not in stdout
    assert [p.name for p in out.rglob("*.html")] == ["CITATION.html"]  # the methods text
    assert "Visual reports" not in (out / "logs" / "CITATION.md").read_text()
