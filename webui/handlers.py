"""Request handlers: one function per message type, `(conn, msg) -> iterator of outgoing messages`.

`msg` has been validated by `protocol.validate` (clean values, required fields present). Handlers
yield messages without `id`; `dispatch` stamps the request id, maps exceptions to `error` messages and
guarantees that the last message for a request is its `reply` or an `error`. No socket here: tests
call `dispatch(conn, msg)` and read the list. Request/response shapes: docs/protocol.md §4.
"""
from __future__ import annotations

import json
import logging
from typing import Callable, Iterator

from sessions import (CorruptSessionError, HistoryError, InvalidIdError, InvalidNameError, MessageNotFoundError,
                      Participant, SessionExistsError, SessionFormatError, SessionNotFoundError,
                      SessionTooLargeError, StaleRevisionError)
from sessions.schema import DEFAULT_BOT_COLORS, DEFAULT_USER_COLOR

from .engine import no_model_info
from .generation import Plan, finish_partial, round_messages
from .protocol import LIMITS, MAX_BOT_TURNS, PROTOCOL_VERSION, ProtocolError, error_message, parse

log = logging.getLogger("webui")
HANDLERS: dict[str, Callable] = {}


def handler(name: str):
    def register(f):
        HANDLERS[name] = f
        return f
    return register


def reply(request: str, **fields) -> dict:
    return {"type": "reply", "request": request, **fields}


def hello(services) -> dict:
    return {"type": "hello", "id": None, "protocol": PROTOCOL_VERSION, "model": model_info(services),
            "limits": dict(LIMITS), "auth": bool(services.config.get("PASSWORD"))}


def model_info(services) -> dict:
    return services.engine.info() if services.engine is not None else no_model_info()


# ---- dispatch ------------------------------------------------------------------------------------

_ERRORS = [  # (exception class, code); order matters (subclasses first)
    (StaleRevisionError, "stale_revision"), (CorruptSessionError, "corrupt_session"),
    (SessionTooLargeError, "too_large"), (SessionNotFoundError, "not_found"), (MessageNotFoundError, "not_found"),
    (SessionExistsError, "exists"), (HistoryError, "invalid"), (InvalidIdError, "bad_request"),
    (InvalidNameError, "bad_request"), (SessionFormatError, "bad_request"),
]


def dispatch(conn, msg: dict) -> Iterator[dict]:
    """Run the handler of a validated request; every message gets the request id."""
    rid = msg["id"]
    try:
        for out in HANDLERS[msg["type"]](conn, msg):
            if "id" not in out:
                out = dict(out, id=rid)
            yield out
    except ProtocolError as e:
        for before in e.extra.pop("_before", []):
            yield dict(before, id=rid)
        yield error_message(e, rid)
    except Exception as e:  # noqa: BLE001 - every failure becomes an error message
        for cls, code in _ERRORS:
            if isinstance(e, cls):
                yield {"type": "error", "id": rid, "code": code, "message": str(e)[:500]}
                return
        log.exception("handler %s failed", msg.get("type"))
        yield {"type": "error", "id": rid, "code": "internal", "message": f"{type(e).__name__}: {str(e)[:300]}"}


def handle_frame(conn, data) -> Iterator[dict]:
    """Raw frame -> messages (for tests and simple loops): parse, then dispatch."""
    try:
        msg = parse(data)
    except ProtocolError as e:
        yield error_message(e)
        return
    yield from dispatch(conn, msg)


# ---- sessions ------------------------------------------------------------------------------------

def _hub(conn):
    return conn.services.hub


@handler("session.list")
def session_list(conn, msg):
    store = conn.services.store
    out = {"sessions": [i.to_dict() for i in store.list()]}
    if msg.get("trash"):
        out["trash"] = [i.to_dict() for i in store.list_trash()]
    yield reply("session.list", **out)


