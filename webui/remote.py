"""`RemoteEngine`: the chat server's engine interface (webui/engine.py) backed by a remote
OpenAI-compatible server over HTTP (stdlib `http.client`; streaming via server-sent events).

    engine = RemoteEngine("http://127.0.0.1:5000/v1", api_key=None, model=None)   # probes /models

- Prompts go as text to `POST {base}/completions` (the chat uses the raw prompt format: no chat
  template, the remote's tokenizer is unknown). Token counts are approximate (`count` = chars / 4,
  rounded up), and `max_seq_len` keeps 10 % of the remote's context free for that approximation.
- Sampling: the standard fields always (temperature, top_p, max_tokens, stop, seed, presence /
  frequency penalty); our extra fields (top_k, min_p, typical, repetition_penalty*, break_on_newline,
  lora) only when the remote is one of ours (its `/models` entry has `"owned_by": "exllama"`), since
  other servers may refuse unknown fields. break_on_newline is also applied here, on the stream.
- Constrained choice (turn order "model"): through the `choices_from` extension when the remote's
  `/models` entry says `"choices_from": true`; otherwise `constrained_choice` is False and the chat falls
  back to round robin (info's `notice` says so).
- The same one-at-a-time line as the local engine (inherited); cancelling closes the connection,
  which makes our own server stop generating.
"""
from __future__ import annotations

import http.client
import json
import math
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from urllib.parse import urlsplit

from .engine import Engine

FALLBACK_NOTICE = ("The remote server has no constrained choice: turn order \"model\" falls back to round robin.")


class RemoteError(Exception):
    """An error answer of the remote server (or a broken stream), in OpenAI's terms."""

    def __init__(self, status: int | None, message: str, type_: str | None = None, code: str | None = None,
                 param: str | None = None):
        super().__init__(f"remote server: {message}" + (f" (HTTP {status})" if status else ""))
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def error_from_response(status: int, body: bytes | str) -> RemoteError:
    """A non-2xx answer -> RemoteError. Understands `{"error": {"message", "type", "code", "param"}}`,
    `{"error": "text"}`, `{"detail": ...}` (FastAPI) and plain text."""
    text = body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else str(body)
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            return RemoteError(status, str(err.get("message") or text[:300]), err.get("type"),
                               None if err.get("code") is None else str(err.get("code")), err.get("param"))
        if isinstance(err, str):
            return RemoteError(status, err)
        if "detail" in data:
            return RemoteError(status, str(data["detail"])[:300])
    return RemoteError(status, text.strip()[:300] or http.client.responses.get(status, "error"))


