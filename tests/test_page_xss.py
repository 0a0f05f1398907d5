"""Script injection never works on the chat page: payloads as message text, participant and bot
names, session names, model output (an edited bot message, a streamed reply, an imported session)
and server error text. A payload that ran would open a dialog (every payload calls alert/confirm/
prompt; `page` fails the test on any dialog), and no payload may leave an element that can run or
load anything (scripts, images, SVG, frames, on* handlers, javascript: URLs) in the DOM."""
from __future__ import annotations

import json

from page_helpers import (add_bot, app_state, browser, injected_elements, live_server, message_action,  # noqa: F401
                          open_settings, page, rename_participant, rename_session, revision, send, set_select,
                          set_setting, shown_messages, wait_connected, wait_idle, wait_revision_above, new_session)

PAYLOADS = [
    "<img src=x onerror=alert(1)>",
    "<script>alert(2)</script>",
    "<svg onload=alert(3)>",
    "<svg><script>alert(4)</script></svg>",
    "[click me](javascript:alert(5))",
    '<a href="javascript:alert(6)">link</a>',
    '<iframe src="javascript:alert(7)"></iframe>',
    "<details open ontoggle=alert(8)>x</details>",
    "<math><mtext><table><mglyph><style><img src=x onerror=alert(9)>",
    "![x](javascript:alert(10))",
    '![y](x" onerror="alert(11))',
    "<body onload=alert(12)>",
    '"><img src=x onerror=alert(13)>',
    "<style>*{background:url(javascript:alert(14))}</style>",
    "`<img src=x onerror=alert(15)>`",
    "```html\n<img src=x onerror=alert(16)>\n```",
    "<input autofocus onfocus=alert(17)>",
    '<a href="&#106;avascript:alert(18)">encoded</a>',
    "[a](&#x6A;avascript:alert(19))",
    "<form><button formaction=javascript:alert(20)>x</button></form>",
    "<noscript><p title=\"</noscript><img src=x onerror=alert(21)>\">",
    "[ref]\n\n[ref]: javascript:confirm(22)",
    "<object data=\"javascript:prompt(23)\"></object>",
    "<a href=\"data:text/html,<script>alert(24)</script>\">data</a>",
]

NAMES = ["<img src=x onerror=alert(101)>", "<svg onload=alert(102)>", '"><script>alert(103)</script>']


def assert_clean(page) -> None:
    page.wait_for_timeout(200)        # give an injected handler (onerror, onload, autofocus) time to fire
    bad = injected_elements(page)
    assert not bad, f"injected elements in the DOM: {bad}"
    page.problems.check()


