"""The page as served (no browser, no model): CSP-clean markup, assets that exist, and the data the
scripts read from the template. The browser tests are test_page_chat.py and test_page_xss.py."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest

from webui_helpers import ROOT


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.script_bodies: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.script_bodies.append(data)


@pytest.fixture
def app(tmp_path):
    from webui import create_app
    return create_app({"SESSIONS_DIR": str(tmp_path / "sessions"), "PASSWORD": "hunter2"}, engine=None)


def page_html(app) -> tuple[str, dict]:
    c = app.test_client()
    assert c.get("/").status_code == 302                       # the login page first
    r = c.post("/login", data={"password": "hunter2"}, headers={"Origin": "http://localhost"})
    assert r.status_code == 302
    r = c.get("/")
    assert r.status_code == 200
    return r.get_data(as_text=True), r.headers


def test_page_is_csp_clean_and_complete(app):
    html, headers = page_html(app)
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp and "unsafe-inline" not in csp
    p = Tags()
    p.feed(html)
    assert not p.script_bodies, "inline script"
    for tag, attrs in p.tags:
        assert "style" not in attrs, f"inline style on <{tag}>"
        assert not any(a.startswith("on") for a in attrs), f"inline handler on <{tag}>"
    # Every asset the page names exists (vendor files after `npm run vendor`).
    refs = [a.get("src") or a.get("href") for t, a in p.tags if t in ("script", "link")]
    for ref in refs:
        assert ref.startswith("/static/"), ref
        assert (ROOT / ref.lstrip("/")).is_file(), ref
    js = "\n".join(f.read_text(encoding="utf-8") for f in (ROOT / "static" / "js").glob("*.js"))
    for imp in set(re.findall(r'from "\.\./vendor/([\w.]+)"', js)):
        assert (ROOT / "package.json").is_file()
        if not (ROOT / "static" / "vendor" / imp).is_file():
            pytest.skip(f"static/vendor/{imp} missing: run `npm ci && npm run vendor`")
    # Ids the scripts look up, and the template data they read.
    ids = {a.get("id") for _, a in p.tags}
    for wanted in re.findall(r'byId\("([\w-]+)"\)', js):
        assert wanted in ids, f"#{wanted} is missing from templates/index.html"
    body = next(a for t, a in p.tags if t == "body")
    assert body["data-ws-url"] == "/ws" and body["data-auth"] == "true"
    assert isinstance(json.loads(body["data-model"]), dict)
    assert any(t == "form" and a.get("action") == "/logout" for t, a in p.tags)


def test_no_inner_html_outside_the_sanitiser():
    """Only markdown.js turns text into markup, and only through DOMPurify."""
    for f in (ROOT / "static" / "js").glob("*.js"):
        src = re.sub(r"/\*.*?\*/|//[^\n]*", "", f.read_text(encoding="utf-8"), flags=re.S)   # code only
        for bad in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                    "alert(", "confirm(", "prompt(", "setAttribute(\"style\"", "setAttribute('style'"):
            assert bad not in src, f"{f.name} uses {bad}"
    md = (ROOT / "static" / "js" / "markdown.js").read_text(encoding="utf-8")
    assert "DOMPurify.sanitize(" in md and "RETURN_DOM_FRAGMENT: true" in md
