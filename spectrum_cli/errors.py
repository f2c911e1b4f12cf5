"""The errors spectrum raises on purpose.

Each message says what failed and where (path, run, step, layer), what was expected and what
was found, and one way to fix it. Only the command line catches them: it prints one red line
on stderr and exits with the error's exit code, without a traceback unless ``--verbose``.
Exit 2 says the command stopped on input it cannot use as given (a flag, a path, a store);
exit 1 says some of the work failed.
"""

from __future__ import annotations


class SpectrumError(Exception):
    """Base of every error spectrum raises for bad input or a failed step."""

    exit_code = 1


class UsageError(SpectrumError):
    """A flag, argument or path the user gave cannot be used as given."""

    exit_code = 2


class CheckpointError(SpectrumError):
    """A checkpoint cannot be read, or holds no weights."""


class StoreError(SpectrumError):
    """A spectra store is missing, of another format, locked, or inconsistent.

    The store the user named cannot be used as given: the command stops before it measures
    anything, as for a usage error.
    """

    exit_code = 2


class EvaluationError(SpectrumError):
    """A model or data callable cannot be loaded or does not fit the checkpoint.

    Bad input the user chose (``--model``, ``--data``): the command stops before it measures
    anything, as for a usage error.
    """

    exit_code = 2
