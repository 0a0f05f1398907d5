"""Thin Python wrappers over the extension: allocate outputs, flatten leading dims, pick kernels.

All kernels take fp16 activations. Other activation dtypes (bf16, fp32) take an equivalent torch path
here, so callers need not check. Shapes: `...` is any number of leading dims.

    q4_matmul(x [..., K], qweight, scales, offsets, perm=None, *, bias=None, residual=None, out=None) -> [..., N]
        M = prod(...) <= 8 rows: q4_gemm_small (reads the packed weights once);
        more rows: q4_matmul_prompt: on Hopper one GEMM dequantizing in its main loop, else
        q4_dequant to fp16 column slices, each then multiplied by cuBLAS.
    q4_gemm_small(x [M <= 8, K], ...) -> [M, N]    the small-M kernel itself (tn/splits/variant for tuning)
    q4_dequant(qweight, scales, offsets, perm=None, *, out=None) -> fp16 [K, N]
        with perm, row k of the sorted weight goes to row perm[k], so x @ W needs no gather;
        the weights may be column slices (rows contiguous).
    embed_gather(ids [...] int64 on the GPU, table [V, D] fp16 in pinned host memory) -> [..., D] on the GPU
    argmax_rows(logits [B, V] fp16|fp32, *, out=None, ids=None) -> [B, 2] int64 (argmax, finite?)
    rms_norm(x [..., D], weight [D] fp16|fp32, eps, *, out=None) -> [..., D]
    add_rms_norm(residual [..., D], x [..., D], weight, eps, *, out=None) -> out   (residual += x in place)
    rotary_(x [B, T, H, Dh], cos [P, Dh/2] fp32, sin, positions [B, T] | [T] int32|int64 on the device) -> x
    silu_mul(gate [..., F], up [..., F], *, out=None) -> [..., F]

KV-cache writes need no kernel: `cache.index_copy_(dim, positions, new)` with a device `positions`
tensor is graph-safe. q4_gemm_small is graph-safe too, provided one call ran eagerly on the device
first (it allocates a small counter buffer for its split-K reduction); run one stream at a time.
While a CUDA graph is being captured (sm_90+), every kernel here is launched with programmatic
dependent launch: a q4 GEMM then starts loading its weights while the kernel before it finishes.
EXLLAMA_NO_PDL=1 turns that off; EXLLAMA_PDL_MODE=2 releases the next kernel earlier (see q4_gemm_small).
"""
from __future__ import annotations

import os

import torch

from . import build

SMALL_M_MAX = 8      # rows up to which q4_matmul uses the small-M kernel
# Prompt path (q4_matmul_prompt, C++): weights are dequantized to fp16 in column slices of at most this
# many bytes, so the scratch stays small whatever the layer (a 70B gate|up would need 0.9 GB at once).
# EXLLAMA_DEQUANT_SLICE_MB: the slice size for A/B runs (32 by default).
DEQUANT_SLICE_BYTES = int(os.environ.get("EXLLAMA_DEQUANT_SLICE_MB", "32")) << 20
# On Hopper, prompts take one fused GEMM that dequantizes in its main loop (q4_wgmma.cuh).
# EXLLAMA_PROMPT_GEMM: "cublas" forces dequant + cuBLAS, a number forces that token tile (A/B runs).
_PROMPT_GEMM = os.environ.get("EXLLAMA_PROMPT_GEMM", "auto")
PROMPT_BN = -1 if _PROMPT_GEMM == "cublas" else (int(_PROMPT_GEMM) if _PROMPT_GEMM.isdigit() else 0)


def _ext():
    return build.load()


def _aligned(t: torch.Tensor, n: int = 16) -> bool:
    return t.data_ptr() % n == 0


# ---- q4 ---------------------------------------------------------------------------------

def _dequant_torch(qweight, scales, offsets, dtype, mma=False):
    from model.quant import dequantize  # reference; only reached for non-fp16 activations
    return dequantize(qweight, scales, offsets, dtype, mma)


