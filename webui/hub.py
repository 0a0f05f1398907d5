"""Live sessions shared by every connection: one in-memory `Session` per id, its lock, who watches it,
and the generation running on it.

Every write to a session goes through `Hub.writing(sid, revision)`: it holds the session's lock,
refuses a stale `revision` (`stale_revision`, after a fresh `state`) and a session that is generating
(`busy`), and the caller mutates the held `Session` and calls `hub.save(live)`. Because all writers share
that one object, the store's own revision check only fires when something outside this process changed
the file; then the session is reloaded and the request refused as stale.

`Connection` is one client (a websocket, or a test): its open session and a `push` callback for
messages that are not replies to its own requests (other tabs' changes, streams it watches).
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from sessions import CorruptSessionError, Session, SessionNotFoundError, StaleRevisionError

from . import conversation
from .protocol import ProtocolError

log = logging.getLogger("webui")
_conn_ids = itertools.count(1)


class Connection:
    def __init__(self, services, push: Callable[[dict], None] | None = None, remote: str = ""):
        self.services = services
        self.id = next(_conn_ids)
        self.remote = remote
        self.session_id: str | None = None      # the open session (gets pushes)
        self.generating = False                 # one generation job per connection
        self.job = None                         # the socket loop's thread running that job
        self.closed = False
        self._push = push

    def push(self, msg: dict) -> None:
        if self._push is None or self.closed:
            return
        try:
            self._push(msg)
        except Exception:  # noqa: BLE001 - a dead socket; the loop notices on its own
            self.closed = True

    def __repr__(self):
        return f"Connection({self.id}, {self.remote})"


@dataclass
class Generation:
    cancel: threading.Event
    conn: Connection
    request_id: str
    queued: bool = True
    message_id: str | None = None
    author: str | None = None


@dataclass
class LiveSession:
    session: Session
    lock: threading.RLock = field(default_factory=threading.RLock)
    stat: tuple | None = None
    generation: Generation | None = None
    subscribers: set = field(default_factory=set)


def _stat_key(path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class Hub:
    def __init__(self, store, engine=None):
        self.store, self.engine = store, engine
        self._lock = threading.Lock()
        self._live: dict[str, LiveSession] = {}
        self._conns: set[Connection] = set()

    # ---- connections ---------------------------------------------------------------------------

    def connect(self, conn: Connection) -> None:
        with self._lock:
            self._conns.add(conn)

    def disconnect(self, conn: Connection) -> None:
        with self._lock:
            self._conns.discard(conn)
            if conn.session_id and conn.session_id in self._live:
                self._live[conn.session_id].subscribers.discard(conn)
            conn.closed = True

    def subscribe(self, conn: Connection, live: LiveSession) -> None:
        with self._lock:
            old = self._live.get(conn.session_id) if conn.session_id else None
            if old is not None:
                old.subscribers.discard(conn)
            live.subscribers.add(conn)
            conn.session_id = live.session.id

    def publish(self, live: LiveSession, msg: dict, exclude: Connection | None = None) -> dict:
        """Send `msg` (with id null) to the session's watchers except `exclude`; returns `msg`."""
        with self._lock:
            targets = [c for c in live.subscribers if c is not exclude]
        if targets:
            out = dict(msg, id=None)
            for c in targets:
                c.push(out)
        return msg

    def broadcast_sessions(self, exclude: Connection | None = None) -> None:
        with self._lock:
            targets = [c for c in self._conns if c is not exclude]
        if targets:
            msg = {"type": "sessions", "id": None, "sessions": [i.to_dict() for i in self.store.list()]}
            for c in targets:
                c.push(msg)

    # ---- loading -------------------------------------------------------------------------------

    def get(self, sid: str) -> LiveSession:
        """The live session (loaded on first use, reloaded when its file changed behind our back)."""
        with self._lock:
            live = self._live.get(sid)
        path = self.store.path(sid)
        if live is not None:
            with live.lock:
                if live.generation is None and live.stat != _stat_key(path):
                    try:
                        live.session = self.store.load(sid)
                        live.stat = _stat_key(path)
                    except (SessionNotFoundError, CorruptSessionError):
                        self.forget(sid)
                        raise
            return live
        s = self.store.load(sid)   # SessionNotFoundError / CorruptSessionError go to the caller
        with self._lock:
            live = self._live.get(sid)
            if live is None:
                live = self._live[sid] = LiveSession(s, stat=_stat_key(path))
                self._evict()
        return live

    def _evict(self, keep: int = 64) -> None:
        if len(self._live) <= keep:
            return
        for sid, live in list(self._live.items()):
            if len(self._live) <= keep:
                break
            if not live.subscribers and live.generation is None:
                del self._live[sid]

    def forget(self, sid: str) -> LiveSession | None:
        with self._lock:
            return self._live.pop(sid, None)

    # ---- writing -------------------------------------------------------------------------------

    @contextmanager
    def writing(self, sid: str, revision: int | None, *, allow_busy: bool = False) -> Iterator[LiveSession]:
        live = self.get(sid)
        with live.lock:
            if live.generation is not None and not allow_busy:
                raise ProtocolError("busy", "this session is generating; stop it first (chat.stop)",
                                    session=sid)
            if revision is not None and revision != live.session.revision:
                raise ProtocolError("stale_revision", f"revision {revision} is stale, the session is at "
                                    f"{live.session.revision}; reload", "revision",
                                    revision=live.session.revision, session=sid,
                                    _before=[{"type": "state", "session": self.snapshot(live)}])
            yield live

    def save(self, live: LiveSession) -> int:
        """Store the held session (caller holds live.lock)."""
        try:
            rev = self.store.save(live.session)
        except StaleRevisionError:
            live.session = self.store.load(live.session.id)
            live.stat = _stat_key(self.store.path(live.session.id))
            raise ProtocolError("stale_revision", "the session file was changed by someone else; reload",
                                "revision", revision=live.session.revision, session=live.session.id,
                                _before=[{"type": "state", "session": self.snapshot(live)}]) from None
        live.stat = _stat_key(self.store.path(live.session.id))
        return rev

    # ---- generation bookkeeping -----------------------------------------------------------------

    def begin(self, live: LiveSession, conn: Connection, request_id: str) -> Generation:
        """Mark the session as generating (caller holds live.lock, after its checks)."""
        if conn.generating:
            raise ProtocolError("busy", "this connection already runs a generation", session=live.session.id)
        gen = Generation(cancel=threading.Event(), conn=conn, request_id=request_id)
        live.generation = gen
        conn.generating = True
        return gen

    def end(self, live: LiveSession, gen: Generation) -> bool:
        """Clear the generating mark; True if it was still set (i.e. this call ended it)."""
        with live.lock:
            gen.conn.generating = False
            if live.generation is gen:
                live.generation = None
                return True
            return False

    def stop(self, live: LiveSession) -> bool:
        with live.lock:
            gen = live.generation
            if gen is None:
                return False
            gen.cancel.set()
        if self.engine is not None:
            self.engine.wake()
        return True

    # ---- snapshots -----------------------------------------------------------------------------

    def snapshot(self, live: LiveSession) -> dict:
        """The session as the client sees it (docs/protocol.md §5). Caller holds live.lock."""
        s = live.session
        path = s.active_path()
        engine = self.engine
        context = None
        dropped: set[str] = set()
        if engine is not None:
            bots = s.bots()
            bot = bots[0] if bots else None
            max_new = int(conversation.merged_settings(s, bot)["max_response_tokens"])
            partial = None
            speaker = bot.name if bot is not None else ""
            try:
                p = conversation.build_prompt(s, path, engine, speaker, max_new, partial=partial)
                dropped = set(p.dropped)
                context = {"tokens_used": p.tokens_used, "tokens_total": p.tokens_total, "reserved": max_new,
                           "dropped": p.dropped, "fixed_prompt_in_context": p.fixed_in, "format": p.format}
            except Exception:  # noqa: BLE001 - context info must never break a snapshot
                log.exception("context computation failed for session %s", s.id)
        if context is None:
            context = {"tokens_used": None, "tokens_total": engine.max_seq_len if engine else 0,
                       "reserved": None, "dropped": [], "fixed_prompt_in_context": True,
                       "format": conversation.prompt_format(s, engine)}
        messages = []
        for m in path:
            idx, count = s.siblings(m.id)
            tokens = m.tokens
            if tokens is None and engine is not None:
                tokens = engine.count(m.text)
            messages.append({"id": m.id, "parent": m.parent, "role": m.role, "author": m.author,
                             "text": m.text, "created": m.created, "tokens": tokens,
                             "tokens_per_s": m.tokens_per_s, "sibling_index": idx, "sibling_count": count,
                             "in_context": m.id not in dropped})
        g = live.generation
        return {"id": s.id, "name": s.name, "revision": s.revision, "created": s.created, "updated": s.updated,
                "participants": [{"name": p.name, "kind": p.kind, "persona": p.persona,
                                  "settings": dict(p.settings), "color": p.color, "lora": p.lora}
                             for p in s.participants],
                "fixed_prompt": s.fixed_prompt, "keep_fixed_prompt": s.keep_fixed_prompt,
                "settings": conversation.merged_settings(s), "turn_order": s.turn_order,
                "max_bot_turns": s.max_bot_turns, "template": s.template, "active_leaf": s.active_leaf,
                "messages": messages, "context": context,
                "generating": None if g is None else {"message_id": g.message_id, "author": g.author,
                                                      "queued": g.queued}}

    def state(self, live: LiveSession, exclude: Connection | None = None) -> dict:
        """A `state` message for the requester, also published to the other watchers."""
        with live.lock:
            msg = {"type": "state", "session": self.snapshot(live)}
        return self.publish(live, msg, exclude)
