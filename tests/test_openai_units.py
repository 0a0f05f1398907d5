"""The OpenAI-compatible API and the remote engine without a network: the SSE parser, the error
mapping both ways, the access rules (Flask test client, fake generator) and the remote engine's
stream handling on canned responses."""
from __future__ import annotations

import json
import threading

import pytest

from webui_helpers import FakeGenerator, FakeTokenizer


# ---- SSE parsing -----------------------------------------------------------------------------------

def test_parse_sse():
    from webui.remote import iter_chunks, parse_sse
    lines = [b": queued, position 1\n", b"\n", b"data: {\"a\": 1}\r\n", b"\r\n", b"event: x\n", b"id: 7\n",
             b"data:{\"b\":\n", b"data: 2}\n", b"\n", "data: [DONE]\n", "\n", "data: {\"late\": 1}\n"]
    assert list(parse_sse(lines)) == ['{"a": 1}', '{"b":\n2}', "[DONE]", '{"late": 1}']
    assert list(iter_chunks(lines)) == [{"a": 1}, {"b": 2}]           # stops at [DONE]
    assert list(parse_sse(["data: no blank line at the end"])) == ["no blank line at the end"]


def test_stream_error_event_raises():
    from webui.remote import RemoteError, iter_chunks
    body = {"error": {"message": "boom", "type": "server_error", "param": None, "code": "generation_failed"}}
    lines = ['data: {"choices": []}\n', "\n", "data: " + json.dumps(body) + "\n", "\n"]
    it = iter_chunks(lines)
    assert next(it) == {"choices": []}
    with pytest.raises(RemoteError) as e:
        next(it)
    assert e.value.code == "generation_failed" and "boom" in str(e.value)


# ---- error mapping ---------------------------------------------------------------------------------

def test_error_from_response():
    from webui.remote import error_from_response
    e = error_from_response(401, b'{"error": {"message": "bad key", "type": "authentication_error", '
                                 b'"param": null, "code": "invalid_api_key"}}')
    assert (e.status, e.type, e.code, e.message) == (401, "authentication_error", "invalid_api_key", "bad key")
    assert "bad key" in str(e) and "401" in str(e)
    assert error_from_response(400, '{"error": "plain"}').message == "plain"
    assert error_from_response(422, b'{"detail": [{"msg": "field required"}]}').message.startswith("[{")
    assert error_from_response(502, b"<html>Bad gateway</html>").message == "<html>Bad gateway</html>"
    assert error_from_response(503, b"").message == "Service Unavailable"


def test_map_exception():
    from webui.engine import QueueFull
    from webui.openai_api import ApiError, map_exception
    cases = [(QueueFull("63 waiting"), 429, "rate_limit_error", "queue_full"),
             (ValueError("top_k must be >= 0"), 400, "invalid_request_error", "invalid_value"),
             (RuntimeError("CUDA exploded"), 500, "server_error", "generation_failed")]
    for exc, status, type_, code in cases:
        e = map_exception(exc)
        assert (e.status, e.type, e.code) == (status, type_, code)
        assert set(e.body()["error"]) == {"message", "type", "param", "code"}
    mine = ApiError(404, "nope", code="model_not_found", param="model")
    assert map_exception(mine) is mine


# ---- the API in-process ----------------------------------------------------------------------------

def make_app(tmp_path, **config):
    from webui import create_app
    from webui.engine import Engine
    tok = FakeTokenizer()
    gen = FakeGenerator(tok)
    app = create_app({"SESSIONS_DIR": str(tmp_path / "s"), **config}, Engine(None, tok, gen, name="fake"))
    return app, gen


