"""Speed where the user is: the chat page's websocket and /v1 against the engine's own greedy decode, one model.

    python tools/bench_chat.py [-d DIR] [--device cpu] [--tokens 200] [--runs 3] [engine options of webui/app.py]

1. engine: `tokens` greedy tokens with a KV cache in this process (the benchmark's decode figure);
2. chat page: the real server (`webui/app.py`, a process of its own) and a real websocket client: a new session with
   its default settings (only max_response_tokens = tokens and break_on_newline off, so that the reply runs its
   length), one message; tokens/s as
   the page shows it (stream.end's tokens_per_s) and as the client saw it (tokens over the time from the first
   delta to stream.end);
3. /v1/chat/completions streamed through the official `openai` client with the API's default sampling, max_tokens =
   tokens: tokens over the time from the first chunk to the last.
--runs rounds of the three in turn (a round's chat reply shorter than half the tokens, at EOS, is tried again in a
new session); the median of each round's ratio to its engine figure. Needs the test requirements (websocket-client,
openai).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle. Take your time."


def load_engine(args):
    import torch
    from model.config import RuntimeConfig
    from model.loader import load
    model, tok = load(args.directory, RuntimeConfig(device=args.device, max_seq_len=2048), progress=False)
    return model, torch.tensor([tok.encode(PROMPT)], device=model.device)


def engine_decode(model, ids, n: int) -> float:
    """n greedy tokens after the prompt, in this process (the server waits meanwhile)."""
    cache = model.new_cache()
    logits = model(ids, cache)
    t0 = time.perf_counter()
    for _ in range(n):
        logits = model(logits[:, -1].argmax(-1, keepdim=True), cache)
    logits.cpu()
    return n / (time.perf_counter() - t0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, folder: Path, extra: list[str]):
    port = free_port()
    log = open(folder / "server.log", "wb")
    cmd = [sys.executable, "webui/app.py", "--port", str(port), "--sessions-dir", str(folder / "sessions"),
           "--device", args.device] + (["-d", args.directory] if args.directory else []) + extra
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {(folder / 'server.log').read_text()[-2000:]}")
        if b"Serving at" in (folder / "server.log").read_bytes():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return proc, port
            except OSError:
                pass
        time.sleep(0.2)
    raise RuntimeError("the server did not start in 600 s")


def chat_page(port: int, n: int) -> tuple[float, float, int]:
    """One reply in a new session: (the page's tokens/s, the client's tokens/s, tokens)."""
    import websocket
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws", timeout=600)
    seq = iter(range(1, 1 << 30))

    def request(type_, **fields):
        rid = f"b{next(seq)}"
        ws.send(json.dumps({"type": type_, "id": rid, **fields}))
        out = []
        while True:
            m = json.loads(ws.recv())
            if m.get("id") == rid:
                out.append(m)
                if m["type"] in ("reply", "error"):
                    if m["type"] == "error":
                        raise RuntimeError(f"{type_}: {m}")
                    return out

    assert json.loads(ws.recv())["type"] == "hello"
    out = request("session.create", name="bench")
    sid = out[-1]["session"]
    rev = [m for m in out if m["type"] == "state"][-1]["session"]["revision"]
    out = request("session.update", session=sid, revision=rev,
                  changes={"settings": {"max_response_tokens": n, "break_on_newline": False}})
    rev = [m for m in out if m["type"] == "state"][-1]["session"]["revision"]
    rid = "send"
    ws.send(json.dumps({"type": "chat.send", "id": rid, "session": sid, "revision": rev, "text": PROMPT}))
    first = end = None
    while end is None:
        m = json.loads(ws.recv())
        if m.get("id") != rid:
            continue
        if m["type"] == "stream.delta" and first is None:
            first = time.perf_counter()
        elif m["type"] == "stream.end":
            end = m
            t_end = time.perf_counter()
        elif m["type"] == "error":
            raise RuntimeError(f"chat.send: {m}")
    ws.close()
    client = (end["tokens"] - 1) / (t_end - first) if first and end["tokens"] > 1 else 0.0
    return end["tokens_per_s"] or 0.0, client, end["tokens"]


def api_stream(port: int, n: int) -> tuple[float, int]:
    from openai import OpenAI
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    model = client.models.list().data[0].id
    first = last = None
    chunks = 0
    usage = None
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=n, stream=True, stream_options={"include_usage": True})
    for ev in stream:
        if ev.usage is not None:
            usage = ev.usage
        if ev.choices and ev.choices[0].delta.content:
            chunks += 1
            last = time.perf_counter()
            first = first or last
    tokens = usage.completion_tokens if usage is not None else chunks
    return ((tokens - 1) / (last - first) if first and last > first else 0.0), tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-d", "--directory", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    args, extra = ap.parse_known_args()
    sys.path.insert(0, str(ROOT))
    model, ids = load_engine(args)
    engine_decode(model, ids, 16)                  # warm-up
    rows = {"engine": [], "page": [], "client": [], "api": []}
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_server(args, Path(tmp), extra)
        try:
            # each round: the engine alone, then a chat reply, then a /v1 stream, so that a machine whose speed
            # drifts (a shared host) moves all three alike; ratios per round
            tries = 0
            while len(rows["page"]) < args.runs:
                tries += 1
                if tries > 8 * args.runs:
                    raise SystemExit(f"no reply of {args.tokens // 2}+ tokens in {tries - 1} tries")
                eng = engine_decode(model, ids, args.tokens)
                page = chat_page(port, args.tokens)
                if page[2] < args.tokens // 2:     # a new session's raw format often ends at once (EOS)
                    continue
                api = api_stream(port, args.tokens)
                rows["engine"].append(eng)
                rows["page"].append(page[0] / eng)
                rows["client"].append(page[1] / eng)
                rows["api"].append(api[0] / eng)
                print(f"  round {len(rows['page'])}: engine {eng:.1f} t/s, page {page[0]:.1f} ({page[2]} tokens), "
                      f"/v1 {api[0]:.1f} ({api[1]} tokens)", flush=True)
        finally:
            os.killpg(proc.pid, 2)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"engine greedy decode: {med['engine']:.1f} t/s (median)")
    print(f"chat page (new session's defaults): {med['page']:.0%} of the engine shown, {med['client']:.0%} at the "
          f"client (median of the rounds' ratios)")
    print(f"/v1 streamed (openai client): {med['api']:.0%} of the engine")


if __name__ == "__main__":
    main()
