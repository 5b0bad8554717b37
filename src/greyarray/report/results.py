"""Results sections: the maps of one analysis under ``results/<analysis>`` of an HDF5 file.

Columns are recognised by ModelArray's names: ``<term>.estimate``, ``<term>.statistic``,
``<term>.p.value`` and their corrections ``<term>.p.value.fdr`` (Benjamini-Hochberg),
``<term>.p.value.fwe`` and ``<term>.tfce.p.value.fwe`` (permutation FWE), and
``model.adj.r.squared``. GAM smooth terms (``s_age.statistic``, ``s_age.p.value``) have no
estimate: their statistic is drawn instead. Significance maps show the signed -log10 of the
uncorrected p (sign of the estimate, else of the statistic) where the corrected p is below
``ALPHA``: grey elsewhere.
"""

from __future__ import annotations

import json

import h5py
import numpy as np

from greyarray.io.export import read_results
from greyarray.report import figures
from greyarray.report.html import Anchors, Facts, Figure, Section, Table, Text
from greyarray.report.layout import Layout

ALPHA = 0.05
TERM_SUFFIXES = (".estimate", ".statistic", ".p.value", ".std.error")
CORRECTIONS = (("FDR", ".p.value.fdr"), ("FWE", ".p.value.fwe"), ("TFCE FWE", ".tfce.p.value.fwe"))


def analyses(h5: h5py.File) -> list[str]:
    """The analyses present in a file, in name order (every one gets a section)."""
    return sorted(name for name in h5.get("results", {}) if not name.startswith("."))


def terms(names: list[str]) -> list[str]:
    """Term names in column order: anything with a term-level statistic, except ``model``."""
    found: list[str] = []
    for name in names:
        for suffix in TERM_SUFFIXES:
            if name.endswith(suffix):
                term = name.removesuffix(suffix)
                if term != "model" and not term.endswith(".tfce") and term not in found:
                    found.append(term)
    return found


def signed_log_p(p: np.ndarray, sign: np.ndarray | None) -> np.ndarray:
    """-log10(p), signed like the effect; p = 0 becomes the largest finite value."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = -np.log10(p)
    finite = np.isfinite(out)
    if (~finite & (p == 0)).any():
        out[p == 0] = out[finite].max() if finite.any() else 300.0
    return out if sign is None else out * np.where(np.sign(sign) == 0, 1, np.sign(sign))


def results_section(
    h5: h5py.File,
    analysis: str,
    layout: Layout | None = None,
    anchors: Anchors | None = None,
    *,
    title: str | None = None,
    surface_kind: str = "inflated",
    draw_intercept: bool = False,
) -> Section:
    """One analysis: per term the effect map and significance maps, counts, model fit map.

    ``layout`` defaults to the file's geometry; ``anchors`` keeps ids unique within a page."""
    layout = layout or Layout.from_h5(h5)
    anchors = anchors or Anchors()
    results = read_results(h5, analysis, layout.n_elements)
    columns = dict(results.columns())
    title = title or f"Analysis {analysis}"
    section = Section(title, anchors(title))
    fitted = _fitted(columns)
    section.add(
        Facts(
            [
                ("HDF5 file", str(h5.filename)),
                ("Analysis", f"results/{analysis} ({len(results.names)} columns)"),
                ("Elements fitted", f"{fitted:,} of {layout.n_elements:,}"),
            ]
        )
    )
    for note in _warnings(h5[f"results/{analysis}"], columns, fitted, layout.n_elements):
        section.add(Text(note, "warning"))
    found = terms(results.names)
    present = [
        (label, suffix)
        for label, suffix in CORRECTIONS
        if any(term + suffix in columns for term in found)
    ]
    rows, summary = [], []
    for term in found:
        counts = {label: _count(columns, term + suffix) for label, suffix in present}
        rows.append([term, *(_text(c) for c in counts.values())])
        if term != "Intercept" and counts.get("FDR"):
            summary.append(f"{term}: {counts['FDR']:,} FDR")
        if term == "Intercept" and not draw_intercept:
            continue
        section.subsections.append(_term(columns, term, layout, anchors, title, surface_kind))
    if rows and present:
        header = ["term", *(f"{label} p < {ALPHA}" for label, _ in present)]
        section.add(Table(header, rows, caption="Elements significant after correction"))
    model = _model(columns, layout, anchors, title, surface_kind)
    if model is not None:
        section.subsections.append(model)
    section.summary = ", ".join(summary)
    return section


