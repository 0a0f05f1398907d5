"""The chat page in headless Chromium against the live server (embedded model, CPU): sessions,
streaming, stop, alternatives, edit, rewind, reload, multibot turn orders, reconnect and stale
revisions, the queue, and the screenshots in docs/screenshots/.

Replies are kept short (16-24 tokens) so the module runs in about a minute and a half on 2 cores."""
from __future__ import annotations

import json

import pytest

from page_helpers import (add_bot, app_state, browser, live_server, message_action, new_page, new_session,  # noqa: F401
                          open_settings, page, rename_participant, rename_session, revision, save_screenshot, send, session_file,
                          set_checkbox, set_number, set_select, set_setting, shown_messages, wait_connected,
                          wait_idle, wait_revision_above)
from webui_helpers import WSClient, last_state

SHORT = 16

RECORD_STREAM = """() => {
    window.__ends = []; window.__lengths = [];
    const t = window.exllamaChat.transport;
    t.addEventListener('message', (e) => { if (e.detail.type === 'stream.end') window.__ends.push(e.detail); });
    new MutationObserver(() => {
        const b = document.querySelector('#message-list .msg.streaming .msg-body');
        if (b) window.__lengths.push(b.textContent.length);
    }).observe(document.getElementById('message-list'), {childList: true, subtree: true, characterData: true});
}"""


def short_replies(page, tokens: int = SHORT) -> None:
    set_setting(page, "max_response_tokens", tokens)


STORY = "Write a long story about a dragon."


def long_replies(page) -> None:
    """Through its chat template, as an assistant, the embedded model answers STORY at length
    (it ran to the 200-token cap in every try)."""
    set_setting(page, "max_response_tokens", 300)
    set_checkbox(page, "#break-newline", False)
    set_select(page, "#template", "chat")
    rev = revision(page)
    page.fill("#fixed-prompt", "You are a helpful assistant.")
    page.locator("#fixed-prompt").blur()
    wait_revision_above(page, rev)


def test_send_streams_and_stops(page):
    new_session(page)
    assert page.locator("#session-title").text_content() == "Untitled session"
    long_replies(page)
    assert app_state(page)["session"]["context"]["format"] == "chat"
    page.evaluate(RECORD_STREAM)

    # A long reply in a short window: it streams (the text grows), the view follows it while the
    # reader is at the bottom and stays put once they scroll up; Esc stops it, keeping the text.
    page.set_viewport_size({"width": 700, "height": 330})      # a phone-sized width: short lines
    page.fill("#input", STORY)
    page.press("#input", "Enter")
    page.wait_for_selector("#stop:not([hidden])")          # a visible stop button while it streams
    assert page.input_value("#input") == ""
    scroller = "document.getElementById('messages')"
    page.wait_for_function(f"() => {scroller}.scrollHeight > {scroller}.clientHeight + 90"
                           " && document.querySelector('.msg.streaming')")
    page.wait_for_timeout(100)
    assert page.evaluate(f"{scroller}.scrollHeight - {scroller}.scrollTop - {scroller}.clientHeight") < 60
    page.evaluate(f"{scroller}.scrollTop = 0")
    grown = page.evaluate("document.querySelector('.msg.streaming .msg-body').textContent.length") + 15
    page.wait_for_function("(n) => (document.querySelector('.msg.streaming .msg-body')?.textContent.length ?? 0) > n",
                           arg=grown)
    assert page.evaluate(f"{scroller}.scrollTop") == 0
    assert page.locator("#jump-bottom").is_visible()
    page.keyboard.press("Escape")
    msgs = wait_idle(page, 2, timeout_ms=20_000)
    ends = page.evaluate("window.__ends")
    assert ends and ends[-1]["finish_reason"] == "cancelled", ends
    assert 0 < ends[-1]["tokens"] < 300
    lengths = page.evaluate("window.__lengths")
    assert len(set(lengths)) >= 3, f"the reply did not stream (text lengths seen: {lengths})"
    assert [m["role"] for m in msgs] == ["user", "bot"] and msgs[0]["text"] == STORY
    assert msgs[1]["author"] == "Chatbort" and len(msgs[1]["text"]) > 10
    assert "tok/s" in msgs[1]["meta"] and "tok" in msgs[0]["meta"]
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
    page.set_viewport_size({"width": 1360, "height": 860})
    assert page.locator("#context-meter").is_visible() and "/ 1,024" in page.locator("#context-label").text_content()

    # Continue the stopped reply: same message, more text.
    before = msgs[1]["text"]
    set_setting(page, "max_response_tokens", 8)
    message_action(page, 1, "continue")
    page.wait_for_function("() => window.exllamaChat.state.generating")
    msgs = wait_idle(page, 2)
    assert len(msgs) == 2 and msgs[1]["id"] == ends[-1]["message_id"]
    assert len(msgs[1]["text"]) >= len(before)

    # Shift+Enter is a newline, Enter sends.
    set_setting(page, "max_response_tokens", 24)
    page.fill("#input", "Hello there.")
    page.press("#input", "Shift+Enter")
    page.keyboard.type("Who are you?")
    assert page.input_value("#input") == "Hello there.\nWho are you?"
    page.press("#input", "Enter")
    msgs = wait_idle(page, 4)
    assert msgs[2]["text"] == "Hello there.\nWho are you?" and msgs[3]["role"] == "bot"


