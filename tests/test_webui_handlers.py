"""Protocol handlers without a socket: conversation flow, turn orders, history operations, revisions,
context trimming, stop and the queue. Uses a scripted FakeGenerator (tests/webui_helpers.py), so
the logic is checked exactly and fast; test_webui_model.py repeats the key paths on the real model."""
from __future__ import annotations

import threading
from collections import deque

import pytest

from webui_helpers import Client, fake_services

THREE_BOTS = [{"name": "User", "kind": "user"}, {"name": "Alice", "kind": "bot", "persona": "Alice is kind."},
              {"name": "Bob", "kind": "bot"}, {"name": "Carol", "kind": "bot"}]


def types(out):
    return [m["type"] for m in out]


def new_session(c: Client, **changes) -> str:
    sid = c.ok("session.create", name="t")["session"]
    if changes:
        c.ok("session.update", session=sid, revision=c.revision[sid], changes=changes)
    return sid


def speakers(out):
    return [m["author"] for m in out if m["type"] == "stream.start"]


@pytest.fixture
def services(tmp_path):
    return fake_services(tmp_path)


def test_send_streams_and_saves(services):
    c = Client(services)
    sid = new_session(c)
    services.engine.generator.replies.append(" Hello, I like blue.")
    out = c.call("chat.send", session=sid, revision=c.revision[sid], text="Hi!")
    t = types(out)
    assert t[0] == "state" and t[-1] == "reply"
    assert t.index("queue") < t.index("stream.start") < t.index("stream.delta") < t.index("stream.end")
    assert all(m["id"] == out[0]["id"] for m in out)
    deltas = "".join(m["text"] for m in out if m["type"] == "stream.delta")
    assert deltas == "Hello, I like blue."          # leading space of the raw format dropped
    end = next(m for m in out if m["type"] == "stream.end")
    assert end["finish_reason"] == "eos" and end["tokens"] > 0 and not end["discarded"]
    reply = out[-1]
    assert reply["turns"][0]["author"] == "Chatbort" and reply["stopped"] is False
    # saved: a fresh store sees the same two messages
    s = services.store.load(sid)
    assert [m.text for m in s.active_path()] == ["Hi!", "Hello, I like blue."]
    assert s.revision == reply["revision"]
    snap = c.state(sid)
    assert snap["generating"] is None and [m["role"] for m in snap["messages"]] == ["user", "bot"]
    assert snap["messages"][1]["tokens_per_s"] > 0 and snap["context"]["tokens_used"] > 0
    # the prompt the model got: fixed prompt, the transcript, then the speaker tag
    prompt = services.engine.generator.prompts[-1]
    assert prompt.startswith("This is a conversation") and prompt.endswith("User: Hi!\nChatbort:")


def test_stop_strings_cut_other_speakers(services):
    c = Client(services)
    sid = new_session(c, participants=THREE_BOTS, turn_order="manual")
    services.engine.generator.replies.append(" Sure thing.\nBob: I agree!\nUser: ok")
    out = c.call("chat.send", session=sid, revision=c.revision[sid], text="Hi", bot="Alice")
    end = next(m for m in out if m["type"] == "stream.end")
    assert end["finish_reason"] == "stop"
    assert services.store.load(sid).active_path()[-1].text == "Sure thing."


def test_turn_order_round_robin(services):
    c = Client(services)
    sid = new_session(c, participants=THREE_BOTS, turn_order="round_robin", max_bot_turns=2)
    out = c.call("chat.send", session=sid, revision=c.revision[sid], text="Hello all")
    assert speakers(out) == ["Alice", "Bob"]
    out = c.call("chat.send", session=sid, revision=c.revision[sid], text="And again")
    assert speakers(out) == ["Carol", "Alice"]
    c.ok("session.update", session=sid, revision=c.revision[sid], changes={"max_bot_turns": 3})
    out = c.call("chat.send", session=sid, revision=c.revision[sid], text="Everyone")
    assert speakers(out) == ["Bob", "Carol", "Alice"]


