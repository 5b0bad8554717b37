"""``harmonize``: ComBat (neuroCombat's numbers) or ComBat-GAM (neuroHarmonize's) at every
element, written as a new scalar of the HDF5; ``--apply-from`` harmonises new subjects."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from greyarray.cli.shared import check_report, report_option, write_report
from greyarray.errors import UsageError
from greyarray.options import Parser, add_logging, add_nprocs, non_negative_int, option

log = logging.getLogger("greyarray")

FIT_ONLY = {  # flags that describe a fit: --apply-from takes them from the fitted model
    "covariates": "--covariates",
    "nonparametric": "--nonparametric",
    "mean_only": "--mean-only",
    "no_eb": "--no-eb",
    "reference_batch": "--reference-batch",
    "seed": "--seed",
}


def harmonize_parser(prog: str = "greyarray harmonize") -> Parser:
    parser = Parser(
        prog=prog,
        description="Remove site (batch) effects at every element with ComBat, as neuroCombat "
        "0.2.12 computes it (parametric empirical Bayes by default), keeping the covariates' "
        "effects; with a smooth term s(x) in --covariates, ComBat-GAM as neuroHarmonize 2.5.2 "
        "computes it. The harmonised values are written as a new scalar of the HDF5 (same "
        "subjects, same order), which ModelArray reads like any other "
        '(scalar_types = "<output-scalar>"); the input scalar is never changed. What was '
        "estimated is kept under greyarray/harmonization/<output-scalar>/, so that "
        "--apply-from harmonises new subjects of the same sites without refitting.",
    )
    option(parser, "--input-hdf5", required=True, type=Path, help="HDF5 holding the scalar")
    option(
        parser,
        "--cohort-file",
        required=True,
        type=Path,
        help="cohort CSV whose source_file values are the HDF5's subject names, with the batch "
        "and covariate columns",
    )
    parser.add_argument("--scalar", required=True, help="scalar to harmonise, e.g. thickness")
    parser.add_argument(
        "--batch", metavar="COLUMN", help="cohort column naming each subject's site or scanner"
    )
    parser.add_argument(
        "--covariates",
        metavar="TERMS",
        help="effects to keep, in fit-lm's formula language without a response, e.g. "
        "'age + sex' (factors with R's contrasts, interactions, I(age^2)); s(age) makes it "
        "ComBat-GAM (default: none, the batch alone)",
    )
    option(
        parser,
        "--output-scalar",
        help="name of the harmonised scalar (default: <scalar>_combat)",
    )
    option(
        parser,
        "--output-hdf5",
        type=Path,
        help="write the harmonised scalar into this HDF5 (created with the input's geometry "
        "when missing) instead of the input HDF5",
    )
    model = parser.add_argument_group("ComBat's options (neuroCombat's eb, parametric, ...)")
    model.add_argument(
        "--nonparametric",
        action="store_true",
        help="non-parametric empirical Bayes (neuroCombat's parametric=False; quadratic in the "
        "number of elements: minutes for 91k greyordinates)",
    )
    model.add_argument(
        "--mean-only", action="store_true", help="adjust the location only, not the scale"
    )
    model.add_argument(
        "--no-eb",
        action="store_true",
        help="no empirical Bayes: each element's own batch estimates (neuroCombat's eb=False)",
    )
    model.add_argument(
        "--reference-batch",
        metavar="NAME",
        help="harmonise to this batch, whose values are kept as they are (neuroCombat's ref_batch)",
    )
    model.add_argument(
        "--seed",
        type=non_negative_int,
        default=None,
        help="ComBat-GAM: seed of the cross-validation folds that choose each smooth's penalty "
        "(neuroHarmonize's seed; default 0)",
    )
    option(
        parser,
        "--apply-from",
        metavar="FILE.h5:SCALAR",
        help="harmonise the subjects of --input-hdf5 with the estimates of an earlier fit "
        "(FILE.h5's greyarray/harmonization/SCALAR), as neuroHarmonize's harmonizationApply "
        "does: every site must be one that fit estimated; covariates and options are the fit's",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing scalars/<output-scalar>"
    )
    parser.add_argument(
        "--discard-results",
        action="store_true",
        help="with --overwrite: also remove the results/ GreyArray fitted to the scalar being "
        "replaced (without it such a scalar is not replaced: those results would describe "
        "values no longer there)",
    )
    add_nprocs(parser, "threads for compressing and the non-parametric step")
    report_option(parser)
    add_logging(parser)
    return parser


def run_harmonize(args: argparse.Namespace) -> int:
    from greyarray.stats.combat import Options
    from greyarray.stats.harmonization import Request, harmonize

    if args.discard_results and not args.overwrite:
        raise UsageError(
            "--discard-results needs --overwrite (it removes the results fitted to the scalar "
            "--overwrite replaces)"
        )
    if args.apply_from:
        given = [flag for name, flag in FIT_ONLY.items() if getattr(args, name)]
        if given:
            raise UsageError(
                f"{', '.join(given)}: with --apply-from the covariates and options are those "
                "of the fitted model"
            )
    elif args.nonparametric and args.no_eb:
        raise UsageError("--nonparametric chooses an empirical Bayes step; --no-eb has none")
    output_scalar = args.output_scalar or f"{args.scalar}_combat"
    output = args.output_hdf5 or args.input_hdf5
    check_report(args.report, args.input_hdf5, args.cohort_file, args.output_hdf5)
    done = harmonize(
        Request(
            args.input_hdf5,
            args.cohort_file,
            args.scalar,
            output_scalar,
            batch=args.batch,
            covariates=args.covariates,
            options=Options(
                eb=not args.no_eb,
                parametric=not args.nonparametric,
                mean_only=args.mean_only,
                reference=args.reference_batch,
                seed=args.seed or 0,
            ),
            output_hdf5=args.output_hdf5,
            apply_from=args.apply_from,
            overwrite=args.overwrite,
            discard_results=args.discard_results,
            nprocs=args.nprocs,
            command_line=args.command_line,
        )
    )
    about = done.about
    log.info(
        "Wrote scalars/%s (%s, %s; %s subjects) to %s; estimates in greyarray/harmonization/%s",
        output_scalar,
        about["method"] + (f" applied from {args.apply_from}" if args.apply_from else ""),
        about["options_text"],
        ", ".join(f"{k}: {v}" for k, v in about["subjects_per_batch"].items()),
        output,
        output_scalar,
    )
    log.info('In R: ModelArray("%s", scalar_types = "%s")', output, output_scalar)
    if args.report:
        write_report(output, args.cohort_file, args.report)
    return 0
