"""The project's error types: mistakes a user can fix, as opposed to bugs.

The command-line entry points print these as one paragraph (what, where, how to fix) and exit with
status 2, without a traceback (set ORL_DEBUG=1 to see it). Each also derives from the built-in type
callers would expect (ValueError, FileNotFoundError, RuntimeError).
"""
from __future__ import annotations


class OrlError(Exception):
    """Base of every user-facing error."""


class ConfigError(OrlError, ValueError):
    """A configuration value that cannot work (unknown option, out-of-range value)."""


class DataError(OrlError, ValueError):
    """Data that cannot be used as given (file contents, text rows)."""


class DataFileNotFound(OrlError, FileNotFoundError):
    """A dataset, checkpoint or prompt file that does not exist."""


class CheckpointError(OrlError, ValueError):
    """A checkpoint that does not fit what is being built from it."""


class RunDirError(OrlError, ValueError):
    """A run directory that cannot be used as asked (it would overwrite another run)."""


class DivergenceError(OrlError, RuntimeError):
    """Training produced non-finite losses or weights; the last good checkpoint was kept."""
