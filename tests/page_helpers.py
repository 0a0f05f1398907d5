"""Browser tests of the chat page: fixtures and helpers (Playwright, sync API, Debian's chromium).

The live server (tests/webui_helpers.LiveServer, the embedded model on the CPU) is started once per
test run and shared by the test_page_* modules (loading the model is the slow part); every test
makes its own sessions. Tests are skipped, with the reason, when /usr/bin/chromium or Playwright is
missing. Every page records dialogs (alert/confirm/prompt: the page never opens one, so any dialog
means injected script ran), uncaught page errors and console errors; `page` fails a test that
produced any of them.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from webui_helpers import ROOT, LiveServer

CHROMIUM = os.environ.get("EXLLAMA_CHROMIUM", "/usr/bin/chromium")
# Tests write screenshots to a scratch folder; EXLLAMA_SCREENSHOTS=1 refreshes the README's copies.
SCREENSHOTS = ROOT / "docs" / "screenshots" if os.environ.get("EXLLAMA_SCREENSHOTS") else ROOT / "test-artifacts"
VENDOR = ROOT / "static" / "vendor"
TIMEOUT_MS = int(os.environ.get("EXLLAMA_PAGE_TIMEOUT_MS", "60000"))            # a reply on 2 busy cores can take a while; most waits end far sooner

_shared: dict = {}


def require_browser() -> None:
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright==1.65.2)")
    missing = [f for f in ("marked.js", "purify.js", "highlight.js") if not (VENDOR / f).is_file()]
    if missing:
        pytest.skip(f"static/vendor/ lacks {', '.join(missing)} (run `npm ci && npm run vendor`)")


class ExternalServer:
    """A server someone else started (EXLLAMA_PAGE_SERVER=http://127.0.0.1:PORT and
    EXLLAMA_PAGE_SESSIONS=its --sessions-dir): quicker edit-test cycles while working on the page."""

    def __init__(self, url: str, sessions_dir: str):
        self.url = url.rstrip("/")
        self.ws_url = "ws" + self.url[4:] + "/ws"
        self.sessions_dir = Path(sessions_dir)


@pytest.fixture(scope="module")
def live_server(tmp_path_factory, request):
    """One live server for all page tests of this run (started on first use, stopped at the end)."""
    require_browser()
    if os.environ.get("EXLLAMA_PAGE_SERVER"):
        return ExternalServer(os.environ["EXLLAMA_PAGE_SERVER"], os.environ.get("EXLLAMA_PAGE_SESSIONS", ""))
    srv = _shared.get("server")
    if srv is None or srv.proc.poll() is not None:
        root = tmp_path_factory.mktemp("page-server")
        srv = LiveServer(root / "sessions", log_path=root / "server.log").start()
        _shared["server"] = srv
        request.config.add_cleanup(srv.stop)
    return srv


@pytest.fixture(scope="module")
def browser(live_server):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM)
        try:
            yield b
        finally:
            b.close()


class PageProblems:
    """What a page did that it never should: dialogs, uncaught errors, console errors."""

    def __init__(self, page):
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("console", self._console)

    def _dialog(self, d):
        self.dialogs.append(f"{d.type}: {d.message}")
        d.dismiss()

    def _console(self, m):
        # Failed websocket handshakes while the test restarts a connection are expected noise.
        if m.type == "error" and "WebSocket" not in m.text:
            self.errors.append(f"console: {m.text}")

    def check(self) -> None:
        assert not self.dialogs, f"a dialog opened (script ran): {self.dialogs}"
        assert not self.errors, f"page errors: {self.errors}"


def new_page(browser, live_server, *, viewport=(1360, 860), color_scheme="light", **kw):
    ctx = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]}, color_scheme=color_scheme,
                              accept_downloads=True, **kw)
    ctx.set_default_timeout(TIMEOUT_MS)
    page = ctx.new_page()
    page.problems = PageProblems(page)
    page.goto(live_server.url + "/")
    wait_connected(page)
    return page


@pytest.fixture
def page(browser, live_server):
    p = new_page(browser, live_server)
    yield p
    try:
        p.problems.check()
    finally:
        p.context.close()


# ---- reading the page ----------------------------------------------------------------------------

def wait_connected(page) -> None:
    page.wait_for_function("() => window.exllamaChat && window.exllamaChat.state.connected"
                           " && window.exllamaChat.state.session")


def app_state(page) -> dict:
    """The open session's snapshot as the page holds it (plus streaming)."""
    return page.evaluate("() => { const s = window.exllamaChat.state; return {session: s.session,"
                         " generating: s.generating, sessions: s.sessions, trash: s.trash}; }")


def shown_messages(page) -> list[dict]:
    """What the conversation shows: author, role, rendered text, alternative position, classes."""
    return page.evaluate("""() => [...document.querySelectorAll('#message-list .msg')].map(m => ({
        id: m.dataset.id, role: m.dataset.role,
        author: m.querySelector('.msg-author').textContent,
        text: m.querySelector('.msg-body').innerText.trim(),
        alt: m.querySelector('.alt-pos')?.textContent ?? null,
        meta: m.querySelector('.msg-meta')?.textContent ?? null,
        streaming: m.classList.contains('streaming'),
        out: m.classList.contains('out-of-context'),
    }))""")


def wait_idle(page, messages: int | None = None, timeout_ms: int = TIMEOUT_MS) -> list[dict]:
    """Wait until nothing generates (and, if given, at least `messages` messages are shown)."""
    page.wait_for_function(
        """(n) => { const s = window.exllamaChat.state;
                    return s.session && !s.generating && !s.streaming
                      && (n === null || s.session.messages.length >= n); }""",
        arg=messages, timeout=timeout_ms)
    return shown_messages(page)


