"""The page survives a server restart: it shows that it is offline, reconnects by itself with
backoff, re-reads the open session, and never writes a stale local copy over the server's one
(edits made while offline are sent only where the server's value did not move meanwhile).

Uses a server without a model (it starts in seconds); nothing here generates."""
from __future__ import annotations

import pytest

import webui_helpers
from page_helpers import (CHROMIUM, app_state, new_page, new_session, open_settings, rename_session,  # noqa: F401
                          require_browser, set_number, shown_messages, wait_idle)
from webui_helpers import LiveServer


@pytest.fixture
def server(tmp_path):
    require_browser()
    srv = LiveServer(tmp_path / "sessions", model=False, log_path=tmp_path / "server.log").start(timeout=60)
    yield srv
    srv.stop()


def restart_on_same_port(srv, monkeypatch) -> None:
    port = srv.port
    monkeypatch.setattr(webui_helpers, "free_port", lambda: port)
    srv.start(timeout=60)


def test_reconnects_after_restart_and_keeps_the_servers_copy(server, monkeypatch):
    from playwright.sync_api import sync_playwright
    from sessions import SessionStore
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        page = new_page(browser, server)
        try:
            sid = new_session(page)
            rename_session(page, "Before the restart")
            set_number(page, "#set-temperature", 0.7)
            page.fill("#input", "Typed but not sent")

            server.stop()
            page.wait_for_selector("#conn-status:not([hidden])")
            assert "Reconnecting" in page.locator("#conn-status").text_content()
            assert page.locator("#send").is_disabled()

            # Offline edits: the fixed prompt and top-p. Meanwhile the file changes on disk
            # (another program, a restored backup): a new fixed prompt, same top-p.
            open_settings(page)
            page.fill("#fixed-prompt", "Typed while offline")
            page.locator("#fixed-prompt").blur()
            page.fill("#set-top_p", "0.5")
            page.locator("#set-top_p").press("Tab")
            store = SessionStore(server.sessions_dir)
            s = store.load(sid)
            s.fixed_prompt = "Changed on disk"
            s.name = "Renamed on disk"
            store.save(s)
            disk_revision = s.revision

            restart_on_same_port(server, monkeypatch)
            page.wait_for_function("() => window.exllamaChat.state.connected"
                                   " && window.exllamaChat.state.session?.name === 'Renamed on disk'", timeout=30_000)
            assert page.locator("#conn-status").is_hidden()
            # The server's fixed prompt wins; the untouched top-p edit is applied on top of it.
            page.wait_for_function("() => window.exllamaChat.state.session.settings.top_p === 0.5")
            snap = app_state(page)["session"]
            assert snap["fixed_prompt"] == "Changed on disk" and snap["settings"]["temperature"] == 0.7
            assert snap["revision"] == disk_revision + 1
            assert page.input_value("#fixed-prompt") == "Changed on disk"
            page.locator(".toast", has_text="fixed prompt changed in another window").wait_for()
            on_disk = SessionStore(server.sessions_dir).load(sid)
            assert on_disk.fixed_prompt == "Changed on disk" and on_disk.settings["top_p"] == 0.5
            # The unsent text is still in the box, and the session list is back.
            assert page.input_value("#input") == "Typed but not sent"
            assert any(x["id"] == sid for x in app_state(page)["sessions"])
            assert shown_messages(page) == [] and wait_idle(page) == []
            page.problems.check()
        finally:
            page.context.close()
            browser.close()
