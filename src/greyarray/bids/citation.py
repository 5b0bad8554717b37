"""The methods text: ``logs/CITATION.md`` (and ``.html``, ``.bib``), filled from the runs.

The templates live in the top-level ``boilerplate/`` folder. What the group level learnt (versions,
counts, scalars), one section per analysis and what the reports show are kept in
``logs/citation-facts.json``, so a later ``--model`` or ``--analysis-name`` run adds its section
and never removes an earlier one.
References are cited as ``[@key]`` in the text and listed as formatted text at the end.
"""

from __future__ import annotations

import json
import re
from importlib.resources import files
from pathlib import Path
from string import Template

from greyarray.io.fileio import atomic_write, locked, make_folder, write_json

STATE = "citation-facts.json"
LOCK = ".citation.lock"


def template(name: str) -> str:
    return (files("greyarray") / "boilerplate" / name).read_text(encoding="utf-8")


def bibliography() -> dict[str, dict[str, str]]:
    """{key: fields} of boilerplate/references.bib (our own, well-formed BibTeX)."""
    entries = {}
    for match in re.finditer(r"@\w+\{([^,]+),(.*?)\n\}", template("references.bib"), re.DOTALL):
        fields = re.findall(r"(\w+)\s*=\s*\{(.*?)\},?\s*$", match.group(2), re.MULTILINE)
        entries[match.group(1).strip()] = {
            k: v.replace("{", "").replace("}", "").replace("\\&", "&") for k, v in fields
        }
    return entries


def reference_text(fields: dict[str, str]) -> str:
    """One reference as text: Authors (year). Title. Journal volume, pages. doi."""
    authors = fields.get("author", "").split(" and ")
    names = [a.split(",")[0].strip() if "," in a else a.strip() for a in authors if a.strip()]
    who = f"{names[0]} et al." if "others" in names or len(names) > 3 else ", ".join(names)
    year = f" ({fields['year']})" if "year" in fields else ""
    where = fields.get("journal") or fields.get("publisher") or fields.get("howpublished", "")
    volume = f" {fields['volume']}" if "volume" in fields else ""
    pages = f", {fields['pages'].replace('--', '-')}" if "pages" in fields else ""
    doi = f" doi:{fields['doi']}" if "doi" in fields else ""
    return f"{who}{year}. {fields.get('title', '')}. {where}{volume}{pages}.{doi}".replace(
        "..", "."
    )


def load_state(logs_dir: Path) -> dict:
    path = logs_dir / STATE
    if not path.is_file():
        return {"facts": None, "analyses": {}}
    state = json.loads(path.read_text())
    if "facts" not in state:  # written by GreyArray 0.1.0: the facts alone
        state = {"facts": state, "analyses": {}}
    return state


def update(
    logs_dir: Path,
    facts: dict | None = None,
    analysis: dict | None = None,
    reports: dict | None = None,
    discarded: tuple[str, list[str]] | None = None,
    harmonization: dict | None = None,
) -> Path | None:
    """Record the group level's facts, one analysis and/or the reports' paragraph
    (boilerplate/reports.md), forget the sections of ``discarded`` (scalar, analyses) whose
    results were discarded, then rewrite the methods text from everything recorded. Returns
    CITATION.md, or None while no group level has run."""
    make_folder(logs_dir)
    with locked(logs_dir / LOCK):  # group runs of two SLURM chains may end together
        return _update(logs_dir, facts, analysis, reports, discarded, harmonization)


def _update(logs_dir, facts, analysis, reports, discarded, harmonization=None) -> Path | None:
    state = load_state(logs_dir)
    if discarded is not None:
        scalar, names = discarded
        for name in names:
            state["analyses"].pop(f"{scalar}/{name}", None)
    if facts is not None:
        state["scalars"] = facts.pop("scalars", {})
        state["facts"] = facts
    if analysis is not None:
        state["analyses"][f"{analysis['scalar']}/{analysis['analysis']}"] = analysis
    if reports is not None:
        state["reports"] = reports
    if harmonization is not None:  # one paragraph per harmonised scalar
        state.setdefault("harmonization", {})[harmonization["scalar"]] = harmonization
    write_json(logs_dir / STATE, state)
    if state["facts"] is None:
        return None
    harmonized = list(state.get("harmonization", {}).values())
    analyses = list(state["analyses"].values())
    return write(logs_dir, state["facts"], analyses, state.get("reports"), harmonized)


def render(
    facts: dict, analyses: list[dict], reports: dict | None = None, harmonized: list | None = None
) -> str:
    defaults = {
        "format_text": "CIFTI-2",
        "element_text": "greyordinate",
        "fitted_text": "",
    }  # older records
    sections = "".join(
        Template(template("harmonization.md")).substitute(h) for h in harmonized or []
    )
    sections += "".join(
        Template(template("analysis.md")).substitute({**defaults, **a}) for a in analyses
    )
    text = Template(template("methods.md")).substitute({**facts, "analysis_text": sections})
    if reports is not None:
        text += Template(template("reports.md")).substitute(reports)
    text += template("copyright.md")
    bib = bibliography()
    cited = [key for key in bib if f"@{key}" in text]
    return text + "".join(f"- [@{key}] {reference_text(bib[key])}\n" for key in cited)


def write(
    logs_dir: Path,
    facts: dict,
    analyses: list[dict],
    reports: dict | None = None,
    harmonized: list | None = None,
) -> Path:
    """CITATION.md, CITATION.html and CITATION.bib in ``logs_dir``."""
    import markdown

    text = render(facts, analyses, reports, harmonized)
    body = markdown.markdown(text)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>GreyArray: methods</title></head><body>\n" + body + "\n</body></html>\n"
    )
    atomic_write(logs_dir / "CITATION.md", text.encode())
    atomic_write(logs_dir / "CITATION.html", page.encode())
    atomic_write(logs_dir / "CITATION.bib", template("references.bib").encode())
    return logs_dir / "CITATION.md"