def revision(page) -> int:
    return page.evaluate("() => window.exllamaChat.state.session.revision")


def wait_revision_above(page, rev: int) -> None:
    page.wait_for_function("(r) => window.exllamaChat.state.session && window.exllamaChat.state.session.revision > r",
                           arg=rev)


# ---- doing things --------------------------------------------------------------------------------

def new_session(page) -> str:
    old = page.evaluate("() => window.exllamaChat.state.currentId")
    if not page.locator("#new-session").is_visible():
        page.click("#toggle-sidebar")            # a phone: the session list is a drawer
    page.click("#new-session")
    page.wait_for_function("(old) => { const s = window.exllamaChat.state.session; return s && s.id !== old; }",
                           arg=old)
    return page.evaluate("() => window.exllamaChat.state.session.id")


def open_settings(page) -> None:
    """Make sure the settings panel is visible (a column on wide screens, a drawer otherwise)."""
    visible = page.evaluate("""() => { const r = document.getElementById('settings').getBoundingClientRect();
        return r.width > 0 && r.left < window.innerWidth - 10 && getComputedStyle(document.getElementById('settings')).visibility === 'visible'; }""")
    if not visible:
        page.click("#toggle-settings")
        page.wait_for_timeout(300)


def set_number(page, selector: str, value) -> None:
    """Type into a number box and commit it (change event); waits for the server's new revision."""
    rev = revision(page)
    box = page.locator(selector)
    box.fill(str(value))
    box.press("Tab")
    wait_revision_above(page, rev)


def set_setting(page, key: str, value) -> None:
    open_settings(page)
    set_number(page, f"#set-{key}", value)


def set_select(page, selector: str, value: str) -> None:
    rev = revision(page)
    page.select_option(selector, value)
    wait_revision_above(page, rev)


def set_checkbox(page, selector: str, on: bool) -> None:
    box = page.locator(selector)
    if box.is_checked() != on:
        rev = revision(page)
        box.click()
        wait_revision_above(page, rev)


def send(page, text: str, wait: bool = True, replies: int = 1) -> list[dict]:
    n = len(app_state(page)["session"]["messages"])
    page.fill("#input", text)
    page.press("#input", "Enter")
    if not wait:
        return []
    try:
        page.wait_for_function("(n) => window.exllamaChat.state.session?.messages.length > n", arg=n)
    except Exception as e:
        raise AssertionError(f"message {text!r} was not sent; toasts: {page.locator('.toast').all_text_contents()}, "
                             f"input: {page.input_value('#input')!r}") from e
    return wait_idle(page, n + 1 + replies)


def add_bot(page, name: str) -> None:
    open_settings(page)
    rev = revision(page)
    page.click("#add-bot")
    wait_revision_above(page, rev)
    rename_participant(page, -1, name)


def rename_participant(page, index: int, name: str) -> None:
    rev = revision(page)
    box = page.locator("#participants .p-name").nth(index)
    box.fill(name)
    box.press("Enter")
    wait_revision_above(page, rev)


def message_action(page, index: int, action: str) -> None:
    """Click an action button (regenerate, continue, edit, rewind, branch, delete) of message `index`."""
    msg = page.locator("#message-list .msg").nth(index)
    msg.hover()
    msg.locator(f".act-{action}").click()


def rename_session(page, name: str) -> None:
    page.click("#session-title")
    box = page.locator(".title-input")
    box.fill(name)
    box.press("Enter")
    page.wait_for_function("(n) => window.exllamaChat.state.session?.name === n", arg=name)


def injected_elements(page) -> list[str]:
    """Elements no message, name or model output may create: scripts (other than the page's own),
    images, SVG (other than the page's icons), frames, objects, handlers (on* attributes),
    javascript: URLs and style attributes in rendered text."""
    return page.evaluate("""() => {
        const bad = [];
        for (const el of document.querySelectorAll('*')) {
            const tag = el.tagName.toLowerCase();
            for (const a of el.attributes) {
                if (a.name.startsWith('on')) bad.push(`${tag}[${a.name}]`);
                if (/^\\s*(javascript|vbscript|data):/i.test(a.value) && ['href', 'src', 'action', 'formaction', 'xlink:href'].includes(a.name))
                    bad.push(`${tag}[${a.name}=${a.value}]`);
            }
            if (tag === 'script' && !(el.src && el.closest('head'))) bad.push('script');
            if (['img', 'iframe', 'object', 'embed', 'video', 'audio', 'form', 'math', 'style', 'link', 'meta', 'base'].includes(tag)
                && !el.closest('head')) bad.push(tag);
            if (tag === 'svg' && !el.classList.contains('icon')) bad.push('svg');
            if (el.closest('.msg-body, .session-list, .trash-list, .msg-author, .toasts, #participants')
                && el.hasAttribute('style')) bad.push(`${tag}[style]`);
        }
        return bad;
    }""")


def save_screenshot(page, name: str, max_bytes: int = 500_000) -> Path:
    """A PNG in docs/screenshots/ (kept under `max_bytes`: retaken at a smaller scale if needed)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    page.screenshot(path=str(path))
    assert path.stat().st_size < max_bytes, f"{path} is {path.stat().st_size} bytes"
    return path


def session_file(live_server, sid: str) -> dict:
    return json.loads((Path(live_server.sessions_dir) / f"{sid}.json").read_text(encoding="utf-8"))


def until(pred, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError("condition not met in time")


__all__ = [name for name in dir() if not name.startswith("_") and name not in ("annotations", "re")]
