"""``to-modelarray`` and ``export-results``: ModelArrayIO's two commands, flag for flag."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from greyarray.cli.shared import check_report, report_option, write_report
from greyarray.errors import UsageError
from greyarray.options import Parser, add_logging, add_nprocs, option, positive_int

log = logging.getLogger("greyarray")


def to_modelarray_parser(prog: str = "greyarray to-modelarray") -> Parser:
    parser = Parser(
        prog=prog,
        description="Convert a cohort of CIFTI-2 dscalar/pscalar/pconn files, NIfTI-1/2 maps "
        "(.nii, .nii.gz; with --mask) or MRtrix fixel data (.mif, .mif.gz; with --index-file "
        "and --directions-file) to the HDF5 file ModelArray reads. The data type comes from the "
        "files' names. Every file is checked (type, geometry, maps) before anything is written. "
        "The flags are ModelArrayIO's.",
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
        type=positive_int,
        default=8,
        metavar="N",
        help="parallel reads of s3://bucket/key sources (default 8); credentials: boto3's "
        "chain, MODELARRAYIO_S3_ANON=1 for public buckets, AWS_ENDPOINT_URL for S3-compatible "
        "stores",
    )
    _space_files(parser)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing outputs (an output that is one of the inputs is never replaced)",
    )
    add_logging(parser)
    return parser


def _space_files(parser, export: bool = False) -> None:
    """ModelArrayIO's NIfTI and fixel flags."""
    group = parser.add_argument_group("NIfTI maps (.nii, .nii.gz)")
    option(
        group,
        "--mask",
        type=Path,
        metavar="FILE",
        help="group mask (NIfTI, voxels > 0): "
        + (
            "optional for HDF5 files GreyArray made (checked against the stored grid)"
            if export
            else "the elements are its voxels; every map and subject mask (cohort column "
            "source_mask_file, optional; voxels outside it are NaN) must be on its grid"
        ),
    )
    group = parser.add_argument_group("MRtrix fixel data (.mif, .mif.gz)")
    option(
        group,
        "--index-file",
        type=Path,
        metavar="FILE",
        help="the fixel directory's index image"
        + (" (copied beside the maps; optional for HDF5 files GreyArray made)" if export else ""),
    )
    option(
        group,
        "--directions-file",
        type=Path,
        metavar="FILE",
        help="the fixel directory's directions image"
        + (" (copied beside the maps)" if export else ""),
    )


def _refuse_unsupported(args: argparse.Namespace) -> None:
    if getattr(args, "backend", "hdf5") != "hdf5":
        raise UsageError(
            f"--backend {args.backend} is not supported yet; GreyArray writes HDF5 (--backend hdf5)"
        )
    if getattr(args, "workers", None) is not None:
        log.info("--workers has no effect on HDF5 output; --nprocs sets threads")
    for name in ("mask", "index_file", "directions_file"):
        value = getattr(args, name, None)
        if value is not None and str(value).startswith("s3:/"):  # Path("s3://b/k"): "s3:/b/k"
            flag = "--" + name.replace("_", "-")
            raise UsageError(
                f"{flag} s3://{str(value)[4:]}: {flag} is read from a local file only (s3:// "
                "is read for the cohort's source_file and source_mask_file); download it first"
            )


def _space_files_of(args: argparse.Namespace):
    from greyarray.io.formats import SpaceFiles

    return SpaceFiles(args.mask, args.index_file, args.directions_file)


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
        s3_workers=args.s3_workers,
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
        space_files=_space_files_of(args),
    )
    return 0


# ---- export-results --------------------------------------------------------------------------
def export_results_parser(prog: str = "greyarray export-results") -> Parser:
    parser = Parser(
        prog=prog,
        description="Write ModelArray's results (results/<analysis> in the HDF5) as maps of the "
        "HDF5's data type (CIFTI-2, NIfTI, MRtrix fixel data), one per result column, with "
        "1m.p.value companions for p-values. The geometry stored by to-modelarray is used; a "
        "template is optional. The flags are ModelArrayIO's.",
    )
    option(parser, "--analysis-name", required=True, help="name of the analysis in the HDF5")
    option(parser, "--input-hdf5", required=True, type=Path, help="HDF5 file with the results")
    option(
        parser,
        "--output-dir",
        required=True,
        type=Path,
        help="folder for the maps (created if needed; files of the same names in it are "
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
        help="a map of the cohort's geometry to use as template",
    )
    parser.add_argument(
        "--no-compress",
        dest="compress",
        action="store_false",
        help="write .nii / .mif instead of .nii.gz / .mif.gz (CIFTI files are never compressed)",
    )
    _space_files(parser, export=True)
    report_option(parser)
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
    export_results(
        args.input_hdf5,
        args.analysis_name,
        args.output_dir,
        template,
        space_files=_space_files_of(args),
        compress=args.compress,
    )
    if args.report:
        write_report(args.input_hdf5, args.cohort_file, args.report)
    return 0
