"""The BIDS-App: ``greyarray BIDS_DIR OUTPUT_DIR participant|group [options]``.

participant (participant.py): check each selected participant's maps, write a manifest.
group (group.py): each scalar's cohort CSV and ModelArray HDF5 under ``OUTPUT_DIR/group/``.
group --model / --analysis-name (results.py): fit, or export ModelArray's results, as BIDS maps.
Each level then writes its HTML reports (reports.py), unless --no-report; --reports-only redraws
them alone.
This module holds the options and the run's logging; run.py the resolved settings.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from greyarray import __version__
from greyarray.errors import GreyArrayError, one_line
from greyarray.options import (
    Parser,
    add_nprocs,
    add_tfce_connectivity,
    non_negative_int,
    reference_levels,
)

log = logging.getLogger("greyarray")

EXAMPLES = """examples:
  greyarray /data/xcp_d /out participant --participant-label 01
  greyarray /data/xcp_d /out group
  greyarray /data/bids /out group --derivatives xcpd=/data/bids/derivatives/xcp_d --scalar alff
  greyarray /data/xcp_d /out group --model "alff ~ age + sex"   # fit here, export the maps
  greyarray /data/xcp_d /out group --analysis-name lm     # after ModelArray's writeResults
  greyarray /data/xcp_d /out group --reports-only         # redraw OUTPUT_DIR/group.html

exit codes: 0 ok, 1 failure, 16 invalid input dataset, 17 unknown analysis level,
  18 filters matched no files, 64 usage, 65 bad data, 66 missing input, 73 cannot create output,
  75 file held by another process, 129/130/143 ended by SIGHUP/SIGINT/SIGTERM