def test_turn_order_manual(services):
    c = Client(services)
    sid = new_session(c, participants=THREE_BOTS, turn_order="manual", max_bot_turns=3)
    out = c.call("chat.send", session=sid, revision=c.revision[sid], text="Hello")
    assert speakers(out) == [] and out[-1]["turns"] == []
    out = c.call("chat.generate", session=sid, revision=c.revision[sid], bot="Carol")
    assert speakers(out) == ["Carol"]
    out = c.call("chat.send", session=sid, revision=c.revision[sid], text="Bob?", bot="Bob")
    assert speakers(out) == ["Bob"]
    out = c.call("chat.generate", session=sid, revision=c.revision[sid])
    assert out[-1]["code"] == "invalid" and out[-1]["field"] == "bot"
    out = c.call("chat.generate", session=sid, revision=c.revision[sid], bot="User")
    assert out[-1]["code"] == "invalid"


def test_turn_order_mentioned(services):
    c = Client(services)
    sid = new_session(c, participants=THREE_BOTS, turn_order="mentioned", max_bot_turns=3)
    services.engine.generator.replies.extend([" Hm, what does bob think?", " I think so too.", " Fine."])
    out = c.call("chat.send", session=sid, revision=c.revision[sid], text="Carol, do you like tea?")
    # Carol is named by the user; Bob by Carol; then nobody is named: round robin after Bob
    assert speakers(out) == ["Carol", "Bob", "Carol"]
    out = c.call("chat.send", session=sid, revision=c.revision[sid], text="nobody named here")
    assert speakers(out)[0] == "Alice"   # round robin after the last bot (Carol)


def test_turn_order_model_uses_constrained_choice(services):
    c = Client(services)
    sid = new_session(c, participants=THREE_BOTS, turn_order="model", max_bot_turns=3)
    g = services.engine.generator
    g.choices.extend(["Bob:", "Alice:", "User:"])
    out = c.call("chat.send", session=sid, revision=c.revision[sid], text="Hi everyone")
    assert speakers(out) == ["Bob", "Alice"]            # then the model picked the user: round over
    (p1, o1), (p2, o2), (p3, o3) = g.choose_calls
    assert o1 == ["Alice:", "Bob:", "Carol:"]          # the user who just spoke is not an option
    assert o2 == ["Alice:", "Carol:", "User:"]         # Bob spoke this round
    assert o3 == ["Carol:", "User:"]
    assert p1.endswith("User: Hi everyone\n") and p2.endswith("\n") and "Bob:" in p2


def test_max_bot_turns_limits_round(services):
    c = Client(services)
    sid = new_session(c, participants=THREE_BOTS, turn_order="model", max_bot_turns=1)
    services.engine.generator.choices.extend(["Carol:", "Alice:"])
    out = c.call("chat.send", session=sid, revision=c.revision[sid], text="Hi")
    assert speakers(out) == ["Carol"]


