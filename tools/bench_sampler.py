#!/usr/bin/env python
"""Time one decode step of `model.sampler.Sampler.sample` (ms/step, median of N).

    python tools/bench_sampler.py [--steps 200] [--vocab 128256 49152] [--device cpu] [--threads N]

Logits are Zipf-like (logit = -1.1 * ln(rank) + noise, shuffled), i.e. peaked like a real LM's,
batch 1, with a 256-token history for the penalties. Rows: the default settings (temperature 0.8,
top_k 50, top_p 0.9, min_p 0.05, repetition penalty 1.1), greedy, and a few extra configurations.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model.sampler import Sampler, SamplerSettings  # noqa: E402

CONFIGS = {
    "default (t0.8 k50 p0.9 minp0.05 rep1.1)": SamplerSettings(),
    "greedy": SamplerSettings.greedy(),
    "greedy + rep1.1": SamplerSettings.greedy(repetition_penalty=1.1),
    "top_p 0.9 only (no top_k)": SamplerSettings(top_k=0),
    "min_p 0.05 only": SamplerSettings(top_k=0, top_p=1.0),
    "typical 0.9 (no top_k)": SamplerSettings(top_k=0, top_p=1.0, min_p=0.0, typical=0.9),
    "mirostat v2": SamplerSettings(mirostat=True),
}


def make_logits(v: int, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, v + 1, dtype=torch.float32)
    x = -1.1 * ranks.log() + 0.3 * torch.randn(v, generator=g)
    return x[torch.randperm(v, generator=g)].unsqueeze(0).to(device)


def bench(settings: SamplerSettings, logits: torch.Tensor, history: torch.Tensor, steps: int) -> float:
    sm = Sampler(settings, seed=0)
    sync = torch.cuda.synchronize if logits.is_cuda else (lambda: None)
    for _ in range(20):
        sm.sample(logits, history)
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        tok = sm.sample(logits, history)
        int(tok[0])  # the generator needs the token on the host anyway
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--vocab", type=int, nargs="+", default=[128256, 49152])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"median of {args.steps} steps, batch 1, history 256 tokens")
    width = max(len(k) for k in CONFIGS)
    for v in args.vocab:
        logits = make_logits(v, args.device)
        history = torch.randint(0, v, (1, 256), generator=torch.Generator().manual_seed(1)).to(args.device)
        print(f"\nV = {v}")
        for name, s in CONFIGS.items():
            print(f"  {name:<{width}}  {bench(s, logits, history, args.steps):7.3f} ms/step", flush=True)


if __name__ == "__main__":
    main()
