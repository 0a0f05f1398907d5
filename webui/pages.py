"""The page (templates/index.html, assets from static/) and, with a password, the login form."""
from __future__ import annotations

import time

from flask import Blueprint, current_app, redirect, render_template, request, session, url_for
from jinja2 import TemplateNotFound
from markupsafe import escape

from . import security
from .handlers import model_info

bp = Blueprint("pages", __name__)

_LOGIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Log in</title></head>
<body><main><h1>ExLlama chat</h1>
<form method="post" action="{action}">
<label>Password <input type="password" name="password" autocomplete="current-password" autofocus required></label>
<button type="submit">Log in</button></form>
<p>{message}</p></main></body></html>
"""

_FALLBACK = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ExLlama chat</title></head>
<body><p>Model: {model}. The page (templates/index.html) is not installed; the websocket is at /ws.</p></body></html>
"""


@bp.get("/")
def index():
    info = model_info(current_app.extensions["exllama"])
    try:
        return render_template("index.html", model=info, ws_url="/ws",
                               auth=bool(current_app.config.get("_PASSWORD_HASH")))
    except TemplateNotFound:
        return _FALLBACK.format(model=escape(info.get("name") or "none"))


@bp.route("/login", methods=["GET", "POST"])
def login():
    app = current_app
    if not app.config.get("_PASSWORD_HASH"):
        return redirect(url_for("pages.index"))
    message, status = "", 200
    if request.method == "POST":
        throttle = app.extensions["exllama.login_throttle"]
        if throttle.blocked():
            message, status = "Too many failed attempts; wait a minute.", 429
        else:
            given = request.form.get("password", "")
            if isinstance(given, str) and len(given) <= 1024 and security.check_password(app, given):
                session.clear()
                session["auth"] = security.password_tag(app)
                session.permanent = True
                return redirect(url_for("pages.index"))
            throttle.failed()
            time.sleep(0.3)
            message, status = "Wrong password.", 401
    return _LOGIN.format(action=escape(url_for("pages.login")), message=escape(message)), status


@bp.post("/logout")
def logout():
    session.clear()
    return redirect(url_for("pages.login"))