def test_history_edit_regenerate_rewind_switch_delete(services):
    c = Client(services)
    sid = new_session(c)
    g = services.engine.generator
    g.replies.extend([" first", " second", " third"])
    out = c.call("chat.send", session=sid, revision=c.revision[sid], text="Hi")
    user_id, bot1 = out[-1]["message_id"], out[-1]["turns"][0]["message_id"]
    # regenerate: a sibling of the bot message becomes active
    out = c.call("chat.regenerate", session=sid, revision=c.revision[sid], message_id=bot1)
    bot2 = out[-1]["turns"][0]["message_id"]
    snap = c.state(sid)
    assert [m["text"] for m in snap["messages"]] == ["Hi", "second"]
    assert (snap["messages"][1]["sibling_index"], snap["messages"][1]["sibling_count"]) == (1, 2)
    # switch back to the first alternative, by direction and by index
    c.ok("chat.switch", session=sid, revision=c.revision[sid], message_id=bot2, direction=-1)
    assert [m["text"] for m in c.state(sid)["messages"]] == ["Hi", "first"]
    c.ok("chat.switch", session=sid, revision=c.revision[sid], message_id=bot1, index=1)
    assert c.state(sid)["active_leaf"] == bot2
    out = c.call("chat.switch", session=sid, revision=c.revision[sid], message_id=bot1, index=5)
    assert out[-1]["code"] == "invalid"
    # edit the user message with reply: new branch, bot answers
    out = c.call("chat.edit", session=sid, revision=c.revision[sid], message_id=user_id, text="Hello", reply=True)
    assert out[-1]["type"] == "reply" and len(out[-1]["turns"]) == 1
    snap = c.state(sid)
    assert [m["text"] for m in snap["messages"]] == ["Hello", "third"]
    assert snap["messages"][0]["sibling_count"] == 2
    # edit a bot message (no reply): a sibling with the new text
    out = c.call("chat.edit", session=sid, revision=c.revision[sid], message_id=snap["messages"][1]["id"],
                 text="edited")
    assert [m["text"] for m in c.state(sid)["messages"]] == ["Hello", "edited"]
    # continue appends in place
    g.replies.append(" and more")
    out = c.call("chat.continue", session=sid, revision=c.revision[sid])
    assert next(m for m in out if m["type"] == "stream.start")["continue"] is True
    assert c.state(sid)["messages"][-1]["text"] == "edited and more"
    # rewind to before everything, then back via switch
    c.ok("chat.rewind", session=sid, revision=c.revision[sid], message_id=None)
    assert c.state(sid)["messages"] == []
    c.ok("chat.rewind", session=sid, revision=c.revision[sid], message_id=user_id)
    assert [m["text"] for m in c.state(sid)["messages"]] == ["Hi"]
    # delete the first user message's subtree; the other branch remains
    reply = c.ok("chat.delete", session=sid, revision=c.revision[sid], message_id=user_id)
    snap = c.state(sid)
    assert snap["messages"][0]["text"] == "Hello" and reply["active_leaf"] == snap["active_leaf"]
    s = services.store.load(sid)
    assert user_id not in s.messages and bot1 not in s.messages
    # regenerate / continue a user message: refused
    out = c.call("chat.regenerate", session=sid, revision=c.revision[sid], message_id=snap["messages"][0]["id"])
    assert out[-1]["code"] == "invalid"
    out = c.call("chat.rewind", session=sid, revision=c.revision[sid], message_id="nosuchmessage")
    assert out[-1]["code"] == "not_found"


def test_stale_revision_rejected(services):
    a, b = Client(services), Client(services)
    sid = new_session(a)
    rev = a.revision[sid]
    b.ok("session.open", session=sid)
    b.ok("session.update", session=sid, revision=rev, changes={"fixed_prompt": "new prompt"})
    before = services.store.load(sid)
    out = a.call("chat.send", session=sid, revision=rev, text="stale write")
    assert types(out) == ["state", "error"]
    assert out[-1]["code"] == "stale_revision" and out[-1]["revision"] == rev + 1
    assert out[0]["session"]["revision"] == rev + 1 and out[0]["session"]["fixed_prompt"] == "new prompt"
    after = services.store.load(sid)
    assert after.revision == before.revision and after.messages == before.messages
    out = a.call("session.update", session=sid, revision=rev, changes={"fixed_prompt": "x"})
    assert out[-1]["code"] == "stale_revision"
    out = a.call("session.rename", session=sid, revision=rev, name="x")
    assert out[-1]["code"] == "stale_revision"
    assert a.ok("session.rename", session=sid, name="renamed")["revision"] == rev + 2


def test_other_watchers_get_pushes(services):
    a, b = Client(services), Client(services)
    sid = new_session(a)
    b.ok("session.open", session=sid)
    b.pushed.clear()
    a.call("chat.send", session=sid, revision=a.revision[sid], text="Hi")
    got = types(b.pushed)
    assert "stream.start" in got and "stream.delta" in got and "stream.end" in got and "state" in got
    assert all(m["id"] is None for m in b.pushed)
    assert b.pushed[-1]["type"] == "state" and b.pushed[-1]["session"]["generating"] is None
    # a session created elsewhere shows up in the others' lists
    b.pushed.clear()
    a.ok("session.create", name="another")
    assert any(m["type"] == "sessions" for m in b.pushed)
    # deleting the session b watches tells b
    a.ok("session.open", session=sid)
    b.pushed.clear()
    a.ok("session.delete", session=sid)
    assert {"type": "state", "id": None, "session": None} in b.pushed
    a.ok("session.restore", session=sid)
    assert services.store.load(sid).id == sid


