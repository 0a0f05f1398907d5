"""The CPU kernels (cuda_ext/cpu) against their torch references, and the packed CPU model against the dense one.

The GEMV quantizes activations to int8 per block of 32 (one fp32 scale each), so it is checked two ways: against
the reference product of those same quantized activations (fp32 summation order, and on fresh random inputs now and
then one rounding that lands on the other side of a half, ~1e-4 of the product: rel < 1e-3, where a layout or
scale bug costs O(1)), and against the unquantized product (the int8 rounding itself: rel < 3e-2).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cuda_ext import build
from model.cpu_layout import TILE, CpuWeight, pack_q4, pack_q8
from model.ops import rms_norm_ref, rotary_ref, silu_mul_ref
from model.quant import from_gptq, quantize_rtn

if not build.cpu.is_available():
    pytest.skip(f"CPU kernels unavailable: {build.cpu.failure_reason()}", allow_module_level=True)

EXT = build.cpu.load()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def quant_act_ref(x: torch.Tensor, levels: int = 1) -> torch.Tensor:
    """x [M, K] as the kernel sees it: int8 per block of 32, scale d = max|x| / 127, round half to even; two levels
    add the rounding error in steps of d / 128."""
    b = x.float().view(x.shape[0], -1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    d = amax / 127
    q = torch.where(amax > 0, torch.round(b * (127 / amax)), torch.zeros_like(b))
    if levels == 2:
        r = torch.where(amax > 0, torch.round((b - q * d) * (127 / amax) * 128), torch.zeros_like(b))
        q = q + r / 128
    return (q * d).view_as(x)


def random_q4(K, N, gs, seed, sym=False, act_order=False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) * 0.05
    qw, qz, sc, g_idx = quantize_rtn(w, gs, sym)
    perm = None
    if act_order:
        perm = torch.randperm(K, generator=gen)
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[perm] = (torch.arange(K) // gs).int()
    qweight, scales, offsets, p = from_gptq(qw, qz, sc, g_idx)
    return qweight, scales, offsets, p


def gemv(x, cw: CpuWeight, norm=None, silu=False, bias=None, residual=None, levels=1, perm=None):
    return EXT.q_gemv(x, cw.bits, cw.w, cw.sc, cw.of, cw.K, cw.gs, norm[0] if norm else None,
                      norm[1] if norm else 0.0, silu, bias, residual, None, levels, perm)


@pytest.mark.parametrize("K,N,gs", [(32, 8, 32), (64, 24, 32), (576, 960, 32), (256, 40, 64), (512, 64, 128),
                                    (1536, 576, 128), (384, 16, 384)])
@pytest.mark.parametrize("M", [1, 3, 8])
def test_q4_gemv_matches_the_reference(K, N, gs, M):
    qweight, scales, offsets, _ = random_q4(K, N, gs, seed=K + N + M)
    cw = pack_q4(qweight, scales, offsets, None, EXT)
    W = cw.dequantize()
    x = torch.randn(M, K) * 3
    y = gemv(x, cw)
    assert rel(y, quant_act_ref(x) @ W.t()) < 1e-3
    assert rel(y, x @ W.t()) < 3e-2
    y2 = gemv(x, cw, levels=2)
    # the kernel's residual x - q d is one fma: a second-level rounding may land one step (d / 128) apart
    assert rel(y2, quant_act_ref(x, 2) @ W.t()) < 1e-4
    assert rel(y2, x @ W.t()) < 2e-4


@pytest.mark.parametrize("K,N", [(32, 8), (576, 1000 // TILE * TILE), (64, 49152 // 64)])
@pytest.mark.parametrize("M", [1, 5])
def test_q8_gemv_matches_the_reference(K, N, M):
    w = torch.randn(N, K) * 0.1
    cw = pack_q8(w)
    W = cw.dequantize()
    assert rel(W, w) < 1e-2                       # 8-bit round to nearest
    x = torch.randn(M, K)
    y = gemv(x, cw)
    assert rel(y, quant_act_ref(x) @ W.t()) < 1e-3
    assert rel(y, x @ w.t()) < 3e-2
    assert rel(gemv(x, cw, levels=2), quant_act_ref(x, 2) @ W.t()) < 1e-4


def test_gemv_prologues_bias_and_residual():
    K, N, M = 256, 48, 3
    qweight, scales, offsets, _ = random_q4(K, N, 64, seed=5)
    cw = pack_q4(qweight, scales, offsets, None, EXT)
    W = cw.dequantize()
    x, gate_up = torch.randn(M, K) * 4, torch.randn(M, 2 * K)
    nw, bias, res = torch.rand(K) + 0.5, torch.randn(N), torch.randn(M, N)
    normed = rms_norm_ref(x, nw, 1e-5)
    assert rel(gemv(x, cw, norm=(nw, 1e-5)), quant_act_ref(normed) @ W.t()) < 1e-3
    act = silu_mul_ref(gate_up[:, :K], gate_up[:, K:])
    # the kernel's exp differs from torch's by ~1e-7, which may move an int8 rounding: compare loosely there
    assert rel(gemv(gate_up, cw, silu=True), quant_act_ref(act) @ W.t()) < 1e-3
    y = gemv(x, cw, bias=bias, residual=res)
    assert rel(y, quant_act_ref(x) @ W.t() + bias + res) < 1e-3
    perm = torch.randperm(K)
    assert rel(gemv(x, cw, norm=(nw, 1e-5), perm=perm, levels=2), quant_act_ref(normed[:, perm], 2) @ W.t()) < 1e-4
    out = res.clone()          # out may be the residual itself (the model's residual stream)
    EXT.q_gemv(x, 4, cw.w, cw.sc, cw.of, K, 64, None, 0.0, False, None, out, out, 1, None)
    assert rel(out, quant_act_ref(x) @ W.t() + res) < 1e-3


def test_gemv_rejects_what_does_not_fit():
    qweight, scales, offsets, _ = random_q4(64, 8, 32, seed=1)
    cw = pack_q4(qweight, scales, offsets, None, EXT)
    with pytest.raises(RuntimeError, match="columns"):
        gemv(torch.randn(1, 32), cw)
    with pytest.raises(RuntimeError, match="group size"):
        EXT.q_gemv(torch.randn(1, 64), 4, cw.w, cw.sc, cw.of, 64, 48, None, 0.0, False, None, None, None, 1, None)
    with pytest.raises(RuntimeError, match="dtype"):
        gemv(torch.randn(1, 64, dtype=torch.float64), cw)


@pytest.mark.parametrize("K,N,gs", [(64, 16, 32), (576, 192, 32), (256, 24, 128)])
def test_pack_and_dequant_agree_with_torch(K, N, gs):
    qweight, scales, offsets, _ = random_q4(K, N, gs, seed=3)
    c, t = pack_q4(qweight, scales, offsets, None, EXT), pack_q4(qweight, scales, offsets, None, None)
    assert torch.equal(c.w, t.w) and torch.equal(c.sc, t.sc) and torch.equal(c.of, t.of)
    # the layout holds exactly the q4 format's weights
    from model.quant import dequantize
    assert torch.equal(c.dequantize(), dequantize(qweight, scales, offsets).t())
    assert torch.equal(EXT.q_dequant(4, c.w, c.sc, c.of, K, gs, 8, N), c.dequantize(8, N))
    q8 = pack_q8(torch.randn(N, K))
    assert torch.equal(EXT.q_dequant(8, q8.w, q8.sc, None, K, 32, 0, N), q8.dequantize())
    ids = torch.tensor([[0, N - 1], [3, 9]])
    assert torch.equal(q8.rows(ids), q8.dequantize()[ids]) and torch.equal(c.rows(ids), c.dequantize()[ids])


def test_q8_of_a_q8_table_keeps_its_values():
    """A GGUF Q8_0 table dequantized at load and packed again is the same table (scale = max|w| / 127)."""
    d = (torch.rand(64, 4) * 0.01).half()
    q = torch.randint(-127, 128, (64, 4, 32)).float()
    q[:, :, 0] = 127                                        # llama.cpp's quantizer maps max|w| to 127
    w = (q * d.float().unsqueeze(-1)).view(64, 128)
    assert torch.equal(pack_q8(w).dequantize(), w)


def attention_ref(qkv, cos, sin, start, kc, vc, H):
    B, T, _ = qkv.shape
    Hkv, D = kc.shape[1], kc.shape[3]
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], -1)
    pos = torch.arange(start, start + T).expand(B, T)
    q = rotary_ref(q.reshape(B, T, H, D), cos, sin, pos).transpose(1, 2)
    k = rotary_ref(k.reshape(B, T, Hkv, D), cos, sin, pos).transpose(1, 2)
    kc[:, :, start:start + T], vc[:, :, start:start + T] = k.to(kc.dtype), v.reshape(B, T, Hkv, D).transpose(1, 2).to(vc.dtype)
    L = start + T
    mask = torch.arange(L).view(1, L) <= torch.arange(start, L).view(T, 1)
    o = F.scaled_dot_product_attention(q, kc[:, :, :L].float(), vc[:, :, :L].float(), attn_mask=mask,
                                       enable_gqa=H != Hkv)
    return o.transpose(1, 2).reshape(B, T, H * D)


@pytest.mark.parametrize("B,T,start", [(1, 1, 0), (1, 1, 37), (2, 3, 5), (1, 8, 100)])
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (4, 4, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qkv_attention_matches_rotary_cache_write_and_sdpa(B, T, start, H, Hkv, D, dtype):
    S = 128
    gen = torch.Generator().manual_seed(B * 100 + T + start)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=gen)
    ang = torch.rand(S, D // 2, generator=gen) * 6
    cos, sin = ang.cos(), ang.sin()
    kc = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    vc = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    kr, vr = kc.clone(), vc.clone()
    out = EXT.qkv_attention(qkv, cos, sin, start, kc, vc, H)
    ref = attention_ref(qkv, cos, sin, start, kr, vr, H)
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3)
    tol = 0 if dtype == torch.float32 else 1e-3
    assert (kc.float() - kr.float()).abs().max() <= tol + 1e-5 and torch.equal(vc, vr)
    with pytest.raises(RuntimeError, match="exceed"):
        EXT.qkv_attention(qkv, cos, sin, S - T + 1, kc, vc, H)


# ---- the packed model ----------------------------------------------------------------------

def test_packed_tiny_model_against_dense(tmp_path):
    """A 4-bit checkpoint packed for the CPU kernels: prompts (dense GEMM on dequantized slices) equal the dense
    model; cached decode steps (the int8 GEMV, fused attention) stay within the int8 rounding and pick the same
    greedy tokens; the reference path (no kernels) of the same layouts equals the dense model."""
    from tiny import gptq_checkpoint, hf_tiny, load_ours
    hf = hf_tiny(seed=11, hidden_size=128, intermediate_size=256)
    folder = gptq_checkpoint(hf, tmp_path / "q", 32, False, False)
    dense = load_ours(folder, max_seq_len=64)
    packed = load_ours(folder, max_seq_len=64, cpu_weights="packed")
    lin = packed.layers[0].mlp.down_proj
    assert lin.packed is not None and lin.packed.bits == 4 and lin.qweight is None
    assert packed.layers[0].self_attn.qkv.packed is not None and packed.lm_head.packed.bits == 8
    n = packed.ops.CPU_GEMV_MAX_ROWS + 8             # a prompt: more rows than the GEMV takes
    ids = torch.randint(0, 96, (1, n))
    full = dense(ids, last_only=False)
    # prompts read the 8-bit LM head through the same dense GEMM: only its 8-bit rounding differs
    assert rel(packed(ids, last_only=False), full) < 1e-2
    cache = packed.new_cache()
    packed(ids[:, :10], cache)
    steps = torch.cat([packed(ids[:, i:i + 1], cache) for i in range(10, n)], 1)
    assert rel(steps, full[:, 10:]) < 3e-2
    assert (steps.argmax(-1) == full[:, 10:].argmax(-1)).float().mean() >= 0.9
    ref = load_ours(folder, max_seq_len=64, cpu_weights="packed", force_reference=True)
    assert ref.cpu_decoder is None and ref.layers[0].mlp.down_proj.packed is not None
    assert rel(ref(ids, last_only=False), packed(ids, last_only=False)) < 1e-5


def test_one_call_decode_step_equals_the_python_layers(tmp_path):
    """CpuDecoder (model/cpu_decode.py) runs the same kernels as the Python layers: the same logits and cache for
    one-token steps; several new tokens at once (causal among themselves) match the Python path's SDPA closely."""
    from tiny import gptq_checkpoint, hf_tiny, load_ours
    hf = hf_tiny(seed=13, hidden_size=128, intermediate_size=256)
    model = load_ours(gptq_checkpoint(hf, tmp_path / "q", 64, False, False), max_seq_len=64, cpu_weights="packed")
    assert model.cpu_decoder is not None
    ids = torch.randint(0, 96, (2, 14))
    outs = {}
    for name, dec in (("one call", model.cpu_decoder), ("layers", None)):
        model.cpu_decoder = dec
        cache = model.new_cache(batch_size=2)
        model(ids[:, :3], cache)                                  # a few rows: the decode path too
        steps = torch.cat([model(ids[:, i:i + 1], cache) for i in range(3, 11)], 1)
        k11 = cache.k[1][:, :, :11].clone()
        several = model(ids[:, 11:14], cache, last_only=False)
        outs[name] = (steps, k11, several, cache.length)
    (a, ka, sa, la), (b, kb, sb, lb) = outs["one call"], outs["layers"]
    assert torch.equal(ka, kb) and rel(a, b) < 1e-6
    # (the SDPA path rounds differently; the 8-bit head's one-level activations turn that into ~2e-3)
    assert la == lb == 14 and rel(sa, sb) < 5e-3

