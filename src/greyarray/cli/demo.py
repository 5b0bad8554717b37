"""``demo``: a synthetic BIDS dataset and the whole pipeline on it."""

from __future__ import annotations

import argparse
from pathlib import Path

from greyarray.options import Parser, add_logging


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
