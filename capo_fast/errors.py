"""The errors a run reports to its user (exit status 2, the message alone): what users catch.

Every module raises them from here, so raising one imports nothing above this leaf.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key and where it was set."""


class DataError(ValueError):
    """A data row or source that cannot be used; the message names the file and line."""


class JudgeError(RuntimeError):
    """Too many critiques failed, or the judge cannot answer: the run would silently lose its step credit."""
