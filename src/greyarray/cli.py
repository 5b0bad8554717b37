"""Command line: ModelArrayIO's two commands, flag for flag, plus GreyArray's own.

User errors end as one line on stderr and the exit code of their kind (errors.py); argparse usage
errors exit with 64 (EX_USAGE) as the BIDS execution spec recommends.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from greyarray.errors import GreyArrayError, UsageError
from greyarray.options import Parser, default_nprocs, option

log = logging.getLogger("greyarray")


def _common(parser) -> None:
    option(
        parser,
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="logging level (WARNING hides progress messages)",
    )


def to_modelarray_parser(prog: str = "greyarray to-modelarray") -> Parser:
    parser = Parser(
        prog=prog,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Convert a cohort of CIFTI-2 dscalar/pscalar/pconn files to the HDF5 file "
        "ModelArray reads. Every file is checked (type, full greyordinate geometry, "
        "maps) before anything is written.",
    )
    option(
        parser,
        "--cohort-file",
        required=True,
        type=Path,
        help="CSV with columns scalar_name and source_file (or --scalar-columns); a relative "
        "source_file is relative to the CSV's folder, not the current directory",
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
        help="one HDF5 per scalar, named <scalar>_<output> (default for wide cohorts)",
    )
    option(
        split,
        "--no-split-files",
        dest="split",
        action="store_false",
        help="all scalars in one HDF5 (default for long cohorts)",
    )
    parser.add_argument(
        "--backend",
        choices=["hdf5"],
        default="hdf5",
        help="storage backend (ModelArrayIO compatibility; only hdf5)",
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
        "--no-shuffle", dest="shuffle", action="store_false", help="disable the shuffle filter"
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
        help="which map of multi-map dscalar/pscalar files (a name, or a 1-based "
        "index as wb_command counts)",
    )
    parser.add_argument(
        "--nprocs", type=int, default=default_nprocs(), help="threads for checking and compressing"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _common(parser)
    return parser


def export_results_parser(prog: str = "greyarray export-results") -> Parser:
    parser = Parser(
        prog=prog,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write ModelArray's results (results/<analysis> in the HDF5) as CIFTI-2 files, "
        "one per result column, with 1m.p.value companions for p-values. The "
        "geometry stored by to-modelarray is used; a template is optional.",
    )
    option(parser, "--analysis-name", required=True, help="name of the analysis in the HDF5")
    option(parser, "--input-hdf5", required=True, type=Path, help="HDF5 file with the results")
    option(
        parser,
        "--output-dir",
        required=True,
        type=Path,
        help="folder for the CIFTI files (created; listed outputs in it are replaced)",
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
    _common(parser)
    return parser


def run_to_modelarray(args: argparse.Namespace) -> int:
    from greyarray.io.cohort import load_cohort
    from greyarray.io.store import StoreOptions, to_modelarray

    if args.nprocs < 1:
        raise UsageError("--nprocs must be at least 1")
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


def run_export_results(args: argparse.Namespace) -> int:
    from greyarray.io.export import export_results

    template = args.example_file
    if args.cohort_file is not None:
        from greyarray.io.cohort import load_cohort

        cohort = load_cohort(args.cohort_file)
        template = cohort.resolve(cohort.table["source_file"].iloc[0])
    export_results(args.input_hdf5, args.analysis_name, args.output_dir, template)
    return 0


def fit_lm_parser(prog: str = "greyarray fit-lm") -> Parser:
    from greyarray.stats import lm  # scipy and formulaic: imported only for this command

    parser = Parser(
        prog=prog,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Fit a linear model at every element, with ModelArray.lm's rules and "
        "outputs, and write results/<analysis> into the HDF5 as ModelArray's writeResults "
        "does. R formula syntax: numeric and categorical variables (treatment contrasts, R's "
        "column names such as sexM), interactions (age:sex, age*sex), I(age^2), factor(x), "
        "intercept removal (0 + ... or - 1).",
    )
    option(parser, "--input-hdf5", required=True, type=Path, help="HDF5 from to-modelarray")
    option(
        parser,
        "--cohort-file",
        required=True,
        type=Path,
        help="cohort CSV whose source_file values are the HDF5's subject names",
    )
    parser.add_argument(
        "--formula",
        required=True,
        help="R formula; its response is the scalar, e.g. 'thickness ~ age + sex'",
    )
    option(parser, "--analysis-name", default="lm", help="results/<name> in the HDF5")
    parser.add_argument("--scalar", help="scalar to model (default: the formula's response)")
    option(
        parser,
        "--full-outputs",
        action="store_true",
        help="every statistic below (ModelArray's full.outputs=TRUE)",
    )
    parser.add_argument(
        "--var-terms",
        nargs="+",
        default=list(lm.DEFAULT_TERM_STATS),
        choices=lm.TERM_STATS,
        help="statistics of each term (ModelArray's var.terms)",
    )
    parser.add_argument(
        "--var-model",
        nargs="+",
        default=list(lm.DEFAULT_MODEL_STATS),
        choices=lm.MODEL_STATS,
        help="statistics of the model (ModelArray's var.model)",
    )
    parser.add_argument(
        "--num-subj-lthr-abs",
        type=float,
        default=10,
        help="fit an element only with more valid subjects than this ...",
    )
    parser.add_argument(
        "--num-subj-lthr-rel",
        type=float,
        default=0.2,
        help="... and more than this fraction of all subjects",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace results/<name>")
    _permutation_options(parser)
    _common(parser)
    return parser


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
    group.add_argument("--seed", type=int, default=0, help="seed of the random permutations")
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
    group.add_argument(
        "--nprocs", type=int, default=default_nprocs(), help="batches of permutations in parallel"
    )


def _permutations(args: argparse.Namespace):
    """The permutation options of fit-lm's arguments, or None."""
    if args.permutations <= 0:
        given = [
            flag
            for flag, value in [
                ("--tfce", args.tfce),
                ("--exchangeability-blocks", args.exchangeability_blocks),
                ("--permutation-shard", args.permutation_shard),
                ("--merge-shards", args.merge_shards),
            ]
            if value
        ]
        if given or args.permutations < 0:
            raise UsageError(f"{', '.join(given) or '--permutations'} needs --permutations N > 0")
        return None
    if args.nprocs < 1:
        raise UsageError("--nprocs must be at least 1")
    from greyarray.stats.permutation import PermutationOptions, parse_shard

    return PermutationOptions(
        permutations=args.permutations,
        tfce=args.tfce,
        blocks=args.exchangeability_blocks,
        seed=args.seed,
        shard=parse_shard(args.permutation_shard) if args.permutation_shard else None,
        merge=tuple(args.merge_shards or ()),
        nprocs=args.nprocs,
    )


