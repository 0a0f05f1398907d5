"""OpenAI-compatible HTTP API: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`
(docs/api.md). Streaming is server-sent events in OpenAI's chunk shape, ending `data: [DONE]`.

Generations take the same one-at-a-time line as the chat (`Engine.join` / `position` / `leave`);
a full line is a 429. Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.

Access (`gate`, run *instead of* the page's security checks for /v1 paths; see `init_app`):
- the Host header must be allowed (DNS rebinding), as for every other request;
- with an API key (`API_KEY`, `--api-key`): `Authorization: Bearer KEY` is required, and then the
  browser Origin does not matter (a page on another site does not have the key);
- without one: a server with a password refuses the API (401: it would otherwise be an open door
  past the login), a request carrying a foreign `Origin` is refused (403: a page on another site
  must not drive the loopback server from the user's browser), and a POST must be
  `application/json` (a cross-site "simple" request cannot send that without a CORS preflight, which
  is never granted: no CORS headers are sent).
"""
from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import uuid

from flask import Blueprint, Response, current_app, jsonify, request

from .engine import QueueFull

log = logging.getLogger("webui")

bp = Blueprint("openai", __name__, url_prefix="/v1")

MAX_STOP = 16
MAX_CHOICES = 64
FINISH = {"eos": "stop", "stop": "stop", "newline": "stop", "length": "length", "cancelled": "stop"}
API_SAMPLER_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "typical": 1.0,
                        "repetition_penalty": 1.0}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(e: ApiError):
    resp = jsonify(e.body())
    resp.status_code = e.status
    if e.status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="exllama"'
    return resp


