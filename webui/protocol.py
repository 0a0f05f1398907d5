"""The websocket protocol: limits, frame parsing, per-type field validation and the dispatch table.

Spec: docs/protocol.md. A request is validated completely here (types, ranges, sizes, id formats)
before a handler sees it, so handlers work on clean values. Every problem becomes a `ProtocolError`,
which the caller turns into an `error` message; nothing here raises anything else on bad input.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from sessions import TURN_ORDERS, TEMPLATES
from sessions.errors import SessionFormatError
from sessions.util import MESSAGE_ID_RE, SESSION_ID_RE, clean_name, clean_text, loads_strict

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 64 * 1024          # one client message
MAX_SOCKET_MESSAGE_BYTES = 4 * 1024 * 1024   # simple-websocket closes the socket (1009) above this
MAX_TEXT_CHARS = 32 * 1024           # message text, fixed prompt, persona
MAX_NAME_CHARS = 120
MAX_PARTICIPANTS = 16
MIN_PARTICIPANTS = 2
MAX_BOT_TURNS = 16
MAX_WAITING = 64                     # generation requests waiting for the engine (whole server)
MAX_IMPORT_BYTES = 16 * 1024 * 1024
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
COLOR_RE = re.compile(r"#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})")

LIMITS = {
    "frame_bytes": MAX_FRAME_BYTES, "socket_message_bytes": MAX_SOCKET_MESSAGE_BYTES,
    "text_chars": MAX_TEXT_CHARS, "name_chars": MAX_NAME_CHARS,
    "participants_min": MIN_PARTICIPANTS, "participants_max": MAX_PARTICIPANTS,
    "max_bot_turns": MAX_BOT_TURNS, "waiting_generations": MAX_WAITING, "import_bytes": MAX_IMPORT_BYTES,
    "request_id": REQUEST_ID_RE.pattern,
}

ERROR_CODES = ("bad_json", "too_large", "bad_request", "unknown_type", "not_found", "corrupt_session",
               "stale_revision", "busy", "invalid", "exists", "queue_full", "generation_failed",
               "no_model", "internal")


class ProtocolError(Exception):
    """A request that cannot be served; becomes `{"type": "error", "code", "message", ...}`."""

    def __init__(self, code: str, message: str, field: str | None = None, **extra: Any):
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code, self.message, self.field, self.extra = code, message, field, extra

    def to_message(self, request_id: str | None) -> dict:
        out = {"type": "error", "id": request_id, "code": self.code, "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        out.update(self.extra)
        return out


def _bad(field: str, why: str, code: str = "bad_request"):
    raise ProtocolError(code, f"{field}: {why}", field)


def _type_name(v: Any) -> str:
    return "null" if v is None else {dict: "object", list: "list", str: "string", bool: "bool"}.get(
        type(v), type(v).__name__)


# ---- value validators: (value, field) -> clean value, or ProtocolError ---------------------------

def v_bool(v, field):
    if not isinstance(v, bool):
        _bad(field, f"expected true/false, got {_type_name(v)}")
    return v


def v_int(lo: int, hi: int):
    def check(v, field):
        if isinstance(v, bool) or not isinstance(v, int):
            _bad(field, f"expected an integer, got {_type_name(v)}")
        if not lo <= v <= hi:
            _bad(field, f"{v} is outside {lo}..{hi}")
        return v
    return check


def v_num(lo: float, hi: float):
    def check(v, field):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            _bad(field, f"expected a number, got {_type_name(v)}")
        if not lo <= v <= hi:
            _bad(field, f"{v} is outside {lo}..{hi}")
        return v
    return check


def v_text(max_chars: int = MAX_TEXT_CHARS, min_chars: int = 0):
    def check(v, field):
        if not isinstance(v, str):
            _bad(field, f"expected a string, got {_type_name(v)}")
        if len(v) > max_chars:
            _bad(field, f"longer than {max_chars} characters", "too_large")
        v = clean_text(v).replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
        if len(v.strip()) < min_chars:
            _bad(field, "must not be empty")
        return v
    return check


def v_name(v, field):
    if not isinstance(v, str):
        _bad(field, f"expected a string, got {_type_name(v)}")
    if len(v) > MAX_NAME_CHARS * 4:
        _bad(field, f"longer than {MAX_NAME_CHARS} characters", "too_large")
    try:
        name = clean_name(v, max_chars=MAX_NAME_CHARS * 4)
    except ValueError as e:
        _bad(field, str(e))
    if len(name) > MAX_NAME_CHARS:
        _bad(field, f"longer than {MAX_NAME_CHARS} characters", "too_large")
    return name


def v_session_id(v, field):
    if not isinstance(v, str) or SESSION_ID_RE.fullmatch(v) is None:
        _bad(field, "not a session id (32 lowercase hex digits)")
    return v


def v_message_id(v, field):
    if not isinstance(v, str) or MESSAGE_ID_RE.fullmatch(v) is None:
        _bad(field, "not a message id")
    return v


def v_nullable(inner):
    def check(v, field):
        return None if v is None else inner(v, field)
    return check


def v_enum(*allowed):
    def check(v, field):
        if not isinstance(v, str) or v not in allowed:
            _bad(field, f"must be one of {', '.join(allowed)}")
        return v
    return check


def v_object(v, field):
    if not isinstance(v, dict):
        _bad(field, f"expected an object, got {_type_name(v)}")
    return v


def v_direction(v, field):
    if v in ("prev", "left"):
        return -1
    if v in ("next", "right"):
        return 1
    if isinstance(v, bool) or v not in (-1, 1):
        _bad(field, "must be -1 or +1")
    return v


# ---- generation settings -------------------------------------------------------------------------

SETTING_SPECS: dict[str, Callable] = {
    "temperature": v_num(0.0, 5.0),
    "top_k": v_int(0, 1000),
    "top_p": v_num(0.0, 1.0),
    "min_p": v_num(0.0, 1.0),
    "typical": v_num(0.0, 1.0),
    "token_repetition_penalty_max": v_num(1.0, 3.0),
    "token_repetition_penalty_sustain": v_int(-1, 65536),
    "token_repetition_penalty_decay": v_int(0, 65536),
    "max_response_tokens": v_int(1, 4096),
    "break_on_newline": v_bool,
    "seed": v_nullable(v_int(0, 2**32 - 1)),
    "chunk_size": v_int(1, 2048),
}


def v_settings(partial: bool):
    """A settings object; with `partial`, null values mean "back to the default" (kept as None)."""
    def check(v, field):
        v_object(v, field)
        out = {}
        for k, x in v.items():
            spec = SETTING_SPECS.get(k)
            if spec is None:
                _bad(f"{field}.{str(k)[:40]}", "unknown setting")
            if x is None and (partial or k != "seed"):
                if not partial:
                    continue
                out[k] = None
                continue
            out[k] = spec(x, f"{field}.{k}")
        return out
    return check


_PARTICIPANT_FIELDS = {"name": v_name, "kind": v_enum("user", "bot"), "persona": v_text(),
                       "settings": v_settings(False), "color": None, "lora": None}
LORA_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def v_participants(v, field):
    if not isinstance(v, list):
        _bad(field, f"expected a list, got {_type_name(v)}")
    if not MIN_PARTICIPANTS <= len(v) <= MAX_PARTICIPANTS:
        _bad(field, f"needs {MIN_PARTICIPANTS}..{MAX_PARTICIPANTS} participants",
             "too_large" if len(v) > MAX_PARTICIPANTS else "bad_request")
    out = []
    for i, p in enumerate(v):
        where = f"{field}[{i}]"
        v_object(p, where)
        for k in p:
            if k not in _PARTICIPANT_FIELDS:
                _bad(f"{where}.{str(k)[:40]}", "unknown field")
        for k in ("name", "kind"):
            if k not in p:
                _bad(f"{where}.{k}", "missing")
        clean = {k: _PARTICIPANT_FIELDS[k](p[k], f"{where}.{k}") for k in ("name", "kind")}
        clean["persona"] = _PARTICIPANT_FIELDS["persona"](p.get("persona", ""), f"{where}.persona")
        clean["settings"] = _PARTICIPANT_FIELDS["settings"](p.get("settings", {}), f"{where}.settings")
        if "color" in p:
            if not isinstance(p["color"], str) or COLOR_RE.fullmatch(p["color"]) is None:
                _bad(f"{where}.color", "expected #rgb or #rrggbb")
            clean["color"] = p["color"]
        if "lora" in p:   # an adapter NAME (loaded at start); never a path
            if p["lora"] is not None and (not isinstance(p["lora"], str) or LORA_RE.fullmatch(p["lora"]) is None):
                _bad(f"{where}.lora", "expected null or an adapter name")
            clean["lora"] = p["lora"]
        out.append(clean)
    names = [p["name"] for p in out]
    if len({n.casefold() for n in names}) != len(names):
        _bad(field, "two participants have the same name")
    kinds = {p["kind"] for p in out}
    if kinds != {"user", "bot"}:
        _bad(field, "needs at least one user and one bot")
    return out


_CHANGE_FIELDS = {
    "participants": v_participants,
    "fixed_prompt": v_text(),
    "keep_fixed_prompt": v_bool,
    "turn_order": v_enum(*TURN_ORDERS),
    "max_bot_turns": v_int(0, MAX_BOT_TURNS),
    "template": v_enum(*TEMPLATES),
    "settings": v_settings(True),
}


def v_changes(v, field):
    v_object(v, field)
    if not v:
        _bad(field, "nothing to change")
    out = {}
    for k, x in v.items():
        spec = _CHANGE_FIELDS.get(k)
        if spec is None:
            _bad(f"{field}.{str(k)[:40]}", "unknown field")
        out[k] = spec(x, f"{field}.{k}")
    return out


# ---- request schemas -----------------------------------------------------------------------------
# type -> {field: (validator, required)}; `type` and `id` are checked by parse().

_REQ, _OPT = True, False
_S = {"session": (v_session_id, _REQ)}
_SR = {"session": (v_session_id, _REQ), "revision": (v_int(0, 2**53), _REQ)}

SCHEMAS: dict[str, dict[str, tuple[Callable, bool]]] = {
    "session.list": {"trash": (v_bool, _OPT)},
    "session.open": {"session": (v_session_id, _OPT)},
    "session.create": {"name": (v_name, _OPT), "template": (v_enum(*TEMPLATES), _OPT),
                       "participants": (v_participants, _OPT), "fixed_prompt": (v_text(), _OPT)},
    "session.rename": {**_S, "name": (v_name, _REQ), "revision": (v_int(0, 2**53), _OPT)},
    "session.duplicate": {**_S, "name": (v_name, _OPT), "upto": (v_message_id, _OPT)},
    "session.delete": {**_S, "revision": (v_int(0, 2**53), _OPT)},
    "session.restore": dict(_S),
    "session.export": dict(_S),
    "session.import": {"data": (v_object, _REQ), "name": (v_name, _OPT)},
    "session.update": {**_SR, "changes": (v_changes, _REQ)},
    "chat.send": {**_SR, "text": (v_text(min_chars=1), _REQ), "author": (v_name, _OPT), "bot": (v_name, _OPT)},
    "chat.generate": {**_SR, "bot": (v_name, _OPT)},
    "chat.regenerate": {**_SR, "message_id": (v_message_id, _REQ)},
    "chat.continue": {**_SR, "message_id": (v_message_id, _OPT)},
    "chat.edit": {**_SR, "message_id": (v_message_id, _REQ), "text": (v_text(), _REQ), "reply": (v_bool, _OPT)},
    "chat.delete": {**_SR, "message_id": (v_message_id, _REQ)},
    "chat.rewind": {**_SR, "message_id": (v_nullable(v_message_id), _REQ)},
    "chat.switch": {**_SR, "message_id": (v_message_id, _REQ), "direction": (v_direction, _OPT),
                    "index": (v_int(0, 100_000), _OPT)},
    "chat.stop": dict(_S),
    "model.info": {},
}

# Requests that may run long (queue for the engine, stream); the socket loop runs them off-thread.
GENERATING = frozenset({"chat.send", "chat.generate", "chat.regenerate", "chat.continue", "chat.edit"})


def peek_id(obj: Any) -> str | None:
    """The request id of a parsed frame if it is well-formed (to address an error), else None."""
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, str) and REQUEST_ID_RE.fullmatch(rid):
            return rid
    return None


def decode_frame(data: Any) -> Any:
    """Frame -> JSON value. ProtocolError bad_json / too_large (the latter with the id if readable)."""
    if not isinstance(data, str):
        raise ProtocolError("bad_json", "binary frames are not supported; send JSON text")
    try:
        obj = loads_strict(data)   # the session files' parser: no NaN, no duplicate keys, bounded nesting
    except SessionFormatError as e:
        raise ProtocolError("bad_json", str(e)[:200]) from None
    if len(data.encode("utf-8", "surrogatepass")) > MAX_FRAME_BYTES:
        raise ProtocolError("too_large", f"message larger than {MAX_FRAME_BYTES} bytes", None,
                            **({"_id": peek_id(obj)} if peek_id(obj) else {}))
    return obj


def parse(data: Any) -> dict:
    """A raw frame -> a validated request dict {type, id, ...clean fields}. Raises ProtocolError whose
    `extra["_id"]` (when present) is the request id to answer to."""
    if isinstance(data, str) and len(data) > MAX_SOCKET_MESSAGE_BYTES:
        raise ProtocolError("too_large", f"message larger than {MAX_FRAME_BYTES} bytes")
    obj = decode_frame(data)
    return validate(obj)


def validate(obj: Any) -> dict:
    if not isinstance(obj, dict):
        raise ProtocolError("bad_json", f"a message must be a JSON object, not {_type_name(obj)}")
    rid = obj.get("id")
    if not isinstance(rid, str) or REQUEST_ID_RE.fullmatch(rid) is None:
        raise ProtocolError("bad_request", "id: missing or not matching " + REQUEST_ID_RE.pattern, "id")
    try:
        mtype = obj.get("type")
        if not isinstance(mtype, str):
            _bad("type", f"expected a string, got {_type_name(mtype)}")
        schema = SCHEMAS.get(mtype)
        if schema is None:
            raise ProtocolError("unknown_type", f"unknown message type {mtype[:40]!r}", "type")
        out = {"type": mtype, "id": rid}
        for k, v in obj.items():
            if k in ("type", "id"):
                continue
            spec = schema.get(k)
            if spec is None:
                _bad(str(k)[:40], "unknown field")
            out[k] = spec[0](v, k)
        for k, (_, required) in schema.items():
            if required and k not in obj:
                _bad(k, "missing")
        if mtype == "chat.switch" and ("direction" in out) == ("index" in out):
            _bad("direction", "give exactly one of direction or index")
        return out
    except ProtocolError as e:
        e.extra["_id"] = rid
        raise


def error_message(e: ProtocolError, request_id: str | None = None) -> dict:
    rid = e.extra.pop("_id", None) or request_id
    return e.to_message(rid)