def test_payloads_in_messages_names_and_model_output(page):
    sid = new_session(page)
    set_setting(page, "max_response_tokens", 12)
    set_select(page, "#turn-order", "manual")         # user messages get no reply: quick

    # Session name.
    rename_session(page, NAMES[0])
    assert page.locator("#session-title").text_content() == NAMES[0]
    assert page.locator(f".session-row[data-id='{sid}'] .session-name").text_content() == NAMES[0]

    # Participant names: the user and three bots.
    open_settings(page)
    rename_participant(page, 0, NAMES[2])
    rename_participant(page, 1, NAMES[1])
    add_bot(page, NAMES[0])
    assert [p["name"] for p in app_state(page)["session"]["participants"]] == [NAMES[2], NAMES[1], NAMES[0]]

    # Message text, one payload per message.
    for text in PAYLOADS:
        send(page, text, replies=0)
    msgs = shown_messages(page)
    assert len(msgs) == len(PAYLOADS) and all(m["author"] == NAMES[2] for m in msgs)
    assert msgs[0]["text"] == PAYLOADS[0] and msgs[1]["text"] == PAYLOADS[1]    # shown as text
    assert_clean(page)

    # Model output: a real reply from the bot named like a payload, then edited into payloads.
    page.select_option("#next-speaker", NAMES[0])
    page.click("#bot-turn")
    msgs = wait_idle(page, len(PAYLOADS) + 1)
    assert msgs[-1]["role"] == "bot" and msgs[-1]["author"] == NAMES[0]
    rev = revision(page)
    message_action(page, len(msgs) - 1, "edit")
    page.locator(".edit-area").fill("\n\n".join(PAYLOADS))
    page.click(".edit-save")
    wait_revision_above(page, rev)
    msgs = wait_idle(page)
    last = page.locator("#message-list .msg").last
    assert last.locator(".msg-author").text_content() == NAMES[0]
    assert "<script>alert(2)</script>" in msgs[-1]["text"]
    links = last.locator(".msg-body a")
    for i in range(links.count()):
        href = links.nth(i).get_attribute("href")
        assert href is None or not href.strip().lower().startswith(("javascript:", "data:")), href
    assert_clean(page)

    # A streamed reply carrying a payload split across deltas (as a model could write it).
    st = app_state(page)["session"]
    frames = [{"type": "stream.start", "id": None, "session": sid, "message_id": "evil1", "author": NAMES[1],
               "parent": st["active_leaf"], "continue": False}]
    frames += [{"type": "stream.delta", "id": None, "session": sid, "message_id": "evil1", "text": t}
               for t in ["Sure: <img src=x ", "onerror=alert(201)> and <scr", "ipt>alert(202)</script> ",
                         "[x](javascript:alert(203)) <svg onload=alert(204)>"]]
    for f in frames:
        page.evaluate("(f) => window.exllamaChat.transport.onFrame(JSON.stringify(f))", f)
    page.wait_for_function("() => document.querySelector('.msg[data-id=\"evil1\"] .msg-body')?.textContent.includes('svg')")
    assert "<img src=x onerror=alert(201)>" in page.locator(".msg[data-id='evil1'] .msg-body").text_content()
    assert_clean(page)

    # A server error is shown as text in a toast.
    page.evaluate("(m) => window.exllamaChat.transport.onFrame(JSON.stringify({type: 'error', id: null, code: 'internal',"
                  " message: m}))", PAYLOADS[0])
    page.locator(".toast .toast-text", has_text=PAYLOADS[0]).wait_for()
    assert_clean(page)

    # Everything again after a reload (rendered from the saved session).
    page.reload()
    wait_connected(page)
    wait_idle(page)
    assert len(shown_messages(page)) == len(PAYLOADS) + 1
    open_settings(page)
    assert page.locator("#participants .p-name").nth(2).input_value() == NAMES[0]
    assert_clean(page)


def test_payloads_in_an_imported_session(page, live_server, tmp_path):
    sid = new_session(page)
    set_setting(page, "max_response_tokens", 12)
    send(page, "Hello.")
    data = json.loads(page.evaluate("(id) => fetch(`/api/sessions/${id}/export`).then(r => r.text())", sid))
    data["name"] = NAMES[1]
    data["participants"][0]["name"] = NAMES[0]
    data["participants"][1]["name"] = NAMES[2]
    data["participants"][1]["persona"] = PAYLOADS[1]
    data["fixed_prompt"] = PAYLOADS[0]
    msgs = data["messages"]
    for m in (msgs.values() if isinstance(msgs, dict) else msgs):
        m["author"] = NAMES[0] if m["role"] == "user" else NAMES[2]
        m["text"] = "\n\n".join(PAYLOADS[:12] if m["role"] == "user" else PAYLOADS[12:])
    path = tmp_path / "evil.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    page.set_input_files("#import-file", str(path))
    page.wait_for_function("(n) => window.exllamaChat.state.session?.name === n", arg=NAMES[1])
    msgs = wait_idle(page)
    assert [m["author"] for m in msgs] == [NAMES[0], NAMES[2]]
    open_settings(page)
    assert page.input_value("#fixed-prompt") == PAYLOADS[0]
    assert_clean(page)
    # The trash list shows names too.
    page.locator(f".session-row[data-id='{app_state(page)['session']['id']}'] [aria-label='Delete (to the trash)']").click(force=True)
    page.wait_for_function("(n) => window.exllamaChat.state.trash.some(s => s.name === n)", arg=NAMES[1])
    page.locator("#trash summary").click()
    assert page.locator("#trash-list .trash-name", has_text=NAMES[1]).count() >= 1
    assert_clean(page)