def map_exception(e: BaseException) -> ApiError:
    """Any exception -> the ApiError (status, type, code) a client gets."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFull):
        return ApiError(429, f"the server is busy: {e}", "rate_limit_error", code="queue_full")
    if isinstance(e, (ValueError, TypeError)):
        return ApiError(400, str(e), "invalid_request_error", code="invalid_value")
    return ApiError(500, f"the engine failed: {type(e).__name__}: {str(e)[:300]}", "server_error",
                    code="generation_failed")


# ---- access --------------------------------------------------------------------------------------

def is_api_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def bearer_token() -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return None


def gate():
    """The access check for /v1 requests (None: go on; else the error response)."""
    from . import security
    app = current_app
    if not security._host_ok(app):
        return error_response(ApiError(403, "unexpected Host header", "permission_error", code="forbidden"))
    key = app.config.get("API_KEY")
    if key:
        given = bearer_token()
        if given is None:
            return error_response(ApiError(401, "missing API key: send `Authorization: Bearer KEY`",
                                           "authentication_error", code="invalid_api_key"))
        if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), key.encode("utf-8", "surrogatepass")):
            return error_response(ApiError(401, "incorrect API key provided", "authentication_error",
                                           code="invalid_api_key"))
        return None
    if app.config.get("_PASSWORD_HASH"):
        return error_response(ApiError(401, "this server has a password: start it with --api-key KEY to use the "
                                            "API", "authentication_error", code="api_key_required"))
    origin = request.headers.get("Origin")
    if origin is not None and origin not in (f"http://{request.host}", f"https://{request.host}"):
        return error_response(ApiError(403, "cross-origin request refused (set --api-key to use the API from "
                                            "other origins)", "permission_error", code="cross_origin"))
    if request.method not in ("GET", "HEAD", "OPTIONS") and request.mimetype != "application/json":
        return error_response(ApiError(415, "send the request as application/json", "invalid_request_error",
                                       code="unsupported_media_type"))
    return None


def init_app(app) -> None:
    """Register the blueprint; /v1 requests get `gate` instead of the page checks (login cookie,
    same-origin POSTs) of `security.before_request`, which stays in force for everything else."""
    app.extensions["exllama.api_gate"] = (is_api_path, gate)   # read by security.before_request
    app.register_blueprint(bp)


# ---- request parsing -----------------------------------------------------------------------------

def _body() -> dict:
    data = request.get_json(silent=True, force=True)
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return data


def _number(d: dict, key: str, lo: float | None = None, hi: float | None = None, integer: bool = False,
            default=None):
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise ApiError(400, f"{key} must be {'an integer' if integer else 'a number'}", param=key,
                       code="invalid_type")
    if v != v or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
        raise ApiError(400, f"{key} must be in {rng}, got {v}", param=key, code="invalid_value")
    return int(v) if integer else float(v)


def _engine(d: dict):
    engine = current_app.extensions["exllama"].engine
    model = d.get("model")
    if engine is None:
        raise ApiError(404, "no model is loaded on this server", code="model_not_found", param="model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model must be a string", param="model", code="invalid_type")
    if model and model not in _model_ids(engine):
        raise ApiError(404, f"The model `{model}` does not exist (this server has `{engine.name}`)",
                       param="model", code="model_not_found")
    return engine


def _model_ids(engine) -> set[str]:
    ids = {engine.name}
    if "." in engine.name:
        ids.add(engine.name.rsplit(".", 1)[0])
    return ids


def _unsupported(d: dict) -> None:
    n = d.get("n")
    if n is not None and n != 1:
        raise ApiError(400, "only n=1 is supported", param="n", code="unsupported_value")
    best_of = d.get("best_of")
    if best_of is not None and best_of != 1:
        raise ApiError(400, "only best_of=1 is supported", param="best_of", code="unsupported_value")
    for key in ("echo", "logprobs", "top_logprobs", "suffix", "logit_bias", "tools", "functions",
                "tool_choice", "function_call"):
        if d.get(key) not in (None, False, {}, [], ""):
            raise ApiError(400, f"{key} is not supported", param=key, code="unsupported_parameter")
    rf = d.get("response_format")
    if rf not in (None, {}) and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise ApiError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format",
                       code="unsupported_parameter")


def _stop(d: dict) -> list[str]:
    stop = d.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop must be a string or a list of strings", param="stop", code="invalid_type")
    if len(stop) > MAX_STOP:
        raise ApiError(400, f"at most {MAX_STOP} stop strings", param="stop", code="invalid_value")
    return [s for s in stop if s]


def _sampler(d: dict) -> dict:
    s = dict(API_SAMPLER_DEFAULTS)
    s["temperature"] = _number(d, "temperature", 0, 2, default=s["temperature"])
    top_p = _number(d, "top_p", 0, 1, default=1.0)
    if top_p == 0:
        s["temperature"] = 0.0
    else:
        s["top_p"] = top_p
    s["top_k"] = _number(d, "top_k", 0, None, integer=True, default=0)
    s["min_p"] = _number(d, "min_p", 0, 1, default=0.0)
    typical = _number(d, "typical", 0, 1, default=1.0)
    s["typical"] = typical if typical > 0 else 1.0
    s["repetition_penalty"] = _number(d, "repetition_penalty", 0, None, default=1.0) or 1.0
    for key in ("presence_penalty", "frequency_penalty"):
        s[key] = _number(d, key, -2, 2, default=0.0)
    sustain = _number(d, "repetition_penalty_sustain", -1, None, integer=True)
    if sustain is not None:
        s["repetition_penalty_sustain"] = sustain
    decay = _number(d, "repetition_penalty_decay", 0, None, integer=True)
    if decay is not None:
        s["repetition_penalty_decay"] = decay
    seed = _number(d, "seed", integer=True)
    if seed is not None:
        s["seed"] = seed % 2**64
    return s


def _lora(d: dict, engine) -> str | None:
    lora = d.get("lora")
    if lora is None:
        return None
    if not isinstance(lora, str) or lora not in engine.adapters():
        raise ApiError(400, f"unknown adapter {lora!r} (loaded: {engine.adapters()})", param="lora",
                       code="invalid_value")
    return lora


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        out = []
        for part in c:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, "only text content parts are supported", param=f"messages[{i}].content",
                               code="unsupported_content")
            out.append(part["text"])
        return "".join(out)
    raise ApiError(400, "content must be a string or a list of text parts", param=f"messages[{i}].content",
                   code="invalid_type")


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def chat_messages(d: dict) -> list[dict]:
    msgs = d.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list", param="messages", code="invalid_value")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {sorted(ROLES)}", param=f"messages[{i}].role",
                           code="invalid_value")
        out.append({"role": ROLES[m["role"]], "content": _content(m, i)})
    return out


def raw_chat_prompt(messages: list[dict]) -> str:
    """The fallback without a chat template: `System:` / `User:` / `Assistant:` lines, then `Assistant:`."""
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "".join(f"{names[m['role']]}: {m['content']}\n" for m in messages) + "Assistant:"


# ---- generation ----------------------------------------------------------------------------------

class Job:
    """One validated request: the prompt, settings and how to answer."""

    def __init__(self, engine, kind: str, prompt, prompt_text: str, n_prompt: int, settings, stream: bool,
                 include_usage: bool, choices: list[str] | None = None, lora: str | None = None):
        self.engine, self.kind, self.prompt, self.prompt_text = engine, kind, prompt, prompt_text
        self.n_prompt, self.settings, self.stream, self.include_usage = n_prompt, settings, stream, include_usage
        self.choices, self.lora = choices, lora
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = engine.name
        self.cancel = threading.Event()

    # -- OpenAI shapes --
    def choice(self, text: str | None, finish: str | None, native: str | None = None, final: bool = False) -> dict:
        if self.kind == "chat":
            c = {"index": 0, "logprobs": None, "finish_reason": finish}
            if self.stream:
                c["delta"] = {} if text is None else {"content": text}
            else:
                c["message"] = {"role": "assistant", "content": text or ""}
        else:
            c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if native is not None:
            c["native_finish_reason"] = native
        return c

    def envelope(self, choices: list[dict], usage: dict | None = None) -> dict:
        obj = ("chat.completion.chunk" if self.stream else "chat.completion") if self.kind == "chat" \
            else "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
               "system_fingerprint": None, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def usage(self, n: int) -> dict:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": n, "total_tokens": self.n_prompt + n}

    # -- running --
    def wait(self, ticket):
        """Yields the line position while waiting (for SSE keep-alives)."""
        last = None
        while True:
            pos = self.engine.position(ticket, wait=0.0 if last is None else 1.0)
            if pos == 0:
                return
            yield pos
            last = pos

    def pieces(self):
        """(text, final delta or None) while generating; the last item has the final delta."""
        if self.choices is not None:
            choice = self.engine.choose(self.prompt, self.choices, self.lora)
            n = self.engine.count(choice)
            yield choice, _Final(n, "stop")
            return
        final = None
        it = self.engine.generate(self.prompt, self.settings, self.cancel)
        try:
            for d in it:
                final = d
                if d.text:
                    yield d.text, None
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        yield "", final if final is not None else _Final(0, "cancelled")


class _Final:
    def __init__(self, n_tokens: int, finish_reason: str):
        self.n_tokens, self.finish_reason = n_tokens, finish_reason


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def run(job: Job):
    engine = job.engine
    try:
        ticket = engine.join()
    except QueueFull as e:
        raise map_exception(e) from None
    if not job.stream:
        try:
            for _ in job.wait(ticket):
                pass
            text, final = "", None
            for piece, fin in job.pieces():
                text += piece
                final = fin or final
        except Exception as e:  # noqa: BLE001 - reported in the standard shape
            log.exception("API generation failed")
            raise map_exception(e) from None
        finally:
            engine.leave(ticket)
        native = final.finish_reason or "length"
        body = job.envelope([job.choice(text, FINISH.get(native, "stop"), native)], job.usage(final.n_tokens))
        return jsonify(body)

    def events():
        try:
            for pos in job.wait(ticket):
                yield f": queued, position {pos}\n\n"      # an SSE comment: keeps the line warm
            if job.kind == "chat":
                yield _sse(job.envelope([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]))
            final = None
            for piece, fin in job.pieces():
                if piece:
                    yield _sse(job.envelope([job.choice(piece, None)]))
                final = fin or final
            native = final.finish_reason or "length"
            yield _sse(job.envelope([job.choice(None if job.kind == "chat" else "", FINISH.get(native, "stop"),
                                                native)]))
            if job.include_usage:
                yield _sse(job.envelope([], job.usage(final.n_tokens)))
        except GeneratorExit:
            job.cancel.set()
            raise
        except Exception as e:  # noqa: BLE001 - the status is sent already: an error event
            log.exception("API generation failed (stream)")
            yield _sse(map_exception(e).body())
        finally:
            job.cancel.set()
            engine.leave(ticket)
        yield "data: [DONE]\n\n"

    resp = Response(events(), mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    return resp


def _settings(engine, d: dict, stop: list[str], max_new: int, lora):
    return engine.generation_settings(sampler=_sampler(d), max_new_tokens=max_new, stop_strings=stop,
                                      break_on_newline=bool(d.get("break_on_newline", False)), lora=lora)


def _max_tokens(d: dict, engine, n_prompt: int, default: int | None) -> int:
    asked = _number(d, "max_completion_tokens", 1, None, integer=True)
    param = "max_completion_tokens"
    if asked is None:
        asked = _number(d, "max_tokens", 1, None, integer=True)
        param = "max_tokens"
    ctx = engine.max_seq_len
    if asked is None:
        if n_prompt >= ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens; the prompt has "
                                f"{n_prompt}", param="messages", code="context_length_exceeded")
        return min(default, ctx - n_prompt) if default else ctx - n_prompt
    if n_prompt + asked > ctx:
        raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                            f"{n_prompt + asked} tokens ({n_prompt} in the prompt, {asked} for the completion)",
                       param=param, code="context_length_exceeded")
    return asked


def _encode(engine, text: str, fmt: str):
    ids = engine.encode_prompt(text, fmt)
    if ids is None:           # a remote engine: text goes as it is, counted approximately
        return text, engine.count(text)
    return ids, len(ids)


def _stream_opts(d: dict) -> tuple[bool, bool]:
    stream = d.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be a boolean", param="stream", code="invalid_type")
    opts = d.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options", code="invalid_type")
    return stream, bool(stream and opts.get("include_usage"))


# ---- routes --------------------------------------------------------------------------------------

@bp.errorhandler(ApiError)
def _api_error(e: ApiError):
    return error_response(e)


@bp.get("/models")
def models():
    engine = current_app.extensions["exllama"].engine
    data = []
    if engine is not None:
        info = engine.info()
        data.append({"id": engine.name, "object": "model", "created": 0, "owned_by": "exllama",
                     # extensions
                     "context_length": engine.max_seq_len, "chat_template": bool(info.get("chat_template")),
                     "choices_from": bool(info.get("constrained_choice", True)), "adapters": engine.adapters()})
    return jsonify({"object": "list", "data": data})


@bp.get("/models/<path:model>")
def model(model: str):
    engine = current_app.extensions["exllama"].engine
    if engine is None or model not in _model_ids(engine):
        raise ApiError(404, f"The model `{model}` does not exist", param="model", code="model_not_found")
    return jsonify({"id": engine.name, "object": "model", "created": 0, "owned_by": "exllama"})


@bp.post("/completions")
def completions():
    d = _body()
    engine = _engine(d)
    _unsupported(d)
    prompt = d.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if engine.encode_prompt("", "raw") is None:
            raise ApiError(400, "token id prompts need a local model", param="prompt", code="invalid_type")
        vocab = engine.info().get("vocab_size") or 0
        if any(t < 0 or (vocab and t >= vocab) for t in prompt):
            raise ApiError(400, "token id out of range", param="prompt", code="invalid_value")
        ids, n_prompt, text = list(prompt), len(prompt), None
    elif isinstance(prompt, str):
        ids, n_prompt = _encode(engine, prompt, "raw")
        text = prompt
    else:
        raise ApiError(400, "prompt must be a string (or one string in a list, or a list of token ids)",
                       param="prompt", code="invalid_type")
    stream, usage = _stream_opts(d)
    lora = _lora(d, engine)
    choices = d.get("choices_from")
    if choices is not None:
        if (not isinstance(choices, list) or not 1 <= len(choices) <= MAX_CHOICES
                or not all(isinstance(c, str) and c for c in choices)):
            raise ApiError(400, f"choices_from must be a list of 1..{MAX_CHOICES} non-empty strings",
                           param="choices_from", code="invalid_value")
        if not engine.info().get("constrained_choice", True):
            raise ApiError(400, "this engine cannot do constrained choice", param="choices_from",
                           code="unsupported_parameter")
        job = Job(engine, "completion", ids, text, n_prompt, None, stream, usage, choices=list(choices), lora=lora)
        return run(job)
    stop = _stop(d)
    max_new = _max_tokens(d, engine, n_prompt, 16)
    try:
        settings = _settings(engine, d, stop, max_new, lora)
    except ValueError as e:
        raise ApiError(400, str(e), code="invalid_value") from None
    return run(Job(engine, "completion", ids, text, n_prompt, settings, stream, usage, lora=lora))


@bp.post("/chat/completions")
def chat_completions():
    d = _body()
    engine = _engine(d)
    _unsupported(d)
    messages = chat_messages(d)
    stop = _stop(d)
    if engine.has_chat_template:
        try:
            text = engine.chat_template([{"role": m["role"], "content": engine.defang(m["content"])}
                                         for m in messages], add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a template that refuses these messages (e.g. role order)
            raise ApiError(400, f"the chat template refused these messages: {e}", param="messages",
                           code="invalid_messages") from None
        ids, n_prompt = _encode(engine, text, "chat")
    else:
        text = raw_chat_prompt(messages)
        ids, n_prompt = _encode(engine, text, "raw")
        stop = stop + ["\nUser:", "\nSystem:"]
    stream, usage = _stream_opts(d)
    lora = _lora(d, engine)
    max_new = _max_tokens(d, engine, n_prompt, None)
    try:
        settings = _settings(engine, d, stop, max_new, lora)
    except ValueError as e:
        raise ApiError(400, str(e), code="invalid_value") from None
    return run(Job(engine, "chat", ids, text, n_prompt, settings, stream, usage, lora=lora))


@bp.route("/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def unknown(rest: str):
    raise ApiError(404, f"unknown endpoint /v1/{rest}", code="unknown_url")
