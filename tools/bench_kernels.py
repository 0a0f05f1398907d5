"""Time the q4 kernels on the GPU: small-M GEMV at bandwidth, dequant + cuBLAS for prompts.

    python tools/bench_kernels.py [--sweep] [--json FILE]

q4_gemm_small (M=1) on Llama-2-7B and SmolLM2-135M layer shapes: microseconds per call and achieved
GB/s (bytes of qweight + scales + offsets + x + out over the time), next to the device-to-device copy
bandwidth measured in the same run (bytes read + written). Calls are captured in a CUDA graph and
replayed (as the engine's decode step will be), rotating over enough weight sets that the L2 cache
cannot hold them; the time per call is the median over replays. Also dequant + cuBLAS at M=2048
(TFLOP/s), and cuBLAS fp16 GEMV on dense weights as a yardstick. --sweep also tries every tile width,
split count and inner-loop variant and reports the best. The short table is printed last.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cuda_ext import build, ops  # noqa: E402

DEV = torch.device("cuda")
ROTATE_BYTES = 256 << 20      # weight bytes cycled through per graph: several times the L2
MIN_CALLS = 64                # calls per graph replay
MAX_SETS = 1024               # the smallest shapes rotate through less than ROTATE_BYTES

LLAMA7B = [  # (name, K, N, group size)
    ("7B q/k/v/o 4096x4096", 4096, 4096, 128),
    ("7B qkv fused 4096x12288", 4096, 12288, 128),
    ("7B gate/up 4096x11008", 4096, 11008, 128),
    ("7B gate|up fused 4096x22016", 4096, 22016, 128),
    ("7B down 11008x4096", 11008, 4096, 128),
    ("7B lm_head q4 4096x32000", 4096, 32000, 128),
]
SMOL = [
    ("135M q/o 576x576", 576, 576, 64),
    ("135M k/v 576x192", 576, 192, 64),
    ("135M qkv fused 576x960", 576, 960, 64),
    ("135M gate/up 576x1536", 576, 1536, 64),
    ("135M gate|up fused 576x3072", 576, 3072, 64),
    ("135M down 1536x576", 1536, 576, 64),
    ("135M lm_head q4 576x49152", 576, 49152, 64),
]


def q4_layer(K, N, gs):
    G = K // gs
    qweight = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device=DEV)
    scales = (torch.rand(G, N, device=DEV) * 0.02 + 0.002).half()
    offsets = (-scales.float() * torch.randint(1, 16, (G, N), device=DEV)).half()
    return qweight, scales, offsets


def q4_bytes(K, N, gs, M=1):
    return K // 8 * N * 4 + 2 * (K // gs) * N * 2 + M * K * 2 + M * N * 2


def time_calls(calls, replays=25):
    """Median microseconds per call of `calls` (list of no-arg callables), replayed in one CUDA graph."""
    for f in calls:
        f()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / len(calls))
    del graph
    return statistics.median(times), (max(times) - min(times))


def copy_bandwidth():
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=DEV).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1000.0)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / statistics.median(times) / 1e9


def make_sets(K, N, gs):
    """Weight sets to rotate through: views into one allocation per tensor (tiny shapes need many)."""
    per = q4_bytes(K, N, gs)
    n = max(2, min(MAX_SETS, math.ceil(ROTATE_BYTES / per)))
    G = K // gs
    qweight = torch.randint(-2**31, 2**31 - 1, (n, K // 8, N), dtype=torch.int32, device=DEV)
    scales = (torch.rand(n, G, N, device=DEV) * 0.02 + 0.002).half()
    offsets = (-scales.float() * torch.randint(1, 16, (n, G, N), device=DEV)).half()
    return [(qweight[i], scales[i], offsets[i]) for i in range(n)]


def bench_q4(sets, K, N, gs, M=1, **cfg):
    x = torch.randn(M, K, device=DEV).half()
    out = torch.empty(M, N, device=DEV, dtype=torch.float16)
    passes = max(1, math.ceil(MIN_CALLS / len(sets)))
    calls = [(lambda s=s: ops.q4_gemm_small(x, *s, out=out, **cfg)) for s in sets] * passes
    us, spread = time_calls(calls)
    return us, q4_bytes(K, N, gs, M) / (us * 1e-6) / 1e9, spread


def sweep(sets, K, N, gs, ext):
    """(tn, splits, variant) at M=1 with the default PDL mode of graphs; sorted by time."""
    seen, results = set(), []
    for v in range(ext.q4_gemm_num_variants(1)):
        for tn in (32, 64, 128):
            for splits in (1, 2, 4, 8, 12, 16):
                plan = tuple(ext.q4_gemm_plan(1, K, N, K // gs, 0, tn, splits, v))
                key = (plan[0], plan[1], v)
                if plan[1] == 0 or key in seen:
                    continue
                seen.add(key)
                us, gbps, _ = bench_q4(sets, K, N, gs, tn=plan[0], splits=plan[1], variant=v)
                results.append((us, gbps, dict(tn=plan[0], splits=plan[1], variant=v)))
    results.sort(key=lambda r: r[0])
    return results


LAYER_7B = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]   # qkv, o, gate|up, down
LAYER_135M = [(576, 960), (576, 576), (576, 3072), (1536, 576)]


def compare_variants(ext, only=None):
    """Each M=1 inner-loop variant (or those named in `only`; the tensor-core kernel's are "mma:NAME")
    with its automatic plan: per 7B layer shape and as a layer chain. Random words are valid weights
    in either layout, so both kernels read the same kind of data."""
    out = {}
    kinds = [(v, ext.q4_gemm_variant_name(1, v), False) for v in range(ext.q4_gemm_num_variants(1))]
    kinds += [(v, "mma:" + ext.q4_mma_variant_name(v), True) for v in range(ext.q4_mma_num_variants())]
    for v, name, mma in kinds:
        if only and name not in only:
            continue
        per = {}
        for K, N in LAYER_7B:
            sets = make_sets(K, N, 128)
            per[f"{K}x{N}"] = round(bench_q4(sets, K, N, 128, variant=v, mma=mma)[0], 2)
            del sets
        chain7 = bench_layer_chain(LAYER_7B, 128, 4, variant=v, pdls=(-1,), mma=mma)["pdl1"]["us_per_layer"]
        chain135 = bench_layer_chain(LAYER_135M, 64, 64, variant=v, pdls=(-1,), mma=mma)["pdl1"]["us_per_layer"]
        f7 = bench_layer_chain(LAYER_7B, 128, 4, variant=v, pdls=(-1,), mma=mma, fused=True)["pdl1"]
        f135 = bench_layer_chain(LAYER_135M, 64, 64, variant=v, pdls=(-1,), mma=mma, fused=True)["pdl1"]
        out[name] = dict(shapes_us=per, layer7b_us=round(chain7, 2), layer135m_us=round(chain135, 2),
                         fused7b=f7, fused135m=f135)
        print(f"variant {name:14s} 7B layer {chain7:6.2f} us, 135M layer {chain135:5.2f} us; {per}", flush=True)
        print(f"  with the model's prologues/epilogues: 7B layer {f7['us_per_layer']:6.2f} us "
              f"{[round(u, 2) for u in f7['per_kernel_us']]}, 135M layer {f135['us_per_layer']:5.2f} us "
              f"{[round(u, 2) for u in f135['per_kernel_us']]}", flush=True)
        torch.cuda.empty_cache()
    return out


def bench_layer_chain(shapes, gs, n_layers, M=1, variant=-1, pdls=(-1, 0, 2), mma=False, fused=False):
    """A decoder layer's four q4 GEMVs back to back, several layers rotated; per PDL mode.
    fused: as the model calls them (shapes in LAYER_* order): RMSNorm prologue on q|k|v and gate|up,
    residual on o and down, SiLU-mul prologue on down; also times each kernel alone (per_kernel_us)."""
    layers = [[q4_layer(K, N, gs) for K, N in shapes] for _ in range(n_layers)]
    xs = {K: torch.randn(M, K, device=DEV).half() for K, _ in shapes}
    outs = {N: torch.empty(M, N, device=DEV).half() for _, N in shapes}
    gu = torch.randn(M, 2 * shapes[3][0], device=DEV).half()
    nw = torch.rand(shapes[0][0], device=DEV) + 0.5

    def kw(i):
        if not fused:
            return {}
        return [dict(norm_weight=nw, norm_eps=1e-5), dict(residual=outs[shapes[1][1]]), dict(norm_weight=nw, norm_eps=1e-5),
                dict(silu_up=True, residual=outs[shapes[3][1]])][i]

    def call(i, K, N, w, pdl):
        x = gu if (fused and i == 3) else xs[K]
        return lambda: ops.q4_gemm_small(x, *w, out=outs[N], pdl=pdl, variant=variant, mma=mma, **kw(i))

    per = sum(q4_bytes(K, N, gs, M) for K, N in shapes)
    reps = max(1, math.ceil(MIN_CALLS / (4 * n_layers)))
    res = {}
    for pdl in pdls:
        calls = [call(i, K, N, w, pdl) for layer in layers for i, ((K, N), w) in enumerate(zip(shapes, layer))]
        us, _ = time_calls(calls * reps)
        res[{-1: "pdl1", 0: "nopdl", 2: "pdl2"}[pdl]] = dict(us_per_layer=us * 4, gbps=per / (us * 4e-6) / 1e9)
        if fused:
            res[{-1: "pdl1", 0: "nopdl", 2: "pdl2"}[pdl]]["per_kernel_us"] = [
                time_calls([call(i, K, N, layer[i], pdl) for layer in layers] * reps * 4)[0]
                for i, (K, N) in enumerate(shapes)]
    del layers
    return res


def bench_dense_gemv(K, N):
    per = K * N * 2
    n = max(2, min(64, math.ceil(ROTATE_BYTES / per)))
    ws = [torch.randn(K, N, device=DEV).half() for _ in range(n)]
    x = torch.randn(1, K, device=DEV).half()
    out = torch.empty(1, N, device=DEV).half()
    passes = max(1, math.ceil(MIN_CALLS / n))
    us, _ = time_calls([(lambda w=w: torch.matmul(x, w, out=out)) for w in ws] * passes)
    del ws
    return us, (per + 2 * K + 2 * N) / (us * 1e-6) / 1e9


def bench_lm_head(K, N, copies=4):
    """Our fp16 GEMV (ops.dense_gemv, the decode step's LM head with its RMSNorm prologue): us a call and GB/s,
    calls chained in a graph over `copies` weight copies (each far larger than L2)."""
    ws = [torch.randn(N, K, device=DEV).half() for _ in range(copies)]
    x = torch.randn(1, K, device=DEV).half()
    nw = torch.rand(K, device=DEV) + 0.5
    out = torch.empty(1, N, device=DEV).half()
    us, _ = time_calls([(lambda w=w: ops.dense_gemv(x, w, out=out, norm_weight=nw, norm_eps=1e-5)) for w in ws] * 4)
    del ws
    return us, K * N * 2 / (us * 1e-6) / 1e9


def bench_prefill(K, N, gs, M=2048):
    qw, sc, of = q4_layer(K, N, gs)
    x = torch.randn(M, K, device=DEV).half()
    w = ops.q4_dequant(qw, sc, of)
    out = torch.empty(M, N, device=DEV).half()
    flop = 2.0 * M * K * N
    t_deq, _ = time_calls([lambda: ops.q4_dequant(qw, sc, of, out=w)] * 8)
    t_deq_mma, _ = time_calls([lambda: ops.q4_dequant(qw, sc, of, out=w, mma=True)] * 8)
    t_mm, _ = time_calls([lambda: torch.matmul(x, w, out=out)] * 8)
    t_all, _ = time_calls([lambda: ops.q4_matmul(x, qw, sc, of, out=out)] * 8)
    return dict(dequant_us=t_deq, dequant_mma_us=t_deq_mma, cublas_us=t_mm, total_us=t_all,
                cublas_tflops=flop / (t_mm * 1e-6) / 1e12, total_tflops=flop / (t_all * 1e-6) / 1e12)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="try every tile width / split / variant at M=1")
    ap.add_argument("--json", type=Path, help="write all numbers here")
    ap.add_argument("--quick", action="store_true", help="7B 4096x4096 and one SmolLM shape only")
    ap.add_argument("--lm-head", action="store_true", help="only our fp16 GEMV on LM head shapes (7B, SmolLM2)")
    ap.add_argument("--variants", nargs="*", default=None, metavar="NAME",
                    help="only compare the M=1 inner-loop variants (all, or those named)")
    args = ap.parse_args()

    ext = build.load()
    prop = torch.cuda.get_device_properties(0)
    print(f"device: {prop.name}, {prop.multi_processor_count} SMs, L2 {prop.L2_cache_size >> 20} MB; "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw:.0f} GB/s (read + write)", flush=True)

    if args.lm_head:
        for name, K, N in (("7B lm_head", 4096, 32000), ("SmolLM2 lm_head", 576, 49152)):
            us, gbps = bench_lm_head(K, N)
            print(f"{name} {K}x{N}: {us:.2f} us, {gbps:.0f} GB/s", flush=True)
        return
    if args.variants is not None:
        res = compare_variants(ext, args.variants)
        if args.json:
            args.json.write_text(json.dumps(dict(device=prop.name, copy_gbps=bw, variants=res), indent=1))
        return
    shapes = LLAMA7B + SMOL
    if args.quick:
        shapes = [LLAMA7B[0], SMOL[0]]
    report = dict(device=prop.name, copy_gbps=bw, q4=[], sweep={}, prefill=[], dense=[], rows=[])

    rows = []
    for name, K, N, gs in shapes:
        sets = make_sets(K, N, gs)
        plan = ext.q4_gemm_plan(1, K, N, K // gs, 0)
        us, gbps, spread = bench_q4(sets, K, N, gs)
        line = dict(name=name, K=K, N=N, gs=gs, us=us, gbps=gbps, spread_us=spread, pct=100 * gbps / bw,
                    plan=dict(tn=plan[0], splits=plan[1], variant=plan[4]))
        line["nopdl_us"] = bench_q4(sets, K, N, gs, pdl=0)[0]
        line["pdl2_us"] = bench_q4(sets, K, N, gs, pdl=2)[0]
        if args.sweep and (K * N >= 4096 * 4096):
            res = sweep(sets, K, N, gs, ext)
            line["best"] = dict(us=res[0][0], gbps=res[0][1], pct=100 * res[0][1] / bw, **res[0][2])
            report["sweep"][name] = [dict(us=r[0], gbps=r[1], **r[2]) for r in res]
            print(f"  sweep {name}: " + ", ".join(
                f"{r[2]['tn']}/{r[2]['splits']}/{ext.q4_gemm_variant_name(1, r[2]['variant'])}={r[0]:.1f}"
                for r in res[:10]), flush=True)
        rows.append(line)
        print(f"{name}: {us:.2f} us, {gbps:.0f} GB/s ({100 * gbps / bw:.0f}% of copy), plan tn={plan[0]} "
              f"splits={plan[1]} (spread {spread:.2f} us)", flush=True)
        del sets
        torch.cuda.empty_cache()
    report["q4"] = rows

    # More rows on one shape.
    mrows = []
    sets = make_sets(4096, 4096, 128)
    for M in (1, 2, 4, 8):
        for v in range(ext.q4_gemm_num_variants(M)):
            us, gbps, _ = bench_q4(sets, 4096, 4096, 128, M=M, variant=v)
            mrows.append(dict(M=M, variant=ext.q4_gemm_variant_name(M, v), us=us, gbps=gbps))
    del sets
    report["rows"] = mrows

    chain = {"7B": bench_layer_chain(LAYER_7B, 128, 4), "135M": bench_layer_chain(LAYER_135M, 64, 64)}
    report["chain"] = chain
    print(f"layer chains: {chain}", flush=True)

    dense = []
    for name, K, N, _ in (LLAMA7B[0], LLAMA7B[4]):
        us, gbps = bench_dense_gemv(K, N)
        dense.append(dict(name=name, us=us, gbps=gbps))
    report["dense"] = dense
    torch.cuda.empty_cache()

    pre = []
    for name, K, N, gs in (LLAMA7B[0], LLAMA7B[2], LLAMA7B[3], LLAMA7B[4]):
        r = bench_prefill(K, N, gs)
        pre.append(dict(name=name, **r))
        torch.cuda.empty_cache()
    report["prefill"] = pre

    if args.json:
        args.json.write_text(json.dumps(report, indent=1))

    print()
    print(f"== {prop.name}: D2D copy {bw:.0f} GB/s ==")
    vname = lambda v: ext.q4_gemm_variant_name(1, v)  # noqa: E731
    hdr = (f"{'q4_gemm_small M=1 (g128 7B, g64 135M)':<34} {'us':>7} {'GB/s':>6} {'%copy':>6} {'noPDL':>6} "
           f"{'PDL2':>6}  plan")
    if args.sweep:
        hdr += f"   {'best us':>7} {'%copy':>6} best cfg (tn/splits/variant)"
    print(hdr)
    for r in rows:
        s = (f"{r['name']:<34} {r['us']:7.2f} {r['gbps']:6.0f} {r['pct']:5.0f}% {r['nopdl_us']:6.2f} "
             f"{r['pdl2_us']:6.2f}  {r['plan']['tn']}/{r['plan']['splits']}/{vname(r['plan']['variant'])}")
        if "best" in r:
            b = r["best"]
            s += f"   {b['us']:7.2f} {b['pct']:5.0f}% {b['tn']}/{b['splits']}/{vname(b['variant'])}"
        print(s)
    for model, modes in chain.items():
        print(f"{model} layer (qkv+o+gate|up+down) M=1: " + ", ".join(
            f"{k} {c['us_per_layer']:.1f} us ({c['gbps']:.0f} GB/s, {100 * c['gbps'] / bw:.0f}%)" for k, c in modes.items()))
    print("4096x4096 g128 by rows: " + ", ".join(
        f"M={r['M']} {r['variant']} {r['us']:.2f} us ({r['gbps']:.0f} GB/s)" for r in mrows))
    print("cuBLAS fp16 GEMV (dense weights): " + ", ".join(f"{d['name']} {d['us']:.2f} us ({d['gbps']:.0f} GB/s)" for d in dense))
    print(f"{'prefill M=2048':<34} {'dequant us':>10} {'cuBLAS us':>9} {'total us':>9} {'cuBLAS TF/s':>11} {'total TF/s':>10}")
    for p in pre:
        print(f"{p['name']:<34} {p['dequant_us']:10.1f} {p['cublas_us']:9.1f} {p['total_us']:9.1f} "
              f"{p['cublas_tflops']:11.0f} {p['total_tflops']:10.0f}")


if __name__ == "__main__":
    main()