def test_act_order_layers_pack_with_their_permutation(tmp_path):
    from tiny import gptq_checkpoint, hf_tiny, load_ours
    hf = hf_tiny(seed=12, hidden_size=128, intermediate_size=256)
    folder = gptq_checkpoint(hf, tmp_path / "q", 32, True, True)
    dense = load_ours(folder, max_seq_len=64)
    packed = load_ours(folder, max_seq_len=64, cpu_weights="packed")
    q = packed.layers[0].self_attn.q_proj
    assert q.packed is not None and q.packed.perm is not None
    assert torch.equal(q.dense_weight(), dense.layers[0].self_attn.q_proj.dense_weight())
    ids = torch.randint(0, 96, (1, 12))
    full = dense(ids, last_only=False)
    cache = packed.new_cache()
    packed(ids[:, :4], cache)
    steps = torch.cat([packed(ids[:, i:i + 1], cache) for i in range(4, 12)], 1)
    assert rel(steps, full[:, 4:]) < 3e-2


def test_embedded_model_packed(embedded_fp32, botchan_text):
    """The embedded GGUF in 4 + 8 bits: the prompt path's perplexity equals the dense model's (the Q8_0 table is
    kept exactly), the decode path's (int8 activations) stays close, and far less memory holds the weights."""
    from model.config import RuntimeConfig
    from model.loader import load
    from model.perplexity import perplexity
    dense, tok = embedded_fp32
    packed, _ = load(None, RuntimeConfig(device="cpu", dtype="float32", max_seq_len=1024), progress=False)
    assert packed.embed_tokens is packed.lm_head.packed
    ids = tok.encode(botchan_text)
    ppl_dense = perplexity(dense, ids, 256, 2, progress=False)
    ppl_prompt = perplexity(packed, ids, 256, 2, progress=False)
    assert abs(ppl_prompt / ppl_dense - 1) < 2e-4
    packed.ops.CPU_GEMV_MAX_ROWS = 1 << 30            # every row through the int8 GEMV
    ppl_gemv = perplexity(packed, ids, 256, 2, progress=False)
    assert math.isfinite(ppl_gemv) and abs(ppl_gemv / ppl_dense - 1) < 2e-3
    weights = sum(m.packed.nbytes for m in packed.modules() if getattr(m, "packed", None) is not None
                  and not any(m in getattr(p, "views", []) for p in packed.modules()))
    assert weights < 110e6


