"""The errors escapelab raises on purpose.

Every error a user can cause (a bad config key, a missing archive, a run directory
in the way) is an :class:`EscapelabError` whose message names the problem and what
to do about it. The CLI prints that one message and exits 2; a stopped run
(:class:`RunInterrupted`) exits 128 + the signal's number, like a shell would report
it (130 for SIGINT, 143 for SIGTERM); anything else reaching the top is a bug.
"""

from __future__ import annotations

import signal


class EscapelabError(Exception):
    """Base class of all user-facing errors."""

    exit_code = 2


class ConfigError(EscapelabError):
    """A config key is unknown, has the wrong type or an impossible value."""


class DataError(EscapelabError):
    """A data set cannot be found, read or trusted."""


class RunDirError(EscapelabError):
    """A run directory is missing, damaged, locked or in the way."""


class RunInterrupted(EscapelabError):
    """The run was stopped by a signal (SIGINT, SIGTERM); its folder says whether and
    how it can be resumed."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return 128 + self.signum