def _open(conn, sid: str) -> dict:
    hub = _hub(conn)
    live = hub.get(sid)
    hub.subscribe(conn, live)
    conn.services.store.set_last_session(sid)
    with live.lock:
        return {"type": "state", "session": hub.snapshot(live)}


@handler("session.open")
def session_open(conn, msg):
    store = conn.services.store
    sid = msg.get("session")
    created = False
    if sid is None:
        sid = store.last_session_id()
        if sid is None:
            sid, created = store.create().id, True
    yield _open(conn, sid)
    if created:
        _hub(conn).broadcast_sessions(exclude=conn)
    yield reply("session.open", session=sid)


def _participants(conn, items: list[dict], old=()) -> list[Participant]:
    loras = {p.name: p.lora for p in old}
    engine = conn.services.engine
    adapters = engine.adapters() if engine is not None else []
    out, n_bots = [], 0
    for i, p in enumerate(items):
        lora = p["lora"] if "lora" in p else loras.get(p["name"])
        if "lora" in p and lora is not None and lora not in adapters:
            raise ProtocolError("bad_request", f"participants[{i}].lora: no adapter named {lora!r} is loaded "
                                f"(loaded: {', '.join(adapters) or 'none'})", f"participants[{i}].lora")
        if p["kind"] == "bot":
            color = p.get("color") or DEFAULT_BOT_COLORS[n_bots % len(DEFAULT_BOT_COLORS)]
            n_bots += 1
        else:
            color = p.get("color") or DEFAULT_USER_COLOR
        out.append(Participant(name=p["name"], kind=p["kind"], persona=p["persona"], settings=p["settings"],
                               lora=lora, color=color))
    return out


@handler("session.create")
def session_create(conn, msg):
    fields = {}
    if "template" in msg:
        fields["template"] = msg["template"]
    if "fixed_prompt" in msg:
        fields["fixed_prompt"] = msg["fixed_prompt"]
    if "participants" in msg:
        fields["participants"] = _participants(conn, msg["participants"])
    s = conn.services.store.create(msg.get("name"), **fields)
    yield _open(conn, s.id)
    _hub(conn).broadcast_sessions(exclude=conn)
    yield reply("session.create", session=s.id)


@handler("session.rename")
def session_rename(conn, msg):
    hub = _hub(conn)
    with hub.writing(msg["session"], msg.get("revision"), allow_busy=True) as live:
        live.session.name = msg["name"]
        rev = hub.save(live)
    yield hub.state(live, exclude=conn)   # the requester needs the new revision too
    hub.broadcast_sessions(exclude=conn)
    yield reply("session.rename", revision=rev)


@handler("session.duplicate")
def session_duplicate(conn, msg):
    s = conn.services.store.duplicate(msg["session"], msg.get("name"), msg.get("upto"))
    _hub(conn).broadcast_sessions(exclude=conn)
    yield reply("session.duplicate", session=s.id)


@handler("session.delete")
def session_delete(conn, msg):
    hub, store, sid = _hub(conn), conn.services.store, msg["session"]
    try:
        live = hub.get(sid)
    except CorruptSessionError:
        live = None  # an unreadable file can still be moved to the trash
    if live is None:
        store.delete(sid)
    else:
        with hub.writing(sid, msg.get("revision")) as live:
            store.delete(sid)
            hub.forget(sid)
            watchers = [c for c in live.subscribers if c is not conn]
            live.subscribers.clear()
        for c in watchers:
            c.session_id = None
            c.push({"type": "state", "id": None, "session": None})
    if conn.session_id == sid:
        conn.session_id = None
        yield {"type": "state", "session": None}
    hub.broadcast_sessions(exclude=conn)
    yield reply("session.delete")


@handler("session.restore")
def session_restore(conn, msg):
    info = conn.services.store.restore(msg["session"])
    _hub(conn).broadcast_sessions(exclude=conn)
    yield reply("session.restore", info=info.to_dict())


