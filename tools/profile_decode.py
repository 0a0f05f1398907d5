"""Where a decode step's GPU time goes: kernel times of captured decode steps (torch.profiler).

    python tools/profile_decode.py [-d DIR] [--context 100] [--steps 20] [--eager] [--prefill T] [--timeline]

Prefills `--context` random tokens, then profiles `--steps` graph replays (or the same static step run
eagerly with --eager) and prints each kernel's count, mean and share of the GPU time, plus the
step time the GPU was busy for. Inside graphs kernels launched early (programmatic dependent launch)
count their wait for the previous kernel; --eager times them alone. --prefill T profiles one forward
of T tokens (the prompt path) instead. --timeline adds where the GPU sat idle: the wall time against the
union of kernel intervals, and the largest gaps by the pair of kernels around them (host-bound stretches
show up as gaps).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import RuntimeConfig  # noqa: E402
from model.graph import GraphDecoder  # noqa: E402
from model.loader import load  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-d", "--directory", default=None)
    ap.add_argument("-l", "--length", type=int, default=2048)
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eager", action="store_true", help="run the static step without capturing it")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--prefill", type=int, default=0, help="profile one forward of this many tokens instead")
    ap.add_argument("--ops", action="store_true", help="also list torch ops (what launched the kernels) by GPU time")
    ap.add_argument("--timeline", action="store_true", help="also report idle gaps between kernels")
    args = ap.parse_args()
    model, _ = load(args.directory, RuntimeConfig(max_seq_len=args.length), progress=False, tokenizer=False)
    cache = model.new_cache()
    model(torch.randint(0, model.cfg.vocab_size, (1, args.context), device=model.device), cache)
    dec = GraphDecoder(model, cache, use_graphs=not args.eager)
    ids = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    start = cache.length
    for i in range(3):        # greedy steps as benchmark.py times them: the argmax inside the captured step
        dec.greedy(ids if i == 0 else None)
    cache.truncate(start)
    torch.cuda.synchronize()
    if args.prefill:
        prompt = torch.randint(0, model.cfg.vocab_size, (1, args.prefill), device=model.device)
        pcache = model.new_cache()
        model(prompt, pcache)                             # warm-up at this length
        args.steps = 1
    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.ops else [])
    def run():
        if args.prefill:
            pcache.reset()
            model(prompt, pcache)
        else:
            for i in range(args.steps):
                dec.greedy(ids if i == 0 else None)
            cache.truncate(start)

    if args.timeline:     # wall time without the profiler, and how long the host took to queue the work
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            ev[0].record()            # the GPU is idle: it passes this event as soon as it is queued
            run()
            ev[1].record()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            print(f"wall {1e3 * (t2 - t0) / args.steps:.3f} ms per step, host queued it in "
                  f"{1e3 * (t1 - t0) / args.steps:.3f} ms, GPU from first to last event "
                  f"{ev[0].elapsed_time(ev[1]) / args.steps:.3f} ms")
    with profile(activities=acts) as prof:
        run()
        torch.cuda.synchronize()
    if args.timeline:
        timeline(prof, args.steps, args.rows)
    if args.ops:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    rows = []
    for e in prof.key_averages():
        if args.ops and getattr(e, "device_type", None) == torch.autograd.DeviceType.CPU:
            continue
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.count:
            rows.append((t, e.count, e.key))
    total = sum(r[0] for r in rows)
    rows.sort(reverse=True)
    print(f"{'kernel':80s} {'calls/step':>10s} {'mean us':>9s} {'share':>6s}")
    for t, n, key in rows[:args.rows]:
        print(f"{key[:80]:80s} {n / args.steps:10.1f} {t / n:9.2f} {100 * t / total:5.1f}%")
    what = f"prefill of {args.prefill} tokens" if args.prefill else ("eager" if args.eager else "graph")
    print(f"GPU busy per step: {total / args.steps / 1000:.3f} ms ({what}, context {args.context}, "
          f"{model.cfg.num_hidden_layers} layers)")


def timeline(prof, steps: int, rows: int):
    """Idle time between the profiled kernels: span, busy (union of kernel intervals), the largest gaps."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.loads(Path(f.name).read_text())
    ks = sorted((e for e in trace["traceEvents"] if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    if not ks:
        print("no kernel events in the trace")
        return
    busy, gaps, end, last = 0.0, defaultdict(lambda: [0, 0.0]), ks[0]["ts"], ks[0]["name"]
    added = defaultdict(lambda: [0, 0.0])      # how far each kernel pushed the end of the work out
    for e in ks:
        s, t = e["ts"], e["ts"] + e["dur"]
        if s > end:
            g = gaps[(last[:45], e["name"][:45])]
            g[0] += 1
            g[1] += s - end
        busy += max(0.0, t - max(s, end))
        a = added[e["name"][:80]]
        a[0] += 1
        a[1] += max(0.0, t - end)
        if t > end:
            end, last = t, e["name"]
    span = end - ks[0]["ts"]
    print(f"kernels {len(ks) / steps:.0f} a step; span {span / steps:.1f} us a step, GPU busy {busy / steps:.1f} us "
          f"({100 * busy / span:.1f}%), idle {(span - busy) / steps:.1f} us")
    print(f"{'time added to the end of the work by kernel (overlap with the previous excluded)':80s} "
          f"{'calls/step':>10s} {'us/call':>8s} {'us/step':>8s}")
    for name, (n, t) in sorted(added.items(), key=lambda kv: -kv[1][1])[:rows]:
        print(f"{name:80s} {n / steps:10.1f} {t / n:8.2f} {t / steps:8.1f}")
    print(f"{'idle gaps: after':47s} {'before':47s} {'count':>6s} {'total us':>9s}")
    for (a, b), (n, t) in sorted(gaps.items(), key=lambda kv: -kv[1][1])[:rows]:
        print(f"{a:47s} {b:47s} {n:6d} {t:9.1f}")


if __name__ == "__main__":
    main()
