"""History tree operations on Session (no disk)."""
import pytest

from sessions import HistoryError, MessageNotFoundError, Session, SessionFormatError


def texts(s: Session) -> list[str]:
    return [m.text for m in s.active_path()]


@pytest.fixture
def chat() -> tuple[Session, list[str]]:
    s = Session.new("t")
    ids = [s.append("user", "User", "u1"), s.append("bot", "Chatbort", "b1"),
           s.append("user", "User", "u2"), s.append("bot", "Chatbort", "b2")]
    return s, ids


def test_append_and_active_path(chat):
    s, ids = chat
    assert texts(s) == ["u1", "b1", "u2", "b2"]
    assert s.active_leaf == ids[-1]
    assert [m.parent for m in s.active_path()] == [None] + ids[:-1]
    assert s.siblings(ids[2]) == (0, 1)
    assert s.message_count == 4


def test_add_message_validates():
    s = Session.new()
    with pytest.raises(MessageNotFoundError):
        s.add_message("nope", "user", "User", "x")
    with pytest.raises(HistoryError):
        s.add_message(None, "admin", "User", "x")
    with pytest.raises(SessionFormatError):
        s.add_message(None, "user", "User", 5)
    mid = s.add_message(None, "user", "Us\x00er\n", "lone \ud800 surrogate")
    m = s.message(mid)
    assert m.author == "User"
    assert m.text == "lone \ufffd surrogate"
    s.validate()


def test_edit_creates_sibling_and_original_stays(chat):
    s, (u1, b1, u2, b2) = chat
    e = s.edit(u2, "u2 edited")
    assert e != u2
    assert texts(s) == ["u1", "b1", "u2 edited"]  # subtree of the original not carried over
    assert s.siblings(e) == (1, 2)
    assert s.siblings(u2) == (0, 2)
    assert s.message(u2).text == "u2" and s.message(b2).parent == u2
    # back to the original: its reply comes back too
    assert s.switch(e, -1) == b2
    assert texts(s) == ["u1", "b1", "u2", "b2"]
    assert s.switch(u2, +1) == e
    assert texts(s) == ["u1", "b1", "u2 edited"]


def test_switch_remembers_deeper_choices(chat):
    s, (u1, b1, u2, b2) = chat
    e = s.edit(u2, "u2 alt")
    r1 = s.append("bot", "Chatbort", "reply to alt")
    s.regenerate(r1)
    r2 = s.append("bot", "Chatbort", "reply to alt, take 2")
    s.switch(r2, index=0)
    assert texts(s)[-1] == "reply to alt"
    # go to the original branch and back: the alt branch comes back with the choice made in it (r1)
    s.switch(e, "prev")
    assert texts(s) == ["u1", "b1", "u2", "b2"]
    s.switch(u2, "next")
    assert texts(s) == ["u1", "b1", "u2 alt", "reply to alt"]
    assert s.active_leaf == r1
    # clamped at the ends
    assert s.switch(r1, -5) == r1
    assert s.switch(r1, +5) == r2
    with pytest.raises(HistoryError):
        s.switch(r1, index=2)
    with pytest.raises(HistoryError):
        s.switch(r1, index=-1)
    with pytest.raises(HistoryError):
        s.switch(r1, "sideways")


def test_rewind_then_new_message_forks(chat):
    s, (u1, b1, u2, b2) = chat
    s.rewind(b1)
    assert texts(s) == ["u1", "b1"]
    assert u2 in s.messages and b2 in s.messages  # kept
    n = s.append("user", "User", "new direction")
    assert texts(s) == ["u1", "b1", "new direction"]
    assert s.siblings(n) == (1, 2)
    assert s.switch(n, -1) == b2  # the old branch is recoverable
    assert texts(s) == ["u1", "b1", "u2", "b2"]


def test_rewind_to_none_and_roots_are_siblings(chat):
    s, (u1, *_rest) = chat
    s.rewind(None)
    assert s.active_path() == []
    r = s.append("user", "User", "another start")
    assert s.roots() == [u1, r]
    assert s.siblings(r) == (1, 2)
    s.switch(r, -1)
    assert texts(s) == ["u1", "b1", "u2", "b2"]


