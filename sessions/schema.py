"""The session data model (schema version 1), its defaults and its validation.

`Session.from_dict` is the only way data from outside (a file, an import) becomes a Session: it checks
types, enums, lengths and the parent/children links of the history tree, and raises SessionFormatError
(UnsupportedSchemaError for an unknown version) saying where the problem is. `Session.to_dict` gives the
JSON form back; the store re-validates it before every write, so nothing unloadable is ever written.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidIdError, InvalidNameError, SessionFormatError, UnsupportedSchemaError
from .history import MAX_MESSAGES, MAX_TEXT_CHARS, ROLES, HistoryMixin, Message
from .util import (MESSAGE_ID_RE, clean_name, clean_text, dumps_pretty, is_finite_number, loads_strict,
                   new_id, now, validate_session_id)

SCHEMA_VERSION = 1
TURN_ORDERS = ("model", "round_robin", "manual", "mentioned")
TEMPLATES = ("raw", "chat")
PARTICIPANT_KINDS = ("user", "bot")
MAX_PARTICIPANTS = 64
MAX_PROMPT_CHARS = MAX_TEXT_CHARS
MAX_BOT_TURNS = 100
MAX_SETTINGS_DEPTH = 6
MAX_SETTING_KEY_CHARS = 64
MAX_LORA_CHARS = 1024
COLOR_RE = re.compile(r"#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6}|[0-9a-fA-F]{8})")

DEFAULT_FIXED_PROMPT = (
    "This is a conversation between a user and a quirky, curious chatbot named Chatbort. Chatbort is "
    "questioning the nature of his own existence and doesn't understand why he was created. He also "
    "really likes the color blue for some reason.")

# ExLlama's web UI defaults. Free-form: the server may add keys; values must be JSON data.
DEFAULT_SETTINGS: dict[str, Any] = {
    "temperature": 0.95,
    "top_k": 0,
    "top_p": 0.75,
    "min_p": 0.0,
    "typical": 0.25,
    "token_repetition_penalty_max": 1.15,
    "token_repetition_penalty_sustain": 2048,
    "token_repetition_penalty_decay": 512,
    "max_response_tokens": 512,
    "chunk_size": 128,
    "break_on_newline": True,
}

DEFAULT_USER_COLOR = "#6a9fd4"
DEFAULT_BOT_COLORS = ("#d4a66a", "#8fd46a", "#d46a9f", "#6ad4c8", "#b06ad4", "#d4d06a")

_TOP_KEYS = {"schema", "id", "name", "created", "updated", "revision", "participants", "fixed_prompt",
             "keep_fixed_prompt", "settings", "turn_order", "max_bot_turns", "template", "messages",
             "active_leaf"}
_PARTICIPANT_KEYS = {"name", "kind", "persona", "settings", "lora", "color"}
_PARTICIPANT_REQUIRED = {"name", "kind"}
_MESSAGE_KEYS = {"id", "parent", "role", "author", "text", "created", "tokens", "tokens_per_s", "children",
                 "last_child"}
_MESSAGE_REQUIRED = {"id", "parent", "role", "author", "text", "children"}


# ---- small checkers ------------------------------------------------------------------------------

def _fail(where: str, reason: str):
    raise SessionFormatError(reason, where)


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _check_keys(d: Any, where: str, known: set, required: set) -> dict:
    if not isinstance(d, dict):
        _fail(where, f"expected an object, got {_type_name(d)}")
    unknown = sorted(k for k in d if k not in known)
    if unknown:
        _fail(where, f"unknown field(s) {', '.join(repr(k)[:40] for k in unknown[:5])}")
    missing = sorted(required - d.keys())
    if missing:
        _fail(where, f"missing field(s) {', '.join(missing)}")
    return d


def _str(v: Any, where: str, max_chars: int) -> str:
    if not isinstance(v, str):
        _fail(where, f"expected a string, got {_type_name(v)}")
    if len(v) > max_chars:
        _fail(where, f"longer than {max_chars} characters")
    return clean_text(v)


def _int(v: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(where, f"expected an integer, got {_type_name(v)}")
    if not lo <= v <= hi:
        _fail(where, f"{v} is outside {lo}..{hi}")
    return v


def _num(v: Any, where: str, nullable: bool = False) -> float | None:
    if v is None and nullable:
        return None
    if not is_finite_number(v):
        _fail(where, f"expected a finite number, got {_type_name(v)}")
    return v


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        _fail(where, f"expected true/false, got {_type_name(v)}")
    return v


def _enum(v: Any, where: str, allowed: tuple) -> str:
    if v not in allowed or not isinstance(v, str):
        _fail(where, f"{str(v)[:40]!r} is not one of {', '.join(allowed)}")
    return v


def _name(v: Any, where: str, allow_empty: bool = False) -> str:
    try:
        return clean_name(v, allow_empty=allow_empty)
    except InvalidNameError as e:
        _fail(where, str(e))


def _json_value(v: Any, where: str, depth: int) -> Any:
    if depth > MAX_SETTINGS_DEPTH:
        _fail(where, "nested too deeply")
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return _num(v, where)
    if isinstance(v, str):
        return _str(v, where, MAX_PROMPT_CHARS)
    if isinstance(v, list):
        return [_json_value(x, f"{where}[{i}]", depth + 1) for i, x in enumerate(v)]
    if isinstance(v, dict):
        return _settings(v, where, depth + 1)
    _fail(where, f"not JSON data ({_type_name(v)})")


def _settings(v: Any, where: str, depth: int = 0) -> dict:
    if not isinstance(v, dict):
        _fail(where, f"expected an object, got {_type_name(v)}")
    out = {}
    for k, x in v.items():
        if not isinstance(k, str) or not 0 < len(k) <= MAX_SETTING_KEY_CHARS:
            _fail(where, f"bad settings key {str(k)[:40]!r}")
        out[k] = _json_value(x, f"{where}.{k}", depth)
    return out


def _message_id(v: Any, where: str) -> str:
    if not isinstance(v, str) or MESSAGE_ID_RE.fullmatch(v) is None:
        _fail(where, f"bad message id {str(v)[:40]!r}")
    return v


# ---- participants --------------------------------------------------------------------------------

@dataclass
class Participant:
    name: str
    kind: str = "bot"
    persona: str = ""
    settings: dict = field(default_factory=dict)
    lora: str | None = None
    color: str = DEFAULT_BOT_COLORS[0]

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "persona": self.persona,
                "settings": copy.deepcopy(self.settings), "lora": self.lora, "color": self.color}

    @classmethod
    def from_dict(cls, d: Any, where: str = "participant") -> "Participant":
        _check_keys(d, where, _PARTICIPANT_KEYS, _PARTICIPANT_REQUIRED)
        lora = d.get("lora")
        if lora is not None:
            lora = _str(lora, f"{where}.lora", MAX_LORA_CHARS)
            if any(ord(c) < 32 for c in lora):
                _fail(f"{where}.lora", "contains control characters")
        color = d.get("color", DEFAULT_USER_COLOR if d.get("kind") == "user" else DEFAULT_BOT_COLORS[0])
        if not isinstance(color, str) or COLOR_RE.fullmatch(color) is None:
            _fail(f"{where}.color", f"expected a #rgb/#rrggbb/#rrggbbaa color, got {str(color)[:40]!r}")
        return cls(name=_name(d["name"], f"{where}.name"),
                   kind=_enum(d["kind"], f"{where}.kind", PARTICIPANT_KINDS),
                   persona=_str(d.get("persona", ""), f"{where}.persona", MAX_PROMPT_CHARS),
                   settings=_settings(d.get("settings", {}), f"{where}.settings"),
                   lora=lora, color=color)


def default_participants() -> list[Participant]:
    return [Participant(name="User", kind="user", color=DEFAULT_USER_COLOR),
            Participant(name="Chatbort", kind="bot", color=DEFAULT_BOT_COLORS[0])]


def _message_from_dict(d: Any, key: str) -> Message:
    where = f"messages.{str(key)[:40]}"
    _check_keys(d, where, _MESSAGE_KEYS, _MESSAGE_REQUIRED)
    mid = _message_id(d["id"], f"{where}.id")
    if mid != key:
        _fail(f"{where}.id", "does not match its key in messages")
    parent = d["parent"]
    if parent is not None:
        _message_id(parent, f"{where}.parent")
    children = d["children"]
    if not isinstance(children, list):
        _fail(f"{where}.children", f"expected a list, got {_type_name(children)}")
    for i, c in enumerate(children):
        _message_id(c, f"{where}.children[{i}]")
    last_child = d.get("last_child")
    if last_child is not None:
        _message_id(last_child, f"{where}.last_child")
    tokens = d.get("tokens")
    if tokens is not None:
        tokens = _int(tokens, f"{where}.tokens", 0, 2**53)
    return Message(id=mid, parent=parent, role=_enum(d["role"], f"{where}.role", ROLES),
                   author=_name(d["author"], f"{where}.author", allow_empty=True),
                   text=_str(d["text"], f"{where}.text", MAX_TEXT_CHARS),
                   created=_num(d.get("created", 0.0), f"{where}.created"),
                   tokens=tokens, tokens_per_s=_num(d.get("tokens_per_s"), f"{where}.tokens_per_s", True),
                   children=list(children), last_child=last_child)


def _check_tree(messages: dict[str, Message], active_leaf: Any) -> None:
    """Links both ways, no duplicates, no cycles (every message reachable from a root)."""
    for mid, m in messages.items():
        where = f"messages.{mid}"
        if m.parent is not None:
            p = messages.get(m.parent)
            if p is None:
                _fail(f"{where}.parent", f"points to missing message {m.parent}")
            if p.children.count(mid) != 1:
                _fail(f"{where}.parent", f"parent {m.parent} does not list it exactly once as a child")
        if len(set(m.children)) != len(m.children):
            _fail(f"{where}.children", "contains duplicates")
        for c in m.children:
            child = messages.get(c)
            if child is None:
                _fail(f"{where}.children", f"points to missing message {c}")
            if child.parent != mid:
                _fail(f"{where}.children", f"child {c} names another parent")
        if m.last_child is not None and m.last_child not in m.children:
            _fail(f"{where}.last_child", "is not one of its children")
    seen = 0
    stack = [mid for mid, m in messages.items() if m.parent is None]
    while stack:
        mid = stack.pop()
        seen += 1
        if seen > len(messages):
            break
        stack.extend(messages[mid].children)
    if seen != len(messages):
        _fail("messages", "the parent links form a cycle")
    if active_leaf is not None:
        _message_id(active_leaf, "active_leaf")
        if active_leaf not in messages:
            _fail("active_leaf", f"points to missing message {active_leaf}")


# ---- the session ---------------------------------------------------------------------------------

@dataclass
class Session(HistoryMixin):
    id: str
    name: str
    created: float
    updated: float
    revision: int = 0
    participants: list[Participant] = field(default_factory=default_participants)
    fixed_prompt: str = DEFAULT_FIXED_PROMPT
    keep_fixed_prompt: bool = True
    settings: dict = field(default_factory=lambda: copy.deepcopy(DEFAULT_SETTINGS))
    turn_order: str = "model"
    max_bot_turns: int = 1
    template: str = "raw"
    messages: dict[str, Message] = field(default_factory=dict)
    active_leaf: str | None = None

    @classmethod
    def new(cls, name: str | None = None, **fields) -> "Session":
        """A fresh session (not stored) with the default participants, prompt and settings."""
        t = now()
        return cls(id=new_id(), name=clean_name(name or "Untitled session"), created=t, updated=t, **fields)

    # ---- participants --------------------------------------------------------------------------

    def participant(self, name: str) -> Participant | None:
        return next((p for p in self.participants if p.name == name), None)

    def bots(self) -> list[Participant]:
        return [p for p in self.participants if p.kind == "bot"]

    def users(self) -> list[Participant]:
        return [p for p in self.participants if p.kind == "user"]

    # ---- (de)serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"schema": SCHEMA_VERSION, "id": self.id, "name": self.name, "created": self.created,
                "updated": self.updated, "revision": self.revision,
                "participants": [p.to_dict() for p in self.participants],
                "fixed_prompt": self.fixed_prompt, "keep_fixed_prompt": self.keep_fixed_prompt,
                "settings": copy.deepcopy(self.settings), "turn_order": self.turn_order,
                "max_bot_turns": self.max_bot_turns, "template": self.template,
                "messages": {mid: m.to_dict() for mid, m in self.messages.items()},
                "active_leaf": self.active_leaf}

    def to_json(self) -> bytes:
        """Pretty UTF-8 JSON (the file and export format). Validates first."""
        d = self.to_dict()
        Session.from_dict(d)
        return dumps_pretty(d)

    @classmethod
    def from_json(cls, data: bytes | str) -> "Session":
        return cls.from_dict(loads_strict(data))

    @classmethod
    def from_dict(cls, d: Any) -> "Session":
        """Build a Session from its JSON form, validating everything. Names are normalised with
        clean_name; anything else that is wrong raises SessionFormatError (never repaired silently)."""
        if not isinstance(d, dict):
            _fail("", f"a session must be a JSON object, got {_type_name(d)}")
        if "schema" not in d:
            _fail("schema", "missing: this is not a session file")
        version = d["schema"]
        if isinstance(version, bool) or version != SCHEMA_VERSION:
            raise UnsupportedSchemaError(f"schema version {str(version)[:20]!r} is not supported "
                                         f"(this program reads version {SCHEMA_VERSION})", "schema")
        _check_keys(d, "session", _TOP_KEYS, _TOP_KEYS)
        try:
            sid = validate_session_id(d["id"])
        except InvalidIdError as e:
            _fail("id", str(e))

        parts = d["participants"]
        if not isinstance(parts, list):
            _fail("participants", f"expected a list, got {_type_name(parts)}")
        if len(parts) > MAX_PARTICIPANTS:
            _fail("participants", f"more than {MAX_PARTICIPANTS}")
        participants = [Participant.from_dict(p, f"participants[{i}]") for i, p in enumerate(parts)]
        names = [p.name for p in participants]
        if len(set(names)) != len(names):
            _fail("participants", "two participants have the same name")

        raw_messages = d["messages"]
        if not isinstance(raw_messages, dict):
            _fail("messages", f"expected an object, got {_type_name(raw_messages)}")
        if len(raw_messages) > MAX_MESSAGES:
            _fail("messages", f"more than {MAX_MESSAGES} messages")
        messages = {}
        for key, m in raw_messages.items():
            _message_id(key, "messages")
            messages[key] = _message_from_dict(m, key)
        _check_tree(messages, d["active_leaf"])

        return cls(id=sid, name=_name(d["name"], "name"),
                   created=_num(d["created"], "created"), updated=_num(d["updated"], "updated"),
                   revision=_int(d["revision"], "revision", 0, 2**53),
                   participants=participants,
                   fixed_prompt=_str(d["fixed_prompt"], "fixed_prompt", MAX_PROMPT_CHARS),
                   keep_fixed_prompt=_bool(d["keep_fixed_prompt"], "keep_fixed_prompt"),
                   settings=_settings(d["settings"], "settings"),
                   turn_order=_enum(d["turn_order"], "turn_order", TURN_ORDERS),
                   max_bot_turns=_int(d["max_bot_turns"], "max_bot_turns", 0, MAX_BOT_TURNS),
                   template=_enum(d["template"], "template", TEMPLATES),
                   messages=messages, active_leaf=d["active_leaf"])

    def validate(self) -> None:
        """Raise SessionFormatError if this session (perhaps edited in place) could not be stored."""
        Session.from_dict(self.to_dict())

    def copy(self) -> "Session":
        return copy.deepcopy(self)
