"""JSON API over HTTP, for what a websocket is bad at: downloads and uploads of session files."""
from __future__ import annotations

import json
from urllib.parse import quote

from flask import Blueprint, Response, current_app, jsonify, request

from sessions import (CorruptSessionError, InvalidIdError, SessionError, SessionFormatError,
                      SessionNotFoundError, SessionTooLargeError)

from .handlers import export_filename, model_info
from .protocol import MAX_IMPORT_BYTES

bp = Blueprint("api", __name__, url_prefix="/api")


def api_error(status: int, code: str, message: str):
    resp = jsonify({"error": {"code": code, "message": message}})
    resp.status_code = status
    return resp


def _services():
    return current_app.extensions["exllama"]


@bp.errorhandler(SessionError)
def _session_error(e):
    if isinstance(e, (SessionNotFoundError, InvalidIdError)):
        return api_error(404, "not_found", str(e))
    if isinstance(e, CorruptSessionError):
        return api_error(409, "corrupt_session", str(e))
    if isinstance(e, SessionTooLargeError):
        return api_error(413, "too_large", str(e))
    if isinstance(e, SessionFormatError):
        return api_error(400, "bad_request", str(e))
    return api_error(400, "invalid", str(e))


@bp.get("/model")
def model():
    return jsonify(model_info(_services()))


@bp.get("/sessions")
def sessions():
    store = _services().store
    return jsonify({"sessions": [i.to_dict() for i in store.list()],
                    "trash": [i.to_dict() for i in store.list_trash()]})


@bp.get("/sessions/<sid>/export")
def export(sid: str):
    store = _services().store
    data = store.export(sid)   # validates the id (InvalidIdError -> 404)
    name = export_filename(json.loads(data)["name"])
    resp = Response(data, mimetype="application/json")
    ascii_name = "".join(c if c.isascii() else "_" for c in name)
    resp.headers["Content-Disposition"] = (f'attachment; filename="{ascii_name}"; '
                                           f"filename*=UTF-8''{quote(name, safe='')}")
    return resp


@bp.post("/sessions/import")
def import_():
    if request.mimetype != "application/json":
        return api_error(415, "bad_request", "send the session as application/json")
    if request.content_length is not None and request.content_length > MAX_IMPORT_BYTES:
        return api_error(413, "too_large", f"import is larger than {MAX_IMPORT_BYTES} bytes")
    data = request.get_data(cache=False)
    if len(data) > MAX_IMPORT_BYTES:
        return api_error(413, "too_large", f"import is larger than {MAX_IMPORT_BYTES} bytes")
    services = _services()
    s = services.store.import_session(data)
    services.hub.broadcast_sessions()
    return jsonify({"session": s.id}), 201
