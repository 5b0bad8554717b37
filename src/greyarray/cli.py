"""Command line: ModelArrayIO's two commands, flag for flag, GreyArray's own, and the BIDS-App.

Every run ends in one of three ways, each a single line on stderr and the exit code of its kind:
a user error (errors.py: 64 usage, 65 bad data, 66 missing input, 73 cannot write output), a
signal (SIGINT 130, SIGHUP 129, SIGTERM 143: what SLURM and ``docker stop`` send; temporary files
are removed on the way out), or, as a last resort, a bug (exit 1, the traceback in the log file).
Each command imports only what it needs, so ``--version`` and small exports start fast.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from greyarray.errors import GreyArrayError, Interrupted, OutputError, UsageError, one_line
from greyarray.options import (
    Parser,
    add_logging,
    add_nprocs,
    non_negative_int,
    option,
    permutation_options,
    reference_levels,
)

log = logging.getLogger("greyarray")
SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


def _report_option(parser) -> None:
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


# ---- to-modelarray ---------------------------------------------------------------------------
def to_modelarray_parser(prog: str = "greyarray to-modelarray") -> Parser:
    parser = Parser(
        prog=prog,
        description="Convert a cohort of CIFTI-2 dscalar/pscalar/pconn files to the HDF5 file "
        "ModelArray reads. Every file is checked (type, full greyordinate geometry, maps) "
        "before anything is written. The flags are ModelArrayIO's.",
    )
    option(
        parser,
        "--cohort-file",
        required=True,
        type=Path,
        help="CSV with columns scalar_name and source_file (or --scalar-columns); a relative "
        "source_file is looked up in the CSV's folder, then in the current folder",
    )
    parser.add_argument(
        "--output", type=Path, default=Path("modelarray.h5"), help="output HDF5 file"
    )
    option(
        parser,
        "--scalar-columns",
        nargs="+",
        metavar="COL",
        help="wide cohort: columns holding each scalar's file paths",
    )
    split = parser.add_mutually_exclusive_group()
    option(
        split,
        "--split-files",
        dest="split",
        action="store_true",
        default=None,
        help="one HDF5 per scalar, named <scalar>_<output> (the default for wide cohorts)",
    )
    option(
        split,
        "--no-split-files",
        dest="split",
        action="store_false",
        help="all scalars in one HDF5 (the default for long cohorts)",
    )
    parser.add_argument(
        "--backend",
        default="hdf5",
        help="storage backend: hdf5 (ModelArrayIO's tiledb is not supported)",
    )
    parser.add_argument(
        "--dtype", choices=["float32", "float64"], default="float32", help="stored value type"
    )
    parser.add_argument(
        "--compression",
        choices=["gzip", "lzf", "none"],
        default="gzip",
        help="compression filter; lzf needs rhdf5filters in R",
    )
    option(
        parser,
        "--compression-level",
        type=int,
        default=4,
        choices=range(10),
        metavar="0-9",
        help="gzip level",
    )
    parser.add_argument(
        "--no-shuffle",
        dest="shuffle",
        action="store_false",
        help="do not apply HDF5's shuffle filter (shuffle is on by default: smaller files)",
    )
    chunks = parser.add_mutually_exclusive_group()
    option(
        chunks,
        "--chunk-voxels",
        type=int,
        default=0,
        metavar="N",
        help="elements per chunk (0: from --target-chunk-mb)",
    )
    option(
        chunks,
        "--target-chunk-mb",
        type=float,
        default=1.0,
        metavar="MB",
        help="chunk size target; at most 1 MiB keeps ModelArray's element-wise reads in "
        "HDF5's default chunk cache (ModelArrayIO uses 2)",
    )
    parser.add_argument(
        "--map",
        metavar="NAME|INDEX",
        help="which map of multi-map dscalar/pscalar files: a name, or a 1-based index as "
        "wb_command counts (required when files hold several maps)",
    )
    add_nprocs(parser, "threads for checking and compressing")
    option(
        parser,
        "--workers",
        type=int,
        metavar="N",
        help="accepted for ModelArrayIO compatibility (TileDB writers); no effect on HDF5",
    )
    option(
        parser,
        "--s3-workers",
        type=int,
        metavar="N",
        help="accepted for ModelArrayIO compatibility (s3:// downloads); no effect",
    )
    _unsupported_modalities(parser)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing outputs (an output that is one of the inputs is never replaced)",
    )
    add_logging(parser)
    return parser


def _unsupported_modalities(parser) -> None:
    """ModelArrayIO's NIfTI and fixel flags: recognised, so the error can say why."""
    for name in ("--mask", "--index-file", "--directions-file"):
        option(
            parser,
            name,
            type=Path,
            metavar="FILE",
            help="ModelArrayIO's NIfTI/fixel option: not supported (GreyArray converts CIFTI-2)",
        )