def q4_gemm_small(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                  perm: torch.Tensor | None = None, *, bias: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                  tn: int = 0, splits: int = 0, variant: int = -1, pdl: int = -1,
                  norm_weight: torch.Tensor | None = None, norm_eps: float = 0.0,
                  silu_up: bool = False, mma: bool = False) -> torch.Tensor:
    """out [M, N] = x [M, K][:, perm] @ W + bias + residual for M <= 8 (fp16 in and out, fp32 sums).

    tn (32/64/128 columns a block), splits (K splits) and variant pick a kernel configuration;
    0 / 0 / -1 choose automatically. pdl: -1 automatic (programmatic dependent launch while a CUDA
    graph is captured, sm_90+), 0 off, 1 on (the next kernel may launch once this one's main loop is
    done), 2 on (it may launch at once). The weights are read before waiting on the previous kernel,
    so forcing PDL eagerly is only safe when the kernel right before does not write them.
    `residual` may be `out` itself.
    Fused prologues (decode): `norm_weight` [K] makes it rms_norm(x, norm_weight, norm_eps) @ W (x rows
    normalised over K in each block); `silu_up` takes x = gate|up [M, 2K] and computes silu(gate) * up @ W.
    Both round the transformed x to fp16, as the separate kernels store it.
    mma: qweight is in the mma layout (model/quant.py) and the tensor-core kernel runs (tn is ignored;
    variant indexes its own variants, see q4_mma_variant_name).
    """
    if x.dim() != 2:
        raise ValueError(f"q4_gemm_small: x must be [M, K], got {tuple(x.shape)}")
    x = x.contiguous()
    if not _aligned(x):
        x = x.clone()
    if out is None:
        out = torch.empty((x.shape[0], qweight.shape[1]), dtype=torch.float16, device=x.device)
    if norm_weight is not None and (norm_weight.dtype != torch.float32 or not norm_weight.is_contiguous()):
        norm_weight = norm_weight.float().contiguous()
    if bias is not None and bias.dtype != torch.float16:
        bias = bias.to(torch.float16)
    if residual is not None:
        residual = residual.reshape(out.shape)
    _ext().q4_gemm_small(x, qweight, scales, offsets, perm, bias, residual, out, tn, splits, variant, pdl,
                         norm_weight, float(norm_eps), bool(silu_up), bool(mma))
    return out


def q4_dequant(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
               perm: torch.Tensor | None = None, *, out: torch.Tensor | None = None, mma: bool = False) -> torch.Tensor:
    """fp16 [K, N] = scales * q + offsets (rows of the sorted weight scattered to perm[k] if perm is given);
    mma: qweight in the mma layout (column slices at multiples of 16)."""
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    if out is None:
        out = torch.empty((K, N), dtype=torch.float16, device=qweight.device)
    _ext().q4_dequant(qweight, scales, offsets, perm, out, bool(mma))
    return out


