"""Helpers for the web UI tests: a scripted fake generator and tokenizer (fast, deterministic handler
tests), in-process services without Flask, a live server subprocess and a websocket client."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE_ARGS = ["--device", "cpu", "--dtype", "float32", "-l", "1024"]


# ---- fakes ---------------------------------------------------------------------------------------

class FakeTokenizer:
    """Words, punctuation and whitespace runs are tokens; ids are assigned on first sight."""
    _re = re.compile(r"\w+|[^\w\s]|\s+")

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.pieces: list[str] = []
        self.bos_id, self.eos_ids, self.pad_id = None, [0], None
        self.add_bos_token = False
        self.chat_template = None
        self.special_ids = frozenset()
        self.lock = threading.Lock()

    @property
    def vocab_size(self):
        return len(self.pieces)

    def encode(self, text, add_bos=False, special=True):
        out = []
        with self.lock:
            for t in self._re.findall(text):
                if t not in self.vocab:
                    self.vocab[t] = len(self.pieces)
                    self.pieces.append(t)
                out.append(self.vocab[t])
        return out

    def decode(self, ids, skip_special=False):
        return "".join(self.pieces[i] for i in ids)


class FakeGenerator:
    """Follows the model.generator contract. Replies come from `replies` (a deque of strings, or a
    callable(prompt_text, settings) -> str); the text streams token by token (the FakeTokenizer's
    tokens), stop strings end it, `delay` seconds per token, the cancel event is honoured."""

    def __init__(self, tokenizer: FakeTokenizer, replies=None, max_seq_len: int = 256, delay: float = 0.0):
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.replies = replies if replies is not None else deque()
        self.delay = delay
        self.prompts: list[str] = []
        self.choices: deque[str] = deque()     # scripted answers of choose(); else the first option
        self.choose_calls: list[tuple[str, list[str]]] = []
        self.started = threading.Event()

    def encode(self, prompt):
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def _text(self, prompt):
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)

    def generate(self, prompt, settings, cancel=None):
        from model.generator import Delta
        text = self._text(prompt)
        self.prompts.append(text)
        if callable(self.replies):
            reply = self.replies(text, settings)
        else:
            reply = self.replies.popleft() if self.replies else " Hello there, friend."
        reason = None
        for s in settings.stop_strings:
            i = reply.find(s)
            if i >= 0:
                reply, reason = reply[:i], "stop"
        if settings.break_on_newline and "\n" in reply.lstrip():
            lead = len(reply) - len(reply.lstrip())
            reply, reason = reply[:lead + reply.lstrip().index("\n")], "newline"
        pieces = FakeTokenizer._re.findall(reply)
        if len(pieces) > settings.max_new_tokens:
            pieces, reason = pieces[:settings.max_new_tokens], "length"
        n = 0
        t0 = time.perf_counter()
        self.started.set()
        for p in pieces:
            if cancel is not None and cancel.is_set():
                yield Delta("", [], n, 10.0, len(text), "cancelled")
                return
            if self.delay:
                time.sleep(self.delay)
            n += 1
            yield Delta(p, [1], n, n / max(time.perf_counter() - t0, 1e-6), len(text), None)
        if cancel is not None and cancel.is_set():
            reason = "cancelled"
        yield Delta("", [], n, 10.0, len(text), reason or "eos")

    def choose(self, prompt, options):
        self.choose_calls.append((self._text(prompt), list(options)))
        if self.choices:
            c = self.choices.popleft()
            return c if c in options else options[0]
        return options[0]


def fake_services(tmp_path, replies=None, max_seq_len: int = 256, delay: float = 0.0, engine=True):
    """Services (store + hub + engine with a FakeGenerator) as create_app builds them, without Flask."""
    from sessions import SessionStore
    from webui import Services
    from webui.engine import Engine
    from webui.hub import Hub
    store = SessionStore(tmp_path / "sessions")
    eng = None
    if engine:
        tok = FakeTokenizer()
        eng = Engine(None, tok, FakeGenerator(tok, replies, max_seq_len, delay), name="fake")
    return Services(config={}, store=store, engine=eng, hub=Hub(store, eng))


class Client:
    """A connection driven directly through handlers.dispatch (no socket). Pushes land in `pushed`."""

    def __init__(self, services):
        from webui.hub import Connection
        self.pushed: list[dict] = []
        self.conn = Connection(services, push=self.pushed.append)
        services.hub.connect(self.conn)
        self.n = 0
        self.revision: dict[str, int] = {}

    def call(self, type_, **fields) -> list[dict]:
        from webui.handlers import dispatch
        from webui.protocol import validate
        from webui.protocol import ProtocolError, error_message
        self.n += 1
        try:
            msg = validate({"type": type_, "id": f"r{self.n}", **fields})
        except ProtocolError as e:
            return [error_message(e)]
        out = list(dispatch(self.conn, msg))
        self._track(out)
        return out

    def iter(self, type_, **fields):
        """The handler's messages one by one (to act mid-stream)."""
        from webui.handlers import dispatch
        from webui.protocol import validate
        self.n += 1
        msg = validate({"type": type_, "id": f"r{self.n}", **fields})
        for m in dispatch(self.conn, msg):
            self._track([m])
            yield m

    def _track(self, out):
        for m in out:
            if m["type"] == "state" and m.get("session"):
                self.revision[m["session"]["id"]] = m["session"]["revision"]
            if m["type"] == "reply" and "revision" in m and "session" in m and isinstance(m["session"], str):
                self.revision[m["session"]] = m["revision"]

    def ok(self, type_, **fields) -> dict:
        out = self.call(type_, **fields)
        assert out[-1]["type"] == "reply", out[-1]
        return out[-1]

    def state(self, sid) -> dict:
        out = self.call("session.open", session=sid)
        return [m for m in out if m["type"] == "state"][-1]["session"]