def _refuse_unsupported(args: argparse.Namespace) -> None:
    for flag in ("mask", "index_file", "directions_file"):
        if getattr(args, flag, None) is not None:
            raise UsageError(
                f"--{flag.replace('_', '-')} is for NIfTI or fixel data, which GreyArray does "
                "not convert yet; it converts CIFTI-2 dscalar/pscalar/pconn files"
            )
    if getattr(args, "backend", "hdf5") != "hdf5":
        raise UsageError(
            f"--backend {args.backend} is not supported yet; GreyArray writes HDF5 (--backend hdf5)"
        )
    if getattr(args, "workers", None) is not None or getattr(args, "s3_workers", None) is not None:
        log.info("--workers/--s3-workers have no effect on HDF5 output; --nprocs sets threads")


def run_to_modelarray(args: argparse.Namespace) -> int:
    from greyarray.io.cohort import load_cohort
    from greyarray.io.store import StoreOptions, to_modelarray

    _refuse_unsupported(args)
    cohort = load_cohort(args.cohort_file, args.scalar_columns)
    options = StoreOptions(
        dtype=args.dtype,
        compression=args.compression,
        compression_level=args.compression_level,
        shuffle=args.shuffle,
        chunk_elements=args.chunk_voxels,
        target_chunk_mb=args.target_chunk_mb,
        nprocs=args.nprocs,
    )
    split = bool(args.scalar_columns) if args.split is None else args.split
    to_modelarray(
        cohort,
        args.output,
        options,
        split=split,
        wanted_map=args.map,
        overwrite=args.overwrite,
        command_line=args.command_line,
    )
    return 0


# ---- export-results --------------------------------------------------------------------------
def export_results_parser(prog: str = "greyarray export-results") -> Parser:
    parser = Parser(
        prog=prog,
        description="Write ModelArray's results (results/<analysis> in the HDF5) as CIFTI-2 files, "
        "one per result column, with 1m.p.value companions for p-values. The geometry stored "
        "by to-modelarray is used; a template is optional. The flags are ModelArrayIO's.",
    )
    option(parser, "--analysis-name", required=True, help="name of the analysis in the HDF5")
    option(parser, "--input-hdf5", required=True, type=Path, help="HDF5 file with the results")
    option(
        parser,
        "--output-dir",
        required=True,
        type=Path,
        help="folder for the CIFTI files (created if needed; files of the same names in it are "
        "replaced, others are left alone)",
    )
    template = parser.add_mutually_exclusive_group()
    option(
        template,
        "--cohort-file",
        type=Path,
        help="cohort CSV: its first source_file is the template (checked against the "
        "stored geometry)",
    )
    option(
        template,
        "--example-file",
        type=Path,
        help="a CIFTI file of the cohort's geometry to use as template",
    )
    parser.add_argument(
        "--no-compress",
        dest="compress",
        action="store_false",
        help="accepted for ModelArrayIO compatibility; CIFTI files are never compressed",
    )
    _unsupported_modalities(parser)
    _report_option(parser)
    add_logging(parser)
    return parser


def run_export_results(args: argparse.Namespace) -> int:
    from greyarray.io.export import export_results
    from greyarray.io.names import check_name

    _refuse_unsupported(args)
    check_name("analysis", args.analysis_name)
    inputs = (args.input_hdf5, args.cohort_file, args.example_file)
    check_report(args.report, *inputs, output_dir=args.output_dir)
    template = args.example_file
    if args.cohort_file is not None:
        from greyarray.io.cohort import first_source

        template = first_source(args.cohort_file)
    export_results(args.input_hdf5, args.analysis_name, args.output_dir, template)
    if args.report:
        write_report(args.input_hdf5, args.cohort_file, args.report)
    return 0