def q4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
              perm: torch.Tensor | None = None, *, bias: torch.Tensor | None = None,
              residual: torch.Tensor | None = None, out: torch.Tensor | None = None, mma: bool = False,
              prompt_bn: int | None = None) -> torch.Tensor:
    """y [..., N] = x[..., perm] @ W + bias + residual; the small-M kernel for <= 8 rows, else the prompt path
    (the fused Hopper GEMM or dequant + cuBLAS; prompt_bn as q4_matmul_prompt's bn, default PROMPT_BN).
    mma: qweight is in the mma layout (tensor-core kernels, and the matching dequantization)."""
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    if x.shape[-1] != K:
        raise ValueError(f"q4_matmul: x has {x.shape[-1]} features, the weight takes K={K}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]

    if x.dtype != torch.float16:
        xs = x2.index_select(1, perm) if perm is not None else x2
        y = xs @ _dequant_torch(qweight, scales, offsets, x.dtype, mma)
        if bias is not None:
            y = y + bias.to(y.dtype)
        if residual is not None:
            y = y + residual.reshape(M, N).to(y.dtype)
        if out is not None:
            out.reshape(M, N).copy_(y)
            return out
        return y.reshape(*lead, N)

    out2 = out.reshape(M, N) if out is not None else None
    if 1 <= M <= SMALL_M_MAX and N % 4 == 0:
        y = q4_gemm_small(x2, qweight, scales, offsets, perm, bias=bias, residual=residual, out=out2, mma=mma)
    else:
        y = out2 if out2 is not None else torch.empty((M, N), dtype=torch.float16, device=x.device)
        res2 = residual.reshape(M, N) if residual is not None else None
        b = bias.to(torch.float16) if bias is not None else None
        bn = PROMPT_BN if prompt_bn is None else prompt_bn
        _ext().q4_matmul_prompt(x2, qweight, scales, offsets, perm, b, res2, y, bool(mma), DEQUANT_SLICE_BYTES, bn)
    return out if out is not None else y.reshape(*lead, N)


def wgmma_plan(M: int, N: int, bn: int = 0, device: torch.device | int | None = None) -> tuple[int, int, int, int]:
    """(token tile, stages, shared memory bytes, blocks) of the fused Hopper prompt GEMM for an [M, N] output;
    zeros where this device or build has no such kernel."""
    index = device if isinstance(device, int) else (torch.device(device).index if device is not None else None)
    if index is None:
        index = torch.cuda.current_device()
    return tuple(_ext().q4_wgmma_plan(M, N, index, bn))


# ---- dense fp16 GEMV ----------------------------------------------------------------------

def dense_gemv(x: torch.Tensor, weight: torch.Tensor, *, residual: torch.Tensor | None = None,
               out: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
               norm_eps: float = 0.0) -> torch.Tensor:
    """out [M, N] = rms_norm?(x [M <= 8, K]) @ weight [N, K]^T (+ residual), fp16, fp32 sums. No cuBLAS, so no
    cuBLAS workspace inside a captured decode step (the fp16 LM head)."""
    x = x.contiguous()
    if not _aligned(x):
        x = x.clone()
    if out is None:
        out = torch.empty((x.shape[0], weight.shape[0]), dtype=torch.float16, device=x.device)
    if norm_weight is not None:
        norm_weight = _norm_weight(norm_weight).float()
    _ext().dense_gemv(x, weight, residual, out, norm_weight, float(norm_eps))
    return out


# ---- norms ------------------------------------------------------------------------------

def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [M, D] view (rows may be strided) or copy if the last dim is not contiguous."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _norm_weight(weight: torch.Tensor) -> torch.Tensor:
    if weight.dtype not in (torch.float16, torch.float32):
        weight = weight.float()
    return weight.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, fp32 math."""
    if x.dtype != torch.float16:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
        return out.copy_(y) if out is not None else y
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float16, device=x.device)
    _ext().rms_norm(_rows(x), _norm_weight(weight), float(eps), out.view(-1, x.shape[-1]))
    return out


def add_rms_norm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """residual += x (in place), then return rms_norm(residual)."""
    if x.dtype != torch.float16 or residual.dtype != torch.float16:
        residual += x
        return rms_norm(residual, weight, eps, out=out)
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float16, device=x.device)
    r2 = residual.view(-1, residual.shape[-1])  # must be a view: it is updated in place
    _ext().add_rms_norm(r2, _rows(x), _norm_weight(weight), float(eps), out.view(-1, x.shape[-1]))
    return out


# ---- rotary -----------------------------------------------------------------------------

def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary in place on x [B, T, H, Dh] (strided views allowed, Dh contiguous).

    cos/sin: fp32 tables [max_pos, Dh/2]; positions: [B, T] or [T] (int32/int64, on x's device).
    Positions outside the table leave their rows unchanged.
    """
    if positions.dim() == 1:
        positions = positions.unsqueeze(0).expand(x.shape[0], -1)
    if x.dtype != torch.float16:
        d = x.shape[-1] // 2
        c = cos[positions].unsqueeze(2)
        s = sin[positions].unsqueeze(2)
        x1, x2 = x[..., :d].float(), x[..., d:].float()
        y = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        x.copy_(y.to(x.dtype))
        return x
    _ext().rotary_(x, cos, sin, positions)
    return x


# ---- activations ------------------------------------------------------------------------

def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up, fp32 math. gate/up may be strided row views (e.g. halves of a fused gate|up output)."""
    if gate.dtype != torch.float16 or up.dtype != torch.float16:
        y = torch.nn.functional.silu(gate) * up
        return out.copy_(y) if out is not None else y
    if out is None:
        out = torch.empty(gate.shape, dtype=torch.float16, device=gate.device)
    F = gate.shape[-1]
    _ext().silu_mul(_rows(gate), _rows(up), out.view(-1, F))
    return out


# ---- decode step (T = 1) ----------------------------------------------------------------

def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor, slot: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
    """q [B, T, H, D] rotated in place; k [B, T, Hkv, D] rotated and v stored at k_cache/v_cache[:, :, slot[0] + t].

    q/k/v may be strided views of a fused qkv output (even strides, D % 4 == 0); positions: rotary
    positions [B, T] (or [B] when T = 1), int32/int64; slot: int64 [1] on the device. Returns q.
    """
    if positions.dim() == 1:
        positions = positions.view(-1, 1)
    _ext().rope_kv_write(q, k, v, cos, sin, positions, slot, k_cache, v_cache)
    return q


def decode_attention_supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether decode_attention has a kernel for these shapes (fp16, D 64/128, <= 8 query heads per kv head)."""
    B, T, H, D = q.shape
    Hkv = k_cache.shape[1]
    return (T == 1 and q.dtype == torch.float16 and k_cache.dtype == torch.float16 and D in (64, 128)
            and H % Hkv == 0 and H // Hkv <= 8 and q.stride(-1) == 1 and q.stride(0) % 8 == 0
            and q.stride(2) % 8 == 0 and _aligned(q) and k_cache.is_contiguous())


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     kv_len: int, pad: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                     splits: int = 0, rope: tuple | None = None) -> torch.Tensor:
    """Single-query attention: q [B, 1, H, D] over cache keys j < kv_len with pad[b] <= j <= pos[0]
    (GQA: query head h reads kv head h // (H / Hkv)); softmax in fp32. Returns [B, 1, H, D] fp16.

    rope = (k, v, cos, sin): first do rope_kv_write's work in the same launch at rotary position
    pos[0] - pad[b] (clamped at 0), the model's (q unrotated; k / v [B, 1, Hkv, D] the new token's, stored
    at pos[0]). q is not modified."""
    B, _, H, D = q.shape
    if out is None:
        out = torch.empty((B, 1, H, D), dtype=torch.float16, device=q.device)
    k, v, cos, sin = rope if rope is not None else (None,) * 4
    _ext().decode_attention(q, k_cache, v_cache, pos, pad, int(kv_len), out, int(splits), k, v, cos, sin)
    return out


# ---- embeddings -------------------------------------------------------------------------

def embed_gather(ids: torch.Tensor, table: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """table[ids] on ids' GPU, with the fp16 table [V, D] in pinned host memory (no VRAM for it).
    Graph-safe; ids outside [0, V) give zero rows."""
    ids = ids.contiguous()
    if out is None:
        out = torch.empty((*ids.shape, table.shape[1]), dtype=torch.float16, device=ids.device)
    _ext().embed_gather(ids.view(-1), table, out)
    return out


# ---- greedy pick --------------------------------------------------------------------------

def argmax_rows(logits: torch.Tensor, *, out: torch.Tensor | None = None,
                ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 2] int64: per row of logits [B, V] (fp16 or fp32, contiguous rows) the index torch.argmax picks
    (a NaN wins, ties go to the lowest index) and 1 if that logit is finite, else 0. ids (B int64 values, may be
    strided): also receives the index (a decode step's next input). One launch; graph-safe."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if out is None:
        out = torch.empty((logits.shape[0], 2), dtype=torch.int64, device=logits.device)
    _ext().argmax_rows(logits, out, ids)
    return out