def test_alternatives_edit_rewind_delete(page):
    new_session(page)
    short_replies(page)
    msgs = send(page, "Say something about the sea.")
    first = msgs[1]["text"]

    # Ctrl+Enter regenerates the last reply: a second alternative, shown as 2/2.
    page.keyboard.press("Control+Enter")
    page.wait_for_function("() => document.querySelector('#message-list .msg:last-child .alt-pos')?.textContent === '2/2'"
                           " && !window.exllamaChat.state.generating")
    second = shown_messages(page)[1]["text"]
    page.locator("#message-list .msg").nth(1).locator(".alt-prev").click()
    page.wait_for_function("() => document.querySelector('#message-list .msg:last-child .alt-pos')?.textContent === '1/2'")
    assert shown_messages(page)[1]["text"] == first
    page.locator("#message-list .msg").nth(1).locator(".alt-next").click()
    page.wait_for_function("() => document.querySelector('#message-list .msg:last-child .alt-pos')?.textContent === '2/2'")
    assert shown_messages(page)[1]["text"] == second
    page.reload()                                           # alternatives survive a reload
    wait_connected(page)
    assert [(m["text"], m["alt"]) for m in wait_idle(page, 2)][1] == (second, "2/2")

    # A second exchange, then edit the bot's first reply in place (a new alternative, rendered as markdown).
    send(page, "And about the mountains?")
    rev = revision(page)
    message_action(page, 1, "edit")
    area = page.locator(".edit-area")
    assert area.input_value() == second
    area.fill("The sea is **deep** and `salty`.")
    page.click(".edit-save")
    wait_revision_above(page, rev)
    msgs = wait_idle(page)
    assert [m["role"] for m in msgs] == ["user", "bot"]       # an edit starts a new branch there
    assert msgs[1]["text"] == "The sea is deep and salty." and msgs[1]["alt"] == "3/3"
    body = page.locator("#message-list .msg").nth(1).locator(".msg-body")
    assert body.locator("strong").text_content() == "deep" and body.locator("code").text_content() == "salty"

    # Back to the branch that has the second exchange, then rewind to the first reply.
    page.locator("#message-list .msg").nth(1).locator(".alt-prev").click()
    page.wait_for_function("() => window.exllamaChat.state.session?.messages.length === 4")
    rev = revision(page)
    message_action(page, 1, "rewind")
    wait_revision_above(page, rev)
    msgs = wait_idle(page)
    assert len(msgs) == 2 and msgs[1]["text"] == second

    # Edit the user's message and get a reply to it.
    rev = revision(page)
    message_action(page, 0, "edit")
    page.locator(".edit-area").fill("Say something about rivers.")
    page.click(".edit-reply")
    wait_revision_above(page, rev)
    msgs = wait_idle(page, 2)
    assert msgs[0]["text"] == "Say something about rivers." and msgs[0]["alt"] == "2/2"
    assert msgs[1]["role"] == "bot"

    # Delete needs a second click (no dialog), and removes the message and what follows.
    rev = revision(page)
    message_action(page, 1, "delete")
    assert len(shown_messages(page)) == 2                      # armed, nothing deleted yet
    page.locator("#message-list .msg").nth(1).locator(".act-delete").click()
    wait_revision_above(page, rev)
    assert [m["role"] for m in wait_idle(page)] == ["user"]


