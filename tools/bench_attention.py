"""Time the decode attention kernel (single query over the KV cache) on model shapes.

    python tools/bench_attention.py [--splits 0,1,2,4,8] [--layers 32] [--shapes 135M,7B]

Each row: one model shape (batch 1), a key bucket kv_len and the query position; microseconds per call
from a CUDA graph of back-to-back calls over `--layers` separate caches (as the decode step runs them,
with programmatic dependent launch), for the automatic split plan (0) and fixed split counts, with and
without the rotary + KV-write prologue (the 135M model's path; the 7B shape's is without).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cuda_ext import build, ops  # noqa: E402

SHAPES = [("135M", 9, 3, 64), ("7B", 32, 32, 128), ("13B", 40, 40, 128)]   # (name, H, Hkv, D)
CASES = [(256, 40), (256, 100), (512, 400), (2048, 2000)]                  # (kv_len, pos)


def time_graph(fn, calls: int, replays: int = 20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(replays):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return 1e3 * a.elapsed_time(b) / replays / calls


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", default="0,1,2,4,8,16")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--shapes", default=",".join(n for n, *_ in SHAPES), help="of " + ", ".join(n for n, *_ in SHAPES))
    args = ap.parse_args()
    dev = torch.device("cuda")
    ext = build.load()
    S = 2048
    print(f"{torch.cuda.get_device_name()}; us per call, {args.layers} caches")
    for name, H, Hkv, D in (sh for sh in SHAPES if sh[0] in args.shapes.split(",")):
        kc = [torch.randn(1, Hkv, S, D, device=dev).half() for _ in range(args.layers)]
        vc = [torch.randn(1, Hkv, S, D, device=dev).half() for _ in range(args.layers)]
        q = torch.randn(1, 1, H, D, device=dev).half()
        k = torch.randn(1, 1, Hkv, D, device=dev).half()
        v = torch.randn(1, 1, Hkv, D, device=dev).half()
        cos = torch.randn(4096, D // 2, device=dev)
        sin = torch.randn(4096, D // 2, device=dev)
        out = torch.empty(1, 1, H, D, device=dev, dtype=torch.float16)
        for kv_len, p in CASES:
            pos = torch.tensor([p], device=dev)
            for rope in (False, True):
                row = []
                for sp in (int(x) for x in args.splits.split(",")):
                    plan = ext.decode_attention_plan(1, Hkv, H // Hkv, D, kv_len, 0, sp)

                    def fn():
                        for i in range(args.layers):
                            ops.decode_attention(q, kc[i], vc[i], pos, kv_len, out=out, splits=sp,
                                                 rope=(k, v, cos, sin) if rope else None)
                    us = time_graph(fn, args.layers)
                    threads = f", {plan[3]} threads" if plan[3] != 128 else ""
                    row.append(f"{'auto' if sp == 0 else sp}({plan[0]}x{plan[1]}{threads}): {us:.2f}")
                print(f"{name} kv_len {kv_len} pos {p}{' rope' if rope else ''}: " + "  ".join(row))


if __name__ == "__main__":
    main()
