"""``fit-lm``, ``fit-gam`` and ``fit-lmm``: models at every element, with ModelArray's options."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from greyarray.cli.shared import check_report, report_option, write_report
from greyarray.options import (
    Parser,
    add_factor_options,
    add_logging,
    add_nprocs,
    add_tfce_connectivity,
    add_thresholds,
    factor_options,
    non_negative_int,
    option,
    permutation_options,
)

log = logging.getLogger("greyarray")


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
    add_factor_options(parser)
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
    report_option(parser)
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
    add_thresholds(parser)


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
        "--tfce",
        action="store_true",
        help="TFCE on dense greyordinates or voxels (PALM's H = 2; E = 1 on surfaces, 0.5 in "
        "volumes); not on parcels or fixels",
    )
    add_tfce_connectivity(group)
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


def _fit_options(args: argparse.Namespace) -> dict:
    """The options every fit command passes on: scalar, threshold, overwrite, factor coding."""
    references, ordered = factor_options(args)
    return {
        "scalar": args.scalar,
        "lthr_abs": args.num_subj_lthr_abs,
        "lthr_rel": args.num_subj_lthr_rel,
        "overwrite": args.overwrite,
        "reference_levels": references,
        "ordered_factors": ordered,
    }


def _written(args: argparse.Namespace, columns: list[str]) -> int:
    """Say what was written, and write the --report asked for."""
    log.info(
        "Wrote results/%s (%d columns) to %s", args.analysis_name, len(columns), args.input_hdf5
    )
    if getattr(args, "report", None):
        from greyarray.report import Thresholds

        thresholds = Thresholds(args.num_subj_lthr_abs, args.num_subj_lthr_rel)
        write_report(args.input_hdf5, args.cohort_file, args.report, thresholds)
    return 0


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
        term_stats=TERM_STATS if args.full_outputs else args.var_terms,
        model_stats=MODEL_STATS if args.full_outputs else args.var_model,
        permutations=permutations,
        **_fit_options(args),
    )
    if permutations is not None and permutations.shard is not None:
        from greyarray.stats.permutation import shard_path

        path = shard_path(args.input_hdf5, args.analysis_name, permutations.shard)
        log.info("Wrote the null distribution of shard %s to %s", args.permutation_shard, path)
        return 0
    return _written(args, columns)


def fit_lmm_parser(prog: str = "greyarray fit-lmm") -> Parser:
    parser = Parser(
        prog=prog,
        description="Fit a linear mixed model at every element with lme4's lmer numbers "
        "(REML by default) and lmerTest's Satterthwaite t tests, and write results/<analysis> "
        "into the HDF5. Random effects in lme4's syntax: (1 | participant_id), (1 + age | "
        "participant_id) (correlated), (1 | participant_id) + (0 + age | participant_id) or "
        "(age || participant_id) (uncorrelated), and two grouping factors, crossed "
        "((1 | site) + (1 | participant_id)) or nested ((1 | family_id/participant_id)). "
        "Fixed effects as in fit-lm.",
    )
    _model_inputs(
        parser, "lmm", "R formula with random effects, e.g. "
        "'thickness ~ age + sex + (1 | participant_id)'",
    )  # fmt: skip
    add_factor_options(parser)
    criterion = parser.add_mutually_exclusive_group()
    criterion.add_argument(
        "--reml", dest="reml", action="store_true", default=True,
        help="restricted maximum likelihood (lme4's default)",
    )  # fmt: skip
    criterion.add_argument(
        "--ml", dest="reml", action="store_false", help="maximum likelihood (lmer's REML = FALSE)"
    )
    _thresholds(parser)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing results/<name>"
    )
    add_nprocs(parser, "threads fitting batches of elements")
    report_option(parser)
    add_logging(parser)
    return parser


def run_fit_lmm(args: argparse.Namespace) -> int:
    from greyarray.stats.lmm import fit_lmm  # numba and scipy: only for this command

    check_report(args.report, args.input_hdf5, args.cohort_file)
    columns = fit_lmm(
        args.input_hdf5,
        args.cohort_file,
        args.formula,
        args.analysis_name,
        reml=args.reml,
        nprocs=args.nprocs,
        **_fit_options(args),
    )
    return _written(args, columns)


def fit_gam_parser(prog: str = "greyarray fit-gam") -> Parser:
    parser = Parser(
        prog=prog,
        description="Fit a GAM (mgcv::gam, gaussian) at every element with ModelArray.gam's "
        "rules and outputs, and write results/<analysis> into the HDF5. Smooth terms "
        "s(x, k=, fx=, bs=, by=) with bs tp, ts, cr or cs (by= a factor: one smooth per "
        "level), tensor products te(x, z, ...) and ti(...), plus parametric terms as in fit-lm.",
    )
    _model_inputs(parser, "gam", "e.g. 'thickness ~ s(age, k=4, fx=TRUE) + sex'")
    add_factor_options(parser)
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
    from greyarray.stats.gam import fit_gam  # scipy: only for this command

    columns = fit_gam(
        args.input_hdf5,
        args.cohort_file,
        args.formula,
        args.analysis_name,
        method=args.method,
        changed_rsq_term=args.changed_rsq_term,
        full_outputs=args.full_outputs,
        **_fit_options(args),
    )
    return _written(args, columns)