# ---- sampling ------------------------------------------------------------------------------

SAMPLER_CASES = [
    dict(),                                                   # the app's defaults: k 50, p 0.9, min_p, rep 1.1
    dict(temperature=0.95, top_k=0, top_p=0.75, min_p=0.0, typical=0.25, repetition_penalty=1.15,
         repetition_penalty_sustain=2048, repetition_penalty_decay=512),      # a new chat session's defaults
    dict(top_k=20, top_p=0.8, min_p=0.02, typical=0.9, temperature=0.7, presence_penalty=0.3,
         frequency_penalty=0.2, banned_tokens=[0, 5]),
    dict(temperature=1.0, top_k=0, top_p=0.95, min_p=0.0, repetition_penalty=1.0),   # top_p's head grows
    dict(temperature=1.3, top_k=0, top_p=1.0, min_p=0.1, repetition_penalty=1.0),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical=0.8, repetition_penalty=1.3),
    dict(temperature=0.0, repetition_penalty=10.0, banned_tokens=[3]),
    dict(temperature=1.2, top_k=0, top_p=1.0, min_p=0.0, banned_tokens=[7]),       # no truncation (/v1's defaults)
]


def row_args(s, h):
    return (h, torch.tensor(s.banned_tokens, dtype=torch.long), s.repetition_penalty, s.repetition_penalty_sustain,
            s.repetition_penalty_decay, s.presence_penalty, s.frequency_penalty, s.temperature, s.top_k, s.top_p,
            s.min_p, s.typical)


