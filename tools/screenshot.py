#!/usr/bin/env python3
"""Screenshots of GreyArray's HTML reports with headless Chromium (for the README and tests).

    python3 tools/screenshot.py REPORT.html OUT.png [--width 1200] [--section ANCHOR]

Without ``--section`` the whole page is captured (its height is measured first); with it, only
that section (its id, as in the report's table of contents). ``measure()`` loads a report with a
small script appended to a temporary copy (the report itself carries no test code) and returns
what the browser rendered: page height, images and whether each decoded, section boxes, and the
order of a sortable table after clicks on its headers.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--run-all-compositor-stages-before-draw",
    "--virtual-time-budget=10000",
]
MARKER = "greyarray-check"
# Runs after load: reports images, sections and, for sortable tables, the first column's order
# after clicking a header once (ascending) and twice (descending).
PROBE = """
<script>
window.addEventListener("load", function () {
  var images = Array.from(document.images).map(function (img) {
    return {width: img.naturalWidth, height: img.naturalHeight, complete: img.complete};
  });
  var sections = {};
  document.querySelectorAll("section[id]").forEach(function (s) {
    var box = s.getBoundingClientRect();
    sections[s.id] = [box.top + window.scrollY, box.height];
  });
  var sorts = {};
  document.querySelectorAll("table.sortable[id]").forEach(function (table) {
    var header = table.tHead.rows[0].cells[SORT_COLUMN];
    var column = function () {
      return Array.from(table.tBodies[0].rows).map(function (r) {
        return r.cells[SORT_COLUMN].dataset.value;
      });
    };
    header.click();
    var up = column();
    header.click();
    sorts[table.id] = {ascending: up, descending: column()};
  });
  var out = document.createElement("pre");
  out.id = "MARKER";
  out.textContent = JSON.stringify({
    height: document.documentElement.scrollHeight, images: images, sections: sections,
    sorts: sorts, title: document.title
  });
  document.body.appendChild(out);
});
</script>
"""


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(args: list[str], timeout: float = 120) -> str:
    exe = chromium()
    if exe is None:
        raise RuntimeError("no chromium found (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [exe, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if done.returncode != 0:
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def measure(report: Path, sort_column: int = 1, width: int = 1200) -> dict:
    """What Chromium rendered of ``report`` (see the module doc)."""
    text = Path(report).read_text(encoding="utf-8")
    probe = PROBE.replace("MARKER", MARKER).replace("SORT_COLUMN", str(int(sort_column)))
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "report.html"
        copy.write_text(text.replace("</body>", probe + "</body>"), encoding="utf-8")
        dom = _run([f"--window-size={width},1000", "--dump-dom", copy.as_uri()])
    found = re.search(rf'<pre id="{MARKER}">(.*?)</pre>', dom, re.DOTALL)
    if found is None:
        raise RuntimeError(f"{report}: the page did not finish loading (no probe output)")
    result = json.loads(_unescape(found.group(1)))
    result["dom"] = dom
    return result


def _unescape(text: str) -> str:
    return (
        text.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
    )


def screenshot(
    report: Path,
    output: Path,
    width: int = 1200,
    section: str | None = None,
    height: int | None = None,
    max_height: int = 16000,
) -> Path:
    """PNG of the page (or of one section) as Chromium renders it; ``height`` None: the whole
    page (measured first)."""
    facts = measure(report, width=width) if height is None or section else None
    if height is None:
        height = min(int(facts["height"]) + 20, max_height)
    uri = Path(report).resolve().as_uri()
    _run([f"--window-size={width},{height}", f"--screenshot={Path(output).resolve()}", uri])
    if section is not None:
        from PIL import Image

        if section not in facts["sections"]:
            raise KeyError(f"no section {section!r}; sections: {', '.join(facts['sections'])}")
        top, size = facts["sections"][section]
        with Image.open(output) as picture:
            picture.crop((0, int(top), width, min(int(top + size), height))).save(output)
    return Path(output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--section", help="id of one section to capture")
    args = parser.parse_args(argv)
    screenshot(args.report, args.output, args.width, args.section)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