# ---- fit-lm ----------------------------------------------------------------------------------
def fit_lm_parser(prog: str = "greyarray fit-lm") -> Parser:
    from greyarray.stats import names

    parser = Parser(
        prog=prog,
        description="Fit a linear model at every element, with ModelArray.lm's rules and "
        "outputs, and write results/<analysis> into the HDF5 as ModelArray's writeResults "
        "does. R formula syntax: numeric and categorical variables (treatment contrasts, R's "
        "column names such as sexM), interactions (age:sex, age*sex), I(age^2), factor(x), "
        "intercept removal (0 + ... or - 1).",
    )
    _model_inputs(
        parser, "lm", "R formula; its response is the scalar, e.g. 'thickness ~ age + sex'"
    )
    option(
        parser,
        "--reference-level",
        nargs="+",
        default=[],
        metavar="COLUMN=LEVEL",
        help="reference level of a factor, e.g. sex=F (default: the first level in R's "
        "order, which ignores case as R does in UTF-8 locales)",
    )
    option(
        parser,
        "--full-outputs",
        action="store_true",
        help="every statistic of --var-terms and --var-model (ModelArray's full.outputs=TRUE)",
    )
    option(
        parser,
        "--var-terms",
        nargs="+",
        default=list(names.DEFAULT_TERM_STATS),
        choices=names.TERM_STATS,
        help="statistics of each term (ModelArray's var.terms)",
    )
    option(
        parser,
        "--var-model",
        nargs="+",
        default=list(names.DEFAULT_MODEL_STATS),
        choices=names.MODEL_STATS,
        help="statistics of the model (ModelArray's var.model)",
    )
    _thresholds(parser)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing results/<name>"
    )
    _permutation_options(parser)
    _report_option(parser)
    add_logging(parser)
    return parser


def _model_inputs(parser, analysis: str, formula_help: str) -> None:
    """The HDF5, cohort, formula, analysis and scalar options of fit-lm and fit-gam."""
    option(parser, "--input-hdf5", required=True, type=Path, help="HDF5 from to-modelarray")
    option(
        parser,
        "--cohort-file",
        required=True,
        type=Path,
        help="cohort CSV whose source_file values are the HDF5's subject names",
    )
    parser.add_argument("--formula", required=True, help=formula_help)
    option(parser, "--analysis-name", default=analysis, help="results/<name> in the HDF5")
    parser.add_argument("--scalar", help="scalar to model (default: the formula's response)")


def _thresholds(parser) -> None:
    """ModelArray's element threshold (num.subj.lthr.abs / .rel)."""
    option(
        parser,
        "--num-subj-lthr-abs",
        type=float,
        default=10,
        help="fit an element only with more subjects with a finite value than this",
    )
    option(
        parser,
        "--num-subj-lthr-rel",
        type=float,
        default=0.2,
        help="... and more than this fraction of all subjects",
    )


def _permutation_options(parser) -> None:
    group = parser.add_argument_group(
        "permutation inference (PALM's Freedman-Lane, two-sided; adds <term>.p.value.fwe, and "
        "with --tfce <term>.tfce and <term>.tfce.p.value.fwe, for every term but the Intercept)"
    )
    group.add_argument(
        "--permutations",
        type=int,
        default=0,
        metavar="N",
        help="number of permutations, the identity included (0: none); all of them when "
        "there are no more than N",
    )
    group.add_argument(
        "--tfce", action="store_true", help="TFCE on the greyordinates (dscalar only)"
    )
    option(
        group,
        "--exchangeability-blocks",
        metavar="COLUMN",
        help="cohort column whose blocks are permuted whole (e.g. participant_id with "
        "sessions); blocks must have one size",
    )
    group.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the random permutations"
    )
    shards = group.add_mutually_exclusive_group()
    option(
        shards,
        "--permutation-shard",
        metavar="I/K",
        help="compute only shard I of K (1 <= I <= K) and write its null distribution "
        "beside the HDF5 (<stem>.<analysis>.perm-shard-I-of-K.npz); no results",
    )
    option(
        shards,
        "--merge-shards",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="the K shard files: merge them and write the results",
    )
    add_nprocs(group, "batches of permutations run in parallel")


