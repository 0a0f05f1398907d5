"""Probe: can the prompt's dequantization run beside cuBLAS's GEMM on a separate SM partition (green contexts)?

    python tools/probe/green_overlap.py [--side 8,12,16,24]

Per 7B gate|up shape (1920 x 4096 @ 4096 x 22016, 32 MiB slices): the current serial loop (ops.q4_matmul), then a
pipeline with two slice buffers: slice i+1 dequantized on a stream of an N-SM green context while slice i's GEMM runs
on a stream of the rest. Prints us per call for each split, and the GEMM / dequantization alone on each partition.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cuda_ext import ops  # noqa: E402
from tools.bench_prompt_gemm import time_ms  # noqa: E402


def time_us(fn, reps=10):
    return time_ms(fn, reps) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", default="8,12,16,24")
    args = ap.parse_args()
    from torch.cuda.green_contexts import GreenContext
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    M, K, N, W = 1920, 4096, 22016, 4096
    x = torch.randn(M, K, device=dev).half()
    qw = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device=dev)
    sc = (torch.rand(K // 128, N, device=dev) * 0.002 + 0.003).half()
    of = (-sc.float() * 8).half()
    out = torch.empty(M, N, device=dev).half()
    print(f"{torch.cuda.get_device_name()}, {sms} SMs, torch {torch.__version__}")
    print(f"serial (ops.q4_matmul): {time_us(lambda: ops.q4_matmul(x, qw, sc, of, None, out=out)):.0f} us")
    slices = [(c, min(W, N - c)) for c in range(0, N, W)]
    bufs = [torch.empty(K * W, device=dev).half() for _ in range(2)]
    main_s = torch.cuda.current_stream()

    def pipeline(gemm_s, deq_s):
        ev_deq = [torch.cuda.Event() for _ in slices]
        ev_mm = [torch.cuda.Event() for _ in slices]
        start = torch.cuda.Event()
        start.record(main_s)
        gemm_s.wait_event(start)
        deq_s.wait_event(start)

        def deq(i):
            c, w = slices[i]
            with torch.cuda.stream(deq_s):
                if i >= 2:
                    deq_s.wait_event(ev_mm[i - 2])          # its buffer's last reader
                ops.q4_dequant(qw[:, c:c + w], sc[:, c:c + w], of[:, c:c + w], out=bufs[i % 2][:K * w].view(K, w))
                ev_deq[i].record(deq_s)
        deq(0)
        for i, (c, w) in enumerate(slices):
            if i + 1 < len(slices):
                deq(i + 1)
            with torch.cuda.stream(gemm_s):
                gemm_s.wait_event(ev_deq[i])
                torch.mm(x, bufs[i % 2][:K * w].view(K, w), out=out[:, c:c + w])
                ev_mm[i].record(gemm_s)
        main_s.wait_stream(gemm_s)
        main_s.wait_stream(deq_s)

    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    print(f"two plain streams: {time_us(lambda: pipeline(s1, s2)):.0f} us")
    for side in [int(s) for s in args.side.split(",")]:
        try:
            g_side = GreenContext.create(num_sms=side, device_id=0)
            g_main = GreenContext.create(num_sms=sms - side, device_id=0)
            ss, sm_ = g_side.Stream(), g_main.Stream()
        except Exception as e:                               # noqa: BLE001
            print(f"side {side}: green contexts failed: {e!r}")
            continue
        t = time_us(lambda: pipeline(sm_, ss))
        ref = torch.empty_like(out)
        ops.q4_matmul(x, qw, sc, of, None, out=ref)
        pipeline(sm_, ss)
        torch.cuda.synchronize()
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()

        def gemm_only():
            with torch.cuda.stream(sm_):
                torch.mm(x, bufs[0].view(K, W), out=out[:, :W])
            main_s.wait_stream(sm_)

        def deq_only():
            with torch.cuda.stream(ss):
                ops.q4_dequant(qw[:, :W], sc[:, :W], of[:, :W], out=bufs[1].view(K, W))
            main_s.wait_stream(ss)
        print(f"side {side} SMs / main {sms - side}: pipeline {t:.0f} us (rel diff vs serial {err:.1e}); "
              f"one 4096-wide GEMM on main {time_us(gemm_only):.1f} us, one slice dequantized on side "
              f"{time_us(deq_only):.1f} us")
    print(f"one 4096-wide GEMM, whole GPU: {time_us(lambda: torch.mm(x, bufs[0].view(K, W), out=out[:, :W])):.1f} us; "
          f"one slice dequantized, whole GPU: "
          f"{time_us(lambda: ops.q4_dequant(qw[:, :W], sc[:, :W], of[:, :W], out=bufs[1].view(K, W))):.1f} us")


if __name__ == "__main__":
    main()