def run_fit_lm(args: argparse.Namespace) -> int:
    from greyarray.stats.lm import MODEL_STATS, TERM_STATS, fit_lm

    permutations = _permutations(args)
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
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from greyarray.demo import run_demo as demo

    return demo(args.folder, args.subjects, args.overwrite, args.log_level != "INFO")


def demo_parser(prog: str = "greyarray demo") -> Parser:
    parser = Parser(
        prog=prog,
        description="Build a small cohort from the bundled fsLR 91k "
        "template and convert it: a self-contained first run.",
    )
    parser.add_argument("folder", type=Path, help="where to write the demo data and outputs")
    parser.add_argument("--subjects", type=int, default=20, help="number of subjects")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo")
    _common(parser)
    return parser


COMMANDS: dict[str, tuple[Callable[[], Parser], Callable[[argparse.Namespace], int]]] = {
    "to-modelarray": (to_modelarray_parser, run_to_modelarray),
    "export-results": (export_results_parser, run_export_results),
    "fit-lm": (fit_lm_parser, run_fit_lm),
    "demo": (demo_parser, run_demo),
}


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in COMMANDS:
            make_parser, run = COMMANDS[argv[0]]
            args = make_parser().parse_args(argv[1:])
            args.command_line = shlex.join(["greyarray", *argv])
            configure_logging(args.log_level)
            return run(args)
        from greyarray.bids.app import main as bids_app

        return bids_app(argv)
    except GreyArrayError as err:
        print(f"greyarray: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("greyarray: interrupted", file=sys.stderr)
        return 130
