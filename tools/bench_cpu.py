"""CPU decode speed of the embedded model: our engine against transformers on the same machine.

    python tools/bench_cpu.py [--tokens 128] [--runs 3]

Both decode greedily with a KV cache after the same short prompt; figures are the median of
--runs runs. Our engine runs with its default CPU settings (bf16 weight storage where the CPU
has native bf16, fp32 activations) and, for reference, with fp32 weights.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import RuntimeConfig  # noqa: E402
from model.embedded import embedded_gguf_path  # noqa: E402
from model.loader import load  # noqa: E402

PROMPT = "Once upon a time, in a small village by the sea,"


def ours(weight_dtype: str, n: int) -> float:
    model, tok = load(None, RuntimeConfig(device="cpu", dtype="float32", weight_dtype=weight_dtype),
                      progress=False)
    ids = torch.tensor([tok.encode(PROMPT)])
    cache = model.new_cache()
    logits = model(ids, cache)
    t0 = time.perf_counter()
    for _ in range(n):
        logits = model(logits[:, -1].argmax(-1, keepdim=True), cache)
    return n / (time.perf_counter() - t0)


def transformers_speed(n: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    p = Path(embedded_gguf_path())
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    m = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        m.generate(ids, max_new_tokens=4, do_sample=False)
        t0 = time.perf_counter()
        out = m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        dt = time.perf_counter() - t0
    return (out.shape[1] - ids.shape[1]) / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    rows = [("ours (bf16 weights)", lambda: ours("auto", args.tokens)),
            ("ours (fp32 weights)", lambda: ours("float32", args.tokens)),
            ("transformers fp32", lambda: transformers_speed(args.tokens))]
    print(f"threads: {torch.get_num_threads()}, tokens: {args.tokens}, runs: {args.runs}")
    results = {}
    for name, fn in rows:
        results[name] = statistics.median(fn() for _ in range(args.runs))
        print(f"{name:24s} {results[name]:7.1f} t/s", flush=True)
    ratio = results["ours (bf16 weights)"] / results["transformers fp32"]
    print(f"speed-up over transformers: {ratio:.2f}x")


if __name__ == "__main__":
    main()