def _fitted(columns: dict[str, np.ndarray]) -> int:
    """Elements with any finite result (ModelArray leaves unfitted elements NaN)."""
    stack = [v for name, v in columns.items() if name != "element_id"]
    return int(np.isfinite(np.vstack(stack)).any(axis=0).sum()) if stack else 0


def _warnings(group: h5py.Group, columns: dict[str, np.ndarray], fitted: int, n: int) -> list[str]:
    """What the fit's writer said about empty results (unfitted elements and why, columns NaN
    everywhere, one-subject factor levels: ``greyarray_about``'s notes); for results written
    elsewhere (ModelArray in R), what the columns show."""
    try:
        notes = json.loads(group.attrs["greyarray_about"]).get("notes")
    except (KeyError, TypeError, ValueError, AttributeError):
        notes = None
    if notes is not None:
        return [str(note) for note in notes]
    found = []
    if fitted < n:
        found.append(
            f"{n - fitted:,} of {n:,} elements have no results (NaN): ModelArray leaves an "
            "element unfitted where too few subjects have a finite value (num.subj.lthr.abs, "
            "num.subj.lthr.rel)"
        )
    if fitted:
        empty = [k for k, v in columns.items() if k != "element_id" and not np.isfinite(v).any()]
        if empty:
            found.append(f"NaN at every element: {', '.join(empty)}")
    return found


def _count(columns: dict[str, np.ndarray], name: str) -> int | None:
    if name not in columns:
        return None
    with np.errstate(invalid="ignore"):
        return int((columns[name] < ALPHA).sum())


def _text(count: int | None) -> str:
    return "-" if count is None else f"{count:,}"


def _term(columns, term: str, layout: Layout, anchors: Anchors, where: str, kind: str) -> Section:
    section = Section(f"{term}", anchors(f"{where} {term}"))
    estimate, statistic = columns.get(f"{term}.estimate"), columns.get(f"{term}.statistic")
    p = columns.get(f"{term}.p.value")
    if estimate is not None:
        effect, label = estimate, f"{term} estimate"
    else:
        effect, label = statistic, f"{term} statistic"
    if effect is not None:
        style = figures.Style.auto(effect, label)
        picture, note = figures.brain_map(layout, effect, style, f"{where}: {label}", kind)
        section.add(Figure(picture, note))
    sign = estimate if estimate is not None else statistic
    drawn = False
    for correction, suffix in CORRECTIONS:
        corrected = columns.get(term + suffix)
        if corrected is None:
            continue
        drawn = True
        basis = p if p is not None else corrected
        with np.errstate(invalid="ignore"):
            keep = corrected < ALPHA
        values = np.where(keep, signed_log_p(basis, sign), np.nan)
        count = int(keep.sum())
        heading = f"{where}: {term}, signed -log10 p, {correction} p < {ALPHA} ({count:,} elements)"
        if count:
            style = figures.Style.diverging(values, "signed -log10 p", percentile=99)
            picture, note = figures.brain_map(layout, values, style, heading, kind)
            section.add(Figure(picture, note))
        else:
            section.add(Text(f"{term}: no element with {correction}-corrected p < {ALPHA}."))
    if not drawn and p is not None:
        values = signed_log_p(p, sign)
        style = figures.Style.diverging(values, "signed -log10 p", percentile=99)
        heading = f"{where}: {term}, signed -log10 p (uncorrected)"
        picture, note = figures.brain_map(layout, values, style, heading, kind)
        unthresholded = "No corrected p-values in this analysis: unthresholded. "
        section.add(Figure(picture, unthresholded + note))
    return section


def _model(columns, layout: Layout, anchors: Anchors, where: str, kind: str) -> Section | None:
    r2 = columns.get("model.adj.r.squared")
    if r2 is None:
        return None
    section = Section("model fit", anchors(f"{where} model"))
    style = figures.Style.sequential(r2, "adjusted R squared", cmap="magma")
    picture, note = figures.brain_map(layout, r2, style, f"{where}: adjusted R squared", kind)
    section.add(Figure(picture, note))
    count = _count(columns, "model.p.value.fdr")
    if count is not None:
        section.add(Text(f"{count:,} elements where the model is significant (FDR p < {ALPHA})."))
    return section
