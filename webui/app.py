"""Run the chat server.

    python webui/app.py [-d MODEL] [--host 127.0.0.1] [--port 5000] [--sessions-dir ~/exllama_sessions]
                        [--password PW] [--threads 32] [--no-model] [engine options: -l, --device, ...]
                        [--no-api] [--api-key KEY] [--remote URL [--remote-key KEY] [--remote-model NAME]]

Served by gunicorn (one gthread worker: the model lives in that one process; each open websocket holds
a thread, so --threads bounds the number of clients). The worker loads the model before it serves
anything (progress on stderr; loading after the fork keeps CUDA and OpenMP out of the master), then
prints the URL. Binding beyond loopback requires --password (or EXLLAMA_WEBUI_PASSWORD).
The OpenAI-compatible API (/v1, docs/api.md) is on unless --no-api; with --remote the chat uses a remote
OpenAI-compatible server instead of loading a model.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _fix_path() -> None:
    """Running as `python webui/app.py` puts webui/ first on sys.path (its modules would shadow
    others) and leaves the repository root off it."""
    here = Path(__file__).resolve().parent
    root = here.parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


def build_parser() -> argparse.ArgumentParser:
    from benchmark import add_engine_args
    ap = argparse.ArgumentParser(description="ExLlama chat server", epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    ap.add_argument("--sessions-dir", default="~/exllama_sessions", help="where sessions are stored")
    ap.add_argument("--password", default=os.environ.get("EXLLAMA_WEBUI_PASSWORD"),
                    help="require this password (required when --host is not a loopback address; "
                         "also read from EXLLAMA_WEBUI_PASSWORD)")
    ap.add_argument("--threads", type=int, default=32, help="worker threads = concurrent clients (default 32)")
    ap.add_argument("--no-model", action="store_true", help="serve sessions without loading a model")
    ap.add_argument("--no-api", action="store_true", help="do not serve the OpenAI-compatible API (/v1)")
    ap.add_argument("--api-key", default=os.environ.get("EXLLAMA_API_KEY"),
                    help="require `Authorization: Bearer KEY` on /v1 (also read from EXLLAMA_API_KEY); "
                         "with --password and no key the API refuses every request")
    ap.add_argument("--remote", metavar="URL", default=None,
                    help="use a remote OpenAI-compatible server (e.g. http://127.0.0.1:5000/v1) instead of a model")
    ap.add_argument("--remote-key", default=os.environ.get("EXLLAMA_REMOTE_KEY"),
                    help="API key of the remote server (also read from EXLLAMA_REMOTE_KEY)")
    ap.add_argument("--remote-model", default=None, help="model name on the remote server (default: its first)")
    return ap


def check_args(ap: argparse.ArgumentParser, args) -> None:
    from webui.security import is_loopback
    if not 1 <= args.port <= 65535:
        ap.error("--port must be 1..65535")
    if args.threads < 4:
        ap.error("--threads must be at least 4")
    if not is_loopback(args.host) and not args.password:
        ap.error(f"--host {args.host} is reachable from other machines: set --password (or bind 127.0.0.1)")
    if args.remote:
        from urllib.parse import urlsplit
        if args.no_model:
            ap.error("--remote and --no-model exclude each other")
        if urlsplit(args.remote).scheme not in ("http", "https") or not urlsplit(args.remote).hostname:
            ap.error(f"--remote must be an http(s) URL, got {args.remote!r}")
    elif not args.no_model:
        from model.config import ModelError
        from model.loader import resolve
        try:
            resolve(args.directory)
        except (ModelError, FileNotFoundError) as e:
            ap.error(str(e))


def url_for_bind(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def make_factory(args):
    """The app factory gunicorn's worker calls (after the fork): load the model, build the app."""
    def factory():
        from webui import create_app
        engine = None
        if args.remote:
            from webui.remote import RemoteEngine
            engine = RemoteEngine(args.remote, api_key=args.remote_key, model=args.remote_model)
            info = engine.info()
            print(f"Remote model: {info['name']} at {info['remote']} (context {engine.remote_max_seq_len}, "
                  f"constrained choice {'yes' if info['constrained_choice'] else 'no'})", file=sys.stderr, flush=True)
        elif not args.no_model:
            from webui.engine import Engine
            print("Loading the model ...", file=sys.stderr, flush=True)
            engine = Engine.from_args(args)
            info = engine.info()
            print(f"Model: {info['name']} ({info['device']}, {info['dtype']}, context {info['max_seq_len']})",
                  file=sys.stderr, flush=True)
        config = {"SESSIONS_DIR": args.sessions_dir, "PASSWORD": args.password,
                  "ALLOW_ANY_HOST": not is_loopback_host(args.host),
                  "SESSION_COOKIE_NAME": f"exllama_webui_{args.port}",
                  "API_ENABLED": not getattr(args, "no_api", False), "API_KEY": getattr(args, "api_key", None)}
        app = create_app(config, engine)
        print(f"Serving at {url_for_bind(args.host, args.port)}", flush=True)
        return app
    return factory


def is_loopback_host(host: str) -> bool:
    from webui.security import is_loopback
    return is_loopback(host)


def serve(args) -> None:
    from gunicorn.app.base import BaseApplication

    bind = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
    options = {
        "bind": [bind], "workers": 1, "worker_class": "gthread", "threads": args.threads,
        "timeout": 0,              # model loading and long streams must not trip the worker timeout
        "graceful_timeout": 5, "keepalive": 5, "control_socket_disable": True,
        "accesslog": None, "errorlog": "-", "loglevel": "warning", "proc_name": "exllama-webui",
        "preload_app": False,
    }

    class Server(BaseApplication):
        def load_config(self):
            for k, v in options.items():
                self.cfg.set(k, v)

        def load(self):
            return make_factory(args)()

    Server().run()


def main(argv=None) -> None:
    _fix_path()
    ap = build_parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    serve(args)


if __name__ == "__main__":
    main()
