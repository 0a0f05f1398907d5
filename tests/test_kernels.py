"""CUDA kernels (cuda_ext) against their torch references.

Every check draws fresh random inputs, poisons outputs with NaN first (so unwritten elements show),
and compares by relative error ||out - ref|| / ||ref|| against an fp32 reference:
  q4 products (fp16 out, fp32 sums)     < 2e-3   (M = 1: x as 12-bit integers a packed row (reg4i, the default),
                                                  or 4 fp16 products a lane summed first (reg4h))
  rms_norm / silu_mul / rotary          < 2e-3   (one fp16 rounding of the output dominates)
  q4_dequant                            bit-exact vs the fp32 reference cast to fp16
The tensor-core GEMV (mma=True, weights in the mma layout) is held to the same tolerances.
Skipped as a whole without a CUDA device or when the extension cannot build.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from cuda_ext import build  # noqa: E402

if not build.is_available():
    pytest.skip(f"extension unavailable: {build.failure_reason()}", allow_module_level=True)

from cuda_ext import ops  # noqa: E402
from model.quant import dequantize, mma_layout_ok, pack_int4, q4_matmul_ref, to_mma_layout  # noqa: E402

DEV = torch.device("cuda")
Q4_TOL = 2e-3
ELEM_TOL = 2e-3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output has NaN/inf (unwritten or overflowed elements)"
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poison(shape, dtype=torch.float16) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def make_q4(K: int, N: int, gs: int, act_order: bool = False, gen: torch.Generator | None = None):
    """Random q4 layer: every nibble random, GPTQ-like scales and offsets (-scale * zero)."""
    G = K // gs
    q = torch.randint(0, 16, (K, N), device=DEV, generator=gen)
    qweight = pack_int4(q)
    scales = (torch.rand(G, N, device=DEV, generator=gen) * 0.02 + 0.002).half()
    zeros = torch.randint(1, 16, (G, N), device=DEV, generator=gen).float()
    offsets = (-scales.float() * zeros).half()
    perm = torch.randperm(K, device=DEV, generator=gen) if act_order else None
    return qweight, scales, offsets, perm


def ref_q4(x, qweight, scales, offsets, perm=None, bias=None, residual=None):
    y = q4_matmul_ref(x.float(), qweight, scales, offsets, perm)
    if bias is not None:
        y = y + bias.float()
    if residual is not None:
        y = y + residual.float()
    return y


# ---- q4_gemm_small ------------------------------------------------------------------------

SHAPES = [(576, 192), (576, 576), (576, 1536), (1536, 576), (4096, 4096), (11008, 4096), (4096, 11008)]
GROUPS = [32, 64, 128, 0]  # 0: one group over all of K


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("act_order", [False, True])
def test_q4_gemm_small_shapes(K, N, gs, act_order):
    gs = gs or K
    if K % gs:
        pytest.skip("group size does not divide K")
    qw, sc, of, perm = make_q4(K, N, gs, act_order)
    for M in range(1, 9):
        x = torch.randn(M, K, device=DEV).half()
        out = poison((M, N))
        ops.q4_gemm_small(x, qw, sc, of, perm, out=out)
        err = rel_err(out, ref_q4(x, qw, sc, of, perm))
        assert err < Q4_TOL, f"M={M} K={K} N={N} gs={gs} act_order={act_order}: rel err {err:.2e}"


@pytest.mark.parametrize("K,N", [(576, 49152), (4096, 32000), (4096, 12288), (4096, 22016)])
@pytest.mark.parametrize("M", [1, 3, 8])
def test_q4_gemm_small_wide(K, N, M):
    qw, sc, of, perm = make_q4(K, N, 64 if K == 576 else 128)
    x = torch.randn(M, K, device=DEV).half()
    out = poison((M, N))
    ops.q4_gemm_small(x, qw, sc, of, out=out)
    assert rel_err(out, ref_q4(x, qw, sc, of)) < Q4_TOL


@pytest.mark.parametrize("tn", [32, 64, 128])
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("M", [1, 2, 5, 8])
def test_q4_gemm_small_configs(tn, splits, M):
    """Every tile width and split count, including uneven splits and a partial last column tile."""
    K, N, gs = 1536, 192 + 64, 32
    qw, sc, of, perm = make_q4(K, N, gs, act_order=(splits % 2 == 1))
    x = torch.randn(M, K, device=DEV).half()
    out = poison((M, N))
    ops.q4_gemm_small(x, qw, sc, of, perm, out=out, tn=tn, splits=splits)
    assert rel_err(out, ref_q4(x, qw, sc, of, perm)) < Q4_TOL


@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("K,N,gs", [(4096, 1536, 128), (576, 960, 64), (11008, 512, 128)])
def test_q4_gemm_small_variants(M, K, N, gs):
    qw, sc, of, perm = make_q4(K, N, gs, act_order=True)
    x = torch.randn(M, K, device=DEV).half()
    ref = ref_q4(x, qw, sc, of, perm)
    torch.cuda.synchronize()  # forced PDL reads the weights before waiting on the previous kernel
    for v in range(build.load().q4_gemm_num_variants(M)):
        for splits in (1, 3):
            for pdl in (0, 1, 2):
                out = poison((M, N))
                ops.q4_gemm_small(x, qw, sc, of, perm, out=out, variant=v, splits=splits, pdl=pdl)
                assert rel_err(out, ref) < Q4_TOL, f"variant {v} splits {splits} pdl {pdl}"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_q4_gemm_small_m1_variants_pass_nan_and_inf_on(bad):
    """A NaN or inf in x makes every output non-finite in every M = 1 variant (the greedy step's finite flag
    relies on it): the integer rows, whose 12-bit x drops it, carry it through the row's x sum and scale. A
    zero packed row and a row of wide dynamic range stay within tolerance."""
    K, N, gs = 1536, 320, 64
    qw, sc, of, perm = make_q4(K, N, gs)
    x = torch.randn(1, K, device=DEV).half()
    x[0, 8:16] = 0                                        # a packed row of zeros: scale 0
    x[0, 24:32] = torch.tensor([3e3, 1e-3, -2e3, 5e-4, 1, -1, 0.5, 7e2])
    ref = ref_q4(x, qw, sc, of)
    xb = x.clone()
    xb[0, 100] = bad
    for v in range(build.load().q4_gemm_num_variants(1)):
        for splits in (1, 3):
            out = poison((1, N))
            ops.q4_gemm_small(x, qw, sc, of, out=out, variant=v, splits=splits)
            assert rel_err(out, ref) < Q4_TOL, f"variant {v} splits {splits}"
            out = ops.q4_gemm_small(xb, qw, sc, of, variant=v, splits=splits)
            assert not torch.isfinite(out).any(), f"variant {v} splits {splits}"


def test_q4_gemm_small_bias_residual_and_inplace():
    K, N, M = 4096, 4096, 3
    qw, sc, of, perm = make_q4(K, N, 128, act_order=True)
    x = torch.randn(M, K, device=DEV).half()
    bias = torch.randn(N, device=DEV).half()
    res = torch.randn(M, N, device=DEV).half()
    ref = ref_q4(x, qw, sc, of, perm, bias, res)
    out = poison((M, N))
    ops.q4_gemm_small(x, qw, sc, of, perm, bias=bias, residual=res, out=out)
    assert rel_err(out, ref) < Q4_TOL
    # out aliasing residual: out += x @ W
    acc = res.clone()
    ops.q4_gemm_small(x, qw, sc, of, perm, bias=bias, residual=acc, out=acc)
    assert rel_err(acc, ref) < Q4_TOL


def test_q4_gemm_small_int32_perm_and_deterministic():
    K, N = 11008, 4096
    qw, sc, of, perm = make_q4(K, N, 128, act_order=True)
    x = torch.randn(2, K, device=DEV).half()
    a = ops.q4_gemm_small(x, qw, sc, of, perm)
    b = ops.q4_gemm_small(x, qw, sc, of, perm.to(torch.int32))
    assert torch.equal(a, b), "split-K reduction must be deterministic and perm dtype must not matter"
    assert rel_err(a, ref_q4(x, qw, sc, of, perm)) < Q4_TOL


def test_q4_gemm_small_cuda_graph():
    """Captured once, replayed with new inputs in place: the split-K counters must reset themselves."""
    K, N = 4096, 4096
    qw, sc, of, _ = make_q4(K, N, 128)
    x = torch.randn(1, K, device=DEV).half()
    out = poison((1, N))
    ops.q4_gemm_small(x, qw, sc, of, out=out)  # eager warm-up
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        ops.q4_gemm_small(x, qw, sc, of, out=out)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        x.copy_(torch.randn(1, K, device=DEV).half())
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(out, ref_q4(x, qw, sc, of)) < Q4_TOL


_BAD_ARGS = r"""
import sys, torch
sys.path.insert(0, {root!r})
from cuda_ext import ops
from model.quant import pack_int4
K, N = 576, 192
qw = pack_int4(torch.randint(0, 16, (K, N), device="cuda"))
sc = torch.rand(K // 32, N, device="cuda").half()
of = torch.rand(K // 32, N, device="cuda").half()
for bad, want in ((torch.randn(9, K), "rows"), (torch.randn(1, K).float(), "Half"), (torch.randn(1, 512), "size")):
    x = bad.cuda() if bad.dtype == torch.float32 and want == "Half" else bad.half().cuda()
    try:
        ops.q4_gemm_small(x, qw, sc, of)
        print("NO-ERROR", want)
    except RuntimeError as e:
        print("OK" if want in str(e) else "WRONG-MESSAGE", want, str(e).splitlines()[0][:200])
"""


def test_q4_gemm_small_rejects_bad_args():
    """Bad arguments raise RuntimeError with a clear message (in a child: a crash must not take pytest down)."""
    import subprocess
    import sys
    from pathlib import Path
    root = str(Path(__file__).resolve().parent.parent)
    r = subprocess.run([sys.executable, "-c", _BAD_ARGS.format(root=root)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"child exited with {r.returncode}: {r.stdout[-2000:]} {r.stderr[-2000:]}"
    lines = [ln for ln in r.stdout.splitlines() if ln.split(" ")[0] in ("OK", "NO-ERROR", "WRONG-MESSAGE")]
    assert len(lines) == 3 and all(ln.startswith("OK") for ln in lines), r.stdout


# ---- q4_dequant and q4_matmul dispatch ----------------------------------------------------

@pytest.mark.parametrize("K,N", [(576, 192), (1536, 576), (4096, 11008), (11008, 4096)])
@pytest.mark.parametrize("gs", GROUPS)
def test_q4_dequant_exact(K, N, gs):
    gs = gs or K
    if K % gs:
        pytest.skip("group size does not divide K")
    qw, sc, of, _ = make_q4(K, N, gs)
    out = poison((K, N))
    ops.q4_dequant(qw, sc, of, out=out)
    ref = dequantize(qw, sc, of, torch.float32).half()
    assert torch.equal(out, ref)


def test_q4_dequant_perm_scatters_rows():
    K, N = 1536, 576
    qw, sc, of, perm = make_q4(K, N, 64, act_order=True)
    out = poison((K, N))
    ops.q4_dequant(qw, sc, of, perm, out=out)
    ref = dequantize(qw, sc, of, torch.float32).half()
    assert torch.equal(out[perm], ref)


@pytest.mark.parametrize("lead", [(1,), (8,), (9,), (2, 7), (300,), (4, 512)])
@pytest.mark.parametrize("act_order", [False, True])
def test_q4_matmul_dispatch(lead, act_order):
    K, N = 4096, 1536
    qw, sc, of, perm = make_q4(K, N, 128, act_order)
    x = torch.randn(*lead, K, device=DEV).half()
    y = ops.q4_matmul(x, qw, sc, of, perm)
    assert y.shape == (*lead, N) and y.dtype == torch.float16
    assert rel_err(y, ref_q4(x, qw, sc, of, perm)) < Q4_TOL


def test_q4_matmul_large_m_bias_residual():
    K, N, M = 1536, 576, 2048
    qw, sc, of, perm = make_q4(K, N, 32, act_order=True)
    x = torch.randn(M, K, device=DEV).half()
    bias = torch.randn(N, device=DEV).half()
    res = torch.randn(M, N, device=DEV).half()
    y = ops.q4_matmul(x, qw, sc, of, perm, bias=bias, residual=res)
    assert rel_err(y, ref_q4(x, qw, sc, of, perm, bias, res)) < Q4_TOL


@pytest.mark.parametrize("act_order", [False, True])
def test_q4_dequant_column_slice(act_order):
    """Column slices of a wider weight (the prompt path dequantizes big layers a slice at a time)."""
    K, N = 1536, 1024
    qw, sc, of, perm = make_q4(K, N, 64, act_order)
    full = ops.q4_dequant(qw, sc, of, perm)
    for c0, c1 in ((0, 256), (128, 640), (896, 1024)):
        out = poison((K, c1 - c0))
        ops.q4_dequant(qw[:, c0:c1], sc[:, c0:c1], of[:, c0:c1], perm, out=out)
        assert torch.equal(out, full[:, c0:c1])


@pytest.mark.parametrize("act_order", [False, True])
def test_q4_matmul_prompt_path_in_column_chunks(monkeypatch, act_order):
    """A weight bigger than the dequant slice is done in column slices (the last one narrower), each
    dequantized into one buffer then multiplied; both weight layouts; residual added in place."""
    K, N, M = 1024, 2000, 64
    qw, sc, of, perm = make_q4(K, N, 128, act_order)
    x = torch.randn(M, K, device=DEV).half()
    bias = torch.randn(N, device=DEV).half()
    res = torch.randn(M, N, device=DEV).half()
    whole = ops.q4_matmul(x, qw, sc, of, perm, bias=bias, residual=res, prompt_bn=-1)
    plain = ops.q4_matmul(x, qw, sc, of, perm, prompt_bn=-1)
    wq = to_mma_layout(qw[:, :1920].contiguous())
    # prompt_bn=-1: the dequant + cuBLAS path even where the fused Hopper GEMM would take the mma layout
    plain_mma = ops.q4_matmul(x, wq, sc[:, :1920].contiguous(), of[:, :1920].contiguous(), perm, mma=True,
                              prompt_bn=-1)
    monkeypatch.setattr(ops, "DEQUANT_SLICE_BYTES", K * 2 * 384)  # 6 x 384 columns
    out = poison((M, N))
    chunked = ops.q4_matmul(x, qw, sc, of, perm, bias=bias, residual=res, out=out, prompt_bn=-1)
    # cuBLAS may pick another kernel for a narrower N: equal up to fp16 rounding, not bit for bit
    assert chunked is out and rel_err(chunked, whole.float()) < 1e-3
    assert rel_err(ops.q4_matmul(x, qw, sc, of, perm, prompt_bn=-1), plain.float()) < 1e-3
    assert rel_err(whole, ref_q4(x, qw, sc, of, perm, bias, res)) < Q4_TOL
    sliced_mma = ops.q4_matmul(x, wq, sc[:, :1920].contiguous(), of[:, :1920].contiguous(), perm, mma=True,
                               prompt_bn=-1)
    assert rel_err(sliced_mma, plain_mma.float()) < 1e-3
    acc = res.clone()
    ops.q4_matmul(x, qw, sc, of, perm, residual=acc, out=acc, prompt_bn=-1)
    assert rel_err(acc, ref_q4(x, qw, sc, of, perm, residual=res)) < Q4_TOL


# ---- fused Hopper prompt GEMM (q4_wgmma.cu) ---------------------------------------------------

WGMMA_WIDTHS = (64, 128, 192, 240, 256)
needs_wgmma = pytest.mark.skipif(not (torch.cuda.get_device_capability() == (9, 0) and ops.wgmma_plan(64, 128)[0]),
                                 reason="the fused prompt GEMM needs an sm_90 GPU and an sm_90a build")


# Odd shapes: K of 9 chunks (odd: the unrolled pair's tail), N not a multiple of the 128-column block
# (idle warps), M tails of every token tile, each group size; the 7B's down projection (K = 11008).
@needs_wgmma
@pytest.mark.parametrize("M,K,N,gs,act_order", [
    (9, 576, 960, 64, False), (100, 1536, 576, 32, True), (257, 4096, 1536, 128, False),
    (1920, 576, 1536, 32, False), (333, 11008, 256, 128, True), (64, 1024, 4112, 256, False),
])
def test_wgmma_matches_reference(M, K, N, gs, act_order):
    """Both weight layouts, every token tile: the reference within Q4_TOL, the dequant + cuBLAS path within
    fp32-sum noise, the two layouts bit for bit (the same products in the same order)."""
    qw, sc, of, perm = make_q4(K, N, gs, act_order)
    wq = to_mma_layout(qw)
    x = torch.randn(M, K, device=DEV).half()
    bias = torch.randn(N, device=DEV).half()
    res = torch.randn(M, N, device=DEV).half()
    ref = ref_q4(x, qw, sc, of, perm)
    ref_br = ref_q4(x, qw, sc, of, perm, bias, res)
    cublas = ops.q4_matmul(x, qw, sc, of, perm, prompt_bn=-1)
    for bn in WGMMA_WIDTHS:
        out = poison((M, N))
        y = ops.q4_matmul(x, qw, sc, of, perm, out=out, prompt_bn=bn)
        assert rel_err(y, ref) < Q4_TOL, bn
        assert rel_err(y, cublas.float()) < 1e-3, bn
        assert torch.equal(ops.q4_matmul(x, wq, sc, of, perm, mma=True, prompt_bn=bn), y), bn
        y = ops.q4_matmul(x, qw, sc, of, perm, bias=bias, residual=res, prompt_bn=bn)
        assert rel_err(y, ref_br) < Q4_TOL, bn
    for w, mma in ((qw, False), (wq, True)):
        acc = res.clone()                 # the residual stream, accumulated in place
        ops.q4_matmul(x, w, sc, of, perm, residual=acc, out=acc, mma=mma, prompt_bn=0)
        assert rel_err(acc, ref_q4(x, qw, sc, of, perm, residual=res)) < Q4_TOL


@needs_wgmma
def test_wgmma_is_the_default_prompt_path():
    """Prompts take the fused GEMM by default (a width chosen for M and N); column slices (the parts of a
    fused q|k|v) work as views; a shape it does not take (N % 16 != 0) falls back to dequant + cuBLAS, and
    forcing a tile there is an error."""
    M, K, N = 1920, 4096, 3 * 1024
    assert ops.wgmma_plan(M, N)[0] in WGMMA_WIDTHS
    qw, sc, of, _ = make_q4(K, N, 128)
    x = torch.randn(M, K, device=DEV).half()
    y = ops.q4_matmul(x, qw, sc, of)
    assert torch.equal(y, ops.q4_matmul(x, qw, sc, of, prompt_bn=ops.wgmma_plan(M, N)[0]))
    part = ops.q4_matmul(x, qw[:, 1024:2048], sc[:, 1024:2048], of[:, 1024:2048])
    assert torch.equal(part, y[:, 1024:2048])
    qw, sc, of, _ = make_q4(K, 1000, 128)
    y = ops.q4_matmul(x[:100], qw, sc, of)
    assert rel_err(y, ref_q4(x[:100], qw, sc, of)) < Q4_TOL
    with pytest.raises(RuntimeError, match="fused GEMM"):
        ops.q4_matmul(x[:100], qw, sc, of, prompt_bn=128)


def test_q4_matmul_bf16_falls_back():
    K, N = 576, 192
    qw, sc, of, perm = make_q4(K, N, 64, act_order=True)
    x = torch.randn(3, K, device=DEV).bfloat16()
    y = ops.q4_matmul(x, qw, sc, of, perm)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, ref_q4(x, qw, sc, of, perm)) < 1e-2


# ---- rms_norm -----------------------------------------------------------------------------

def rms_ref(x, w, eps):
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()


@pytest.mark.parametrize("M,D", [(1, 576), (7, 4096), (33, 8192), (5, 100), (3, 4104)])
@pytest.mark.parametrize("wdtype", [torch.float16, torch.float32])
def test_rms_norm(M, D, wdtype):
    x = (torch.randn(M, D, device=DEV) * 3).half()
    w = (torch.rand(D, device=DEV) + 0.5).to(wdtype)
    out = poison((M, D))
    ops.rms_norm(x, w, 1e-5, out=out)
    assert rel_err(out, rms_ref(x, w, 1e-5)) < ELEM_TOL


def test_rms_norm_strided_rows_and_3d():
    x_full = torch.randn(2, 5, 2 * 576, device=DEV).half()
    x = x_full[..., :576]                      # rows strided by 1152
    w = torch.rand(576, device=DEV).half()
    y = ops.rms_norm(x, w, 1e-6)
    assert y.shape == x.shape
    assert rel_err(y, rms_ref(x, w, 1e-6)) < ELEM_TOL


@pytest.mark.parametrize("M,D", [(1, 4096), (6, 576), (4, 100)])
def test_add_rms_norm(M, D):
    res = torch.randn(M, D, device=DEV).half()
    x = torch.randn(M, D, device=DEV).half()
    w = (torch.rand(D, device=DEV) + 0.5).half()
    new_res = (res.float() + x.float()).half()
    out = poison((M, D))
    ops.add_rms_norm(res, x, w, 1e-5, out=out)
    assert torch.equal(res, new_res)
    assert rel_err(out, rms_ref(new_res, w, 1e-5)) < ELEM_TOL


# ---- rotary -------------------------------------------------------------------------------

def rope_tables(max_pos, dh, base=10000.0):
    inv = 1.0 / (base ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh))
    f = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv)
    return f.cos().float().to(DEV), f.sin().float().to(DEV)


def rotary_reference(x, cos, sin, pos):
    d = x.shape[-1] // 2
    c, s = cos[pos].unsqueeze(2), sin[pos].unsqueeze(2)
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


@pytest.mark.parametrize("B,T,H,Dh", [(1, 1, 32, 128), (2, 5, 9, 64), (3, 17, 3, 64), (1, 300, 4, 128)])
@pytest.mark.parametrize("pdtype", [torch.int32, torch.int64])
def test_rotary_random_positions(B, T, H, Dh, pdtype):
    cos, sin = rope_tables(4096, Dh)
    x = torch.randn(B, T, H, Dh, device=DEV).half()
    pos = torch.randint(0, 4096, (B, T), device=DEV, dtype=pdtype)
    ref = rotary_reference(x, cos, sin, pos)
    ops.rotary_(x, cos, sin, pos)
    assert rel_err(x, ref) < ELEM_TOL


def test_rotary_strided_qkv_view_leaves_v_alone():
    B, T, H, Hkv, Dh = 2, 3, 8, 2, 64
    qkv = torch.randn(B, T, (H + 2 * Hkv) * Dh, device=DEV).half()
    before = qkv.clone()
    q = qkv[..., : H * Dh].view(B, T, H, Dh)
    k = qkv[..., H * Dh: (H + Hkv) * Dh].view(B, T, Hkv, Dh)
    cos, sin = rope_tables(512, Dh)
    pos = torch.randint(0, 512, (T,), device=DEV)
    ref_q = rotary_reference(q, cos, sin, pos.unsqueeze(0).expand(B, -1))
    ref_k = rotary_reference(k, cos, sin, pos.unsqueeze(0).expand(B, -1))
    ops.rotary_(q, cos, sin, pos)
    ops.rotary_(k, cos, sin, pos)
    assert rel_err(q, ref_q) < ELEM_TOL and rel_err(k, ref_k) < ELEM_TOL
    assert torch.equal(qkv[..., (H + Hkv) * Dh:], before[..., (H + Hkv) * Dh:])


@pytest.mark.parametrize("pdl", [-1, 2])
def test_decode_chain_cuda_graph_matches_eager(pdl):
    """rms_norm -> q4 (gate|up) -> silu_mul -> q4 (down, += residual) captured with PDL == eager."""
    D, F = 1536, 4096
    w_norm = (torch.rand(D, device=DEV) + 0.5).half()
    gu = make_q4(D, 2 * F, 64)[:3]
    dn = make_q4(F, D, 128, act_order=True)
    h = torch.randn(1, D, device=DEV).half()
    res = torch.randn(1, D, device=DEV).half()
    xn = torch.empty(1, D, device=DEV).half()
    y = torch.empty(1, 2 * F, device=DEV).half()
    a = torch.empty(1, F, device=DEV).half()

    def step(pdl=-1):
        ops.rms_norm(h, w_norm, 1e-5, out=xn)
        ops.q4_gemm_small(xn, *gu, out=y, pdl=pdl)
        ops.silu_mul(y[:, :F], y[:, F:], out=a)
        ops.q4_gemm_small(a, *dn, residual=res, out=res, pdl=pdl)

    res0 = res.clone()
    step(0)
    eager = res.clone()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        step(pdl)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        res.copy_(res0)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(res, eager)


def test_rotary_cuda_graph_moving_position():
    Dh, H = 128, 32
    cos, sin = rope_tables(2048, Dh)
    src = torch.randn(1, 1, H, Dh, device=DEV).half()
    x = src.clone()
    pos = torch.zeros(1, 1, dtype=torch.int64, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        ops.rotary_(x, cos, sin, pos)
    torch.cuda.current_stream().wait_stream(s)
    for p in (5, 1000, 2047):
        x.copy_(src)
        pos.fill_(p)
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(x, rotary_reference(src, cos, sin, pos)) < ELEM_TOL


# ---- silu_mul -----------------------------------------------------------------------------

@pytest.mark.parametrize("M,F", [(1, 11008), (8, 1536), (5, 100), (64, 1536)])
def test_silu_mul(M, F):
    g = (torch.randn(M, F, device=DEV) * 4).half()
    u = torch.randn(M, F, device=DEV).half()
    out = poison((M, F))
    ops.silu_mul(g, u, out=out)
    ref = torch.nn.functional.silu(g.float()) * u.float()
    assert rel_err(out, ref) < ELEM_TOL


def test_silu_mul_fused_halves():
    M, F = 3, 1536
    gu = torch.randn(2, M, 2 * F, device=DEV).half()
    g, u = gu[..., :F], gu[..., F:]
    y = ops.silu_mul(g, u)
    ref = torch.nn.functional.silu(g.float()) * u.float()
    assert y.shape == (2, M, F) and rel_err(y, ref) < ELEM_TOL


# ---- fused GEMV prologues (RMSNorm, SiLU-mul) ---------------------------------------------

@pytest.mark.parametrize("K,N,gs", [(576, 960, 64), (4096, 12288, 128), (1536, 576, 32)])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("mma", [False, True])
def test_q4_gemm_small_fused_norm(K, N, gs, act_order, mma):
    qw, sc, of, perm = make_q4(K, N, gs, act_order)
    wq = to_mma_layout(qw) if mma else qw
    w = (torch.rand(K, device=DEV) + 0.5).float()
    for M in (1, 2, 3, 8):
        x = (torch.randn(M, K, device=DEV) * 3).half()
        res = torch.randn(M, N, device=DEV).half()
        xn = rms_ref(x, w, 1e-5).half()                 # what rms_norm stores
        out = poison((M, N))
        ops.q4_gemm_small(x, wq, sc, of, perm, residual=res, out=out, norm_weight=w, norm_eps=1e-5, mma=mma)
        err = rel_err(out, ref_q4(xn, qw, sc, of, perm, residual=res))
        assert err < Q4_TOL, f"M={M}: rel err {err:.2e}"
        unfused = ops.q4_gemm_small(ops.rms_norm(x, w, 1e-5), wq, sc, of, perm, residual=res, mma=mma)
        assert rel_err(out, unfused.float()) < 1e-3


@pytest.mark.parametrize("K,N,gs", [(1536, 576, 64), (11008, 4096, 128)])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("mma", [False, True])
def test_q4_gemm_small_fused_silu(K, N, gs, act_order, mma):
    qw, sc, of, perm = make_q4(K, N, gs, act_order)
    wq = to_mma_layout(qw) if mma else qw
    for M in (1, 4, 8):
        gu = (torch.randn(M, 2 * K, device=DEV) * 2).half()
        a = (torch.nn.functional.silu(gu[:, :K].float()) * gu[:, K:].float()).half()
        out = poison((M, N))
        ops.q4_gemm_small(gu, wq, sc, of, perm, out=out, silu_up=True, mma=mma)
        err = rel_err(out, ref_q4(a, qw, sc, of, perm))
        assert err < Q4_TOL, f"M={M}: rel err {err:.2e}"


def test_model_ops_fused_matmul_matches_reference():
    """model.ops.Ops.q4_matmul(norm=..., silu=...) on the GPU against the torch reference path."""
    from model.ops import Ops
    K, N = 1536, 1024
    qw, sc, of, perm = make_q4(K, N, 64, act_order=True)
    w = (torch.rand(K, device=DEV) + 0.5).float()
    x = torch.randn(1, 2, K, device=DEV).half()
    gpu, ref = Ops(True), Ops(False)
    for kw in ({"norm": (w, 1e-6)}, {}):
        a = gpu.q4_matmul(x, qw, sc, of, perm, **kw)
        b = ref.q4_matmul(x.float(), qw, sc, of, perm, **{k: v for k, v in kw.items()})
        assert a.shape == (1, 2, N) and rel_err(a, b) < Q4_TOL
    for rows in (3, 40):          # 40: the prompt path, which overwrites the gate half of its input
        gu = torch.randn(rows, 2 * K, device=DEV).half()
        b = ref.q4_matmul(gu.float(), qw, sc, of, perm, silu=True)
        a = gpu.q4_matmul(gu, qw, sc, of, perm, silu=True)
        assert rel_err(a, b) < Q4_TOL


# ---- greedy pick (argmax_rows) ------------------------------------------------------------------

@pytest.mark.parametrize("V", [49152, 32000, 7, 1001, 128256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_argmax_rows_matches_torch(V, dtype):
    """Index as torch.argmax picks it (ties: the lowest index; a NaN wins) and the finite flag, also for rows
    of a strided view and with the index written to a second buffer."""
    from model.ops import argmax_rows_ref
    B = 3
    x = (torch.randn(B, V + 5, device=DEV) * 4).to(dtype)[:, 2:V + 2]      # row stride V + 5, unaligned start
    x[1, V // 3] = x[1, V // 2] = x[1].max() + 1                             # a tie
    if V > 7:
        x[2, V - 3] = float("nan")
        x[2, V - 1] = float("nan")
    ref = argmax_rows_ref(x.contiguous())
    for rows in (x, x.contiguous()):                  # scalar loads; 16-byte loads (V % 8 == 0)
        ids = torch.full((B, 1), -1, dtype=torch.long, device=DEV)
        out = ops.argmax_rows(rows, ids=ids)
        assert torch.equal(out, ref)
        assert torch.equal(ids[:, 0], out[:, 0])
    assert ref[0, 1] == 1 and (V == 7 or ref[2, 1] == 0)
    inf = torch.full((2, V), float("-inf"), device=DEV, dtype=dtype)
    inf[1, V - 1] = float("inf")
    assert ops.argmax_rows(inf).tolist() == [[0, 0], [V - 1, 0]]


# ---- tensor-core GEMV and dequantization on the mma layout ---------------------------------

@pytest.mark.parametrize("K,N", SHAPES + [(4096, 12288), (4096, 22016), (4096, 32000), (576, 960)])
@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("act_order", [False, True])
def test_q4_mma_shapes(K, N, gs, act_order):
    gs = gs or K
    if K % gs or not mma_layout_ok(K, N, K // gs):
        pytest.skip("no mma layout for this shape / group size")
    qw, sc, of, perm = make_q4(K, N, gs, act_order)
    wq = to_mma_layout(qw)
    for M in range(1, 9):
        x = torch.randn(M, K, device=DEV).half()
        out = poison((M, N))
        ops.q4_gemm_small(x, wq, sc, of, perm, out=out, mma=True)
        err = rel_err(out, ref_q4(x, qw, sc, of, perm))
        assert err < Q4_TOL, f"M={M} K={K} N={N} gs={gs} act_order={act_order}: rel err {err:.2e}"


@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("K,N,gs", [(4096, 1536, 128), (576, 960, 32), (11008, 528, 128), (1536, 576, 64),
                                    (4096, 4096, 4096)])
def test_q4_mma_variants_splits_pdl(M, K, N, gs):
    """Every kernel instance, split count (uneven, and more than the warps' units) and PDL mode;
    N = 528 leaves the last block half outside the matrix."""
    qw, sc, of, perm = make_q4(K, N, gs, act_order=True)
    wq = to_mma_layout(qw)
    x = torch.randn(M, K, device=DEV).half()
    bias = torch.randn(N, device=DEV).half()
    res = torch.randn(M, N, device=DEV).half()
    ref = ref_q4(x, qw, sc, of, perm, bias, res)
    torch.cuda.synchronize()  # forced PDL reads the weights before waiting on the previous kernel
    ext = build.load()
    for v in range(ext.q4_mma_num_variants()):
        for splits in (0, 1, 2, 3, 7, 1000):
            for pdl in (0, 1, 2):
                out = poison((M, N))
                ops.q4_gemm_small(x, wq, sc, of, perm, bias=bias, residual=res, out=out, variant=v, splits=splits,
                                  pdl=pdl, mma=True)
                err = rel_err(out, ref)
                assert err < Q4_TOL, f"{ext.q4_mma_variant_name(v)} splits {splits} pdl {pdl}: {err:.2e}"


def test_q4_mma_inplace_residual_deterministic_and_graph():
    K, N, M = 4096, 4096, 2
    qw, sc, of, perm = make_q4(K, N, 128, act_order=True)
    wq = to_mma_layout(qw)
    x = torch.randn(M, K, device=DEV).half()
    acc = torch.randn(M, N, device=DEV).half()
    ref = ref_q4(x, qw, sc, of, perm, residual=acc)
    ops.q4_gemm_small(x, wq, sc, of, perm, residual=acc, out=acc, mma=True)
    assert rel_err(acc, ref) < Q4_TOL
    a = ops.q4_gemm_small(x, wq, sc, of, perm, mma=True)
    b = ops.q4_gemm_small(x, wq, sc, of, perm.to(torch.int32), mma=True)
    assert torch.equal(a, b)
    out = torch.empty(M, N, device=DEV, dtype=torch.float16)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        ops.q4_gemm_small(x, wq, sc, of, perm, out=out, mma=True)      # eager warm-up (split-K counters)
        with torch.cuda.graph(g, stream=s):
            ops.q4_gemm_small(x, wq, sc, of, perm, out=out, mma=True)
    for _ in range(3):
        x.copy_(torch.randn(M, K, device=DEV).half())
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ops.q4_gemm_small(x, wq, sc, of, perm, mma=True))


def test_q4_mma_rejects_shapes_without_the_layout():
    qw, sc, of, _ = make_q4(576, 200, 64)                    # N % 16 != 0
    with pytest.raises(RuntimeError, match="no kernel configuration"):
        ops.q4_gemm_small(torch.randn(1, 576, device=DEV).half(), qw, sc, of, mma=True)
    qw, sc, of, _ = make_q4(4096, 256, 16)                   # group size 16
    with pytest.raises(RuntimeError, match="mma layout"):
        ops.q4_dequant(qw, sc, of, mma=True)


@pytest.mark.parametrize("K,N,gs", [(576, 960, 32), (1536, 576, 64), (4096, 1040, 128), (11008, 4096, 128),
                                    (4096, 512, 4096)])
@pytest.mark.parametrize("act_order", [False, True])
def test_q4_dequant_mma_exact(K, N, gs, act_order):
    qw, sc, of, perm = make_q4(K, N, gs, act_order)
    wq = to_mma_layout(qw)
    out = poison((K, N))
    ops.q4_dequant(wq, sc, of, perm, out=out, mma=True)
    ref = dequantize(qw, sc, of, torch.float32).half()
    assert torch.equal(out[perm] if perm is not None else out, ref)
    for c0, c1 in ((0, 128), (128, N - N % 128 or N), (N - 16, N)):    # column slices, as the prompt path takes them
        part = poison((K, c1 - c0))
        ops.q4_dequant(wq[:, c0:c1], sc[:, c0:c1], of[:, c0:c1], perm, out=part, mma=True)
        assert torch.equal(part, out[:, c0:c1])


@pytest.mark.parametrize("lead", [(1,), (5,), (9,), (300,)])
def test_q4_matmul_mma_dispatch(lead):
    K, N = 4096, 1536
    qw, sc, of, perm = make_q4(K, N, 128, act_order=True)
    wq = to_mma_layout(qw)
    x = torch.randn(*lead, K, device=DEV).half()
    bias = torch.randn(N, device=DEV).half()
    y = ops.q4_matmul(x, wq, sc, of, perm, bias=bias, mma=True)
    assert rel_err(y, ref_q4(x, qw, sc, of, perm, bias)) < Q4_TOL
    yb = ops.q4_matmul(x.bfloat16(), wq, sc, of, perm, mma=True)       # the torch path undoes the layout
    assert rel_err(yb, ref_q4(x, qw, sc, of, perm)) < 1e-2


# ---- dense fp16 GEMV (the decode step's LM head) --------------------------------------------

@pytest.mark.parametrize("K,N", [(576, 49152), (4096, 32000), (1536, 1000), (8, 7)])
def test_dense_gemv(K, N):
    w = (torch.randn(N, K, device=DEV) / K ** 0.5).half()
    nw = (torch.rand(K, device=DEV) + 0.5).float()
    for M in (1, 2, 5, 8):
        x = torch.randn(M, K, device=DEV).half()
        res = torch.randn(M, N, device=DEV).half()
        out = poison((M, N))
        ops.dense_gemv(x, w, residual=res, out=out)
        assert rel_err(out, x.float() @ w.float().t() + res.float()) < ELEM_TOL, f"M={M}"
        y = ops.dense_gemv(x, w, norm_weight=nw, norm_eps=1e-5)
        assert rel_err(y, rms_ref(x, nw, 1e-5).half().float() @ w.float().t()) < ELEM_TOL, f"M={M} norm"


def test_dense_gemv_strided_weight_rows_and_graph():
    K, N = 1024, 3000
    big = torch.randn(N, K + 64, device=DEV).half()
    w = big[:, :K]                                          # rows 1088 elements apart
    x = torch.randn(1, K, device=DEV).half()
    out = torch.empty(1, N, device=DEV, dtype=torch.float16)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        ops.dense_gemv(x, w, out=out)
        with torch.cuda.graph(g, stream=s):
            ops.dense_gemv(x, w, out=out)
    x.copy_(torch.randn(1, K, device=DEV).half())
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(out, x.float() @ w.float().t()) < ELEM_TOL
    with pytest.raises(RuntimeError, match="rows"):
        ops.dense_gemv(torch.randn(9, K, device=DEV).half(), w)

# ---- decode step: rope_kv_write, decode_attention -------------------------------------------

def split_qkv(t, H, Hkv, D):
    """q [B, T, H, D], k and v [B, T, Hkv, D]: strided views of a fused q|k|v output t [B, T, (H + 2 Hkv) D]."""
    B, T = t.shape[:2]
    return (t[..., :H * D].view(B, T, H, D), t[..., H * D:(H + Hkv) * D].view(B, T, Hkv, D),
            t[..., (H + Hkv) * D:].view(B, T, Hkv, D))


def fresh_step(qkv, kc, vc, H, Hkv, D):
    """Copies of a decode step's inputs, which the kernels write (q rotated in place, the new key and value in
    the caches): q, k, v (views of a copy of qkv) and copies of the two caches."""
    return (*split_qkv(qkv.clone(), H, Hkv, D), kc.clone(), vc.clone())


@pytest.mark.parametrize("B,H,Hkv,D", [(1, 32, 32, 128), (2, 9, 3, 64), (3, 8, 2, 128)])
@pytest.mark.parametrize("pdtype", [torch.int32, torch.int64])
def test_rope_kv_write(B, H, Hkv, D, pdtype):
    S, P = 64, 512
    cos, sin = rope_tables(P, D)
    qkv = torch.randn(B, 1, (H + 2 * Hkv) * D, device=DEV).half()
    q, k, v = split_qkv(qkv, H, Hkv, D)
    pos = torch.randint(0, P, (B, 1), device=DEV, dtype=pdtype)
    slot = torch.tensor([37], device=DEV)
    kc = torch.randn(B, Hkv, S, D, device=DEV).half()
    vc = torch.randn(B, Hkv, S, D, device=DEV).half()
    kc0, vc0 = kc.clone(), vc.clone()
    ref_q = rotary_reference(q, cos, sin, pos)
    ref_k = rotary_reference(k, cos, sin, pos)
    v0 = v.clone()
    ops.rope_kv_write(q, k, v, cos, sin, pos, slot, kc, vc)
    assert rel_err(q, ref_q) < ELEM_TOL
    assert rel_err(kc[:, :, 37], ref_k[:, 0]) < ELEM_TOL
    assert torch.equal(vc[:, :, 37], v0[:, 0])
    keep = torch.ones(S, dtype=torch.bool)
    keep[37] = False
    assert torch.equal(kc[:, :, keep], kc0[:, :, keep]) and torch.equal(vc[:, :, keep], vc0[:, :, keep])
    # Bit-identical to the separate rotary kernel + index_copy_ it replaces.
    k2 = k.clone()
    ops.rotary_(k2, cos, sin, pos)
    assert torch.equal(kc[:, :, 37], k2[:, 0])


@pytest.mark.parametrize("B,T,H,Hkv,D,start", [(1, 1920, 32, 32, 128, 0), (2, 37, 9, 3, 64, 5), (3, 5, 8, 2, 128, 59)])
def test_rope_kv_write_prompt(B, T, H, Hkv, D, start):
    """T tokens at once (the prompt path): q rotated in place, k rotated and v copied into cache slots
    start .. start + T - 1 (slots past the cache are skipped), bit-identical to rotary + copies."""
    S, P = max(64, start + T), 4096
    cos, sin = rope_tables(P, D)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, device=DEV).half()
    q, k, v = split_qkv(qkv, H, Hkv, D)
    pos = (torch.arange(T, device=DEV) + start + torch.randint(0, 9, (B, 1), device=DEV)).clamp(max=P - 1)
    S = min(S, start + T - (2 if T > 4 else 0))       # the last tokens fall past a short cache
    kc = torch.randn(B, Hkv, S, D, device=DEV).half()
    vc = torch.randn(B, Hkv, S, D, device=DEV).half()
    kc0, vc0 = kc.clone(), vc.clone()
    q2, k2 = q.clone(), k.clone()
    ref_q = rotary_reference(q.clone(), cos, sin, pos)
    ops.rotary_(q2, cos, sin, pos)
    ops.rotary_(k2, cos, sin, pos)
    v0 = v.clone()
    ops.rope_kv_write(q, k, v, cos, sin, pos, torch.tensor([start], device=DEV), kc, vc)
    assert torch.equal(q, q2)
    n = S - start
    assert torch.equal(kc[:, :, start:], k2[:, :n].transpose(1, 2))
    assert torch.equal(vc[:, :, start:], v0[:, :n].transpose(1, 2))
    assert torch.equal(kc[:, :, :start], kc0[:, :, :start]) and torch.equal(vc[:, :, :start], vc0[:, :, :start])
    assert rel_err(q, ref_q) < ELEM_TOL


def attn_reference(q, kc, vc, pos, kv_len, pad=None):
    """fp32 single-query attention with the decode mask (keys pad[b] <= j <= pos, j < kv_len)."""
    B, _, H, D = q.shape
    Hkv = kc.shape[1]
    G = H // Hkv
    k = kc[:, :, :kv_len].float().repeat_interleave(G, 1)        # [B, H, L, D]
    v = vc[:, :, :kv_len].float().repeat_interleave(G, 1)
    s = torch.einsum("bhd,bhld->bhl", q[:, 0].float(), k) / D ** 0.5
    j = torch.arange(kv_len, device=DEV).view(1, 1, -1)
    m = j <= int(pos[0])
    if pad is not None:
        m = m & (j >= pad.view(B, 1, 1))
    s = s.masked_fill(~m, float("-inf"))
    return torch.einsum("bhl,bhld->bhd", s.softmax(-1), v).unsqueeze(1)


# 40 kv heads (13B): 256-thread blocks at 256 keys on an H100 although 128-thread ones would fill it
@pytest.mark.parametrize("B,H,Hkv,D", [(1, 32, 32, 128), (1, 9, 3, 64), (2, 32, 8, 128), (2, 8, 1, 64), (1, 40, 40, 128)])
@pytest.mark.parametrize("kv_len", [1, 17, 256, 2048])
@pytest.mark.parametrize("splits", [0, 1, 3])
def test_decode_attention(B, H, Hkv, D, kv_len, splits):
    S = 2048
    kc = torch.randn(B, Hkv, S, D, device=DEV).half()
    vc = torch.randn(B, Hkv, S, D, device=DEV).half()
    qkv = torch.randn(B, 1, (H + 2 * Hkv) * D, device=DEV).half() * 2
    q = qkv[..., :H * D].view(B, 1, H, D)                        # a strided view, as in the model
    for trial in range(3):
        pos = torch.tensor([kv_len - 1 if trial == 0 else int(torch.randint(0, kv_len, (1,)))], device=DEV)
        pad = None
        if trial == 2 and B > 1:
            pad = torch.randint(0, int(pos) + 1, (B,), device=DEV)
        out = poison((B, 1, H, D))
        ops.decode_attention(q, kc, vc, pos, kv_len, pad, out=out, splits=splits)
        err = rel_err(out, attn_reference(q, kc, vc, pos, kv_len, pad))
        assert err < ELEM_TOL, f"pos={int(pos)} pad={pad}: rel err {err:.2e}"
    # the model's reference path (SDPA + mask) agrees too
    from model.ops import decode_attention_ref
    ref = decode_attention_ref(q, kc, vc, pos, kv_len, pad)
    assert rel_err(out, ref.float()) < ELEM_TOL


def test_decode_attention_cuda_graph_moving_position():
    B, H, Hkv, D, S, kv_len = 1, 9, 3, 64, 1024, 768
    kc = torch.randn(B, Hkv, S, D, device=DEV).half()
    vc = torch.randn(B, Hkv, S, D, device=DEV).half()
    q = torch.randn(B, 1, H, D, device=DEV).half()
    pos = torch.tensor([kv_len - 1], device=DEV)
    out = poison((B, 1, H, D))
    ops.decode_attention(q, kc, vc, pos, kv_len, out=out)       # eager first (allocates the counters)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        ops.decode_attention(q, kc, vc, pos, kv_len, out=out)
    torch.cuda.current_stream().wait_stream(s)
    for p in (0, 5, 300, 767, 100):
        pos.fill_(p)
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(out, attn_reference(q, kc, vc, pos, kv_len)) < ELEM_TOL, p


@pytest.mark.parametrize("one_launch", [False, True])
def test_captured_decode_attention_reads_this_steps_key(one_launch):
    """rope_kv_write -> decode_attention (or the one-launch form) captured in a graph, replayed at moving
    positions == the same calls run eagerly, bit for bit: under PDL the attention loads the earlier keys before
    waiting on the previous kernel, and must read this step's key and value only after it."""
    B, H, Hkv, D, S = 1, 32, 32, 128, 512
    cos, sin = rope_tables(S, D)
    kc = torch.randn(B, Hkv, S, D, device=DEV).half()
    vc = torch.randn(B, Hkv, S, D, device=DEV).half()
    qkv = torch.empty(B, 1, (H + 2 * Hkv) * D, device=DEV, dtype=torch.float16)
    pos = torch.zeros(1, dtype=torch.long, device=DEV)
    out = torch.empty(B, 1, H, D, device=DEV, dtype=torch.float16)

    def step(t, kcc, vcc):
        q, k, v = split_qkv(t, H, Hkv, D)
        if one_launch:
            return ops.decode_attention(q, kcc, vcc, pos, S, out=out, rope=(k, v, cos, sin))
        q = ops.rope_kv_write(q, k, v, cos, sin, pos.view(1, 1), pos, kcc, vcc)
        return ops.decode_attention(q, kcc, vcc, pos, S, out=out)

    kg, vg, ke, ve = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    qkv.normal_()
    step(qkv, kc.clone(), vc.clone())                             # eager first (counters, lazy init)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        step(qkv, kg, vg)
    torch.cuda.current_stream().wait_stream(s)
    for p in (0, 1, 63, 64, 200, 511, 300):
        src = torch.randn_like(qkv)
        pos.fill_(p)
        qkv.copy_(src)
        g.replay()
        got = out.clone()
        want = step(src.clone(), ke, ve).clone()
        torch.cuda.synchronize()
        assert torch.equal(got, want), p
        assert torch.equal(kg, ke) and torch.equal(vg, ve), p


def test_model_ops_decode_step_matches_reference():
    """Ops.rope_kv_write + Ops.decode_attention (kernels) == the reference path (rotary + index_copy_ + SDPA)."""
    from model.ops import Ops, decode_attention_ref, rope_kv_write_ref
    B, H, Hkv, D, S = 2, 8, 2, 128, 300
    cos, sin = rope_tables(S, D)
    gpu = Ops(True)
    qkv = torch.randn(B, 1, (H + 2 * Hkv) * D, device=DEV).half()
    kc = torch.randn(B, Hkv, S, D, device=DEV).half()
    vc = torch.randn(B, Hkv, S, D, device=DEV).half()
    pos = torch.tensor([200], device=DEV)
    pad = torch.tensor([0, 7], device=DEV)
    rope_pos = (pos.view(1, 1).expand(B, 1) - pad.view(B, 1)).clamp(min=0)
    outs = []
    for fused in (True, False):
        q, k, v, kcc, vcc = fresh_step(qkv, kc, vc, H, Hkv, D)
        if fused:
            q = gpu.rope_kv_write(q, k, v, cos, sin, rope_pos, pos, kcc, vcc)
            o = gpu.decode_attention(q, kcc, vcc, pos, 256, pad)
        else:
            q = rope_kv_write_ref(q, k, v, cos, sin, rope_pos, pos, kcc, vcc)
            o = decode_attention_ref(q, kcc, vcc, pos, 256, pad)
        outs.append((o.float(), kcc, vcc))
    assert torch.equal(outs[0][2], outs[1][2])
    assert rel_err(outs[0][1], outs[1][1].float()) < ELEM_TOL
    assert rel_err(outs[0][0], outs[1][0]) < ELEM_TOL


# p in a block's first batch of rows (loaded before the PDL wait) or its second (loaded after it)
@pytest.mark.parametrize("B,H,Hkv,D,p,kv_len,splits", [(1, 32, 32, 128, 200, 256, 0), (2, 9, 3, 64, 0, 64, 0),
                                                        (3, 8, 2, 128, 1500, 2048, 0), (2, 8, 1, 64, 77, 128, 5),
                                                        (1, 4, 4, 128, 300, 512, 1), (1, 32, 32, 128, 40, 256, 0),
                                                        (1, 32, 32, 128, 127, 256, 0), (1, 9, 3, 64, 100, 256, 0),
                                                        (1, 40, 40, 128, 200, 256, 0)])
def test_rotary_inside_decode_attention(B, H, Hkv, D, p, kv_len, splits):
    """decode_attention with its rotary prologue (one launch) == rope_kv_write then decode_attention: the
    output within fp32 summation-order noise, the new key and value in the cache bit for bit, q untouched."""
    from model.ops import Ops
    S, P = max(kv_len, 64), 4096
    cos, sin = rope_tables(P, D)
    qkv = torch.randn(B, 1, (H + 2 * Hkv) * D, device=DEV).half()
    kc = torch.randn(B, Hkv, S, D, device=DEV).half()
    vc = torch.randn(B, Hkv, S, D, device=DEV).half()
    pos = torch.tensor([p], device=DEV)
    pad = torch.arange(B, device=DEV) * 3 if B > 1 else None
    rope_pos = pos.view(1, 1).expand(B, 1)
    if pad is not None:
        rope_pos = (rope_pos - pad.view(B, 1)).clamp(min=0)
    outs = []
    for one_launch in (True, False):
        q, k, v, kcc, vcc = fresh_step(qkv, kc, vc, H, Hkv, D)
        if one_launch:
            q0 = q.clone()
            o = ops.decode_attention(q, kcc, vcc, pos, kv_len, pad, splits=splits, rope=(k, v, cos, sin))
            assert torch.equal(q, q0)
        else:
            q = ops.rope_kv_write(q, k, v, cos, sin, rope_pos, pos, kcc, vcc)
            o = ops.decode_attention(q, kcc, vcc, pos, kv_len, pad, splits=splits)
        outs.append((o.float(), kcc, vcc))
    assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][2], outs[1][2])
    assert rel_err(outs[0][0], outs[1][0]) < 1e-3
    # and through Ops, as the model calls it
    gpu = Ops(True, fused_decode=True)
    q, k, v, kcc, vcc = fresh_step(qkv, kc, vc, H, Hkv, D)
    o = gpu.rope_decode_attention(q, k, v, cos, sin, rope_pos, pos, kcc, vcc, kv_len, pad)
    assert rel_err(o, outs[1][0]) < 1e-3 and torch.equal(kcc, outs[1][1])


