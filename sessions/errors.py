"""Exceptions raised by the session package. Every one derives from `SessionError`."""
from __future__ import annotations

from pathlib import Path


class SessionError(Exception):
    """Base class of every error in this package."""


class InvalidIdError(SessionError, ValueError):
    """A session or message id does not match the strict id pattern (never turned into a path)."""


class InvalidNameError(SessionError, ValueError):
    """A display name is not a string, or is empty once cleaned."""


class SessionFormatError(SessionError, ValueError):
    """Session data (a dict, an import, a file's content) fails validation.

    `where` is a dotted path into the data (e.g. ``messages.ab12.children[0]``) when known.
    """

    def __init__(self, reason: str, where: str | None = None):
        self.reason = reason
        self.where = where
        super().__init__(f"{where}: {reason}" if where else reason)


class UnsupportedSchemaError(SessionFormatError):
    """The data carries a schema version this code does not know. The file is never overwritten."""


class CorruptSessionError(SessionError):
    """A session file on disk cannot be loaded. Its bytes are left untouched.

    `path` names the file, `reason` says why; `recoverable` tells whether its `.bak` loads
    (then `SessionStore.recover(id)` can restore it).
    """

    def __init__(self, path: Path, reason: str, recoverable: bool = False):
        self.path = Path(path)
        self.reason = reason
        self.recoverable = recoverable
        hint = " (a backup loads: recover() can restore it)" if recoverable else ""
        super().__init__(f"session file {self.path.name}: {reason}{hint}")


class SessionNotFoundError(SessionError, LookupError):
    """No session (or trash entry) with that id."""


class SessionExistsError(SessionError):
    """The target id is already taken (e.g. restore while a live session has the same id)."""


class StaleRevisionError(SessionError):
    """`save` was given a revision that is not the one on disk: another client saved in between."""

    def __init__(self, session_id: str, expected: int, current: int):
        self.session_id = session_id
        self.expected = expected
        self.current = current
        super().__init__(f"session {session_id}: stale revision {expected}, the stored one is {current}; "
                         f"reload before saving")


class SessionTooLargeError(SessionError, ValueError):
    """An import (or file) is over the size limit."""


class MessageNotFoundError(SessionError, LookupError):
    """No message with that id in the session's history."""


class HistoryError(SessionError, ValueError):
    """A history operation that makes no sense (e.g. regenerate on a user message, bad sibling index)."""