def test_regenerate(chat):
    s, (u1, b1, u2, b2) = chat
    parent = s.regenerate(b2)
    assert parent == u2
    assert texts(s) == ["u1", "b1", "u2"]
    n = s.add_message(parent, "bot", "Chatbort", "b2 again")
    assert s.siblings(n) == (1, 2)
    assert texts(s)[-1] == "b2 again"
    s.switch(n, index=0)
    assert texts(s)[-1] == "b2"
    with pytest.raises(HistoryError):
        s.regenerate(u2)


def test_regenerate_root_greeting():
    s = Session.new()
    g = s.append("bot", "Chatbort", "Hello!")
    assert s.regenerate(g) is None
    assert s.active_path() == []
    g2 = s.add_message(None, "bot", "Chatbort", "Hi!")
    assert s.siblings(g2) == (1, 2)


def test_delete_message_on_active_branch_moves_to_neighbour(chat):
    s, (u1, b1, u2, b2) = chat
    parent = s.regenerate(b2)
    alt = s.add_message(parent, "bot", "Chatbort", "b2 alt")
    assert s.delete_message(alt) == b2  # previous alternative
    assert texts(s) == ["u1", "b1", "u2", "b2"]
    assert s.message(u2).children == [b2]
    # no alternative left: the branch ends at the parent
    assert s.delete_message(b1) == u1
    assert texts(s) == ["u1"]
    assert set(s.messages) == {u1}
    s.validate()


def test_delete_message_off_branch_keeps_active(chat):
    s, (u1, b1, u2, b2) = chat
    e = s.edit(u2, "alt")
    leaf = s.append("bot", "Chatbort", "alt reply")
    assert s.delete_message(u2) == leaf  # u2 and b2 were off the active branch
    assert b2 not in s.messages and u2 not in s.messages
    assert texts(s) == ["u1", "b1", "alt", "alt reply"]
    assert s.siblings(e) == (0, 1)
    s.validate()


def test_delete_first_sibling_goes_to_next_and_root_delete(chat):
    s, (u1, b1, u2, b2) = chat
    e = s.edit(u2, "alt")
    s.switch(e, index=0)
    assert s.delete_message(u2) == e
    assert s.delete_message(u1) is None
    assert s.messages == {} and s.active_path() == []
    s.validate()


def test_update_message_text(chat):
    s, (u1, b1, u2, b2) = chat
    s.update_message_text(b2, "b2 streamed final", tokens=7, tokens_per_s=12.5)
    m = s.message(b2)
    assert (m.text, m.tokens, m.tokens_per_s) == ("b2 streamed final", 7, 12.5)
    assert s.siblings(b2) == (0, 1)  # no sibling made
    with pytest.raises(MessageNotFoundError):
        s.update_message_text("missing", "x")


def test_round_trip_dict_keeps_tree(chat):
    s, (u1, b1, u2, b2) = chat
    e = s.edit(u2, "alt")
    s.switch(e, -1)
    t = Session.from_dict(s.to_dict())
    assert t == s
    assert t.switch(u2, +1) == e


def test_validation_catches_bad_links(chat):
    s, (u1, b1, u2, b2) = chat
    d = s.to_dict()
    d["messages"][b2]["parent"] = b1  # b1 does not list b2
    with pytest.raises(SessionFormatError, match="parent"):
        Session.from_dict(d)
    d = s.to_dict()
    d["messages"][u1]["children"].append("0" * 32)
    with pytest.raises(SessionFormatError, match="missing message"):
        Session.from_dict(d)
    d = s.to_dict()  # a detached cycle: b2 <-> u2, consistent links but no root
    d["messages"][u2]["parent"] = b2
    d["messages"][b2]["children"] = [u2]
    d["messages"][b1]["children"] = []
    d["messages"][b1]["last_child"] = None
    with pytest.raises(SessionFormatError, match="cycle"):
        Session.from_dict(d)
    d = s.to_dict()
    d["active_leaf"] = "f" * 32
    with pytest.raises(SessionFormatError, match="active_leaf"):
        Session.from_dict(d)
    d = s.to_dict()
    d["messages"][u1]["last_child"] = u2
    with pytest.raises(SessionFormatError, match="last_child"):
        Session.from_dict(d)
