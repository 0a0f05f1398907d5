"""Crash safety of the live server: SIGKILL it (master and worker at once) while a client writes as fast
as it can; after every kill, every session file loads and no acknowledged change is lost. The server
runs with --no-model (the writes are session writes; model loading would only slow the trials down)."""
from __future__ import annotations

import random
import threading
import time

import pytest

from webui_helpers import LiveServer, WSClient, last_state

pytestmark = pytest.mark.slow
TRIALS = 10


def test_sigkill_during_writes_loses_nothing_acknowledged(tmp_path):
    from sessions import SessionStore
    rng = random.Random(1234)
    sessions_dir = tmp_path / "sessions"
    server = LiveServer(sessions_dir, model=False)
    sid = None
    acked_texts: list[str] = []          # user messages whose chat.send was answered
    acked = {"name": None, "fixed_prompt": None, "revision": 0}
    total_writes = 0
    try:
        for trial in range(TRIALS):
            server.start(timeout=120)
            c = WSClient(server.ws_url, timeout=30)
            if sid is None:
                out, rep = c.ok("session.create", name="crash")
                sid = rep["session"]
                rev = last_state(out)["revision"]
                out, rep = c.ok("session.update", session=sid, revision=rev,
                                changes={"turn_order": "manual", "participants": [
                                    {"name": "User", "kind": "user"}, {"name": "Bot", "kind": "bot"}]})
                acked["revision"] = rep["revision"]
            state = last_state(c.request("session.open", session=sid))
            assert state["revision"] >= acked["revision"]
            pending: dict = {}
            stop = threading.Event()

            def writer():
                nonlocal total_writes
                rev = state["revision"]
                k = 0
                try:
                    while not stop.is_set():
                        k += 1
                        tag = f"t{trial}-{k}"
                        kind = k % 3
                        if kind == 0:
                            pending.update(kind="send", value=tag)
                            rep = c.ok("chat.send", session=sid, revision=rev, text=tag)[1]
                            acked_texts.append(tag)
                        elif kind == 1:
                            pending.update(kind="name", value=tag)
                            rep = c.ok("session.rename", session=sid, revision=rev, name=tag)[1]
                            acked["name"] = tag
                        else:
                            pending.update(kind="fixed_prompt", value=tag)
                            rep = c.ok("session.update", session=sid, revision=rev,
                                       changes={"fixed_prompt": tag, "settings": {"seed": k}})[1]
                            acked["fixed_prompt"] = tag
                        rev = acked["revision"] = rep["revision"]
                        pending.clear()
                        total_writes += 1
                except Exception:  # noqa: BLE001 - the server died under us: expected
                    pass

            t = threading.Thread(target=writer)
            t.start()
            time.sleep(rng.uniform(0.2, 0.7))
            server.kill()
            stop.set()
            t.join(timeout=30)
            c.close()

            # the folder as a fresh process sees it
            store = SessionStore(sessions_dir)
            infos = store.list()
            assert infos and all(i.error is None for i in infos), [i.error for i in infos]
            s = store.load(sid)
            assert s.revision in (acked["revision"], acked["revision"] + 1)   # + the one in flight
            texts = [m.text for m in s.active_path()]
            assert texts[:len(acked_texts)] == acked_texts
            assert len(texts) - len(acked_texts) <= (1 if pending.get("kind") == "send" else 0)
            for key in ("name", "fixed_prompt"):
                if acked[key] is not None:
                    got = getattr(s, key)
                    assert got == acked[key] or (pending.get("kind") == key and got == pending["value"])
            # what really happened becomes the baseline of the next trial
            acked.update(revision=s.revision, name=s.name, fixed_prompt=s.fixed_prompt)
            acked_texts[:] = texts
    finally:
        server.stop()
    print(f"{TRIALS} SIGKILL trials, {total_writes} acknowledged writes, all files loadable, nothing lost")
    assert total_writes >= TRIALS
