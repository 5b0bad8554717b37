"""Command-line pieces shared by every parser (the stand-alone commands and the BIDS-App)."""

from __future__ import annotations

import argparse
import os
import sys

from greyarray.errors import UsageError


class Parser(argparse.ArgumentParser):
    """argparse with exit code 64 for usage errors."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(UsageError.exit_code, f"{self.prog}: error: {message}\n")


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
