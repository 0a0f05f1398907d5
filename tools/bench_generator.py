#!/usr/bin/env python
"""Decode overhead of `model.generator.Generator` against a bare forward loop (CPU by default).

    python tools/bench_generator.py [-d DIR] [--tokens 128] [--runs 5] [--threads N] [--dtype float32]
                                    [--weight-dtype auto|float32|bfloat16]

Three measurements, each the median of --runs:
  bare       prefill, then `tokens` x (argmax, forward one token): the model alone
  generator  Generator.generate with the same model, max_new_tokens = tokens + 1, stop strings on,
             EOS off: the time from the first delta to the last covers the same `tokens` forwards
             plus sampling, streaming detokenisation, stop-string checks and the Delta objects
  replay     the generator on a stand-in model that returns recorded logits instantly: the
             generator's own cost per step, free of the forward pass and its noise
Overhead is reported as (generator - bare) / bare per token, and replay / bare-step. Runs alternate
between bare and generator so that a busy machine hurts both alike.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model.config import RuntimeConfig  # noqa: E402
from model.generator import GenerationSettings, Generator  # noqa: E402
from model.loader import load  # noqa: E402
from model.sampler import SamplerSettings  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]
STOPS = ["\nUser:", "</story>", "###"]


def bare_loop(model, ids: list[int], n: int) -> tuple[float, list[torch.Tensor]]:
    """Seconds for n decode steps (argmax + forward) after the prefill; the logits seen."""
    cache = model.new_cache(1, len(ids) + n + 1)
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), cache)[:, -1]
        seen = [logits]
        t0 = time.perf_counter()
        for _ in range(n):
            tok = int(logits.argmax(-1))
            logits = model(torch.tensor([[tok]]), cache)[:, -1]
            seen.append(logits)
        return time.perf_counter() - t0, seen


def gen_loop(gen: Generator, ids: list[int], n: int, sampler: SamplerSettings) -> float:
    """Seconds from the first delta to the last: n forwards plus the generator's work."""
    s = GenerationSettings(sampler, max_new_tokens=n + 1, stop_strings=STOPS, stop_on_eos=False)
    gen.reset()  # same prefill as the bare loop, no cache reuse
    t_first = None
    for d in gen.generate(ids, s):
        if t_first is None:
            t_first = time.perf_counter()
    assert d.finish_reason == "length", d.finish_reason
    return time.perf_counter() - t_first


class _Cache:
    def __init__(self, max_seq_len):
        self.length, self.max_seq_len, self.k, self.v = 0, max_seq_len, [], []

    def truncate(self, n):
        self.length = n

    def reset(self):
        self.length = 0


class Replay:
    """A stand-in model: returns recorded logits, no compute."""

    def __init__(self, model, logits: list[torch.Tensor], prompt_len: int):
        self.runtime = SimpleNamespace(max_seq_len=prompt_len + len(logits) + 8)
        self.logits, self.P, self.model = logits, prompt_len, model
        self.ops, self.head_device = model.ops, model.head_device     # the generator's CPU sampler, as for the model

    def new_cache(self, batch_size=1, max_seq_len=None):
        return _Cache(max_seq_len or self.runtime.max_seq_len)

    def __call__(self, input_ids, cache=None, last_only=True, lora=None, pad=None):
        cache.length += input_ids.shape[1]
        i = min(max(cache.length - self.P, 0), len(self.logits) - 1)
        return self.logits[i].unsqueeze(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-d", "--directory", default=None, help="model (default: the embedded SmolLM2-135M)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="activations")
    ap.add_argument("--weight-dtype", default="auto", help="CPU weight storage (auto: bf16 where native)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load(args.directory, RuntimeConfig(device=args.device, dtype=args.dtype,
                                                          weight_dtype=args.weight_dtype, max_seq_len=1024))
    ids = tok.encode(tok.apply_chat_template(PROMPT)) if tok.chat_template else tok.encode("Once upon a time,")
    n = args.tokens
    gen = Generator(model, tok, max_seq_len=len(ids) + n + 8)
    configs = {"greedy": SamplerSettings.greedy(),
               "default sampler (t0.8 k50 p0.9 minp0.05 rep1.1)": SamplerSettings(seed=0)}
    wdt = next((str(m.weight.dtype).replace("torch.", "") for m in model.modules()
                if getattr(m, "weight", None) is not None and getattr(m.weight, "dim", lambda: 0)() == 2), "?")
    print(f"model {os.path.basename(getattr(model, 'source', '?'))}, {args.device}, activations {args.dtype}, "
          f"weights {wdt}, {torch.get_num_threads()} threads, "
          f"prompt {len(ids)} tokens, {n} decode steps, median of {args.runs}")

    bare_loop(model, ids, 8)  # warm-up
    gen_loop(gen, ids, 8, configs["greedy"])
    bare, gens = [], {k: [] for k in configs}
    recorded = None
    for _ in range(args.runs):
        for name, ss in configs.items():
            t, recorded = bare_loop(model, ids, n)
            bare.append(t)
            gens[name].append(gen_loop(gen, ids, n, ss))
    b = statistics.median(bare) / n
    print(f"  bare forward loop           {1 / b:8.2f} t/s   {b * 1e3:7.2f} ms/token")
    replay_gen = Generator(Replay(model, recorded, len(ids)), tok)
    for name, ss in configs.items():
        g = statistics.median(gens[name]) / n
        reps = [gen_loop(replay_gen, ids, n, ss) for _ in range(max(3, args.runs))]
        r = statistics.median(reps) / n
        print(f"  generator, {name}")
        print(f"    end to end                {1 / g:8.2f} t/s   {g * 1e3:7.2f} ms/token   "
              f"overhead {100 * (g - b) / b:+6.2f} %")
        print(f"    generator work only       {r * 1e6:8.0f} us/token              "
              f"= {100 * r / b:5.2f} % of a bare decode step")


if __name__ == "__main__":
    main()
