"""Probe: what the CPU GEMV's int8 activations cost in perplexity and what two levels cost in speed.

    python tools/probe/cpu_act_levels.py [--windows 8] [--runs 5]

Perplexity (Botchan, windows of 512) of the embedded model with every row through the GEMV (the decode path's
numerics) against the prompt path (fp32 GEMM on the dequantized weights, exact activations): per layer type with one
int8 level (the others exact), then whole models with one or two levels per layer type. Speed: greedy decode
(128 tokens) of the same configurations interleaved in one process, median of --runs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from model import cpu_decode  # noqa: E402
from model.config import RuntimeConfig  # noqa: E402
from model.loader import load  # noqa: E402
from model.ops import Ops  # noqa: E402
from model.perplexity import perplexity  # noqa: E402


def layer_types(model):
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        yield "qkv", a.qkv
        yield "o", a.o_proj
        yield "gate_up", m.gate_up
        yield "down", m.down_proj
    yield "head", model.lm_head


def set_levels(model, levels: dict):
    for name, lin in layer_types(model):
        lin.packed.levels = levels[name]
    model.cpu_decoder = cpu_decode.build(model)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    model, tok = load(None, RuntimeConfig(device="cpu", dtype="float32", max_seq_len=1024), progress=False)
    ids = tok.encode((ROOT / "data" / "botchan.txt").read_text(encoding="utf-8"))
    names = ["qkv", "o", "gate_up", "down", "head"]
    exact = perplexity(model, ids, 512, args.windows, progress=False)
    print(f"prompt path (exact activations): {exact:.4f}")
    orig = Ops.cpu_matmul
    shapes = {name: (lin.packed.K, lin.packed.N) for name, lin in layer_types(model)}
    set_levels(model, dict.fromkeys(names, 1))
    for name in names:
        def one_type(self, x, cw, *a, _shape=shapes[name], **k):
            self.CPU_GEMV_MAX_ROWS = 1 << 30 if (cw.K, cw.N) == _shape else 0
            return orig(self, x, cw, *a, **k)
        Ops.cpu_matmul = one_type
        p = perplexity(model, ids, 512, args.windows, progress=False)
        print(f"one int8 level in {name} only: {p:.4f} ({(p / exact - 1) * 100:+.3f}%)", flush=True)
    Ops.cpu_matmul = orig
    configs = {"one level everywhere": dict.fromkeys(names, 1),
               "two levels in q|k|v": {**dict.fromkeys(names, 1), "qkv": 2},
               "two levels in the 4-bit layers (default)": {**dict.fromkeys(names, 2), "head": 1},
               "two levels everywhere": dict.fromkeys(names, 2)}
    model.ops.CPU_GEMV_MAX_ROWS = 1 << 30
    for name, levels in configs.items():
        set_levels(model, levels)
        p = perplexity(model, ids, 512, args.windows, progress=False)
        print(f"{name}: {p:.4f} ({(p / exact - 1) * 100:+.3f}%)", flush=True)
    model.ops.CPU_GEMV_MAX_ROWS = Ops.CPU_GEMV_MAX_ROWS
    prompt = torch.tensor([tok.encode("Once upon a time, in a small village by the sea,")])
    speeds = {name: [] for name in configs}
    for _ in range(args.runs):
        for name, levels in configs.items():
            set_levels(model, levels)
            cache = model.new_cache()
            logits = model(prompt, cache)
            t0 = time.perf_counter()
            for _ in range(128):
                logits = model(logits[:, -1].argmax(-1, keepdim=True), cache)
            speeds[name].append(128 / (time.perf_counter() - t0))
    for name, v in speeds.items():
        print(f"{name}: decode {statistics.median(v):.1f} t/s (median of {args.runs})")


if __name__ == "__main__":
    main()
