"""How every run ends: signals, logging, and the one line a user reads.

Every run ends in one of three ways, each a single line on stderr and the exit code of its kind:
a user error (errors.py: 64 usage, 65 bad data, 66 missing input, 73 cannot write output), a
signal (SIGINT 130, SIGHUP 129, SIGTERM 143: what SLURM and ``docker stop`` send; temporary files
are removed on the way out), or, as a last resort, a bug (exit 1, the traceback in the log file).
"""

from __future__ import annotations

import logging
import signal
import sys
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from greyarray.errors import RECEIVED, Interrupted, one_line

SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def _raise_interrupted(signum: int, _frame) -> None:
    """The first signal ends the run by an exception; later ones (a second Ctrl-C, SLURM's
    repeated SIGTERM) are recorded but never interrupt the cleanup it started."""
    interrupted = Interrupted(signum, SIGNALS.get(signum, f"signal {signum}"))
    RECEIVED.append(interrupted)
    if len(RECEIVED) == 1:
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
    RECEIVED.clear()
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
        RECEIVED.clear()  # a later run in this process (tests) starts without them


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
