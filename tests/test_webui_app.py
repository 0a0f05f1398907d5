"""The Flask app: factory, pages, JSON API, security checks and headers, login (flask test client;
the live websocket is covered by test_webui_live.py)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from webui_helpers import ROOT, fake_services

WS_HEADERS = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
              "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


def make_app(tmp_path, **config):
    from webui import create_app
    engine = fake_services(tmp_path).engine
    return create_app({"SESSIONS_DIR": str(tmp_path / "sessions"), **config}, engine=engine)


@pytest.fixture
def app(tmp_path):
    return make_app(tmp_path)


@pytest.fixture
def client(app):
    return app.test_client()


def test_import_has_no_side_effects():
    code = ("import sys, webui, webui.app, webui.handlers, webui.ws; "
            "print('torch' in sys.modules, 'model.loader' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_engine_lives_in_extensions(app):
    services = app.extensions["exllama"]
    assert services.engine is not None and services.engine.name == "fake"
    assert services.store.root.name == "sessions"


def test_page_and_security_headers(client):
    r = client.get("/")
    assert r.status_code == 200
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert "default-src 'self'" in csp and "connect-src 'self' ws://localhost wss://localhost" in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["X-Frame-Options"] == "DENY"
    api = client.get("/api/model")
    assert api.json["name"] == "fake" and api.headers["Cache-Control"] == "no-store"
    assert "nosniff" == api.headers["X-Content-Type-Options"]


@pytest.mark.parametrize("host", ["evil.example", "evil.example:5000", "127.0.0.1.evil.example", "bad host"])
def test_foreign_host_refused(client, host):
    assert client.get("/", headers={"Host": host}).status_code in (400, 403)
    assert client.get("/ws", headers={"Host": host, **WS_HEADERS}).status_code in (400, 403)


@pytest.mark.parametrize("host", ["localhost:5000", "127.0.0.1:5000", "[::1]:5000", "127.0.0.2"])
def test_loopback_hosts_allowed(client, host):
    assert client.get("/api/model", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://localhost:1234", "https://localhost.evil"])
def test_websocket_upgrade_with_wrong_origin_refused(client, origin):
    r = client.get("/ws", headers={"Host": "localhost:5000", "Origin": origin, **WS_HEADERS})
    assert r.status_code == 403


def test_api_sessions_export_import(client, app):
    store = app.extensions["exllama"].store
    s = store.create("My <chat>/../x")
    listing = client.get("/api/sessions").json
    assert [r["id"] for r in listing["sessions"]] == [s.id] and listing["trash"] == []
    r = client.get(f"/api/sessions/{s.id}/export")
    assert r.status_code == 200 and r.mimetype == "application/json"
    assert r.headers["Content-Disposition"].startswith('attachment; filename="My _chat__.._x.json"')
    s2 = store.create("Чат 🎉")
    r2 = client.get(f"/api/sessions/{s2.id}/export")
    assert r2.status_code == 200 and "filename*=UTF-8''%D0%A7%D0%B0%D1%82%20_.json" in r2.headers["Content-Disposition"]
    store.delete(s2.id)
    data = r.data
    r = client.post("/api/sessions/import", data=data, content_type="application/json")
    assert r.status_code == 201 and r.json["session"] != s.id
    assert store.load(r.json["session"]).name == s.name
    # hostile imports and ids
    assert client.post("/api/sessions/import", data=data, content_type="text/plain").status_code == 415
    assert client.post("/api/sessions/import", data=b"{nope", content_type="application/json").status_code == 400
    r = client.post("/api/sessions/import", data=json.dumps({"schema": 1}), content_type="application/json")
    assert r.status_code == 400 and r.json["error"]["code"] == "bad_request"
    big = b'{"a": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    assert client.post("/api/sessions/import", data=big, content_type="application/json").status_code == 413
    assert client.get("/api/sessions/..%2F..%2Fetc%2Fpasswd/export").status_code == 404
    assert client.get("/api/sessions/" + "0" * 32 + "/export").status_code == 404
    # cross-site POST refused even with the right content type
    r = client.post("/api/sessions/import", data=data, content_type="application/json",
                    headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    assert client.get("/api/sessions/import").status_code == 405   # no state-changing GET


def test_corrupt_file_listed_over_http(client, app):
    store = app.extensions["exllama"].store
    p = store.root / ("ab" * 16 + ".json")
    p.write_bytes(b"\xff\xfe garbage")
    rows = client.get("/api/sessions").json["sessions"]
    assert rows[0]["error"] and p.read_bytes() == b"\xff\xfe garbage"
    assert client.get(f"/api/sessions/{'ab' * 16}/export").status_code == 409


def test_password_login_flow(tmp_path):
    app = make_app(tmp_path, PASSWORD="s3cret pw")
    c = app.test_client()
    assert app.config["PASSWORD"] is True                      # the clear text is not kept
    r = c.get("/")
    assert r.status_code == 302 and r.headers["Location"].endswith("/login")
    assert c.get("/api/sessions").status_code == 401
    assert c.get("/ws", headers={"Host": "localhost", **WS_HEADERS}).status_code == 401
    assert c.get("/static/x.js").status_code in (302, 401)
    page = c.get("/login")
    assert page.status_code == 200 and b'type="password"' in page.data and b"<script" not in page.data
    assert c.post("/login", data={"password": "wrong"}).status_code == 401
    r = c.post("/login", data={"password": "s3cret pw"})
    assert r.status_code == 302
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert c.get("/api/sessions").status_code == 200 and c.get("/").status_code == 200
    # the secret key is kept (0600) in the sessions folder, so a restart keeps the login
    key = tmp_path / "sessions" / ".webui_secret_key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert c.post("/logout").status_code == 302 and c.get("/api/sessions").status_code == 401


def test_login_throttled(tmp_path):
    app = make_app(tmp_path, PASSWORD="pw")
    app.extensions["exllama.login_throttle"].limit = 3
    c = app.test_client()
    codes = [c.post("/login", data={"password": "x"}).status_code for _ in range(4)]
    assert codes == [401, 401, 401, 429]
    assert c.post("/login", data={"password": "pw"}).status_code == 429


def test_same_secret_key_after_restart(tmp_path):
    a, b = make_app(tmp_path), make_app(tmp_path)
    assert a.secret_key == b.secret_key and len(a.secret_key) == 32


def test_refuses_public_bind_without_password():
    out = subprocess.run([sys.executable, "webui/app.py", "--host", "0.0.0.0", "--no-model"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--password" in out.stderr