def run_fit_lm(args: argparse.Namespace) -> int:
    from greyarray.stats.lm import fit_lm
    from greyarray.stats.names import MODEL_STATS, TERM_STATS

    permutations = permutation_options(args)
    check_report(args.report, args.input_hdf5, args.cohort_file)
    columns = fit_lm(
        args.input_hdf5,
        args.cohort_file,
        args.formula,
        args.analysis_name,
        scalar=args.scalar,
        term_stats=TERM_STATS if args.full_outputs else args.var_terms,
        model_stats=MODEL_STATS if args.full_outputs else args.var_model,
        lthr_abs=args.num_subj_lthr_abs,
        lthr_rel=args.num_subj_lthr_rel,
        overwrite=args.overwrite,
        reference_levels=reference_levels(args.reference_level),
        permutations=permutations,
    )
    if permutations is not None and permutations.shard is not None:
        from greyarray.stats.permutation import shard_path

        path = shard_path(args.input_hdf5, args.analysis_name, permutations.shard)
        log.info("Wrote the null distribution of shard %s to %s", args.permutation_shard, path)
        return 0
    log.info(
        "Wrote results/%s (%d columns) to %s", args.analysis_name, len(columns), args.input_hdf5
    )
    if args.report:
        from greyarray.report import Thresholds

        thresholds = Thresholds(args.num_subj_lthr_abs, args.num_subj_lthr_rel)
        write_report(args.input_hdf5, args.cohort_file, args.report, thresholds)
    return 0


def fit_gam_parser(prog: str = "greyarray fit-gam") -> Parser:
    parser = Parser(
        prog=prog,
        description="Fit a GAM (mgcv::gam, gaussian) at every element with ModelArray.gam's "
        "rules and outputs, and write results/<analysis> into the HDF5. Smooth terms "
        "s(x, k=, fx=, bs=) with bs tp, ts, cr or cs, plus parametric terms as in fit-lm.",
    )
    _model_inputs(parser, "gam", "e.g. 'thickness ~ s(age, k=4, fx=TRUE) + sex'")
    parser.add_argument(
        "--method",
        choices=["REML", "GCV.Cp"],
        default="GCV.Cp",
        help="smoothing parameter selection (mgcv's and ModelArray's default: GCV.Cp)",
    )
    option(
        parser,
        "--changed-rsq-term",
        metavar="TERM",
        help="a term, e.g. 's(age)', or its 1-based position: add its delta adjusted R-squared "
        "and partial R-squared from the model without it (ModelArray's "
        "changed.rsq.term.index), and signed versions",
    )
    option(
        parser,
        "--full-outputs",
        action="store_true",
        help="every statistic (ModelArray's full.outputs=TRUE)",
    )
    _thresholds(parser)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing results/<name>"
    )
    add_logging(parser)
    return parser


def run_fit_gam(args: argparse.Namespace) -> int:
    from greyarray.stats.gam import fit_gam  # scipy and formulaic: only for this command

    columns = fit_gam(
        args.input_hdf5,
        args.cohort_file,
        args.formula,
        args.analysis_name,
        scalar=args.scalar,
        method=args.method,
        changed_rsq_term=args.changed_rsq_term,
        full_outputs=args.full_outputs,
        lthr_abs=args.num_subj_lthr_abs,
        lthr_rel=args.num_subj_lthr_rel,
        overwrite=args.overwrite,
    )
    log.info(
        "Wrote results/%s (%d columns) to %s", args.analysis_name, len(columns), args.input_hdf5
    )
    return 0


# ---- demo ------------------------------------------------------------------------------------
def demo_parser(prog: str = "greyarray demo") -> Parser:
    parser = Parser(
        prog=prog,
        description="Write a small synthetic BIDS dataset on the real fsLR 91k greyordinates "
        "and run the whole pipeline on it (participant, group, group --model): a "
        "self-contained first run.",
    )
    parser.add_argument("folder", type=Path, help="where to write the demo data and outputs")
    parser.add_argument("--subjects", type=int, default=20, help="number of participants")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the outputs of an earlier demo"
    )
    add_logging(parser)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    from greyarray.demo import run_demo as demo

    return demo(args.folder, args.subjects, args.overwrite, args.log_level != "INFO")


COMMANDS: dict[str, tuple[Callable[[], Parser], Callable[[argparse.Namespace], int], str]] = {
    "to-modelarray": (
        to_modelarray_parser,
        run_to_modelarray,
        "convert a cohort CSV of CIFTI-2 maps to ModelArray's HDF5 (ModelArrayIO's flags)",
    ),
    "export-results": (
        export_results_parser,
        run_export_results,
        "write ModelArray's results as CIFTI-2 maps (ModelArrayIO's flags)",
    ),
    "fit-lm": (
        fit_lm_parser,
        run_fit_lm,
        "ModelArray.lm's linear model at every element, in seconds",
    ),
    "fit-gam": (
        fit_gam_parser,
        run_fit_gam,
        "ModelArray.gam's GAMs (mgcv's numbers) at every element, in minutes",
    ),
    "demo": (demo_parser, run_demo, "run the whole pipeline on a synthetic demo dataset"),
}