def test_sessions_rename_reload_delete_restore_export_import(page, live_server, tmp_path):
    sid = new_session(page)
    short_replies(page)
    send(page, "Remember the number 42.")
    # A reply reserve that leaves almost no room: the oldest message drops out, visibly.
    set_setting(page, "max_response_tokens", 1000)
    page.wait_for_selector("#message-list .msg.out-of-context")
    assert page.locator(".drop-marker").is_visible()
    assert "full" in page.locator("#context-meter").get_attribute("class")
    assert page.locator("#message-list .msg").first.locator(".badge").text_content() == "not in context"
    set_setting(page, "max_response_tokens", SHORT)
    page.wait_for_selector("#message-list .msg.out-of-context", state="detached")

    # Fixed prompt (on blur), a slider moved with the keyboard, model information.
    rev = revision(page)
    page.fill("#fixed-prompt", "A conversation about numbers.")
    page.locator("#fixed-prompt").blur()
    wait_revision_above(page, rev)
    rev = revision(page)
    page.locator("[data-setting='temperature'] input[type=range]").focus()
    page.keyboard.press("ArrowRight")
    wait_revision_above(page, rev)
    assert app_state(page)["session"]["settings"]["temperature"] == 0.96
    assert page.input_value("#set-temperature") == "0.96"
    page.locator("summary", has_text="Model").click()
    assert "SmolLM2" in page.locator("#model-info").text_content()

    rename_session(page, "Numbers & <b>things</b>")
    row = page.locator(f".session-row[data-id='{sid}'] .session-name")
    assert row.text_content() == "Numbers & <b>things</b>"
    before = shown_messages(page)
    settings = app_state(page)["session"]["settings"]

    # Reload: the same session opens, as it was.
    page.reload()
    wait_connected(page)
    wait_idle(page)
    assert page.evaluate("window.exllamaChat.state.session.id") == sid
    assert page.locator("#session-title").text_content() == "Numbers & <b>things</b>"
    after = shown_messages(page)
    key = lambda m: (m["id"], m["author"], m["text"], m["alt"], m["meta"])  # noqa: E731
    assert [key(m) for m in after] == [key(m) for m in before]
    assert page.input_value("#set-max_response_tokens") == str(SHORT)
    assert app_state(page)["session"]["settings"] == settings
    assert page.input_value("#fixed-prompt") == "A conversation about numbers."

    # Duplicate, then delete the copy (it goes to the trash) and undo from the toast.
    page.locator(f".session-row[data-id='{sid}']").hover()
    page.locator(f".session-row[data-id='{sid}'] [aria-label='Duplicate']").click()
    page.wait_for_function("(sid) => { const s = window.exllamaChat.state.session; return s && s.id !== sid; }", arg=sid)
    copy = page.evaluate("window.exllamaChat.state.session.id")
    assert len(shown_messages(page)) == 2
    page.locator(f".session-row[data-id='{copy}']").hover()
    page.locator(f".session-row[data-id='{copy}'] [aria-label='Delete (to the trash)']").click()
    page.wait_for_function("(c) => !window.exllamaChat.state.sessions.some(s => s.id === c)"
                           " && window.exllamaChat.state.trash.some(s => s.id === c)", arg=copy)
    assert page.evaluate("window.exllamaChat.state.session.id") != copy    # another session opened
    page.locator(".toast .toast-action", has_text="Undo").click()
    page.wait_for_function("(c) => window.exllamaChat.state.session?.id === c", arg=copy)

    # Delete again and restore from the trash list.
    page.locator(f".session-row[data-id='{copy}']").hover()
    page.locator(f".session-row[data-id='{copy}'] [aria-label='Delete (to the trash)']").click()
    page.wait_for_function("(c) => window.exllamaChat.state.trash.some(s => s.id === c)", arg=copy)
    page.locator("#trash summary").click()
    page.locator("#trash-list .trash-row").first.locator("button").click()
    page.wait_for_function("(c) => window.exllamaChat.state.sessions.some(s => s.id === c)", arg=copy)

    # Export (a download of the session file) and import it back as a new session.
    page.locator(f".session-row[data-id='{sid}']").hover()
    with page.expect_download() as dl:
        page.locator(f".session-row[data-id='{sid}'] [aria-label='Export (download)']").click()
    path = tmp_path / "export.json"
    dl.value.save_as(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["name"] == "Numbers & <b>things</b>" and len(data["messages"]) == 2
    n = len(app_state(page)["sessions"])
    page.set_input_files("#import-file", str(path))
    page.wait_for_function("([n, ids]) => window.exllamaChat.state.sessions.length === n + 1"
                           " && window.exllamaChat.state.session && !ids.includes(window.exllamaChat.state.session.id)",
                           arg=[n, [sid, copy]])
    wait_idle(page)
    imported = app_state(page)["session"]
    assert imported["id"] not in (sid, copy) and [m["text"] for m in imported["messages"]] == [m["text"] for m in before]

    # Delete the original: it leaves the list; the file is in the trash on disk, not gone.
    page.locator(f".session-row[data-id='{sid}']").hover()
    page.locator(f".session-row[data-id='{sid}'] [aria-label='Delete (to the trash)']").click()
    page.wait_for_function("(s) => !window.exllamaChat.state.sessions.some(x => x.id === s)", arg=sid)
    assert page.locator(f".session-row[data-id='{sid}']").count() == 0


def test_multibot_turn_orders(page):
    new_session(page)
    short_replies(page)
    open_settings(page)
    rename_participant(page, 1, "Alice")
    add_bot(page, "Bob")
    add_bot(page, "Carol")
    s = app_state(page)["session"]
    assert [(p["name"], p["kind"]) for p in s["participants"]] == [
        ("User", "user"), ("Alice", "bot"), ("Bob", "bot"), ("Carol", "bot")]
    assert len({p["color"] for p in s["participants"]}) == 4      # each its own colour
    bots = {"Alice", "Bob", "Carol"}

    # The model picks: only bots answer, none twice in a round.
    set_number(page, "#max-bot-turns", 2)
    msgs = send(page, "Hello everyone! Alice, Bob, Carol: introduce yourselves.", replies=1)
    round_ = [m["author"] for m in msgs[1:]]
    assert round_ and set(round_) <= bots and len(set(round_)) == len(round_)
    colors = page.evaluate("[...document.querySelectorAll('#message-list .msg')].map(m => m.style.getPropertyValue('--c'))")
    by_author = {}
    for m, c in zip(msgs, colors):
        assert by_author.setdefault(m["author"], c) == c

    # Round robin: three bots, in participant order, starting after the last bot that spoke.
    set_select(page, "#turn-order", "round_robin")
    set_number(page, "#max-bot-turns", 3)
    order = ["Alice", "Bob", "Carol"]
    start = (order.index(round_[-1]) + 1) % 3
    n = len(msgs)
    msgs = send(page, "Now each of you, one sentence.", replies=3)
    assert [m["author"] for m in msgs[n + 1:]] == [order[(start + i) % 3] for i in range(3)]

    # Manual: nobody answers by themselves; the next-speaker control picks who does.
    set_select(page, "#turn-order", "manual")
    n = len(msgs)
    assert page.locator("#speaker-wrap").is_visible()
    assert page.locator("#bot-turn").is_disabled()               # no bot picked
    msgs = send(page, "Quiet now.", replies=0)
    page.wait_for_timeout(300)
    msgs = wait_idle(page)
    assert len(msgs) == n + 1 and msgs[-1]["role"] == "user"
    page.select_option("#next-speaker", "Bob")
    msgs = send(page, "Bob, what do you think?", replies=1)
    assert msgs[-1]["author"] == "Bob" and len(msgs) == n + 3
    page.select_option("#next-speaker", "Carol")
    page.click("#bot-turn")
    msgs = wait_idle(page, n + 4)
    assert msgs[-1]["author"] == "Carol" and msgs[-2]["author"] == "Bob"

    # A bot's colour and persona; then remove it (its messages keep its name).
    rev = revision(page)
    page.locator("#participants .participant[data-name='Carol'] .swatch").fill("#ff0000")
    wait_revision_above(page, rev)
    assert page.evaluate("document.querySelector('#message-list .msg:last-child').style.getPropertyValue('--c')") == "#ff0000"
    rev = revision(page)
    page.locator("#participants .participant[data-name='Carol'] .p-persona").fill("Carol speaks in rhymes.")
    page.locator("#participants .participant[data-name='Carol'] .p-persona").blur()
    wait_revision_above(page, rev)
    assert app_state(page)["session"]["participants"][3]["persona"] == "Carol speaks in rhymes."
    rev = revision(page)
    page.locator("#participants .participant[data-name='Carol'] .p-remove").click()
    wait_revision_above(page, rev)
    assert [p["name"] for p in app_state(page)["session"]["participants"]] == ["User", "Alice", "Bob"]
    assert shown_messages(page)[-1]["author"] == "Carol"
    assert [o for o in page.locator("#next-speaker option").all_text_contents()] == ["Nobody (no reply)", "Alice", "Bob"]


def test_reconnect_and_stale_revision(page, live_server):
    sid = new_session(page)
    short_replies(page)
    send(page, "Hi.")

    # Another client changes the session: the page receives it (the server's copy wins).
    other = WSClient(live_server.ws_url)
    try:
        out, _ = other.ok("session.open", session=sid)
        snap = last_state(out)
        other.ok("session.update", session=sid, revision=snap["revision"],
                 changes={"fixed_prompt": "Changed elsewhere.", "settings": {"temperature": 0.5}})
        page.wait_for_function("() => window.exllamaChat.state.session?.fixed_prompt === 'Changed elsewhere.'")
        open_settings(page)
        assert page.input_value("#fixed-prompt") == "Changed elsewhere."
        assert page.input_value("#set-temperature") == "0.5"

        # Drop the connection; while it is down, the other client renames the session. The page
        # reconnects by itself and re-reads the session instead of writing its stale copy back.
        page.evaluate("window.exllamaChat.transport.ws.close()")
        page.wait_for_selector("#conn-status:not([hidden])")
        other.ok("session.rename", session=sid, name="Renamed while away")
        page.wait_for_function("() => window.exllamaChat.state.connected"
                               " && window.exllamaChat.state.session?.name === 'Renamed while away'")
        assert page.locator("#conn-status").is_hidden()

        # A write with a stale revision is refused; the page takes the fresh snapshot and says so.
        page.evaluate("window.exllamaChat.state.session.revision -= 1")
        message_action(page, 1, "delete")
        page.locator("#message-list .msg").nth(1).locator(".act-delete").click()
        page.locator(".toast", has_text="changed elsewhere").wait_for()
        snap = app_state(page)["session"]
        assert len(snap["messages"]) == 2 and snap["name"] == "Renamed while away"
        assert snap["revision"] == session_file(live_server, sid)["revision"]
    finally:
        other.close()


def test_queue_position_and_toast(browser, live_server):
    a = new_page(browser, live_server)
    b = new_page(browser, live_server)
    try:
        new_session(a)
        long_replies(a)
        new_session(b)
        set_setting(b, "max_response_tokens", 8)
        a.fill("#input", STORY)
        a.press("#input", "Enter")
        a.wait_for_selector(".msg.streaming")
        send(b, "Hello?", wait=False)
        b.locator("#queue-status", has_text="#1 in line").wait_for()
        a.click("#stop")
        wait_idle(a)
        wait_idle(b, 2)
        assert b.locator("#queue-status").text_content() == ""

        # A server error is a toast, never a dialog: a bot that is not in the session.
        b.evaluate("window.exllamaChat.transport.request('chat.generate', {session: window.exllamaChat.state.session.id,"
                   " revision: window.exllamaChat.state.session.revision, bot: 'Nobody'}).catch(e => window.__err = e.code)")
        b.wait_for_function("() => window.__err === 'invalid'")
        for p in (a, b):
            p.problems.check()
    finally:
        a.context.close()
        b.context.close()


@pytest.mark.parametrize("kind", ["desktop", "phone"])
def test_screenshots(browser, live_server, kind):
    if kind == "desktop":
        p = new_page(browser, live_server, viewport=(1440, 900))
    else:
        p = new_page(browser, live_server, viewport=(390, 844), device_scale_factor=2, is_mobile=True, has_touch=True)
    try:
        new_session(p)
        rename_session(p, "Three bots talk about code")
        short_replies(p, 24)
        open_settings(p)
        rename_participant(p, 1, "Ada")
        add_bot(p, "Grace")
        set_select(p, "#turn-order", "round_robin")
        set_number(p, "#max-bot-turns", 2)
        if kind == "phone":
            p.click("#close-settings")
        send(p, "Hi both! What is your favourite programming language?", replies=2)
        msgs = shown_messages(p)
        rev = revision(p)
        message_action(p, 2, "edit")
        p.locator(".edit-area").fill("Python, because it reads like prose:\n\n```python\ndef greet(name):\n"
                                     "    return f\"Hello, {name}!\"\n```\n\nWhat about *you*?")
        p.click(".edit-save")
        wait_revision_above(p, rev)
        wait_idle(p, len(msgs))
        p.evaluate("document.activeElement.blur(); document.querySelector('.settings-body').scrollTop = 0")
        p.mouse.move(5, 5)
        p.wait_for_timeout(300)
        save_screenshot(p, f"chat-{kind}.png")
        if kind == "phone":
            p.click("#toggle-sidebar")
            p.wait_for_timeout(400)
            save_screenshot(p, "chat-phone-sessions.png")
            p.click("#backdrop", position={"x": 370, "y": 400})
            p.click("#toggle-settings")
            p.wait_for_timeout(400)
            save_screenshot(p, "chat-phone-settings.png")
        else:
            bg = "getComputedStyle(document.body).backgroundColor"
            light = p.evaluate(bg)
            p.click("#toggle-theme")
            p.wait_for_timeout(300)
            assert p.evaluate(bg) != light and p.evaluate("document.documentElement.dataset.theme") == "dark"
            save_screenshot(p, "chat-desktop-dark.png")
            p.click("#toggle-theme")
            p.wait_for_timeout(100)
            assert p.evaluate(bg) == light
        p.problems.check()
    finally:
        p.context.close()