def test_stop_mid_stream_keeps_partial_text(tmp_path):
    services = fake_services(tmp_path, delay=0.005)
    services.engine.generator.replies.append(" " + " ".join(f"w{i}" for i in range(200)))
    a, b = Client(services), Client(services)
    sid = new_session(a)
    streamed, out = "", []
    for m in a.iter("chat.send", session=sid, revision=a.revision[sid], text="Talk a lot"):
        out.append(m)
        if m["type"] == "stream.delta":
            streamed += m["text"]
            if streamed.count("w") == 3:
                assert b.ok("chat.stop", session=sid)["stopped"] is True
    end = next(m for m in out if m["type"] == "stream.end")
    assert end["finish_reason"] == "cancelled" and not end["discarded"]
    assert out[-1]["type"] == "reply" and out[-1]["stopped"] is True
    saved = services.store.load(sid).active_path()[-1]
    assert saved.text == streamed.rstrip() and 0 < saved.tokens < 200
    assert b.ok("chat.stop", session=sid)["stopped"] is False     # nothing running now


def test_queue_positions_and_busy(tmp_path):
    services = fake_services(tmp_path, delay=0.01)
    g = services.engine.generator
    g.replies = lambda prompt, settings: " " + " ".join(["word"] * 30)
    a, b, c = Client(services), Client(services), Client(services)
    sa, sb = new_session(a), new_session(b)
    results = {}

    def run_a():
        results["a"] = a.call("chat.send", session=sa, revision=a.revision[sa], text="first")

    t = threading.Thread(target=run_a)
    t.start()
    assert g.started.wait(10)
    # the same session is busy while a generates
    out = c.call("chat.send", session=sa, revision=a.revision[sa], text="meanwhile")
    assert out[-1]["code"] in ("busy", "stale_revision")
    rb = b.call("chat.send", session=sb, revision=b.revision[sb], text="second")
    t.join()
    positions = [m["position"] for m in rb if m["type"] == "queue"]
    assert positions[0] >= 1 and positions[-1] == 0
    assert rb[-1]["type"] == "reply" and results["a"][-1]["type"] == "reply"
    # reads are fine while another session streams; the engine line is empty afterwards
    assert services.engine.waiting == 0 and not services.engine.busy


def test_stop_while_queued(tmp_path):
    services = fake_services(tmp_path)
    a, b = Client(services), Client(services)
    sid = new_session(a)
    ticket = services.engine.join()      # someone else holds the engine
    out = []
    try:
        it = a.iter("chat.send", session=sid, revision=a.revision[sid], text="wait for it")
        for m in it:
            out.append(m)
            if m["type"] == "queue":
                assert m["position"] == 1
                assert b.ok("chat.stop", session=sid)["stopped"] is True
    finally:
        services.engine.leave(ticket)
    assert out[-1]["type"] == "reply" and out[-1]["stopped"] is True and out[-1]["turns"] == []
    assert [m.role for m in services.store.load(sid).active_path()] == ["user"]


def test_context_trimming_reports_dropped_ids(services):
    c = Client(services)          # the fake engine has a 256-token context
    sid = new_session(c, settings={"max_response_tokens": 32}, turn_order="manual")
    ids = []
    for i in range(12):
        out = c.call("chat.send", session=sid, revision=c.revision[sid], text=f"message {i} " + "blah " * 10)
        ids.append(out[-1]["message_id"])
    snap = c.state(sid)
    ctx = snap["context"]
    assert ctx["tokens_total"] == 256 and ctx["reserved"] == 32
    assert ctx["dropped"] and ctx["dropped"] == ids[:len(ctx["dropped"])]          # the oldest ones
    assert ctx["tokens_used"] <= 256 - 32 and ctx["fixed_prompt_in_context"] is True
    flags = {m["id"]: m["in_context"] for m in snap["messages"]}
    assert all(not flags[i] for i in ctx["dropped"]) and flags[ids[-1]]
    # the model gets the trimmed prompt: fixed prompt kept, oldest messages gone
    c.call("chat.generate", session=sid, revision=c.revision[sid], bot="Chatbort")
    prompt = services.engine.generator.prompts[-1]
    assert prompt.startswith("This is a conversation") and "message 0 " not in prompt and "message 11 " in prompt
    # without keep_fixed_prompt, a huge fixed prompt is the first to go
    c.ok("session.update", session=sid, revision=c.revision[sid],
         changes={"keep_fixed_prompt": False, "fixed_prompt": "story " * 150})
    ctx = c.state(sid)["context"]
    assert ctx["fixed_prompt_in_context"] is False and ctx["tokens_used"] <= 224


