"""User-facing errors: each carries the exit code the BIDS execution spec recommends.

The CLI prints ``greyarray: error: <message>`` and exits with ``exit_code``; no traceback, since
these describe the user's input, not a bug.
"""


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
