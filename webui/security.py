"""Request checks and response headers: Host allow-list (DNS rebinding), Origin check (cross-site
websocket hijacking, CSRF), the optional password, and the security headers.

All checks run in `before_request`, i.e. before flask-sock upgrades a websocket (a check inside the
route would come after the 101). The password is kept only as a salted hash; the login cookie carries a
tag derived from it, so changing the password logs everyone out.
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import threading
import time
from pathlib import Path

from flask import current_app, jsonify, redirect, request, session, url_for

_HOST_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253})(?::(\d{1,5}))?")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]", "::1"}
SECRET_FILE = ".webui_secret_key"
PUBLIC_ENDPOINTS = {"pages.login"}


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (what --host may bind without a password)."""
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def secret_key(folder: str | os.PathLike | None) -> bytes:
    """The key that signs the login cookie: kept in the sessions folder (mode 0600) so logins survive a
    restart; a fresh random one without a folder."""
    if folder is None:
        return secrets.token_bytes(32)
    path = Path(os.path.expanduser(os.fspath(folder))) / SECRET_FILE
    try:
        data = path.read_bytes().strip()
        if re.fullmatch(rb"[0-9a-f]{64}", data):
            return bytes.fromhex(data.decode())
    except OSError:
        pass
    from sessions import atomic_write
    key = secrets.token_bytes(32)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, key.hex().encode() + b"\n")
    os.chmod(path, 0o600)
    return key


def password_tag(app) -> str:
    """What a logged-in cookie holds: an HMAC of the password hash under the secret key."""
    return hmac.new(app.secret_key if isinstance(app.secret_key, bytes) else app.secret_key.encode(),
                    app.config["_PASSWORD_HASH"], hashlib.sha256).hexdigest()


def check_password(app, given: str) -> bool:
    salt = app.config["_PASSWORD_SALT"]
    digest = hashlib.pbkdf2_hmac("sha256", given.encode("utf-8", "surrogatepass"), salt, 100_000)
    return hmac.compare_digest(digest, app.config["_PASSWORD_HASH"])


class LoginThrottle:
    """At most `limit` failed logins per `window` seconds (whole server)."""

    def __init__(self, limit: int = 10, window: float = 60.0):
        self.limit, self.window = limit, window
        self._fails: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()

    def blocked(self) -> bool:
        with self._lock:
            now = time.monotonic()
            while self._fails and now - self._fails[0] > self.window:
                self._fails.popleft()
            return len(self._fails) >= self.limit

    def failed(self) -> None:
        with self._lock:
            self._fails.append(time.monotonic())


def _host_ok(app) -> bool:
    m = _HOST_RE.fullmatch(request.host or "")
    if m is None:
        return False
    if app.config.get("ALLOW_ANY_HOST"):
        return True
    return m.group(1).lower() in LOOPBACK_NAMES or is_loopback(m.group(1))


def _origin_ok() -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True    # not a browser (browsers always send Origin on websockets and cross-site POSTs)
    return origin in (f"http://{request.host}", f"https://{request.host}")


def _deny(status: int, code: str, message: str):
    resp = jsonify({"error": {"code": code, "message": message}})
    resp.status_code = status
    return resp


def _is_websocket() -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket" or request.path == "/ws"


def before_request():
    app = current_app
    applies, api_check = app.extensions.get("exllama.api_gate", (None, None))
    if applies is not None and applies(request.path):
        return api_check()   # the API's own rules: keys instead of the login cookie
    if not _host_ok(app):
        return _deny(403, "forbidden", "unexpected Host header")
    unsafe = request.method not in ("GET", "HEAD", "OPTIONS")
    if (unsafe or _is_websocket()) and not _origin_ok():
        return _deny(403, "forbidden", "cross-origin request refused")
    if app.config.get("_PASSWORD_HASH") and request.endpoint not in PUBLIC_ENDPOINTS:
        if not hmac.compare_digest(str(session.get("auth", "")), password_tag(app)):
            if _is_websocket() or request.path.startswith("/api/"):
                return _deny(401, "unauthorized", "log in first")
            return redirect(url_for("pages.login"))
    return None


def after_request(resp):
    host = request.host if _HOST_RE.fullmatch(request.host or "") else "localhost"
    resp.headers["Content-Security-Policy"] = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src 'self' ws://{host} wss://{host}; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'self'; object-src 'none'")
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Cross-Origin-Opener-Policy"] = "same-origin"
    if request.endpoint != "static":
        resp.headers.setdefault("Cache-Control", "no-store")
    return resp


def init_app(app) -> None:
    pw = app.config.get("PASSWORD")
    if pw:
        salt = secrets.token_bytes(16)
        app.config["_PASSWORD_SALT"] = salt
        app.config["_PASSWORD_HASH"] = hashlib.pbkdf2_hmac("sha256", pw.encode("utf-8", "surrogatepass"), salt,
                                                           100_000)
        app.config["PASSWORD"] = True   # the clear text is not kept
    app.extensions["exllama.login_throttle"] = LoginThrottle()
    app.before_request(before_request)
    app.after_request(after_request)