def test_settings_update_and_per_bot_override(services):
    c = Client(services)
    sid = new_session(c)
    parts = [{"name": "User", "kind": "user"},
             {"name": "Chatbort", "kind": "bot", "settings": {"max_response_tokens": 3}}]
    c.ok("session.update", session=sid, revision=c.revision[sid],
         changes={"participants": parts, "settings": {"temperature": 0.5, "top_k": 40, "break_on_newline": False}})
    snap = c.state(sid)
    assert snap["settings"]["temperature"] == 0.5 and snap["settings"]["top_k"] == 40
    assert snap["participants"][1]["settings"] == {"max_response_tokens": 3}
    services.engine.generator.replies.append(" one two three four five six")
    out = c.call("chat.send", session=sid, revision=c.revision[sid], text="count")
    end = next(m for m in out if m["type"] == "stream.end")
    assert end["finish_reason"] == "length" and end["tokens"] == 3
    # null resets to the default; unknown keys and bad values are refused
    c.ok("session.update", session=sid, revision=c.revision[sid], changes={"settings": {"temperature": None}})
    assert c.state(sid)["settings"]["temperature"] == 0.95
    for bad, field in [({"settings": {"temprature": 1}}, "changes.settings.temprature"),
                       ({"settings": {"top_p": 2}}, "changes.settings.top_p"),
                       ({"settings": {"max_response_tokens": True}}, "changes.settings.max_response_tokens"),
                       ({"turn_order": "random"}, "changes.turn_order"),
                       ({"participants": [{"name": "A", "kind": "bot"}]}, "changes.participants"),
                       ({"participants": [{"name": "A", "kind": "user"}, {"name": "a", "kind": "bot"}]},
                        "changes.participants")]:
        out = c.call("session.update", session=sid, revision=c.revision[sid], changes=bad)
        assert out[-1]["type"] == "error" and out[-1]["field"] == field, (bad, out[-1])


def test_session_crud_export_import(services):
    c = Client(services)
    sid = new_session(c)
    c.call("chat.send", session=sid, revision=c.revision[sid], text="Hi")
    rows = c.ok("session.list")["sessions"]
    assert [r["id"] for r in rows] == [sid] and rows[0]["message_count"] == 2
    exp = c.ok("session.export", session=sid)
    assert exp["filename"] == "t.json" and exp["data"]["id"] == sid
    new = c.ok("session.import", data=exp["data"], name="imported")["session"]
    assert new != sid and services.store.load(new).name == "imported"
    dup = c.ok("session.duplicate", session=sid, name="copy")["session"]
    assert len(services.store.load(dup).messages) == 2
    c.ok("session.rename", session=sid, name="  new\tname\x00 ")
    assert services.store.load(sid).name == "new name"
    c.ok("session.delete", session=dup)
    lst = c.ok("session.list", trash=True)
    assert [r["id"] for r in lst["trash"]] == [dup]
    out = c.call("session.restore", session=sid)
    assert out[-1]["code"] == "not_found"
    out = c.call("session.import", data={"schema": 99})
    assert out[-1]["code"] == "bad_request"
    # open without an id: the last opened one
    assert c.ok("session.open")["session"] == sid


def test_no_model_mode(tmp_path):
    services = fake_services(tmp_path, engine=False)
    c = Client(services)
    sid = new_session(c)
    before = services.store.load(sid).revision
    out = c.call("chat.send", session=sid, revision=c.revision[sid], text="Hi")
    assert out[-1]["code"] == "no_model" and services.store.load(sid).revision == before
    c.ok("session.update", session=sid, revision=c.revision[sid], changes={"turn_order": "manual"})
    reply = c.ok("chat.send", session=sid, revision=c.revision[sid], text="Hi")
    assert reply["turns"] == [] and c.state(sid)["context"]["tokens_used"] is None
    assert c.ok("model.info")["model"]["name"] is None


