"""User-facing errors.

Every mistake a user can make (bad model name, bad hookpoint, corrupt file, ...) raises a
``SparsetraceError`` whose message names the bad value and what was expected. The CLI prints it as
one line and exits non-zero; no traceback is shown unless ``--debug`` is given.
"""

from __future__ import annotations


class SparsetraceError(Exception):
    """An error caused by user input; shown as a single line by the CLI."""

    exit_code = 2


class ModelError(SparsetraceError):
    """A model could not be found, loaded, or does not match."""


class HookpointError(SparsetraceError):
    """An unknown hookpoint or a layer out of range."""


class DictionaryFileError(SparsetraceError):
    """A dictionary file is missing, corrupt, foreign, or does not match the model."""


class DataError(SparsetraceError):
    """Text or activations are unusable (empty corpus, NaN, too long, not UTF-8)."""


class ConfigError(SparsetraceError):
    """An invalid configuration value."""


class TrainingDiverged(SparsetraceError):
    """Training produced NaN/inf; the last good checkpoint was kept."""
