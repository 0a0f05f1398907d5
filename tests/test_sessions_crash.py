"""A real crash test: a child process saves a session in a loop and is SIGKILLed at random moments.
After every kill the file on disk must load and hold at least the last revision the child acknowledged."""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sessions import Session, SessionStore

REPO = Path(__file__).resolve().parents[1]
TRIALS = 30
CHILD = textwrap.dedent("""
    import sys
    from sessions import SessionStore
    store = SessionStore(sys.argv[1])
    s = store.load(sys.argv[2])
    target = s.active_path()[0].id
    pad = "x" * 4000
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        s.update_message_text(target, f"counter {s.revision + 1} {pad}")
        s.append("bot", "Chatbort", f"save {i}")
        if s.message_count > 120:
            s.delete_message(s.message(target).children[0])
        rev = store.save(s)
        sys.stdout.write(f"{rev}\\n")
        sys.stdout.flush()
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_during_saves_never_loses_acknowledged_revisions(tmp_path, capsys):
    root = tmp_path / "sessions"
    store = SessionStore(root)
    s = store.create("crash")
    first = s.append("user", "User", "start")
    for i in range(100):  # ~400 KB file, so writes take a while and kills land inside them
        s.add_message(first, "bot", "Chatbort", f"{i} " + "y" * 4000)
    store.save(s)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rng = random.Random(1234)
    total_acks = 0
    kills_after_ack = 0
    in_flight = temp_left = 0
    seen_temps: set[str] = set()
    t0 = time.monotonic()
    for trial in range(TRIALS):
        on_disk = SessionStore(root).load(s.id).revision
        proc = subprocess.Popen([sys.executable, str(script), str(root), s.id], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, cwd=str(tmp_path))
        assert proc.stdout.readline() == b"ready\n", proc.stderr.read().decode()
        time.sleep(rng.uniform(0.01, 0.3))  # kill somewhere inside the save loop
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == -signal.SIGKILL, err.decode()
        lines = out.decode().split("\n")[:-1]  # only complete (newline-ended) lines are acknowledgements
        acked = int(lines[-1]) if lines else on_disk
        total_acks += len(lines)
        kills_after_ack += bool(lines)

        fresh = SessionStore(root)
        loaded = fresh.load(s.id)  # must load
        assert loaded.revision >= acked, f"trial {trial}: on disk {loaded.revision} < acknowledged {acked}"
        assert loaded.revision <= acked + 1  # at most the one save in flight when killed
        text = loaded.message(first).text
        if loaded.revision > s.revision:
            assert text.startswith(f"counter {loaded.revision} ")
        assert [r.error for r in fresh.list()] == [None]
        bak = root / f"{s.id}.json.bak"
        assert bak.exists()
        bak_rev = Session.from_json(bak.read_bytes()).revision
        assert bak_rev <= loaded.revision  # equal: killed between the backup link and the rename
        in_flight += loaded.revision == acked + 1 or bak_rev == loaded.revision
        temps = {p.name for p in root.iterdir() if p.name.endswith(".tmp")}
        temp_left += bool(temps - seen_temps)  # a kill mid-write leaves a temp file (never read)
        seen_temps |= temps

    elapsed = time.monotonic() - t0
    with capsys.disabled():
        print(f"\n[crash test] {TRIALS} SIGKILL trials, {total_acks} acknowledged saves, "
              f"{kills_after_ack} kills after >=1 ack, {in_flight} caught a save in flight, "
              f"{temp_left} left a temp file, final revision "
              f"{SessionStore(root).load(s.id).revision}, {elapsed:.1f} s")
    assert kills_after_ack >= TRIALS // 2  # the kills really happened while saving
