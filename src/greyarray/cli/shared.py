"""Pieces the stand-alone commands share: the ``--report`` option, checked before any work."""

from __future__ import annotations

import logging
from pathlib import Path

from greyarray.errors import OutputError, UsageError

log = logging.getLogger("greyarray")


def report_option(parser) -> None:
    parser.add_argument(
        "--report",
        type=Path,
        metavar="FILE.html",
        help="also write an HTML report of the HDF5 file: cohort, coverage, mean/SD maps, "
        "subjects unlike the others, and every analysis in it",
    )


def check_report(report: Path | None, *inputs: Path | None, output_dir: Path | None = None) -> None:
    """Before any work: ``--report`` names an .html file that may be (re)written, in a folder
    that is (or can be) one, and none of the inputs or the output folder (a report written over
    the HDF5, the cohort or a map would destroy it)."""
    if report is None:
        return
    from greyarray.io.fileio import check_output
    from greyarray.io.names import refuse_inputs

    if report.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"{report}: --report names an HTML file (FILE.html)")
    if output_dir is not None and report.resolve() == output_dir.resolve():
        raise UsageError(f"{report}: --report and --output-dir name the same path")
    check_output(report, overwrite=True)
    existing = next((p for p in report.resolve().parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise OutputError(f"{report}: {existing} is a file, not a folder")
    refuse_inputs([report], [p for p in inputs if p is not None])


def write_report(h5: Path, cohort: Path | None, report: Path, thresholds=None) -> None:
    """The group report of one HDF5 file; flagged subjects are logged (never dropped)."""
    from greyarray.report import GroupInput, Thresholds, group_report

    done = group_report(report, [GroupInput(h5, cohort)], thresholds=thresholds or Thresholds())
    for outlier in done.outliers:
        log.warning("Subject unlike the cohort (kept): %s", outlier)
    log.info("Wrote report %s", report)
