"""SessionStore: files, atomic writes, corrupt files, hostile ids/names, revisions, trash, import/export."""
import json
import os
import threading
import time
from pathlib import Path

import pytest

from sessions import (CorruptSessionError, InvalidIdError, InvalidNameError, Session, SessionError,
                      SessionExistsError, SessionFormatError, SessionNotFoundError, SessionStore,
                      SessionTooLargeError, StaleRevisionError, UnsupportedSchemaError)


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "sessions"


@pytest.fixture
def store(root) -> SessionStore:
    return SessionStore(root)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def make_chat(store: SessionStore, name="chat", n=3) -> Session:
    s = store.create(name)
    for i in range(n):
        s.append("user", "User", f"question {i}")
        s.append("bot", "Chatbort", f"answer {i}")
    store.save(s)
    return s


# ---- basics --------------------------------------------------------------------------------------

def test_create_makes_folder_and_file(root):
    assert not root.exists()
    st = SessionStore(root)
    s = st.create()
    assert root.is_dir()
    assert (root / f"{s.id}.json").is_file()
    assert s.revision == 1
    assert [p.name for p in s.participants] == ["User", "Chatbort"]
    assert [p.kind for p in s.participants] == ["user", "bot"]
    assert s.name == "Untitled session"


def test_save_load_round_trip(store):
    s = make_chat(store)
    s.participants[1].persona = "A blue-loving bot."
    s.participants[1].settings = {"temperature": 0.5, "stop": ["\nUser:"]}
    s.participants[1].lora = "loras/blue"
    s.settings["top_k"] = 40
    s.turn_order, s.max_bot_turns, s.template = "round_robin", 3, "chat"
    s.fixed_prompt, s.keep_fixed_prompt = "Be nice. ünïcödé 🎉", False
    s.edit(s.active_path()[2].id, "edited")
    rev = store.save(s)
    assert rev == s.revision == 3
    t = store.load(s.id)
    assert t == s
    assert store.path(s.id).with_name(s.id + ".json.bak").is_file()
    assert store.load(s.id).revision == 3


def test_list_sorted_by_updated_with_counts(store):
    a = make_chat(store, "a", 1)
    time.sleep(0.01)
    b = make_chat(store, "b", 2)
    time.sleep(0.01)
    a.append("user", "User", "bump")
    store.save(a)
    rows = store.list()
    assert [(r.id, r.name, r.message_count, r.error) for r in rows] == [(a.id, "a", 3, None), (b.id, "b", 4, None)]
    assert rows[0].updated >= rows[1].updated
    assert isinstance(rows[0].to_dict(), dict)


def test_rename_and_duplicate(store):
    s = make_chat(store)
    r = store.rename(s.id, "  new\tname\x00 ")
    assert r.name == "new name"
    assert store.load(s.id).name == "new name"
    with pytest.raises(InvalidNameError):
        store.rename(s.id, "\x00\x01 ")
    d = store.duplicate(s.id)
    assert d.id != s.id and d.name == "new name (copy)" and d.revision == 1
    assert [m.text for m in store.load(d.id).active_path()] == [m.text for m in s.active_path()]
    # branch to new session: only the path up to a message
    upto = s.active_path()[2].id
    s.edit(upto, "other")
    store.save(s, store.load(s.id).revision)
    b = store.duplicate(s.id, "branch", upto=upto)
    assert [m.text for m in b.active_path()] == ["question 0", "answer 0", "question 1"]
    assert b.message_count == 3


def test_stale_revision_rejected(store):
    s = make_chat(store)
    tab_a, tab_b = store.load(s.id), store.load(s.id)
    tab_a.append("user", "User", "from tab A")
    store.save(tab_a)
    tab_b.append("user", "User", "from tab B")
    with pytest.raises(StaleRevisionError) as ei:
        store.save(tab_b)
    assert (ei.value.expected, ei.value.current) == (s.revision, s.revision + 1)
    with pytest.raises(StaleRevisionError):
        store.save(tab_b, s.revision)
    assert store.load(s.id).active_path()[-1].text == "from tab A"
    # an explicit, current expected revision works
    assert store.save(tab_b, tab_a.revision) == tab_a.revision + 1