def parse_sse(lines: Iterable[bytes | str]) -> Iterator[str]:
    """Server-sent events -> the `data` of each event (multi-line data joined with "\\n"). Comments
    (`: ...`) and other fields (event, id, retry) are skipped; an event ends at a blank line."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
        line = line.rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
    if data:
        yield "\n".join(data)


def iter_chunks(lines: Iterable[bytes | str]) -> Iterator[dict]:
    """The JSON chunks of an OpenAI stream, up to `data: [DONE]`; an `{"error": ...}` event raises."""
    for data in parse_sse(lines):
        if data.strip() == "[DONE]":
            return
        try:
            obj = json.loads(data)
        except ValueError:
            raise RemoteError(None, f"bad stream event: {data[:200]!r}") from None
        if isinstance(obj, dict) and "error" in obj:
            raise error_from_response(0, json.dumps(obj))
        yield obj


def _finish(choice: dict) -> str:
    native = choice.get("native_finish_reason")
    if native in ("eos", "stop", "length", "cancelled", "newline"):
        return native
    return {"length": "length"}.get(choice.get("finish_reason"), "stop")


class RemoteEngine(Engine):
    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None, *,
                 timeout: float = 600.0, max_waiting: int = 64):
        parts = urlsplit(base_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--remote must be an http(s) URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._parts = parts
        self.api_key = api_key
        self.timeout = timeout
        # the line (same fields as Engine's; the rest of Engine.__init__ needs a local model)
        self.max_waiting = max_waiting
        self._line: list[object] = []
        self._cond = threading.Condition()
        self.model = self.tokenizer = self.generator = None
        self.path = self.base_url
        entries = self._get("/models").get("data") or []
        entry = None
        if model:
            entry = next((e for e in entries if e.get("id") == model), {"id": model})
        elif entries:
            entry = entries[0]
        else:
            raise RemoteError(None, f"{self.base_url}/models lists no model; pass --remote-model")
        self.name = str(entry["id"])
        self.ours = entry.get("owned_by") == "exllama"
        self.constrained_choice = entry.get("choices_from") is True
        self._adapters = [a for a in entry.get("adapters") or [] if isinstance(a, str)] if self.ours else []
        ctx = entry.get("context_length") or entry.get("max_model_len") or entry.get("context_window") or 4096
        self.remote_max_seq_len = int(ctx)
        self.max_seq_len = max(64, int(self.remote_max_seq_len * 0.9))

    # ---- HTTP ----------------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        p = self._parts
        cls = http.client.HTTPSConnection if p.scheme == "https" else http.client.HTTPConnection
        return cls(p.hostname, p.port, timeout=self.timeout)

    def _headers(self, stream: bool = False) -> dict:
        h = {"Content-Type": "application/json", "Accept": "text/event-stream" if stream else "application/json",
             "User-Agent": "exllama-webui-remote"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def _open(self, method: str, path: str, body: dict | None = None, stream: bool = False):
        conn = self._connection()
        data = None if body is None else json.dumps(body).encode("utf-8")
        conn.request(method, self._parts.path + path, body=data, headers=self._headers(stream))
        sock = conn.sock
        resp = conn.getresponse()
        if resp.status >= 400:
            try:
                err = error_from_response(resp.status, resp.read(1 << 20))
            finally:
                conn.close()
            raise err
        return conn, sock, resp

    def _get(self, path: str) -> dict:
        conn, _, resp = self._open("GET", path)
        try:
            return json.loads(resp.read())
        finally:
            conn.close()

    def _post(self, path: str, body: dict) -> dict:
        conn, _, resp = self._open("POST", path, body)
        try:
            return json.loads(resp.read())
        finally:
            conn.close()

    # ---- the engine interface ------------------------------------------------------------------

    def adapters(self) -> list[str]:
        return list(self._adapters)

    def body(self, prompt: str, settings) -> dict:
        """The /completions request for one generation."""
        s = settings.sampler
        b = {"model": self.name, "prompt": prompt, "max_tokens": max(1, settings.max_new_tokens),
             "temperature": s.temperature, "top_p": s.top_p, "stream": True,
             "stream_options": {"include_usage": True}}
        if settings.stop_strings:
            b["stop"] = list(settings.stop_strings)
        if s.seed is not None:
            b["seed"] = int(s.seed) if self.ours else int(s.seed) % 2**63
        for k in ("presence_penalty", "frequency_penalty"):
            if getattr(s, k):
                b[k] = getattr(s, k)
        if self.ours:
            b.update(top_k=s.top_k, min_p=s.min_p, typical=s.typical, repetition_penalty=s.repetition_penalty,
                     repetition_penalty_sustain=s.repetition_penalty_sustain,
                     repetition_penalty_decay=s.repetition_penalty_decay)
            if settings.break_on_newline:
                b["break_on_newline"] = True
            if settings.lora:
                b["lora"] = settings.lora
        return b

    def generate(self, prompt, settings, cancel: threading.Event | None = None):
        if not isinstance(prompt, str):
            raise TypeError("a remote engine takes text prompts")
        return self._generate(prompt, settings, cancel or threading.Event())

    def _generate(self, prompt: str, settings, cancel: threading.Event):
        from model.generator import Delta
        n_prompt = self.count(prompt)
        t0 = time.perf_counter()
        n, seen_text, reason = 0, False, None
        if cancel.is_set():
            yield Delta("", [], 0, 0.0, n_prompt, "cancelled")
            return
        conn, sock, resp = self._open("POST", "/completions", self.body(prompt, settings), stream=True)
        done = threading.Event()

        def watch():  # a cancel closes the socket under the blocked read
            while not done.is_set():
                if cancel.wait(0.2):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return

        threading.Thread(target=watch, daemon=True, name="remote-cancel").start()
        try:
            try:
                for chunk in iter_chunks(resp):
                    usage = chunk.get("usage")
                    if usage and usage.get("completion_tokens") is not None:
                        n = int(usage["completion_tokens"])
                    if usage and usage.get("prompt_tokens") is not None:
                        n_prompt = int(usage["prompt_tokens"])
                    for choice in chunk.get("choices") or []:
                        text = choice.get("text") or ""
                        if text and settings.break_on_newline:
                            lead = 0 if seen_text else len(text) - len(text.lstrip())
                            cut = text.find("\n", lead)
                            if cut >= 0 and (seen_text or text.strip()):
                                text, reason = text[:cut], "newline"
                        if text:
                            seen_text = seen_text or bool(text.strip())
                            n += 1
                            yield Delta(text, [], n, n / max(time.perf_counter() - t0, 1e-6), n_prompt, None)
                        if choice.get("finish_reason") and reason is None:
                            reason = _finish(choice)
                    if reason == "newline" or cancel.is_set():
                        break
            except (OSError, http.client.HTTPException):
                if not cancel.is_set():
                    raise
            if cancel.is_set() and reason != "newline":
                reason = "cancelled"
            tps = n / max(time.perf_counter() - t0, 1e-6)
            yield Delta("", [], n, tps, n_prompt, reason or "length")
        finally:
            done.set()
            conn.close()

    def choose(self, prompt, options, lora: str | None = None) -> str:
        options = list(options)
        if len(options) == 1:
            return options[0]
        if not self.constrained_choice:
            raise NotImplementedError("the remote server has no constrained choice")
        body = {"model": self.name, "prompt": prompt, "choices_from": options, "max_tokens": 1}
        if lora:
            body["lora"] = lora
        out = self._post("/completions", body)
        text = ((out.get("choices") or [{}])[0]).get("text")
        return text if text in options else options[0]

    def count(self, text: str) -> int:
        return math.ceil(len(text) / 4)

    def prompt_tokens(self, prompt: str) -> int:
        return self.count(prompt)

    def encode_prompt(self, prompt: str, fmt: str = "raw"):
        return None       # no tokenizer here: the prompt goes as text

    def defang(self, text: str) -> str:
        return text

    @property
    def has_chat_template(self) -> bool:
        return False

    def chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        raise NotImplementedError("a remote engine uses the raw prompt format")

    def info(self) -> dict:
        return {"name": self.name, "path": self.base_url, "max_seq_len": self.max_seq_len, "device": "remote",
                "dtype": None, "vocab_size": None, "chat_template": False, "busy": self.busy,
                "queue": self.waiting, "adapters": self.adapters(), "remote": self.base_url,
                "token_count": "approximate", "constrained_choice": self.constrained_choice,
                "notice": None if self.constrained_choice else FALLBACK_NOTICE}
