"""Command-line pieces shared by every parser (the stand-alone commands and the BIDS-App)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from greyarray.errors import UsageError, one_line

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a default only where it tells something: never for switches or None, never twice."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower()
            or not action.option_strings
            or default in (None, False, True, argparse.SUPPRESS)
            or action.nargs == 0
        ):
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        return f"{text} (default: {str(default).replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """argparse with exit code 64 for usage errors and GreyArray's help layout."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    refusal = ""  # the error line, for the record of a refused run

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.refusal = f"{self.prog}: error: {one_line(message)}"
        self.exit(UsageError.exit_code, f"{self.refusal}\n")


def default_nprocs() -> int:
    """The CPUs this process may use (honours taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def option(parser, name: str, **kwargs) -> None:
    """Add ``--some-flag`` with ModelArrayIO's ``--some_flag`` spelling too."""
    spellings = [name] + (["--" + name[2:].replace("-", "_")] if "-" in name[2:] else [])
    parser.add_argument(*spellings, **kwargs)


def int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum`` (``--nprocs`` >= 1; ``--seed`` >= 0, as
    numpy's generators refuse negative seeds)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def add_nprocs(parser, what: str) -> None:
    parser.add_argument(
        "--nprocs",
        "--n-cpus",
        "--n_cpus",
        type=positive_int,
        default=default_nprocs(),
        metavar="N",
        help=f"{what} (default: the CPUs this process may use, here {default_nprocs()})",
    )


def add_thresholds(parser) -> None:
    """ModelArray's element threshold (num.subj.lthr.abs / .rel), for every model."""
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


def add_logging(parser) -> None:
    option(
        parser,
        "--log-level",
        default="INFO",
        choices=LOG_LEVELS,
        help="logging level (WARNING hides progress messages; DEBUG also prints tracebacks)",
    )


def reference_levels(items: Sequence[str], option: str = "--reference-level") -> dict[str, str]:
    """``["sex=F", "site=b"]`` -> ``{"sex": "F", "site": "b"}``."""
    levels = {}
    for item in items or []:
        column, sep, level = item.partition("=")
        if not sep or not column.strip():
            raise UsageError(f"{option} {item!r}: expected COLUMN=LEVEL, e.g. sex=F")
        levels[column.strip()] = level
    return levels


def add_tfce_connectivity(parser) -> None:
    option(
        parser,
        "--tfce-connectivity",
        type=int,
        choices=(6, 18, 26),
        default=6,
        help="with --tfce: voxels touch by a face (6, PALM's default for volumes), an edge (18) "
        "or a corner (26); for NIfTI voxels and CIFTI's subcortical structures",
    )


def add_factor_options(parser, prefix: str = "") -> None:
    """--reference-level and --ordered-factor: how a model reads a cohort column (fit-lm,
    fit-gam, fit-lmm, and the BIDS-App's group --model with ``prefix`` "with --model: ")."""
    option(
        parser,
        "--reference-level",
        nargs="+",
        default=[],
        metavar="COLUMN=LEVEL",
        help=f"{prefix}reference level of a factor, e.g. sex=F (default: the first level in R's "
        "order, which ignores case as R does in UTF-8 locales)",
    )
    option(
        parser,
        "--ordered-factor",
        nargs="+",
        default=[],
        metavar="COLUMN=REFERENCE",
        help=f"{prefix}make COLUMN an ordered factor as ModelArray's gen_gamFormula_fxSmooth "
        "does: REFERENCE first, then the other levels in their order in the cohort; it is "
        "coded by R's polynomial contrasts (COLUMN.L, COLUMN.Q, ...) and s(x, by = COLUMN) "
        "fits difference smooths",
    )


def factor_options(args) -> tuple[dict[str, str], dict[str, str]]:
    """(reference levels, ordered factors) given by add_factor_options' flags."""
    return (
        reference_levels(args.reference_level),
        reference_levels(args.ordered_factor, "--ordered-factor"),
    )


def permutation_options(args):
    """fit-lm's or group --model's permutation options, or None; the other permutation flags
    without --permutations are a usage error. fit-lm's --merge-shards names the shard files;
    the BIDS-App's gives their number K, and its caller names the files (``merge`` is empty)."""
    shard, merge = getattr(args, "permutation_shard", None), getattr(args, "merge_shards", None)
    if args.permutations <= 0:
        given = [
            flag
            for flag, value in [
                ("--tfce", args.tfce),
                ("--tfce-connectivity", getattr(args, "tfce_connectivity", 6) != 6),
                ("--exchangeability-blocks", args.exchangeability_blocks),
                ("--permutation-shard", shard),
                ("--merge-shards", merge),
            ]
            if value
        ]
        if given or args.permutations < 0:
            raise UsageError(f"{', '.join(given) or '--permutations'} needs --permutations N > 0")
        return None
    from greyarray.stats.permutation import PermutationOptions, parse_shard

    return PermutationOptions(
        permutations=args.permutations,
        tfce=args.tfce,
        connectivity=getattr(args, "tfce_connectivity", 6),
        blocks=args.exchangeability_blocks,
        seed=args.seed,
        shard=parse_shard(shard) if shard else None,
        merge=tuple(merge) if isinstance(merge, list) else (),
        nprocs=args.nprocs,
    )
