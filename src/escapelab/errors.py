"""The errors escapelab raises on purpose.

Every error a user can cause (a bad config key, a missing archive, a run directory
in the way) is an :class:`EscapelabError` whose message names the problem and what
to do about it. The CLI prints that one message and exits non-zero; anything else
reaching the top is a bug.
"""

from __future__ import annotations


class EscapelabError(Exception):
    """Base class of all user-facing errors."""


class ConfigError(EscapelabError):
    """A config key is unknown, has the wrong type or an impossible value."""


class DataError(EscapelabError):
    """A data set cannot be found, read or trusted."""


class RunDirError(EscapelabError):
    """A run directory is missing, incomplete or in the way."""