def test_stale_detected_across_store_instances(root):
    a, b = SessionStore(root), SessionStore(root)
    s = a.create()
    s1, s2 = a.load(s.id), b.load(s.id)
    a.save(s1)
    with pytest.raises(StaleRevisionError):
        b.save(s2)


def test_concurrent_saves_exactly_one_wins(store):
    s = make_chat(store)
    copies = [store.load(s.id) for _ in range(8)]
    results = []
    barrier = threading.Barrier(len(copies))

    def worker(c):
        barrier.wait()
        try:
            results.append(store.save(c))
        except StaleRevisionError:
            results.append("stale")

    threads = [threading.Thread(target=worker, args=(c,)) for c in copies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=str) == [s.revision + 1] + ["stale"] * 7
    assert store.load(s.id).revision == s.revision + 1


def test_save_unknown_session_refused(store):
    s = Session.new("ghost")
    with pytest.raises(SessionNotFoundError):
        store.save(s)
    assert store.list() == []


def test_save_invalid_session_writes_nothing(store):
    s = make_chat(store)
    before = snapshot(store.root)
    s.turn_order = "whoever"
    with pytest.raises(SessionFormatError):
        store.save(s)
    s.turn_order = "model"
    s.participants.append(s.participants[0])  # duplicate name
    with pytest.raises(SessionFormatError):
        store.save(s)
    assert snapshot(store.root) == before


# ---- atomicity -----------------------------------------------------------------------------------

def test_crash_at_replace_keeps_old_file(store, monkeypatch):
    s = make_chat(store)
    good = store.path(s.id).read_bytes()
    real_replace = os.replace

    def boom(src, dst, *a, **kw):
        if str(dst).endswith(".json"):
            raise OSError(5, "simulated crash before rename")
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", boom)
    s.append("user", "User", "lost")
    with pytest.raises(OSError):
        store.save(s)
    monkeypatch.undo()
    assert store.path(s.id).read_bytes() == good
    assert store.load(s.id).revision == s.revision  # session object not bumped on failure
    assert not [p for p in store.root.iterdir() if p.name.endswith(".tmp")]
    # the backup moved forward to the old file, which loads
    bak = store.root / f"{s.id}.json.bak"
    assert bak.read_bytes() == good
    assert store.save(s) == s.revision


def test_crash_at_fsync_keeps_old_file(store, monkeypatch):
    s = make_chat(store)
    good = store.path(s.id).read_bytes()

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    s.append("user", "User", "lost")
    with pytest.raises(OSError):
        store.save(s)
    monkeypatch.undo()
    assert store.path(s.id).read_bytes() == good
    assert not [p for p in store.root.iterdir() if p.name.endswith(".tmp")]


