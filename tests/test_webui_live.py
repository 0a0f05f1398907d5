"""A live server (`python webui/app.py`, gunicorn, the embedded model) driven by a real websocket client
on 127.0.0.1: a full chat flow and restart, hostile input, and 20 concurrent clients."""
from __future__ import annotations

import json
import threading
import time

import pytest

from webui_helpers import LiveServer, WSClient, last_state

pytestmark = pytest.mark.slow

THREE_BOTS = [{"name": "User", "kind": "user"}, {"name": "Alice", "kind": "bot"},
              {"name": "Bob", "kind": "bot"}, {"name": "Carol", "kind": "bot"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LiveServer(tmp_path_factory.mktemp("live") / "sessions")
    try:
        yield srv.start()
    finally:
        srv.stop()


class Chat:
    """Tracks the revision of one session over a WSClient."""

    def __init__(self, client: WSClient, sid: str, revision: int):
        self.c, self.sid, self.rev = client, sid, revision

    def track(self, out):
        for m in out:
            if m["type"] == "state" and m.get("session") and m["session"]["id"] == self.sid:
                self.rev = m["session"]["revision"]
        return out

    def send(self, type_, **fields):
        return self.c.send(type_, session=self.sid, revision=self.rev, **fields)

    def collect(self, rid, until=None):
        return self.track(self.c.collect(rid, until))

    def call(self, type_, **fields):
        out = self.collect(self.send(type_, **fields))
        assert out[-1]["type"] == "reply", out[-1]
        return out

    def update(self, **changes):
        return self.call("session.update", changes=changes)


def speakers(out):
    return [m["author"] for m in out if m["type"] == "stream.start"]


def stream_text(out):
    return "".join(m["text"] for m in out if m["type"] == "stream.delta")


def test_live_chat_flow_and_restart(server):
    c = WSClient(server.ws_url)
    assert c.hello["protocol"] == 1 and c.hello["model"]["name"].endswith(".gguf")
    out, rep = c.ok("session.create", name="live")
    chat = Chat(c, rep["session"], last_state(out)["revision"])
    chat.update(settings={"max_response_tokens": 6, "seed": 7})

    # send: streamed, then saved
    out = chat.call("chat.send", text="Hello! What is your favourite colour?")
    kinds = [m["type"] for m in out]
    assert kinds.index("queue") < kinds.index("stream.start") < kinds.index("stream.end") < len(kinds) - 1
    snap = last_state(out)
    assert snap["messages"][-1]["text"] == stream_text(out).rstrip() and snap["generating"] is None
    first_user, first_bot = snap["messages"][0]["id"], snap["messages"][1]["id"]
    assert snap["messages"][1]["tokens"] > 0 and snap["messages"][1]["tokens_per_s"] > 0

    # stop mid-reply (the stop goes over the same socket while the reply streams)
    chat.update(settings={"max_response_tokens": 300, "break_on_newline": False})
    for attempt in range(3):
        rid = chat.send("chat.send", text="Tell me a very long story about a ship.")
        head = chat.collect(rid, until=lambda m: m["type"] == "stream.delta")
        stop = c.request("chat.stop", session=chat.sid)
        assert stop[-1]["type"] == "reply"
        out = head + chat.collect(rid)
        end = next(m for m in out if m["type"] == "stream.end")
        if end["finish_reason"] == "cancelled":
            break
    assert end["finish_reason"] == "cancelled" and out[-1]["stopped"] is True
    snap = last_state(out)
    assert snap["messages"][-1]["text"] == stream_text(out).rstrip() and end["tokens"] < 300
    chat.update(settings={"max_response_tokens": 6})

    # regenerate -> 2 alternatives; edit a user message -> a new branch; rewind; switch back
    out = chat.call("chat.regenerate", message_id=first_bot)
    assert [m["sibling_count"] for m in last_state(out)["messages"]][1] == 2
    out = chat.call("chat.edit", message_id=first_user, text="Hi there!", reply=True)
    snap = last_state(out)
    assert snap["messages"][0]["text"] == "Hi there!" and snap["messages"][0]["sibling_count"] == 2
    assert len(snap["messages"]) == 2 and snap["messages"][1]["role"] == "bot"
    out = chat.call("chat.rewind", message_id=snap["messages"][0]["id"])
    assert len(last_state(out)["messages"]) == 1
    out = chat.call("chat.switch", message_id=snap["messages"][0]["id"], direction=-1)
    assert last_state(out)["messages"][0]["text"].startswith("Hello!")

    # a multibot round with 3 bots in every turn order
    chat.update(participants=THREE_BOTS, turn_order="round_robin", max_bot_turns=3)
    out = chat.call("chat.send", text="Hello everyone, introduce yourselves.")
    assert speakers(out) == ["Alice", "Bob", "Carol"]
    chat.update(turn_order="manual")
    out = chat.call("chat.send", text="Only when asked now.")
    assert speakers(out) == []
    out = chat.call("chat.generate", bot="Bob")
    assert speakers(out) == ["Bob"]
    chat.update(turn_order="mentioned", max_bot_turns=1)
    out = chat.call("chat.send", text="Carol, what do you think?")
    assert speakers(out) == ["Carol"]
    chat.update(turn_order="model", max_bot_turns=3)
    out = chat.call("chat.send", text="Alice and Bob, any ideas?")
    names = speakers(out)
    assert 1 <= len(names) <= 3 and set(names) <= {"Alice", "Bob", "Carol"}

    before = last_state(c.request("session.open", session=chat.sid))
    listing = c.ok("session.list")[1]["sessions"]
    exported = c.ok("session.export", session=chat.sid)[1]["data"]
    c.close()

    # restart the server: everything is exactly as it was
    server.stop()
    server.start()
    c2 = WSClient(server.ws_url)
    after = last_state(c2.request("session.open", session=chat.sid))
    assert after == before
    assert c2.ok("session.list")[1]["sessions"] == listing
    assert c2.ok("session.export", session=chat.sid)[1]["data"] == exported
    c2.close()


def test_live_page_and_api(server):
    import urllib.error
    import urllib.request
    with urllib.request.urlopen(server.url + "/", timeout=30) as r:
        assert r.status == 200 and "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    with urllib.request.urlopen(server.url + "/api/model", timeout=30) as r:
        assert json.loads(r.read())["max_seq_len"] == 1024
    req = urllib.request.Request(server.url + "/api/sessions", headers={"Host": "evil.example"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 403


def test_live_hostile_input(server):
    import websocket
    c = WSClient(server.ws_url)

    def error_of(raw):
        c.send_raw(raw)
        m = c.recv()
        assert m["type"] == "error", m
        return m

    assert error_of("not json")["code"] == "bad_json"
    assert error_of("[1, 2, 3]")["code"] == "bad_json"
    assert error_of('{"type": "model.info", "id": Infinity}')["code"] == "bad_json"
    assert error_of('{"type": "model.info"}')["code"] == "bad_request"
    assert error_of('{"type": "rm -rf", "id": "x"}')["code"] == "unknown_type"
    m = error_of(json.dumps({"type": "chat.send", "id": "big", "session": "0" * 32, "revision": 1,
                             "text": "x" * 100_000}))
    assert m["code"] == "too_large" and m["id"] == "big"
    for fields, code in [({"session": "../../etc/passwd"}, "bad_request"), ({"session": ["a"]}, "bad_request"),
                         ({"session": "0" * 32}, "not_found")]:
        out = c.request("session.open", **fields)
        assert out[-1]["code"] == code
    out, rep = c.ok("session.create", name="../../../../tmp/evil\u202e\x07")
    sid = rep["session"]
    assert last_state(out)["name"] == "../../../../tmp/evil"
    out = c.request("chat.rewind", session=sid, revision=1, message_id="../../x")
    assert out[-1]["code"] == "bad_request" and out[-1]["field"] == "message_id"
    out = c.request("session.update", session=sid, revision=1, changes={"settings": {"temperature": "hot"}})
    assert out[-1]["code"] == "bad_request" and out[-1]["field"] == "changes.settings.temperature"
    out = c.request("chat.send", session=sid, revision=True, text="x")
    assert out[-1]["code"] == "bad_request"

    # a corrupt session file: listed with an error, refused, never overwritten
    bad = "f" * 32
    path = server.sessions_dir / f"{bad}.json"
    garbage = b'{"schema": 1, "id": "' + bad.encode() + b'"'
    path.write_bytes(garbage)
    rows = {r["id"]: r for r in c.ok("session.list")[1]["sessions"]}
    assert rows[bad]["error"] and rows[bad]["name"].startswith("(unreadable)")
    for t, extra in [("session.open", {}), ("session.rename", {"name": "x"}),
                     ("chat.send", {"revision": 1, "text": "x"})]:
        assert c.request(t, session=bad, **extra)[-1]["code"] == "corrupt_session"
    assert path.read_bytes() == garbage

    # after all that, the socket is still open and serving
    assert c.ok("model.info")[1]["model"]["max_seq_len"] == 1024

    # a frame beyond the hard cap closes only that socket; the server carries on
    c.send_raw("x" * (5 * 1024 * 1024))
    with pytest.raises(Exception):
        c.recv()
        c.recv()
    c.close()

    # foreign Origin or Host: the upgrade is refused with 403
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(server.ws_url, origin="http://evil.example", timeout=10)
    assert e.value.status_code == 403
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(server.ws_url, host="evil.example", timeout=10)
    assert e.value.status_code == 403
    ok = websocket.create_connection(server.ws_url, origin=f"http://127.0.0.1:{server.port}", timeout=10)
    assert json.loads(ok.recv())["type"] == "hello"
    ok.close()


def test_live_20_concurrent_clients(server):
    n = 20
    barrier = threading.Barrier(n)
    errors: list[str] = []
    queued: list[int] = []
    done: list[int] = []

    def client(i):
        try:
            c = WSClient(server.ws_url, timeout=300)
            out, rep = c.ok("session.create", name=f"client {i}")
            chat = Chat(c, rep["session"], last_state(out)["revision"])
            c.ok("session.list")
            c.ok("model.info")
            chat.update(settings={"max_response_tokens": 4, "seed": i})
            barrier.wait(timeout=120)
            for k in range(2 if i % 4 == 0 else 1):
                out = chat.call("chat.send", text=f"Hi, I am client {i}, message {k}.")
                queued.extend(m["position"] for m in out if m["type"] == "queue")
                assert last_state(out)["messages"][-1]["role"] == "bot"
            assert not [m for m in c.other if m["type"] == "error"]
            c.close()
            done.append(i)
        except Exception as e:  # noqa: BLE001
            errors.append(f"client {i}: {type(e).__name__}: {e}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=400)
    print(f"{n} clients, {len(done)} done in {time.monotonic() - t0:.1f} s, max queue position {max(queued or [0])}")
    assert not errors, errors
    assert sorted(done) == list(range(n))
    assert max(queued) >= 1          # they really waited for the one engine