def export_filename(name: str) -> str:
    safe = "".join(c if c.isalnum() or c in " -_." else "_" for c in name).strip(" .") or "session"
    return safe[:80] + ".json"


@handler("session.export")
def session_export(conn, msg):
    store = conn.services.store
    data = store.export(msg["session"])
    yield reply("session.export", data=json.loads(data), filename=export_filename(store.load(msg["session"]).name))


@handler("session.import")
def session_import(conn, msg):
    data = json.dumps(msg["data"], ensure_ascii=False).encode("utf-8", "surrogatepass")
    s = conn.services.store.import_session(data, msg.get("name"))
    _hub(conn).broadcast_sessions(exclude=conn)
    yield reply("session.import", session=s.id)


@handler("session.update")
def session_update(conn, msg):
    hub = _hub(conn)
    ch = msg["changes"]
    with hub.writing(msg["session"], msg["revision"]) as live:
        s = live.session
        if "participants" in ch:
            s.participants = _participants(conn, ch["participants"], s.participants)
        for k in ("fixed_prompt", "keep_fixed_prompt", "turn_order", "max_bot_turns", "template"):
            if k in ch:
                setattr(s, k, ch[k])
        for k, v in ch.get("settings", {}).items():
            if v is None:
                s.settings.pop(k, None)
            else:
                s.settings[k] = v
        rev = hub.save(live)
    yield hub.state(live, exclude=conn)
    yield reply("session.update", revision=rev)


@handler("model.info")
def model_info_handler(conn, msg):
    yield reply("model.info", model=model_info(conn.services))


# ---- chat: history operations --------------------------------------------------------------------

def _history_op(conn, msg, op) -> Iterator[dict]:
    hub = _hub(conn)
    with hub.writing(msg["session"], msg["revision"]) as live:
        s = live.session
        result = op(s)
        hub.save(live)
        rev = s.revision
    yield hub.state(live, exclude=conn)
    yield reply(msg["type"], revision=rev, **result)


@handler("chat.delete")
def chat_delete(conn, msg):
    yield from _history_op(conn, msg, lambda s: {"active_leaf": s.delete_message(s.message(msg["message_id"]).id)})


@handler("chat.rewind")
def chat_rewind(conn, msg):
    def op(s):
        s.rewind(msg["message_id"])
        return {"active_leaf": s.active_leaf}
    yield from _history_op(conn, msg, op)


@handler("chat.switch")
def chat_switch(conn, msg):
    def op(s):
        if "index" in msg:
            return {"active_leaf": s.switch(msg["message_id"], index=msg["index"])}
        return {"active_leaf": s.switch(msg["message_id"], msg["direction"])}
    yield from _history_op(conn, msg, op)


@handler("chat.stop")
def chat_stop(conn, msg):
    live = _hub(conn).get(msg["session"])
    yield reply("chat.stop", stopped=_hub(conn).stop(live))


# ---- chat: generating requests -------------------------------------------------------------------

def _need_engine(conn, sid):
    if conn.services.engine is None:
        raise ProtocolError("no_model", "no model is loaded (the server runs with --no-model)", session=sid)


def _check_bot(s, name: str | None, field: str = "bot") -> str | None:
    if name is None:
        return None
    p = s.participant(name)
    if p is None or p.kind != "bot":
        raise ProtocolError("invalid", f"{field}: {name[:60]!r} is not a bot of this session", field)
    return name