def test_truncated_temp_file_is_ignored_and_cleaned(root):
    st = SessionStore(root)
    s = make_chat(st)
    data = st.path(s.id).read_bytes()
    tmp = root / f".{s.id}.json.0123456789abcdef.tmp"
    tmp.write_bytes(data[: len(data) // 2])  # a writer died mid-write
    assert [r.error for r in st.list()] == [None]
    assert st.load(s.id).revision == s.revision
    old = time.time() - 3600
    os.utime(tmp, (old, old))
    SessionStore(root)  # a new store (server start) removes stale temp files
    assert not tmp.exists()
    assert st.path(s.id).read_bytes() == data


def test_backup_is_previous_version(store):
    s = make_chat(store)
    prev = store.path(s.id).read_bytes()
    s.append("user", "User", "more")
    store.save(s)
    assert (store.root / f"{s.id}.json.bak").read_bytes() == prev


# ---- corrupt files -------------------------------------------------------------------------------

def _corruptions(good: bytes) -> dict[str, bytes]:
    d = json.loads(good)
    mids = list(d["messages"])

    def variant(fn):
        x = json.loads(good)
        fn(x)
        return json.dumps(x).encode()

    return {
        "garbage": os.urandom(64) + b"\x00\xff",
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "not_utf8": good.replace(b'"chat"', b'"ch\xffat"'),
        "array": b"[1, 2, 3]",
        "schema2": variant(lambda x: x.update(schema=2)),
        "no_schema": variant(lambda x: x.pop("schema")),
        "nan": good.replace(b'"revision": ', b'"revision": NaN, "x": '),
        "dup_key": good.replace(b'"revision": ', b'"name": "dup", "revision": ', 1),
        "bad_link": variant(lambda x: x["messages"][mids[1]].update(parent=mids[2])),
        "missing_child": variant(lambda x: x["messages"][mids[0]]["children"].append("f" * 32)),
        "wrong_id": variant(lambda x: x.update(id="0" * 32)),
        "bad_type": variant(lambda x: x.update(revision="7")),
        "unknown_field": variant(lambda x: x.update(hack=1)),
        "bad_color": variant(lambda x: x["participants"][0].update(color="red;background:url(x)")),
    }


CORRUPTION_KINDS = ["garbage", "empty", "truncated", "not_utf8", "array", "schema2", "no_schema", "nan",
                    "dup_key", "bad_link", "missing_child", "wrong_id", "bad_type", "unknown_field", "bad_color"]


@pytest.mark.parametrize("kind", CORRUPTION_KINDS)
def test_corrupt_file_is_reported_and_never_overwritten(store, kind):
    s = make_chat(store)  # revision 2, with a .bak at revision 1
    path = store.path(s.id)
    bad = _corruptions(path.read_bytes())[kind]
    path.write_bytes(bad)

    rows = store.list()
    assert len(rows) == 1 and rows[0].error is not None and rows[0].id == s.id
    assert path.name in rows[0].error
    assert rows[0].recoverable
    with pytest.raises(CorruptSessionError) as ei:
        store.load(s.id)
    assert path.name in str(ei.value) and ei.value.recoverable
    if kind == "schema2":
        assert isinstance(ei.value.__cause__, UnsupportedSchemaError)
        assert "schema version" in str(ei.value)

    # nothing overwrites it: save (even with the right revision), rename, export, resume
    s.append("user", "User", "would clobber")
    for rev in (s.revision, s.revision + 1, 0):
        with pytest.raises(CorruptSessionError):
            store.save(s, rev)
    with pytest.raises(CorruptSessionError):
        store.rename(s.id, "x")
    with pytest.raises(CorruptSessionError):
        store.export(s.id)
    with pytest.raises(CorruptSessionError):
        store.duplicate(s.id)
    store.set_last_session(s.id)
    resumed = store.resume()  # a new session, not the corrupt one
    assert resumed.id != s.id
    assert path.read_bytes() == bad

    # explicit recovery from the backup
    restored = store.recover(s.id)
    assert restored.revision == 2 and restored.message_count == 0
    assert store.load(s.id).revision == 2
    aside = [p for p in store.root.iterdir() if p.name.startswith(f"{s.id}.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == bad
    with pytest.raises(SessionError, match="nothing to recover"):
        store.recover(s.id)


def test_corrupt_without_backup(store):
    s = store.create()
    path = store.path(s.id)
    path.write_bytes(b'{"schema": 1, "id": ')
    row = store.list()[0]
    assert row.error and not row.recoverable
    with pytest.raises(SessionNotFoundError):
        store.recover(s.id)
    assert path.read_bytes() == b'{"schema": 1, "id": '


def test_corrupt_backup_not_used(store):
    s = make_chat(store)
    store.path(s.id).write_bytes(b"junk")
    (store.root / f"{s.id}.json.bak").write_bytes(b"junk too")
    assert not store.list()[0].recoverable
    with pytest.raises(CorruptSessionError):
        store.recover(s.id)
    assert store.path(s.id).read_bytes() == b"junk"


def test_corrupt_file_delete_and_restore_keep_bytes(store):
    s = make_chat(store)
    path = store.path(s.id)
    path.write_bytes(b"\x00garbage")
    store.delete(s.id)
    assert (store.trash_dir / path.name).read_bytes() == b"\x00garbage"
    assert store.list_trash()[0].error
    store.restore(s.id)
    assert path.read_bytes() == b"\x00garbage"


def test_foreign_files_ignored(store):
    s = make_chat(store)
    (store.root / "notes.txt").write_text("hi")
    (store.root / "Untitled session.json").write_text("{}")  # an old EL file
    (store.root / (s.id.upper() + ".json")).write_text("{}")
    os.symlink("/etc/passwd", store.root / ("e" * 32 + ".json"))
    assert [r.id for r in store.list()] == [s.id]
    with pytest.raises(CorruptSessionError):
        store.load("e" * 32)  # a symlink is not followed


# ---- hostile ids and names -----------------------------------------------------------------------

HOSTILE_IDS = ["../etc/passwd", "a/b", "..", ".", "", "\x00", "0" * 31 + "\x00", "a" * 10000, "é" * 32,
               "0" * 31, "0" * 33, "0" * 32 + "\n", "/etc/passwd", "A" * 32, "..\\..\\x", "%2e%2e",
               "0" * 32 + ".json", "trash/" + "0" * 32, None, 123, ["0" * 32], b"0" * 32]


@pytest.mark.parametrize("bad", HOSTILE_IDS, ids=range(len(HOSTILE_IDS)))
def test_hostile_ids_rejected_everywhere(store, tmp_path, bad):
    good = make_chat(store)
    before_all = snapshot(tmp_path)
    calls = [lambda: store.load(bad), lambda: store.rename(bad, "x"), lambda: store.duplicate(bad),
             lambda: store.delete(bad), lambda: store.restore(bad), lambda: store.purge(bad),
             lambda: store.recover(bad), lambda: store.export(bad),
             lambda: store.path(bad), lambda: store.exists(bad)]
    if bad is not None:  # set_last_session(None) means "forget"
        calls.append(lambda: store.set_last_session(bad))
    for call in calls:
        with pytest.raises(InvalidIdError):
            call()
    fake = store.load(good.id)
    fake.id = bad
    with pytest.raises(InvalidIdError):
        store.save(fake)
    assert snapshot(tmp_path) == before_all


@pytest.mark.parametrize("name,expected", [
    ("../etc/passwd", "../etc/passwd"),
    ("a/b", "a/b"),
    ("x\x00y\x1b[31m\r\nz", "xy[31m z"),
    ("日本語 🎉 Ünïcödé", "日本語 🎉 Ünïcödé"),
    ("evil\u202etxt.exe", "eviltxt.exe"),
    ("lone \ud800", "lone \ufffd"),
    ("n" * 5000, "n" * 120),
])
def test_hostile_names_are_plain_data(store, name, expected):
    s = store.create(name)
    assert s.name == expected
    files = sorted(p.name for p in store.root.iterdir())
    assert files == [f"{s.id}.json"]
    assert store.load(s.id).name == expected
    assert store.rename(s.id, name).name == expected


def test_empty_names_rejected(store):
    s = store.create()
    for bad in ["", "   ", "\x00\x01", 5, None]:
        with pytest.raises(InvalidNameError):
            store.rename(s.id, bad)
    for bad in ["   ", "\x00\x01", 5]:
        with pytest.raises(InvalidNameError):
            store.create(bad)
    assert store.create("").name == store.create(None).name == "Untitled session"


# ---- trash ---------------------------------------------------------------------------------------

def test_trash_and_restore(store):
    s = make_chat(store)
    other = make_chat(store, "other")
    store.delete(s.id)
    assert [r.id for r in store.list()] == [other.id]
    trash = store.list_trash()
    assert [r.id for r in trash] == [s.id] and trash[0].deleted is not None
    with pytest.raises(SessionNotFoundError):
        store.load(s.id)
    with pytest.raises(SessionNotFoundError):
        store.delete(s.id)
    info = store.restore(s.id)
    assert info.id == s.id and info.error is None
    assert store.load(s.id) == s
    assert (store.root / f"{s.id}.json.bak").is_file()  # backup travels along
    assert store.list_trash() == []
    with pytest.raises(SessionNotFoundError):
        store.restore(s.id)
    store.save(store.load(s.id))  # usable after restore


def test_purge_and_empty_trash(store):
    a, b = make_chat(store, "a"), make_chat(store, "b")
    store.delete(a.id)
    store.delete(b.id)
    store.purge(a.id)
    assert [r.id for r in store.list_trash()] == [b.id]
    assert store.empty_trash() == 1
    assert store.list_trash() == [] and store.list() == []
    assert sorted(p.name for p in store.trash_dir.iterdir()) == []


def test_restore_conflict(store):
    s = make_chat(store)
    data = store.path(s.id).read_bytes()
    store.delete(s.id)
    store.path(s.id).write_bytes(data)  # someone put it back by hand
    with pytest.raises(SessionExistsError):
        store.restore(s.id)
    assert (store.trash_dir / f"{s.id}.json").read_bytes() == data


# ---- export / import -----------------------------------------------------------------------------

def test_export_import_round_trip(store):
    s = make_chat(store)
    s.edit(s.active_path()[1].id, "alt answer")
    store.save(s)
    blob = store.export(s.id)
    assert isinstance(blob, bytes) and json.loads(blob)["id"] == s.id
    t = store.import_session(blob)
    assert t.id != s.id and t.revision == 1
    assert t.messages == s.messages and t.active_leaf == s.active_leaf and t.participants == s.participants
    assert store.load(t.id) == t
    u = store.import_session(blob.decode(), name="imported")
    assert u.name == "imported"
    assert len(store.list()) == 3


def test_import_refuses_garbage(tmp_path):
    st = SessionStore(tmp_path / "s", max_import_bytes=100_000)
    good = json.loads(st.export(make_chat(st).id))
    before = snapshot(st.root)

    def variant(**kw):
        return json.dumps(dict(good, **kw))

    bad_inputs = [b"", b"null", b"[]", b"{}", b"not json", b"\xff\xfe", "[" * 100_00 + "]" * 100_00,
                  variant(schema=2), variant(schema="1"), variant(messages=[]),
                  variant(participants=[{"name": "A", "kind": "user"}, {"name": "A", "kind": "bot"}]),
                  variant(turn_order="chaos"), variant(max_bot_turns=10**9), variant(revision=-1),
                  variant(active_leaf="nope"), variant(extra=True), variant(created=float("nan")),
                  variant(settings={"": 1}), variant(fixed_prompt=None), json.dumps(good)[:-10],
                  json.dumps(dict(good, messages={"../x": {}})), 12345]
    for bad in bad_inputs:
        with pytest.raises(SessionError):
            st.import_session(bad)
    with pytest.raises(UnsupportedSchemaError):
        st.import_session(variant(schema=99))
    with pytest.raises(SessionTooLargeError):
        st.import_session(b" " * 100_001)
    with pytest.raises(SessionTooLargeError):
        st.import_session(variant(fixed_prompt="x" * 100_001))
    assert snapshot(st.root) == before


def test_import_ignores_incoming_id(store):
    s = make_chat(store)
    d = json.loads(store.export(s.id))
    d["id"] = "../../etc/passwd"
    t = store.import_session(json.dumps(d))
    assert t.id != s.id and len(t.id) == 32


# ---- last session --------------------------------------------------------------------------------

def test_last_session_and_resume(store, root):
    assert store.last_session_id() is None
    first = store.resume()  # empty store: a new session, remembered
    assert store.last_session_id() == first.id
    a = make_chat(store, "a")
    time.sleep(0.01)
    b = make_chat(store, "b")
    store.set_last_session(a.id)
    assert SessionStore(root).resume().id == a.id
    # a corrupt state file is ignored: most recent session
    (root / "_state.json").write_bytes(b"\x00{garbage")
    assert store.last_session_id() == b.id
    (root / "_state.json").write_text(json.dumps({"schema": 1, "last_session": "../../etc/passwd"}))
    assert store.last_session_id() == b.id
    # remembered session deleted or corrupt: fall back
    store.set_last_session(a.id)
    store.delete(a.id)
    assert store.last_session_id() == b.id
    store.path(b.id).write_bytes(b"junk")
    assert store.last_session_id() == first.id
    store.set_last_session(None)
    assert store.last_session_id() == first.id
