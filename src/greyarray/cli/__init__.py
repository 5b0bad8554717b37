"""Command line: a thin dispatcher to one module per command, and the BIDS-App.

``convert`` holds ModelArrayIO's two commands (flag for flag), ``fit`` the models, ``demo`` the
demo; ``signals`` decides how a run ends (one line, one exit code). Each command imports only what
it needs, so ``--version`` and small exports start fast.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from collections.abc import Callable, Sequence

from greyarray.cli import convert, demo, fit, harmonize
from greyarray.cli.signals import RECEIVED, configure_logging, fail, signals_end_the_run
from greyarray.errors import GreyArrayError, Interrupted
from greyarray.options import Parser

log = logging.getLogger("greyarray")


COMMANDS: dict[str, tuple[Callable[[], Parser], Callable[[argparse.Namespace], int], str]] = {
    "to-modelarray": (
        convert.to_modelarray_parser,
        convert.run_to_modelarray,
        "convert a cohort CSV of CIFTI-2 maps to ModelArray's HDF5 (ModelArrayIO's flags)",
    ),
    "export-results": (
        convert.export_results_parser,
        convert.run_export_results,
        "write ModelArray's results as CIFTI-2 maps (ModelArrayIO's flags)",
    ),
    "fit-lm": (
        fit.fit_lm_parser,
        fit.run_fit_lm,
        "ModelArray.lm's linear model at every element, in seconds",
    ),
    "fit-gam": (
        fit.fit_gam_parser,
        fit.run_fit_gam,
        "ModelArray.gam's GAMs (mgcv's numbers) at every element, in minutes",
    ),
    "fit-lmm": (
        fit.fit_lmm_parser,
        fit.run_fit_lmm,
        "lme4's mixed models (lmerTest's Satterthwaite tests) at every element, in minutes",
    ),
    "harmonize": (
        harmonize.harmonize_parser,
        harmonize.run_harmonize,
        "remove site effects with ComBat or ComBat-GAM (neuroCombat's, neuroHarmonize's numbers)",
    ),
    "demo": (demo.demo_parser, demo.run_demo, "run the whole pipeline on a synthetic demo dataset"),
}


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
            if RECEIVED:  # raised where Python swallowed it: the run went on to its end
                sig = RECEIVED[0]
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
