"""User-facing errors: each carries the exit code the BIDS execution spec recommends.

The CLI prints ``greyarray: error: <message>`` and exits with ``exit_code``; no traceback, since
these describe the user's input, not a bug.
"""

from __future__ import annotations

import re

LINE_LIMIT = 2000  # characters of the whole error line
VALUE_LIMIT = 400  # characters of one unbroken value (a path, a CSV field) inside it
_LONG_VALUE = re.compile(rf"\S{{{VALUE_LIMIT + 1},}}")
_NOT_ASCII_TEXT = re.compile(r"[^ -~]")


class GreyArrayError(Exception):
    """A problem with the user's input or environment (exit 1 unless a subclass says otherwise)."""

    exit_code = 1


class UsageError(GreyArrayError):
    """Bad command-line usage."""

    exit_code = 64


class DataError(GreyArrayError):
    """Input data that cannot be used as it is (wrong CIFTI type, mismatched geometry, ...)."""

    exit_code = 65


class MissingInputError(GreyArrayError):
    """An input file or folder does not exist or cannot be read."""

    exit_code = 66


class UnavailableError(GreyArrayError):
    """A service the run needs does not answer (an S3 endpoint, after bounded retries)."""

    exit_code = 69


class NoPermissionError(GreyArrayError):
    """Access to an input is refused: denied, or no credentials to ask with (EX_NOPERM)."""

    exit_code = 77


class OutputError(GreyArrayError):
    """An output cannot be created (exists without --overwrite, not writable, ...)."""

    exit_code = 73


class BusyError(GreyArrayError):
    """A file is held by another process for longer than we wait (EX_TEMPFAIL: try again)."""

    exit_code = 75


class Interrupted(BaseException):
    """A signal that ends the run (SIGTERM from SLURM or ``docker stop``, SIGHUP, SIGINT).

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` never swallows it and
    every ``finally`` (temporary files, HDF5 handles) runs on the way out.
    """

    def __init__(self, signum: int, name: str):
        super().__init__(name)
        self.signum, self.name = signum, name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def one_line(message: str) -> str:
    """``message`` as one bounded terminal line: user values (CSV fields, paths) may hold
    newlines, NULs, escape sequences or megabytes, and a message built from them must still be
    one readable line. Control and other unprintable characters are escaped as repr escapes them,
    each over-long value keeps its start and end, and the whole line stays <= LINE_LIMIT."""
    message = _LONG_VALUE.sub(lambda m: shorten(m.group(), VALUE_LIMIT), message)
    message = _NOT_ASCII_TEXT.sub(_escape, message)
    return shorten(message, LINE_LIMIT)


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters in the middle (the end of a path names the file)."""
    if len(text) <= limit:
        return text
    tail = limit // 3
    return f"{text[: limit - tail - 1]}\u2026{text[-tail:]}"


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return char if char.isprintable() else repr(char)[1:-1]
