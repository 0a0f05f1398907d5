"""The chat web app: Flask application factory (flaskr style).

    app = create_app({"SESSIONS_DIR": "/tmp/s"}, engine=Engine.load())   # or engine=None: no model

Parts: `engine.py` (model + generator behind a FIFO line), `hub.py` (live sessions, locks, watchers),
`conversation.py` (prompts, turn order, context window), `generation.py` (a streamed round of bot turns),
`protocol.py` + `handlers.py` (the websocket protocol, docs/protocol.md), `ws.py` (the socket loop),
`pages.py`, `api.py`, `security.py`; `app.py` is the command line (gunicorn). Nothing is loaded at import.
`app.extensions["exllama"]` is the `Services` object: `.engine`, `.store`, `.hub`, `.config`.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from flask import Flask

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Services:
    config: dict
    store: object
    engine: object | None
    hub: object


def create_app(config: dict | None = None, engine=None) -> Flask:
    """Build the app. `config` keys: SESSIONS_DIR (default ~/exllama_sessions), PASSWORD (None: no
    login), ALLOW_ANY_HOST (accept any Host header; set when binding beyond loopback), SECRET_KEY
    (default: kept in the sessions folder), API_ENABLED (serve the OpenAI-compatible /v1 API, default
    True), API_KEY (None: no key; see webui/openai_api.py), plus any Flask setting. `engine`: a webui.engine.Engine, or
    None to serve sessions without a model."""
    from sessions import SessionStore

    from . import api, pages, security, ws
    from .hub import Hub
    from .protocol import MAX_IMPORT_BYTES, MAX_SOCKET_MESSAGE_BYTES

    app = Flask(__name__, template_folder=str(ROOT / "templates"), static_folder=str(ROOT / "static"),
                static_url_path="/static")
    app.config.from_mapping(
        SESSIONS_DIR="~/exllama_sessions",
        PASSWORD=None,
        ALLOW_ANY_HOST=False,
        SECRET_KEY=None,
        API_ENABLED=True,
        API_KEY=None,
        MAX_CONTENT_LENGTH=MAX_IMPORT_BYTES + 64 * 1024,
        SESSION_COOKIE_NAME="exllama_webui",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=timedelta(days=30),
        SOCK_SERVER_OPTIONS={"max_message_size": MAX_SOCKET_MESSAGE_BYTES, "ping_interval": 25},
    )
    if config:
        app.config.from_mapping(config)
    store = SessionStore(app.config["SESSIONS_DIR"])
    if not app.config["SECRET_KEY"]:
        app.config["SECRET_KEY"] = security.secret_key(store.root)
    security.init_app(app)
    app.extensions["exllama"] = Services(config=app.config, store=store, engine=engine, hub=Hub(store, engine))
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(ws.bp)
    if app.config["API_ENABLED"]:
        from . import openai_api
        openai_api.init_app(app)      # /v1: its own access check instead of the page's
    ws.sock.init_app(app)
    return app