# ---- running ---------------------------------------------------------------------------------
def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


_RECEIVED: list[Interrupted] = []  # signals received during this run


def _raise_interrupted(signum: int, _frame) -> None:
    """The first signal ends the run by an exception; later ones (a second Ctrl-C, SLURM's
    repeated SIGTERM) are recorded but never interrupt the cleanup it started."""
    interrupted = Interrupted(signum, SIGNALS.get(signum, f"signal {signum}"))
    _RECEIVED.append(interrupted)
    if len(_RECEIVED) == 1:
        raise interrupted


def _unraisable(hook):
    """Python swallows an exception raised where it cannot propagate (a weakref callback, a
    __del__): an Interrupted lost there is not printed; main() still ends with its code."""

    def quiet(info) -> None:
        if not isinstance(info.exc_value, Interrupted):
            hook(info)

    return quiet


@contextmanager
def signals_end_the_run() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run as Ctrl-C does: by an exception, so cleanup runs."""
    previous, hook = {}, sys.unraisablehook
    _RECEIVED.clear()
    for signum in SIGNALS:
        with suppress(ValueError):  # not the main thread (e.g. a test's thread)
            previous[signum] = signal.signal(signum, _raise_interrupted)
    sys.unraisablehook = _unraisable(hook)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sys.unraisablehook = hook


def _file_handlers() -> list[logging.FileHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def _log_outcome(message: str, code: int, crash: bool) -> str | None:
    """Record the outcome, with the traceback, in the run's log files (a crash report of its own
    for a bug in a stand-alone command); return where it was written."""
    handlers: list[logging.Handler] = list(_file_handlers())
    if crash and not handlers:
        with tempfile.NamedTemporaryFile(
            "w", prefix="greyarray-crash-", suffix=".log", delete=False
        ) as handle:
            handlers = [logging.FileHandler(handle.name)]
    record = logging.LogRecord(
        "greyarray",
        logging.ERROR,
        __file__,
        0,
        "%s (exit code %d)",
        (message, code),
        sys.exc_info(),
    )
    for handler in handlers:
        handler.handle(record)
    return getattr(handlers[0], "baseFilename", None) if handlers else None


def fail(message: str, code: int, unexpected: bool = False) -> int:
    """One line for the user (escaped and bounded: it may quote any CSV field); the full message
    and the traceback in the log (and the traceback on stderr with DEBUG logging)."""
    where = _log_outcome(message, code, crash=unexpected)
    if unexpected and logging.getLogger().isEnabledFor(logging.DEBUG):
        traceback.print_exc()
    suffix = f" (details in {where})" if where and unexpected else ""
    print(f"greyarray: error: {one_line(message)}{suffix}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["--version"], ["-V"]):  # answered before anything is imported
        from greyarray import __version__

        print(f"greyarray {__version__}")
        return 0
    started = time.monotonic()
    with signals_end_the_run():
        try:
            code = _dispatch(argv, started)
            if _RECEIVED:  # raised where Python swallowed it: the run went on to its end
                sig = _RECEIVED[0]
                return fail(f"interrupted by {sig.name} as the run ended", sig.exit_code)
            return code
        except GreyArrayError as err:
            return fail(str(err), err.exit_code)
        except Interrupted as sig:
            return fail(f"interrupted by {sig.name}; temporary files removed", sig.exit_code)
        except KeyboardInterrupt:
            return fail("interrupted by SIGINT; temporary files removed", 130)
        except MemoryError:
            return fail("out of memory", 1, unexpected=True)
        except Exception as err:  # the safety net: a bug, not the user's fault
            return fail(f"unexpected {type(err).__name__}: {err}", 1, unexpected=True)


def _dispatch(argv: list[str], started: float) -> int:
    if argv and argv[0] in COMMANDS:
        make_parser, run, _ = COMMANDS[argv[0]]
        args = make_parser().parse_args(argv[1:])
        args.command_line = shlex.join(["greyarray", *argv])
        configure_logging(args.log_level)
        code = run(args)
        log.debug("Done in %.1f s", time.monotonic() - started)
        return code
    from greyarray.bids.app import main as bids_app

    commands = "\n".join(f"  {name:15} {about}" for name, (_, _, about) in COMMANDS.items())
    return bids_app(argv, commands)
