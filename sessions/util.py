"""Ids, name/text cleaning and strict JSON helpers (stdlib only)."""
from __future__ import annotations

import json
import math
import re
import time
import unicodedata
import uuid
from typing import Any

from .errors import InvalidIdError, InvalidNameError, SessionFormatError

# Session ids are made by the server (uuid4().hex) and are the only thing that ever becomes a file name.
SESSION_ID_RE = re.compile(r"[0-9a-f]{32}")
# Message ids: uuid4().hex as well, but accept a slightly wider safe alphabet (never used in paths).
MESSAGE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

MAX_NAME_CHARS = 120

# Bidi embedding/override/isolate controls: dropped from names (spoofing); ZWJ etc. stay for emoji.
_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")
_DROP_CATEGORIES = {"Cc", "Cs", "Zl", "Zp"}


def new_id() -> str:
    return uuid.uuid4().hex


def now() -> float:
    return time.time()


def _short_repr(value: Any, limit: int = 80) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + "..."


def validate_session_id(value: Any) -> str:
    """Return `value` if it is a well-formed session id, else raise InvalidIdError."""
    if not isinstance(value, str) or SESSION_ID_RE.fullmatch(value) is None:
        raise InvalidIdError(f"invalid session id {_short_repr(value)}: expected 32 lowercase hex digits")
    return value


def is_session_id(value: Any) -> bool:
    return isinstance(value, str) and SESSION_ID_RE.fullmatch(value) is not None


def validate_message_id(value: Any) -> str:
    if not isinstance(value, str) or MESSAGE_ID_RE.fullmatch(value) is None:
        raise InvalidIdError(f"invalid message id {_short_repr(value)}")
    return value


def clean_text(text: str) -> str:
    """Make `text` encodable as UTF-8: valid surrogate pairs are joined, lone surrogates become U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def clean_name(value: Any, *, allow_empty: bool = False, max_chars: int = MAX_NAME_CHARS) -> str:
    """A display name as plain data: control, line-separator and bidi-override characters dropped,
    whitespace runs collapsed to one space, ends stripped, at most `max_chars` characters."""
    if not isinstance(value, str):
        raise InvalidNameError(f"a name must be a string, not {type(value).__name__}")
    value = clean_text(value)
    kept = []
    for ch in value:
        if ch in _BIDI_CONTROLS or unicodedata.category(ch) in _DROP_CATEGORIES:
            # tabs/newlines count as whitespace, other controls vanish
            if ch in "\t\n\r\v\f\x1c\x1d\x1e\x1f\x85\u2028\u2029":
                kept.append(" ")
            continue
        kept.append(ch)
    name = " ".join("".join(kept).split())
    if len(name) > max_chars:
        name = name[:max_chars].rstrip()
    if not name and not allow_empty:
        raise InvalidNameError("a name must not be empty")
    return name


# ---- strict JSON -----------------------------------------------------------------------------

def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in session JSON")


def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {_short_repr(k)}")
        out[k] = v
    return out


def loads_strict(data: bytes | str) -> Any:
    """Parse JSON refusing NaN/Infinity, duplicate keys, invalid UTF-8 and absurd nesting.
    Raises SessionFormatError."""
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data).decode("utf-8")
        if data.startswith("\ufeff"):
            data = data[1:]
        return json.loads(data, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as e:
        raise SessionFormatError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise SessionFormatError(f"invalid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise SessionFormatError("invalid JSON: nested too deeply") from None
    except ValueError as e:
        raise SessionFormatError(f"invalid JSON: {e}") from None


def dumps_pretty(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=1, allow_nan=False) + "\n").encode("utf-8")


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