# ---- live server ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python webui/app.py` in its own process group; always stop() it (fixture teardown)."""

    def __init__(self, sessions_dir, *extra, model: bool = True, log_path=None):
        self.sessions_dir = Path(sessions_dir)
        self.extra = list(extra)
        self.model = model
        self.log_path = Path(log_path or (self.sessions_dir.parent / f"server-{os.getpid()}-{id(self)}.log"))
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 180.0) -> "LiveServer":
        self.port = free_port()
        cmd = [sys.executable, "webui/app.py", "--port", str(self.port), "--sessions-dir", str(self.sessions_dir),
               "--threads", "40"] + (ENGINE_ARGS if self.model else ["--no-model"]) + self.extra
        self._log = open(self.log_path, "ab")
        self._log_start = self.log_path.stat().st_size
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if "Serving at" in self.log():
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return self
                except OSError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not start in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode("utf-8", "replace")
        except (OSError, AttributeError):
            return ""

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)   # the process group: gunicorn master and its worker
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole server at once (crash simulation)."""
        if self.proc is None:
            return
        self._signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._wait_group_gone()
        self._log.close()

    def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None and not self._group_alive():
            return
        self._signal(signal.SIGINT)     # gunicorn: quick shutdown (every write is durable already)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        self._signal(signal.SIGKILL)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        self._wait_group_gone()
        self._log.close()

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def _wait_group_gone(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self._group_alive() and time.monotonic() < deadline:
            self._signal(signal.SIGKILL)
            time.sleep(0.05)


class WSClient:
    """A real websocket client (websocket-client). `request` returns every message of one request,
    up to and including its reply or error; other messages (pushes, other ids) go to `other`."""

    def __init__(self, url: str, timeout: float = 120.0, **kw):
        import websocket
        self.ws = websocket.create_connection(url, timeout=timeout, **kw)
        self.hello = self.recv()
        assert self.hello["type"] == "hello", self.hello
        self.n = 0
        self.other: list[dict] = []
        self.pending: dict[str, list[dict]] = {}

    def recv(self) -> dict:
        return json.loads(self.ws.recv())

    def send(self, type_, **fields) -> str:
        self.n += 1
        rid = fields.pop("id", None) or f"c{self.n}"
        self.ws.send(json.dumps({"type": type_, "id": rid, **fields}))
        self.pending[rid] = []
        return rid

    def send_raw(self, data) -> None:
        self.ws.send(data)

    def collect(self, rid: str, until=None) -> list[dict]:
        """Messages of request `rid` until its reply/error (or until `until(msg)` is true)."""
        out = self.pending.setdefault(rid, [])
        for i, m in enumerate(out):  # already received?
            if (until and until(m)) or m["type"] in ("reply", "error"):
                res, self.pending[rid] = out[:i + 1], out[i + 1:]
                return res
        while True:
            m = self.recv()
            if m.get("id") == rid:
                out.append(m)
                if (until and until(m)) or m["type"] in ("reply", "error"):
                    self.pending[rid] = []
                    return out
            elif m.get("id") in self.pending:
                self.pending[m["id"]].append(m)
            else:
                self.other.append(m)

    def request(self, type_, **fields) -> list[dict]:
        return self.collect(self.send(type_, **fields))

    def ok(self, type_, **fields) -> tuple[list[dict], dict]:
        out = self.request(type_, **fields)
        assert out[-1]["type"] == "reply", out[-1]
        return out, out[-1]

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001
            pass


def last_state(messages: list[dict]) -> dict:
    return [m for m in messages if m["type"] == "state"][-1]["session"]