# ---- embed_gather ---------------------------------------------------------------------------

@pytest.mark.parametrize("V,D", [(32000, 4096), (517, 576), (100, 8)])
def test_embed_gather_from_pinned_host_memory(V, D):
    table = torch.randn(V, D).half().pin_memory()
    ids = torch.randint(0, V, (3, 17), device=DEV)
    out = ops.embed_gather(ids, table)
    assert out.is_cuda and out.shape == (3, 17, D)
    assert torch.equal(out.cpu(), table[ids.cpu()])


def test_embed_gather_graph_replay_and_bad_ids():
    V, D = 1000, 256
    table = torch.randn(V, D).half().pin_memory()
    ids = torch.zeros(1, 1, dtype=torch.long, device=DEV)
    out = ops.embed_gather(ids, table)                 # eager first
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.embed_gather(ids, table)
    for t in (5, 999, 0, 123):
        ids.fill_(t)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[0, 0].cpu(), table[t])
    bad = ops.embed_gather(torch.tensor([-1, V, 3], device=DEV), table)
    assert torch.equal(bad[:2].cpu(), torch.zeros(2, D, dtype=torch.float16))
    assert torch.equal(bad[2].cpu(), table[3])
    with pytest.raises(RuntimeError, match="pinned"):
        ops.embed_gather(ids, torch.randn(V, D).half())
