"""Where a decode step's GPU time goes: kernel times of captured decode steps (torch.profiler).

    python tools/profile_decode.py [-d DIR] [--context 100] [--steps 20] [--eager] [--prefill T]

Prefills `--context` random tokens, then profiles `--steps` graph replays (or the same static step run
eagerly with --eager) and prints each kernel's count, mean and share of the GPU time, plus the
step time the GPU was busy for. Inside graphs kernels launched early (programmatic dependent launch)
count their wait for the previous kernel; --eager times them alone. --prefill T profiles one forward
of T tokens (the prompt path) instead.
"""
from __future__ import annotations

import argparse
import sys
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
    args = ap.parse_args()
    model, _ = load(args.directory, RuntimeConfig(max_seq_len=args.length), progress=False, tokenizer=False)
    cache = model.new_cache()
    model(torch.randint(0, model.cfg.vocab_size, (1, args.context), device=model.device), cache)
    dec = GraphDecoder(model, cache, use_graphs=not args.eager)
    ids = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    start = cache.length
    for _ in range(3):
        ids = dec(ids)[:, -1].argmax(-1, keepdim=True)
    cache.truncate(start)
    torch.cuda.synchronize()
    if args.prefill:
        prompt = torch.randint(0, model.cfg.vocab_size, (1, args.prefill), device=model.device)
        model(prompt, model.new_cache())                  # warm-up at this length
        args.steps = 1
    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.ops else [])
    with profile(activities=acts) as prof:
        if args.prefill:
            model(prompt, model.new_cache())
        else:
            for _ in range(args.steps):
                ids = dec(ids)[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
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


if __name__ == "__main__":
    main()
