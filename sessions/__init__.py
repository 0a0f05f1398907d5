"""Chat sessions: data model, history tree and JSON file store. Pure Python (stdlib only); no model or
Flask imports, so the server and the tests can use it anywhere.

    store = SessionStore("~/exllama_sessions")
    s = store.resume()                        # last open session, else most recent, else a new one
    store.set_last_session(s.id)
    u = s.append("user", "User", "Hi")        # history ops mutate the Session in memory ...
    b = s.append("bot", "Chatbort", "")       # ... stream into it with s.update_message_text(b, text)
    store.save(s)                             # ... and save; StaleRevisionError if another tab saved first

Session objects are not locked: one thread at a time per object (the store itself is thread-safe).
Files: sessions/store.py (disk), sessions/schema.py (fields, validation), sessions/history.py (tree).
"""
from .errors import (CorruptSessionError, HistoryError, InvalidIdError, InvalidNameError,
                     MessageNotFoundError, SessionError, SessionExistsError, SessionFormatError,
                     SessionNotFoundError, SessionTooLargeError, StaleRevisionError, UnsupportedSchemaError)
from .history import ROLES, Message
from .schema import (DEFAULT_FIXED_PROMPT, DEFAULT_SETTINGS, PARTICIPANT_KINDS, SCHEMA_VERSION, TEMPLATES,
                     TURN_ORDERS, Participant, Session, default_participants)
from .store import DEFAULT_ROOT, MAX_IMPORT_BYTES, SessionInfo, SessionStore, atomic_write
from .util import clean_name, clean_text, is_session_id, validate_session_id

__all__ = [
    "SessionStore", "SessionInfo", "Session", "Participant", "Message", "default_participants",
    "atomic_write", "clean_name", "clean_text", "is_session_id", "validate_session_id",
    "SCHEMA_VERSION", "TURN_ORDERS", "TEMPLATES", "PARTICIPANT_KINDS", "ROLES", "DEFAULT_SETTINGS",
    "DEFAULT_FIXED_PROMPT", "DEFAULT_ROOT", "MAX_IMPORT_BYTES",
    "SessionError", "InvalidIdError", "InvalidNameError", "SessionFormatError", "UnsupportedSchemaError",
    "CorruptSessionError", "SessionNotFoundError", "SessionExistsError", "StaleRevisionError",
    "SessionTooLargeError", "MessageNotFoundError", "HistoryError",
]