def test_corrupt_session_file_is_reported_and_kept(services):
    c = Client(services)
    good = new_session(c)
    bad_id = "0123456789abcdef0123456789abcdef"
    path = services.store.root / f"{bad_id}.json"
    garbage = b'{"schema": 1, "id": "' + bad_id.encode() + b'", "trunc'
    path.write_bytes(garbage)
    rows = {r["id"]: r for r in c.ok("session.list")["sessions"]}
    assert rows[bad_id]["error"] and rows[good]["error"] is None
    for t, fields in [("session.open", {}), ("session.rename", {"name": "x"}),
                      ("session.update", {"revision": 1, "changes": {"fixed_prompt": "x"}}),
                      ("chat.send", {"revision": 1, "text": "x"}), ("session.export", {})]:
        out = c.call(t, session=bad_id, **fields)
        assert out[-1]["code"] == "corrupt_session", (t, out[-1])
    assert path.read_bytes() == garbage
    c.ok("session.delete", session=bad_id)                  # moved to the trash untouched
    assert (services.store.trash_dir / f"{bad_id}.json").read_bytes() == garbage


@pytest.mark.parametrize("fields, code, field", [
    ({"type": "session.open", "session": "../../etc/passwd"}, "bad_request", "session"),
    ({"type": "session.open", "session": "0123456789ABCDEF0123456789ABCDEF"}, "bad_request", "session"),
    ({"type": "session.open", "session": 5}, "bad_request", "session"),
    ({"type": "session.rename", "session": "0" * 32, "name": "x" * 5000}, "too_large", "name"),
    ({"type": "session.rename", "session": "0" * 32, "name": "\x00\n\t"}, "bad_request", "name"),
    ({"type": "chat.send", "session": "0" * 32, "revision": 1, "text": "x" * 40000}, "too_large", "text"),
    ({"type": "chat.send", "session": "0" * 32, "revision": "1", "text": "x"}, "bad_request", "revision"),
    ({"type": "chat.send", "session": "0" * 32, "revision": 1, "text": ""}, "bad_request", "text"),
    ({"type": "chat.send", "session": "0" * 32, "text": "x"}, "bad_request", "revision"),
    ({"type": "chat.send", "session": "0" * 32, "revision": 1, "text": "x", "evil": 1}, "bad_request", "evil"),
    ({"type": "chat.rewind", "session": "0" * 32, "revision": 1, "message_id": "../x"}, "bad_request", "message_id"),
    ({"type": "chat.switch", "session": "0" * 32, "revision": 1, "message_id": "a"}, "bad_request", "direction"),
    ({"type": "chat.switch", "session": "0" * 32, "revision": 1, "message_id": "a", "direction": 2},
     "bad_request", "direction"),
    ({"type": "session.list", "trash": "yes"}, "bad_request", "trash"),
    ({"type": "no.such.type"}, "unknown_type", "type"),
    ({"type": 7}, "bad_request", "type"),
])
def test_bad_requests_get_errors(services, fields, code, field):
    from webui.handlers import handle_frame
    import json
    c = Client(services)
    out = list(handle_frame(c.conn, json.dumps({"id": "x1", **fields})))
    assert len(out) == 1 and out[0]["type"] == "error", out
    assert out[0]["code"] == code and out[0]["field"] == field and out[0]["id"] == "x1"


@pytest.mark.parametrize("frame, code", [
    ("not json", "bad_json"), ("[1, 2]", "bad_json"), ('{"type": "model.info", "id": NaN}', "bad_json"),
    ('{"type": "model.info", "id": "a", "id": "b"}', "bad_json"), ("[" * 100000 + "]" * 100000, "bad_json"),
    (b"\x00binary", "bad_json"), ('{"type": "model.info"}', "bad_request"),
    ('{"type": "model.info", "id": "../../x"}', "bad_request"), ('{"type": "model.info", "id": ""}', "bad_request"),
    ('{"type": "model.info", "id": "a", "pad": "' + "x" * 70000 + '"}', "too_large"),
])
def test_malformed_frames(services, frame, code):
    from webui.handlers import handle_frame
    out = list(handle_frame(Client(services).conn, frame))
    assert len(out) == 1 and out[0]["type"] == "error" and out[0]["code"] == code, out
    if code == "too_large":
        assert out[0]["id"] == "a"


