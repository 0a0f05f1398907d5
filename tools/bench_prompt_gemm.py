"""Time the prompt path's GEMMs: the fused Hopper GEMM (q4_wgmma) against dequant + cuBLAS per 7B layer
shape; with --cublas also cuBLAS fp16 at the slice widths the dequant loop uses and the dequant path at
several slice sizes.

    python tools/bench_prompt_gemm.py [-m 1920] [--cublas] [--slices 24,32,48,64]

Fused: per shape the dequant + cuBLAS time (32 MiB slices), the fused GEMM at its chosen token tile and at
every tile, in us and TFLOP/s, and its relative difference from the cuBLAS path (row layout, as the model).
--cublas: TFLOP/s for x [M, K] @ w [K, n] over n (wave quantization of cuBLAS's tiles shows as dips), then
per 7B layer shape the q4_matmul prompt time per slice size.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cuda_ext import ops  # noqa: E402

SHAPES = [("qkv", 4096, 12288), ("o", 4096, 4096), ("gate|up", 4096, 22016), ("down", 11008, 4096)]


def time_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", type=int, default=1920, help="prompt rows")
    ap.add_argument("--slices", default="24,32,48,64", help="dequant slice sizes to try, MiB")
    ap.add_argument("--cublas", action="store_true", help="also the cuBLAS sweeps and slice sizes")
    args = ap.parse_args()
    dev, M = torch.device("cuda"), args.m
    print(f"{torch.cuda.get_device_name()}; M = {M}")
    fused(M, dev)
    if args.cublas:
        cublas(M, dev, args.slices)


def random_layer(K: int, N: int, dev):
    qw = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device=dev)
    sc = (torch.rand(K // 128, N, device=dev) * 0.002 + 0.003).half()
    return qw, sc, (-sc.float() * 8).half()


def fused(M: int, dev):
    if not ops.wgmma_plan(M, 128)[0]:
        print("fused GEMM: not available on this device / build")
        return
    total = {"cublas": 0.0, "fused": 0.0}
    for name, K, N in SHAPES:
        x = torch.randn(M, K, device=dev, dtype=torch.float16)
        qw, sc, of = random_layer(K, N, dev)
        out = torch.empty(M, N, device=dev, dtype=torch.float16)
        flop = 2 * M * K * N
        ref = ops.q4_matmul(x, qw, sc, of, prompt_bn=-1)
        ms_ref = time_ms(lambda: ops.q4_matmul(x, qw, sc, of, out=out, prompt_bn=-1))
        auto = ops.wgmma_plan(M, N)[0]
        y = ops.q4_matmul(x, qw, sc, of, prompt_bn=0)
        diff = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
        row = []
        for bn in (64, 128, 192, 240, 256):
            ms = time_ms(lambda: ops.q4_matmul(x, qw, sc, of, out=out, prompt_bn=bn))
            row.append(f"{bn}{'*' if bn == auto else ''}: {1e3 * ms:.0f} us {flop / ms / 1e9:.0f}")
            if bn == auto:
                total["fused"] += ms
        total["cublas"] += ms_ref
        print(f"{name} {K}x{N}: dequant+cuBLAS {1e3 * ms_ref:.0f} us ({flop / ms_ref / 1e9:.0f} TFLOP/s); "
              f"fused (tile: us TFLOP/s, * chosen) " + "; ".join(row) + f"; rel diff {diff:.2e}")
    print(f"a layer: dequant+cuBLAS {1e3 * total['cublas']:.0f} us, fused {1e3 * total['fused']:.0f} us")


def cublas(M: int, dev, slices_arg: str):
    for K in (4096, 11008):
        x = torch.randn(M, K, device=dev, dtype=torch.float16)
        w = torch.randn(K, 22016, device=dev, dtype=torch.float16)
        row = []
        for n in list(range(512, 4097, 256)) + [5504, 8192, 11008, 22016]:
            y = torch.empty(M, n, device=dev, dtype=torch.float16)
            wn = w[:, :n]
            ms = time_ms(lambda: torch.mm(x, wn, out=y))
            row.append(f"{n}:{2 * M * K * n / ms / 1e9:.0f}")
        print(f"cuBLAS K={K} TFLOP/s by n: " + " ".join(row))
    slices = [int(s) for s in slices_arg.split(",")]
    default = ops.DEQUANT_SLICE_BYTES
    for name, K, N in SHAPES:
        x = torch.randn(M, K, device=dev, dtype=torch.float16)
        qw, sc, of = random_layer(K, N, dev)
        out = torch.empty(M, N, device=dev, dtype=torch.float16)
        row = []
        for mb in slices:
            ops.DEQUANT_SLICE_BYTES = mb << 20
            ms = time_ms(lambda: ops.q4_matmul(x, qw, sc, of, None, out=out))
            row.append(f"{mb} MiB: {1e3 * ms:.0f} us ({2 * M * K * N / ms / 1e9:.0f} TFLOP/s)")
        ops.DEQUANT_SLICE_BYTES = default
        print(f"q4 prompt {name} {K}x{N}: " + "; ".join(row))


if __name__ == "__main__":
    main()
