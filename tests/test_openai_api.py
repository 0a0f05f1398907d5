"""The OpenAI-compatible API on a live server (`python webui/app.py`, the embedded model), used through
the official `openai` package as any user would; then a second server (`--remote`, no model) that chats
through the first one over that API."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from webui_helpers import LiveServer, WSClient, last_state

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

KEY = "test-key-5f1c"
THREE_BOTS = [{"name": "User", "kind": "user"}, {"name": "Alice", "kind": "bot"},
              {"name": "Bob", "kind": "bot"}, {"name": "Carol", "kind": "bot"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LiveServer(tmp_path_factory.mktemp("api") / "sessions", "--api-key", KEY)
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def test_models(client, model_id):
    models = client.models.list().data
    assert [m.id for m in models] == [model_id] and model_id.endswith(".gguf")
    assert models[0].owned_by == "exllama"
    extra = models[0].model_extra
    assert extra["context_length"] == 1024 and extra["choices_from"] is True


def test_completion_and_stop(client, model_id):
    r = client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=8,
                                  temperature=0, seed=1)
    text = r.choices[0].text
    assert r.object == "text_completion" and text and r.choices[0].finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    # streaming: same greedy text, chunk by chunk
    chunks = list(client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=8,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    # a stop string cuts the reply right before it (str and list forms)
    word = text.strip().split()[-1] if len(text.strip().split()) > 1 else text.strip()[1:]
    cut = text.rindex(word)
    assert cut > 0
    for stop in (word, [word, "\u2603never"]):
        s = client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=8,
                                      temperature=0, stop=stop)
        assert s.choices[0].text == text[:cut] and s.choices[0].finish_reason == "stop"


def test_chat_completion(client, model_id):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
    r = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=8, temperature=0.7,
                                       top_p=0.9, seed=3, presence_penalty=0.5, frequency_penalty=0.5,
                                       extra_body={"top_k": 40, "min_p": 0.05, "typical": 0.95,
                                                   "repetition_penalty": 1.1})
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content and "<|im_start|>" not in r.choices[0].message.content
    assert r.usage.completion_tokens <= 8

    stream = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 8


def test_errors(client, server, model_id):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_id, prompt="Hi", max_tokens=4, n=2)
    assert e.value.status_code == 400
    assert e.value.body == {"message": "only n=1 is supported", "type": "invalid_request_error", "param": "n",
                            "code": "unsupported_value"}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, temperature=7)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=4)
    assert e.value.body["code"] == "model_not_found"

    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert e.value.body["type"] == "authentication_error"

    # no key at all: 401; the right key from a foreign Origin: allowed (the page there has no key)
    def get(headers):
        req = urllib.request.Request(f"{server.url}/v1/models", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())
    assert get({})[0] == 401
    assert get({"Origin": "http://evil.example", "Authorization": f"Bearer {KEY}"})[0] == 200
    assert get({"Host": "evil.example", "Authorization": f"Bearer {KEY}"})[0] == 403


@pytest.fixture(scope="module")
def remote(server, tmp_path_factory):
    srv = LiveServer(tmp_path_factory.mktemp("remote") / "sessions", "--remote", f"{server.url}/v1",
                     "--remote-key", KEY)
    try:
        yield srv.start()
    finally:
        srv.stop()


def test_remote_multibot(remote, model_id):
    c = WSClient(remote.ws_url)
    try:
        info = c.hello["model"]
        assert info["name"] == model_id and info["remote"].endswith("/v1")
        assert info["token_count"] == "approximate" and info["constrained_choice"] is True
        out, rep = c.ok("session.create", name="remote")
        sid, rev = rep["session"], last_state(out)["revision"]

        def call(type_, **fields):
            nonlocal rev
            out = c.request(type_, session=sid, revision=rev, **fields)
            assert out[-1]["type"] == "reply", out[-1]
            for m in out:
                if m["type"] == "state" and m.get("session"):
                    rev = m["session"]["revision"]
            return out

        call("session.update", changes={"participants": THREE_BOTS, "turn_order": "round_robin",
                                        "max_bot_turns": 3, "settings": {"max_response_tokens": 8, "seed": 5}})
        out = call("chat.send", text="Hello everyone, introduce yourselves.")
        assert [m["author"] for m in out if m["type"] == "stream.start"] == ["Alice", "Bob", "Carol"]
        ends = [m for m in out if m["type"] == "stream.end"]
        assert len(ends) == 3 and all(e["finish_reason"] != "error" for e in ends)
        snap = last_state(out)
        assert len(snap["messages"]) == 4 and snap["context"]["tokens_used"] > 0

        call("session.update", changes={"turn_order": "model"})
        out = call("chat.send", text="Alice and Bob, any ideas?")
        names = [m["author"] for m in out if m["type"] == "stream.start"]
        assert 1 <= len(names) <= 3 and len(set(names)) == len(names) and set(names) <= {"Alice", "Bob", "Carol"}
        assert all("notice" not in t for t in out[-1]["turns"])    # the remote chose (choices_from)
    finally:
        c.close()