def test_access_rules(tmp_path):
    app, _ = make_app(tmp_path)                       # loopback, no key, no password
    c = app.test_client()
    assert c.get("/v1/models").status_code == 200
    body = {"model": "fake", "prompt": "Hi", "max_tokens": 2}
    assert c.post("/v1/completions", json=body).status_code == 200
    assert c.post("/v1/completions", json=body, headers={"Origin": "http://localhost"}).status_code == 200
    r = c.post("/v1/completions", json=body, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and r.json["error"]["code"] == "cross_origin"
    r = c.post("/v1/completions", data=json.dumps(body), content_type="text/plain")   # a "simple" request
    assert r.status_code == 415
    assert c.get("/v1/models", headers={"Host": "evil.example"}).status_code == 403

    app, _ = make_app(tmp_path, PASSWORD="pw")          # password, no key: the API is closed
    r = app.test_client().get("/v1/models")
    assert r.status_code == 401 and r.json["error"]["code"] == "api_key_required"

    app, _ = make_app(tmp_path, PASSWORD="pw", API_KEY="k")
    c = app.test_client()
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer k", "Origin": "http://x.example"}).status_code == 200
    r = c.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json["error"]["type"] == "authentication_error"
    assert c.get("/api/model", headers={"Authorization": "Bearer k"}).status_code == 401   # pages: login only

    app, _ = make_app(tmp_path, API_ENABLED=False)
    assert app.test_client().get("/v1/models").status_code == 404


def test_requests_in_process(tmp_path):
    app, gen = make_app(tmp_path)
    c = app.test_client()
    r = c.post("/v1/completions", json={"model": "fake", "prompt": "Hi", "choices_from": ["Bob:", "Ann:"]})
    assert r.json["choices"][0]["text"] == "Bob:" and gen.choose_calls[-1][1] == ["Bob:", "Ann:"]
    for bad, param in [({"stop": 3}, "stop"), ({"max_tokens": 0}, "max_tokens"), ({"top_k": -1}, "top_k"),
                       ({"logprobs": 2}, "logprobs"), ({"choices_from": []}, "choices_from"),
                       ({"max_tokens": 10**6}, "max_tokens")]:
        r = c.post("/v1/completions", json={"model": "fake", "prompt": "Hi", **bad})
        assert r.status_code == 400 and r.json["error"]["param"] == param, (bad, r.json)
    r = c.post("/v1/chat/completions", json={"model": "fake", "messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400
    # no chat template: the raw fallback, and the other roles are stop strings
    gen.replies.append(" Fine.\nUser: more")
    r = c.post("/v1/chat/completions", json={"model": "fake", "messages": [
        {"role": "system", "content": "Be nice."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]})
    assert r.json["choices"][0]["message"]["content"] == " Fine."
    assert gen.prompts[-1] == "System: Be nice.\nUser: Hi\nAssistant:"
    # a full line: 429
    engine = app.extensions["exllama"].engine
    engine.max_waiting = 0
    held = engine.join()
    try:
        r = c.post("/v1/completions", json={"model": "fake", "prompt": "Hi"})
        assert r.status_code == 429 and r.json["error"]["code"] == "queue_full"
    finally:
        engine.leave(held)


# ---- the remote engine on canned streams -------------------------------------------------------------

class _Sock:
    def shutdown(self, how):
        pass


class _Conn:
    def close(self):
        pass


def remote_engine(entry: dict):
    from webui.remote import RemoteEngine

    class Canned(RemoteEngine):
        def _get(self, path):
            return {"object": "list", "data": [entry]}

        def _open(self, method, path, body=None, stream=False):
            self.sent.append(body)
            return _Conn(), _Sock(), iter("".join(self.lines).encode().splitlines(keepends=True))

    Canned.sent = []
    return Canned("http://127.0.0.1:9/v1")


def chunk(text, finish=None, native=None):
    c = {"index": 0, "text": text, "finish_reason": finish}
    if native:
        c["native_finish_reason"] = native
    return "data: " + json.dumps({"choices": [c]}) + "\n\n"


def test_remote_engine_stream(tmp_path):
    from model.generator import GenerationSettings
    eng = remote_engine({"id": "m", "owned_by": "exllama", "context_length": 1000, "choices_from": True})
    assert eng.name == "m" and eng.max_seq_len == 900 and eng.constrained_choice and eng.info()["notice"] is None
    eng.lines = [": keepalive\n\n", chunk(" Hel"), chunk("lo"), chunk("", "stop", "eos"),
                 'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}\n\n', "data: [DONE]\n\n"]
    settings = GenerationSettings(max_new_tokens=8, stop_strings=["\nBob:"], break_on_newline=True)
    deltas = list(eng.generate("Alice:", settings))
    assert "".join(d.text for d in deltas) == " Hello" and deltas[-1].finish_reason == "eos"
    assert deltas[-1].n_tokens == 2 and deltas[-1].prompt_tokens == 5
    sent = eng.sent[-1]
    assert sent["stop"] == ["\nBob:"] and sent["break_on_newline"] is True and sent["top_k"] == settings.sampler.top_k

    # break on newline applied here too (a remote that ignores the extra field)
    eng.lines = [chunk("\n Hi"), chunk(" there\nBob: no"), chunk(" more")]
    deltas = list(eng.generate("Alice:", settings))
    assert "".join(d.text for d in deltas) == "\n Hi there" and deltas[-1].finish_reason == "newline"

    cancel = threading.Event()
    cancel.set()
    assert [d.finish_reason for d in eng.generate("x", settings, cancel)] == ["cancelled"]


def test_remote_engine_without_choice():
    from sessions import Participant, Session
    from webui import conversation
    eng = remote_engine({"id": "gpt-x", "owned_by": "someone"})
    assert not eng.constrained_choice and eng.info()["notice"] and eng.max_seq_len == int(4096 * 0.9)
    from model.generator import GenerationSettings
    assert "top_k" not in eng.body("p", GenerationSettings())   # no extra fields for other servers
    s = Session.new("t")
    s.participants = [Participant(name="U", kind="user"), Participant(name="A", kind="bot"),
                      Participant(name="B", kind="bot")]
    s.turn_order = "model"
    assert conversation.model_order_fallback(s, eng)
    assert conversation.next_speaker(s, [], eng, [], first_turn=True) == "A"
    assert eng.count("abcdefgh") == 2 and eng.encode_prompt("x") is None
