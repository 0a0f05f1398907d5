"""The websocket endpoint `/ws`: receive -> validate -> dispatch -> send, nothing else.

Requests that generate run in a thread of their own (one per connection at a time), so the loop keeps
reading: `chat.stop` and reads are served while a reply streams. A client that goes away does not stop
its generation; the reply is finished and saved, and other tabs of the session keep watching it.
"""
from __future__ import annotations

import json
import logging
import threading

from flask import Blueprint, current_app, request
from flask_sock import Sock

from . import handlers
from .hub import Connection
from .protocol import GENERATING, ProtocolError, error_message, parse

log = logging.getLogger("webui")
bp = Blueprint("ws", __name__)
sock = Sock()


def _run_job(conn: Connection, msg: dict) -> None:
    try:
        for out in handlers.dispatch(conn, msg):
            if out.get("id") == msg["id"] and out["type"] in ("reply", "error"):
                conn.job = None   # before the client hears "done" and sends its next request
            conn.push(out)
    finally:
        conn.job = None


@sock.route("/ws", bp=bp)
def websocket(ws):  # pragma: no cover - exercised by the live-server tests
    services = current_app.extensions["exllama"]
    send_lock = threading.Lock()

    def send(msg: dict) -> None:
        data = json.dumps(msg, ensure_ascii=False, allow_nan=False)
        with send_lock:
            ws.send(data)

    conn = Connection(services, push=send, remote=request.remote_addr or "")
    services.hub.connect(conn)
    try:
        send(handlers.hello(services))
        while True:
            data = ws.receive()
            if data is None:
                continue
            try:
                msg = parse(data)
            except ProtocolError as e:
                send(error_message(e))
                continue
            if msg["type"] in GENERATING:
                if conn.job is not None:
                    send({"type": "error", "id": msg["id"], "code": "busy",
                          "message": "this connection already runs a generation"})
                    continue
                conn.job = threading.Thread(target=_run_job, args=(conn, msg), daemon=True,
                                            name=f"webui-job-{conn.id}")
                conn.job.start()
            else:
                for out in handlers.dispatch(conn, msg):
                    send(out)
    finally:
        services.hub.disconnect(conn)