"""


class UnknownLevelError(GreyArrayError):
    exit_code = 17


def build_parser(commands: str = "") -> Parser:
    parser = Parser(
        prog="greyarray",
        epilog=(
            f"stand-alone commands (greyarray COMMAND --help):\n{commands}\n\n" if commands else ""
        )
        + EXAMPLES,
        description="BIDS-App: discover CIFTI-2 dscalar/pscalar/pconn derivatives and NIfTI maps "
        "in a standard space (QSIRecon, ASLPrep, XCP-D) with pybids, "
        "write ModelArray's cohort CSV and HDF5, fit models or export ModelArray's results as "
        "BIDS statistical maps.",
    )
    parser.add_argument("bids_dir", type=Path, help="BIDS dataset: raw or derivatives")
    parser.add_argument("output_dir", type=Path, help="output folder (a derivatives dataset)")
    parser.add_argument("analysis_level", help="participant or group")
    parser.add_argument(
        "--version", action="version", version=f"greyarray {__version__}", help="print the version"
    )
    select = parser.add_argument_group("selecting data")
    select.add_argument(
        "--participant-label",
        "--participant_label",
        nargs="+",
        metavar="LABEL",
        help="labels with or without 'sub-', or a file listing them (default: all)",
    )
    select.add_argument(
        "--session-label",
        "--session_label",
        nargs="+",
        metavar="LABEL",
        help="sessions, with or without 'ses-' (default: all)",
    )
    select.add_argument(
        "--derivatives",
        nargs="+",
        metavar="NAME=PATH",
        default=[],
        help="derivative datasets to search (default: BIDS_DIR itself when it "
        "is a derivative, else BIDS_DIR/derivatives/*)",
    )
    select.add_argument(
        "--participants-file",
        type=Path,
        help="phenotypes (default: participants.tsv of BIDS_DIR or of the raw dataset around it)",
    )
    select.add_argument(
        "--config",
        type=Path,
        help="YAML: named scalars (pybids filters) and regex patterns for non-BIDS names; see "
        "README",
    )
    select.add_argument(
        "--bids-filter-file",
        "--bids_filter_file",
        type=Path,
        metavar="FILE",
        help='JSON {"<scalar>": {entity: value}}; null = absent, "*" = any',
    )
    select.add_argument(
        "--scalar",
        nargs="+",
        metavar="NAME",
        help="only these scalars (also: a rare variant that is otherwise skipped)",
    )
    select.add_argument(
        "--map",
        metavar="NAME|INDEX",
        help="map of multi-map files: a name, or a 1-based index as wb_command counts",
    )
    select.add_argument(
        "--group-mask",
        "--group_mask",
        type=Path,
        metavar="FILE",
        help="NIfTI maps: the group mask (voxels > 0) for every NIfTI scalar; default: the "
        "voxels inside at least half of the maps' subject masks (desc-brain_mask; a map "
        "without one counts its finite non-zero voxels), written to group/",
    )
    run = parser.add_argument_group("running")
    run.add_argument(
        "-w",
        "--work-dir",
        type=Path,
        help="scratch folder, not inside BIDS_DIR (holds pybids' index unless "
        "--bids-database-dir is given)",
    )
    run.add_argument(
        "--bids-database-dir",
        type=Path,
        help="keep pybids' index here and reuse it (rebuilt when inputs change)",
    )
    add_nprocs(run, "threads for checking and compressing")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace group outputs whose inputs changed (never ModelArray results: see "
        "--discard-results)",
    )
    run.add_argument(
        "--discard-results",
        action="store_true",
        help="allow replacing an HDF5 that holds ModelArray results when its inputs changed; "
        "its results and the maps exported from them are removed",
    )
    run.add_argument(
        "--skip-bids-validation",
        "--skip_bids_validation",
        "--skip_bids_validator",
        action="store_true",
        help="accepted; GreyArray does not run the BIDS validator",
    )
    run.add_argument(
        "--no-report",
        action="store_true",
        help="write no HTML reports (OUTPUT_DIR/sub-<label>.html, OUTPUT_DIR/group.html)",
    )
    run.add_argument(
        "--reports-only",
        action="store_true",
        help="only redraw the reports from existing outputs: the selected participants' "
        "reports from their manifests (participant), group.html from the group HDF5 files "
        "(group); nothing is converted, fitted or exported",
    )
    run.add_argument("-v", "--verbose", action="count", default=0, help="more messages (-vv)")
    run.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    model = parser.add_argument_group("models and results (group level)")
    model.add_argument(
        "--model",
        metavar="FORMULA",
        help="fit this model at every element and export the maps: a linear model as "
        "ModelArray.lm (e.g. 'thickness ~ age + sex'), or with smooth terms a GAM as "
        "ModelArray.gam (e.g. 'thickness ~ s(age) + sex'); the response is a scalar",
    )
    model.add_argument(
        "--permutations",
        type=int,
        default=0,
        metavar="N",
        help="with a linear --model: family-wise error control by N permutations "
        "(Freedman-Lane, maximum statistic, as PALM; adds stat-pfwe maps)",
    )
    model.add_argument(
        "--tfce",
        action="store_true",
        help="with --permutations: threshold-free cluster enhancement on the greyordinates "
        "or voxels (adds stat-tfce and stat-tfcepfwe maps)",
    )
    add_tfce_connectivity(model)
    model.add_argument(
        "--exchangeability-blocks",
        metavar="COLUMN",
        help="with --permutations: cohort column whose blocks are permuted whole, e.g. "
        "participant_id when participants have several sessions",
    )
    model.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="with --permutations: seed of the random permutations",
    )
    model.add_argument(
        "--gam-method",
        choices=["REML", "GCV.Cp"],
        default="GCV.Cp",
        help="with a --model that has smooth terms s(...): how smoothing parameters are chosen "
        "(mgcv's and ModelArray.gam's default: GCV.Cp)",
    )
    model.add_argument(
        "--changed-rsq-term",
        metavar="TERM",
        help="with a smooth --model: add this term's delta adjusted R-squared and partial "
        "R-squared (ModelArray.gam's changed.rsq.term.index), e.g. 's(age)'",
    )
    model.add_argument(
        "--reference-level",
        nargs="+",
        default=[],
        metavar="COLUMN=LEVEL",
        help="with --model: reference level of a factor, e.g. sex=F (default: the first level "
        "in R's order)",
    )
    model.add_argument(
        "--analysis-name",
        metavar="NAME",
        help="export ModelArray's results of this analysis as BIDS maps (with --model: the "
        "name of the fitted analysis, default lm)",
    )
    return parser


def main(argv: list[str], commands: str = "") -> int:
    args = build_parser(commands).parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", force=True)
    logging.getLogger().setLevel(min(level, logging.INFO))
    logging.getLogger().handlers[0].setLevel(level)
    from greyarray.bids import run

    run.buffer_log(min(level, logging.INFO))  # for the log file, once OUTPUT_DIR may be written
    if args.analysis_level not in ("participant", "group"):
        raise UnknownLevelError(
            f"unknown analysis level {args.analysis_level!r}; use participant or group"
        )
    settings = run.Run.from_args(args, shlex.join(["greyarray", *argv]))
    settings.reference_levels = reference_levels(args.reference_level)
    log.info("%s", one_line(settings.command_line))
    try:
        return _level(settings)
    except GreyArrayError:
        settings.record_refusal()
        raise


def _level(settings) -> int:
    """The run of the level and mode asked for."""
    args = settings.args
    if args.reports_only:
        from greyarray.bids import reports

        return reports.reports_only(settings)
    if args.analysis_level == "participant":
        from greyarray.bids import participant

        return participant.run(settings)
    if args.model:
        from greyarray.bids import results

        return results.model(settings)
    if args.analysis_name:
        from greyarray.bids import results

        return results.export(settings)
    from greyarray.bids import group

    return group.run(settings)