def test_participant_names_are_plain_data(services):
    c = Client(services)
    sid = new_session(c)
    evil = [{"name": "<img src=x onerror=alert(1)>", "kind": "user"}, {"name": "../../etc/passwd", "kind": "bot"}]
    c.ok("session.update", session=sid, revision=c.revision[sid], changes={"participants": evil})
    c.call("chat.send", session=sid, revision=c.revision[sid], text="hi")
    files = sorted(p.name for p in services.store.root.iterdir() if p.suffix == ".json" and not p.name.startswith("_"))
    assert files == [f"{sid}.json"]
    snap = c.state(sid)
    assert [m["author"] for m in snap["messages"]] == ["<img src=x onerror=alert(1)>", "../../etc/passwd"]


def test_generation_failure_is_reported(services):
    c = Client(services)
    sid = new_session(c)

    def boom(prompt, settings):
        raise RuntimeError("kaboom")
    services.engine.generator.replies = boom
    out = c.call("chat.send", session=sid, revision=c.revision[sid], text="Hi")
    assert out[-1]["type"] == "error" and out[-1]["code"] == "generation_failed"
    assert c.state(sid)["generating"] is None and services.engine.waiting == 0 and not services.engine.busy
    # the session still works afterwards
    services.engine.generator.replies = deque([" ok"])
    assert c.ok("chat.send", session=sid, revision=c.revision[sid], text="again")["turns"][0]["finish_reason"] == "eos"


def test_abandoned_stream_is_saved_and_unlocked(tmp_path):
    services = fake_services(tmp_path)
    services.engine.generator.replies.append(" a b c d e f g")
    c = Client(services)
    sid = new_session(c)
    it = c.iter("chat.send", session=sid, revision=c.revision[sid], text="Hi")
    for m in it:
        if m["type"] == "stream.delta" and m["text"] == "b":
            break
    it.close()          # the client vanished mid-stream
    s = services.store.load(sid)
    assert s.active_path()[-1].text.startswith("a")
    assert c.state(sid)["generating"] is None and not services.engine.busy


def test_model_order_generate_always_gets_a_bot(services):
    c = Client(services)
    sid = new_session(c, participants=THREE_BOTS, turn_order="model", max_bot_turns=1)
    g = services.engine.generator
    g.choices.append("Alice:")
    c.call("chat.send", session=sid, revision=c.revision[sid], text="Hi")
    g.choices.append("Carol:")
    out = c.call("chat.generate", session=sid, revision=c.revision[sid])
    assert speakers(out) == ["Carol"]
    # the last writer (Alice) is not an option, and no user is on the first turn
    assert g.choose_calls[-1][1] == ["Bob:", "Carol:"]


def test_per_bot_lora_adapter_by_name(services):
    """A bot may name one of the adapters loaded at start; its replies are generated with it."""
    from types import SimpleNamespace
    services.engine.model = SimpleNamespace(lora_adapters={"pirate": "/adapters/pirate"})
    c = Client(services)
    sid = new_session(c)
    assert c.ok("model.info")["model"]["adapters"] == ["pirate"]
    parts = [{"name": "User", "kind": "user"}, {"name": "Chatbort", "kind": "bot", "lora": "pirate"}]
    c.ok("session.update", session=sid, revision=c.revision[sid], changes={"participants": parts})
    assert services.store.load(sid).participant("Chatbort").lora == "pirate"
    seen = []
    services.engine.generator.replies = lambda text, settings: seen.append(settings.lora) or " Arr."
    c.call("chat.send", session=sid, revision=c.revision[sid], text="Hello")
    assert seen == ["pirate"]
    for bad in ("../etc/passwd", "nope"):
        parts[1]["lora"] = bad
        out = c.call("session.update", session=sid, revision=c.revision[sid], changes={"participants": parts})
        assert out[-1]["type"] == "error" and "lora" in out[-1]["field"], out[-1]
