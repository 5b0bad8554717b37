"""The BIDS-App: ``greyarray BIDS_DIR OUTPUT_DIR participant|group [options]``.

participant (participant.py): check each selected participant's maps, write a manifest.
group (group.py): each scalar's cohort CSV and ModelArray HDF5 under ``OUTPUT_DIR/group/``.
group --model / --analysis-name (results.py): fit, or export ModelArray's results, as BIDS maps.
Each level then writes its HTML reports (reports.py), unless --no-report; --reports-only redraws
them alone.
This module holds the options and the run's logging; run.py the resolved settings.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import shlex
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from greyarray import __version__
from greyarray.errors import GreyArrayError, UsageError, one_line
from greyarray.options import (
    Parser,
    add_factor_options,
    add_nprocs,
    add_tfce_connectivity,
    add_thresholds,
    factor_options,
    non_negative_int,
    positive_int,
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
        "ModelArray.lm (e.g. 'thickness ~ age + sex'), with smooth terms a GAM as "
        "ModelArray.gam (e.g. 'thickness ~ s(age) + sex'), or with random effects a linear "
        "mixed model as lme4 and lmerTest (e.g. 'thickness ~ age + sex + (1 | participant_id)', "
        "analysis lmm); the response is a scalar",
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
    shards = model.add_mutually_exclusive_group()
    shards.add_argument(
        "--permutation-shard",
        metavar="I/K",
        help="with --model and --permutations: compute only shard I of K of the permutations "
        "(one task of a SLURM array) from the HDF5 an earlier group run wrote, and save its "
        "null distribution beside it; nothing is converted, no results or maps are written",
    )
    shards.add_argument(
        "--merge-shards",
        type=positive_int,
        metavar="K",
        help="with --model and --permutations: merge the K shards the --permutation-shard runs "
        "saved (same options), then write the results and maps, equal to one run's",
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
    add_factor_options(model, "with --model: ")
    add_thresholds(model)
    harmonize = parser.add_argument_group("harmonization (group level)")
    harmonize.add_argument(
        "--harmonize",
        metavar="COLUMN",
        help="remove site effects from every scalar with ComBat (neuroCombat's numbers, "
        "parametric empirical Bayes) before any --model, by this participants.tsv or "
        "sessions.tsv column; the HDF5 keeps both <scalar> and <scalar>_combat, and --model is "
        "fitted to the harmonised one",
    )
    harmonize.add_argument(
        "--harmonize-covariates",
        metavar="TERMS",
        help="with --harmonize: effects to keep, e.g. 'age + sex', s(age) for ComBat-GAM "
        "(default: the --model's terms)",
    )
    model.add_argument(
        "--analysis-name",
        metavar="NAME",
        help="export ModelArray's results of this analysis as BIDS maps (with --model: the "
        "name of the fitted analysis, default lm, gam or lmm)",
    )
    return parser


def main(argv: list[str], commands: str = "") -> int:
    """The BIDS-App. A run refused at any stage (its arguments included) is on record in an
    existing OUTPUT_DIR's logs/ (run.record_refusal says which folders qualify)."""
    from greyarray.bids import run

    command_line = shlex.join(["greyarray", *argv])
    parser = build_parser(commands)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        if exit_.code:  # a usage error (help and --version end with 0)
            run.record_refusal(
                given_output_dir(argv), command_line, parser.refusal, int(exit_.code)
            )
        raise
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", force=True)
    logging.getLogger().setLevel(min(level, logging.INFO))
    logging.getLogger().handlers[0].setLevel(level)
    run.buffer_log(min(level, logging.INFO))  # for the log file, once OUTPUT_DIR may be written
    settings = None
    try:
        if args.analysis_level not in ("participant", "group"):
            raise UnknownLevelError(
                f"unknown analysis level {args.analysis_level!r}; use participant or group"
            )
        _check_harmonize(args)
        settings = run.Run.from_args(args, command_line)
        log.info("%s", one_line(settings.command_line))
        settings.reference_levels, settings.ordered_factors = factor_options(args)
        return _level(settings)
    except BaseException:  # refused, interrupted or a bug: the log records its line and code
        if settings is not None:
            settings.record_refusal()
        else:
            run.record_refusal(args.output_dir, command_line)
        raise


def given_output_dir(argv: list[str]) -> Path | None:
    """OUTPUT_DIR as the command line gives it, also when its options cannot be parsed (values
    are not converted or checked here)."""
    parser = build_parser()
    for action in parser._actions:
        action.type, action.choices = None, None
    found = argparse.Namespace()
    quiet = io.StringIO()
    with contextlib.suppress(SystemExit), redirect_stderr(quiet), redirect_stdout(quiet):
        parser.parse_known_args(argv, found)
    given = getattr(found, "output_dir", None)
    return Path(given) if given else None


def _check_harmonize(args) -> None:
    """--harmonize where it applies, before anything is read."""
    if args.harmonize_covariates is not None and not args.harmonize:
        raise UsageError("--harmonize-covariates needs --harmonize COLUMN")
    if args.harmonize and (
        args.analysis_level != "group"
        or args.reports_only
        or (args.analysis_name and not args.model)
    ):
        raise UsageError(
            "--harmonize applies at the group level, when converting or before a --model "
            "(not with participant, --reports-only or an --analysis-name export)"
        )


def _level(settings) -> int:
    """The run of the level and mode asked for."""
    args = settings.args
    model_only = {
        "--permutations": args.permutations,
        "--tfce": args.tfce,
        "--exchangeability-blocks": args.exchangeability_blocks,
        "--permutation-shard": args.permutation_shard,
        "--merge-shards": args.merge_shards,
    }
    if not args.model and (given := [flag for flag, value in model_only.items() if value]):
        raise UsageError(f"{', '.join(given)} needs --model FORMULA (group level)")
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