def _generating(conn, msg, prepare) -> Iterator[dict]:
    """Shared shape of the generating requests. `prepare(s)` runs under the session lock after the
    revision check, mutates the session and returns (plan, extra reply fields)."""
    hub = _hub(conn)
    with hub.writing(msg["session"], msg["revision"]) as live:
        plan, extra = prepare(live.session)
        if plan.max_turns > 0:
            _need_engine(conn, msg["session"])
        changed = extra.pop("_changed", False)
        if changed:
            hub.save(live)
        if plan.max_turns <= 0:
            gen = None
        else:
            gen = hub.begin(live, conn, msg["id"])
    if gen is None:
        if changed:
            yield hub.state(live, exclude=conn)
        yield reply(msg["type"], turns=[], stopped=False, revision=live.session.revision, **extra)
        return
    ended = False
    try:
        yield hub.state(live, exclude=conn)
        turns, stopped = yield from round_messages(hub, live, gen, plan)
        ended = hub.end(live, gen)
        yield hub.state(live, exclude=conn)
        yield reply(msg["type"], turns=turns, stopped=stopped, revision=live.session.revision, **extra)
    finally:
        if not ended:
            finish_partial(hub, live, gen)
            if hub.end(live, gen):
                hub.state(live)


def _user(s, author: str | None) -> str:
    users = s.users()
    if author is None:
        if not users:
            raise ProtocolError("invalid", "this session has no user participant")
        return users[0].name
    p = s.participant(author)
    if p is None or p.kind != "user":
        raise ProtocolError("invalid", f"author: {author[:60]!r} is not a user of this session", "author")
    return author


def _user_round(s, bot: str | None) -> Plan:
    limit = min(s.max_bot_turns, MAX_BOT_TURNS)     # an imported file may carry more
    if bot is not None:
        return Plan(max_turns=max(1, limit), first=bot)
    turns = 0 if s.turn_order == "manual" or not s.bots() else limit
    return Plan(max_turns=turns)


@handler("chat.send")
def chat_send(conn, msg):
    def prepare(s):
        author = _user(s, msg.get("author"))
        bot = _check_bot(s, msg.get("bot"))
        plan = _user_round(s, bot)
        if plan.max_turns:
            _need_engine(conn, s.id)
        mid = s.append("user", author, msg["text"])
        return plan, {"message_id": mid, "_changed": True}
    yield from _generating(conn, msg, prepare)


@handler("chat.generate")
def chat_generate(conn, msg):
    def prepare(s):
        bot = _check_bot(s, msg.get("bot"))
        if bot is None and s.turn_order == "manual":
            raise ProtocolError("invalid", "bot: required with the manual turn order", "bot")
        if not s.bots():
            raise ProtocolError("invalid", "this session has no bot")
        return Plan(max_turns=1, first=bot), {}
    yield from _generating(conn, msg, prepare)


@handler("chat.regenerate")
def chat_regenerate(conn, msg):
    def prepare(s):
        m = s.message(msg["message_id"])
        if m.role != "bot":
            raise ProtocolError("invalid", "only bot messages can be regenerated", "message_id")
        return Plan(kind="regenerate", target=m.id), {}
    yield from _generating(conn, msg, prepare)


@handler("chat.continue")
def chat_continue(conn, msg):
    def prepare(s):
        mid = msg.get("message_id") or s.active_leaf
        if mid is None:
            raise ProtocolError("invalid", "nothing to continue", "message_id")
        m = s.message(mid)
        if m.role != "bot":
            raise ProtocolError("invalid", "only bot messages can be continued", "message_id")
        if mid != s.active_leaf:
            raise ProtocolError("invalid", "only the last message of the conversation can be continued", "message_id")
        return Plan(kind="continue", target=mid), {}
    yield from _generating(conn, msg, prepare)


@handler("chat.edit")
def chat_edit(conn, msg):
    def prepare(s):
        m = s.message(msg["message_id"])
        want_reply = bool(msg.get("reply"))
        if want_reply and m.role != "user":
            raise ProtocolError("invalid", "reply: only an edited user message gets bot replies", "reply")
        plan = _user_round(s, None) if want_reply else Plan(max_turns=0)
        if plan.max_turns:
            _need_engine(conn, s.id)
        new_id = s.edit(m.id, msg["text"])
        return plan, {"message_id": new_id, "_changed": True}
    yield from _generating(conn, msg, prepare)