@pytest.mark.parametrize("case", SAMPLER_CASES)
@pytest.mark.parametrize("V", [5000, 49152])
def test_cpu_sampler_distribution_equals_the_torch_sampler(case, V):
    """sample_row's final distribution (u < 0) is the torch Sampler's `probs`: same survivors, same weights."""
    from model.sampler import Sampler, SamplerSettings
    s = SamplerSettings(**case)
    g = torch.Generator().manual_seed(V)
    x = torch.randn(V, generator=g) * 2.5
    h = torch.randint(0, V, (300,), generator=g)
    want = Sampler(s, seed=1).probs(x.unsqueeze(0), h.unsqueeze(0))[0]
    got = EXT.sample_row(x, *row_args(s, h), -1.0)
    assert torch.equal(got > 0, want > 0)
    assert (got - want).abs().max() < 1e-6


def test_cpu_sampler_draws_follow_the_distribution():
    """Draws through Sampler(kernels=...) (the generator's CPU path) against the reference distribution: a chi-square
    over 60k draws that the distribution of a wrong temperature (0.7 for 0.8) or of no penalty fails; a fixed seed
    replays exactly."""
    from model.sampler import Sampler, SamplerSettings
    s = SamplerSettings(temperature=0.8, top_k=12, top_p=0.97, min_p=0.0, repetition_penalty=1.3)
    x = torch.randn(1, 400, generator=torch.Generator().manual_seed(3)) * 1.5
    h = [[int(i) for i in x[0].topk(3).indices]]      # penalise three likely tokens
    n = 60000
    fast = Sampler(s, seed=5, kernels=EXT)
    toks = torch.cat([fast.sample(x, h) for _ in range(n)])
    counts = torch.bincount(toks, minlength=400).double()

    def chi2(p):
        keep = p > 0
        if counts[~keep].sum() > 0:                       # a token this distribution never gives
            return math.inf, 0
        e = p[keep] * n
        return float(((counts[keep] - e) ** 2 / e).sum()), int(keep.sum()) - 1

    stat, dof = chi2(Sampler(s).probs(x, h)[0].double())
    limit = dof + 5 * math.sqrt(2 * dof)
    assert dof > 5 and stat < limit
    for wrong in (s.replace(temperature=0.7), s.replace(repetition_penalty=1.0)):
        assert chi2(Sampler(wrong).probs(x, h)[0].double())[0] > limit
    replay = Sampler(s, seed=5, kernels=EXT)
    assert torch.equal(torch.cat([replay.sample(x, h) for _ in range(200)]), toks[:200])


def test_cpu_sampler_rejects_rows_with_nothing_to_sample():
    from model.sampler import Sampler, SamplerSettings
    s = SamplerSettings(banned_tokens=[0, 1])
    with pytest.raises(ValueError, match="no token can be sampled"):
        Sampler(s, kernels=EXT).sample(torch.tensor([[1.0, 2.0, float("-inf")]]))
    with pytest.raises(ValueError, match="no token can be sampled"):
        Sampler(SamplerSettings.greedy(), kernels=EXT).sample(torch.tensor([[1.0, float("nan")]]))
