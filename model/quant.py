"""The engine's 4-bit weight format and its torch reference.

One format serves GPTQ (integer zero points) and GGUF Q4_0/Q4_1 (float offsets):
    W[n, k] = scales[k // gs, n] * q[k, n] + offsets[k // gs, n]
with q packed eight to an int32 along K, exactly as GPTQ packs `qweight`. GPTQ's integer
zeros become `offset = -scale * zero`; Q4_1's `w = d * q + m` maps straight on, so GGUF
weights load without re-quantization (forcing Q4_1 into integer zeros costs perplexity).
See docs/design.md for the full contract the CUDA kernels follow.
"""
from __future__ import annotations

import torch

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack q [K, N] (values 0..15) into int32 [K // 8, N]; nibble j of row i is q[8i + j]."""
    K, N = q.shape
    if K % 8:
        raise ValueError(f"pack_int4: K={K} is not a multiple of 8")
    # Work along K in memory: two nibbles a byte, then four little-endian bytes a word.
    b = q.t().to(torch.uint8).reshape(N, K // 8, 4, 2)
    words = (b[..., 0] & 0xF) | ((b[..., 1] & 0xF) << 4)          # [N, K/8, 4] uint8
    return words.contiguous().view(torch.int32).reshape(N, K // 8).t().contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: int32 [K // 8, N] -> uint8 [K, N]."""
    K8, N = packed.shape
    b = packed.t().contiguous().view(torch.uint8).reshape(N, K8 * 4)
    q = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(N, K8 * 8)
    return q.t().contiguous()


def pack_cols_int4(z: torch.Tensor) -> torch.Tensor:
    """GPTQ's qzeros packing: z [G, N] -> int32 [G, N // 8], eight columns per word."""
    return pack_int4(z.t().contiguous()).t().contiguous()


def unpack_cols_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_cols_int4: int32 [G, N // 8] -> uint8 [G, N]."""
    return unpack_int4(packed.t().contiguous()).t().contiguous()


# ---- the mma layout (GPUs) ----------------------------------------------------------------
# The tensor-core GEMV (cuda_ext/csrc/q4_mma.cuh) reads qweight with its nibbles permuted inside each
# block of 8 packed rows x 16 columns, so that one 16-byte load is a lane's mma fragments: nibble i of
# the word at packed row 8c + g, column 16j + 4t + s holds q[k, n] with n = 16j + g + 8 (i & 1) and
# k = 64c + 16s + 2t + 8 ((i >> 1) & 1) + (i >> 2). Same shape and dtype as the row layout; column
# slices at multiples of 16 (the parts of a fused q|k|v) stay valid.
# Unpacked q of a piece [64 C, N] viewed as (c, s, kh, t, kl, j, nh, g) with k = 64c + 16s + 8kh + 2t + kl
# and n = 16j + 8nh + g; the mma layout's nibble rows are (c, g, i = 4 kl + 2 kh + nh), its columns (j, t, s).
_MMA_DIMS = (4, 2, 4, 2)                 # (s, kh, t, kl) within a chunk of 64 K
_TO_MMA = (0, 7, 4, 2, 6, 5, 3, 1)       # (c, s, kh, t, kl, j, nh, g) -> (c, g, kl, kh, nh, j, t, s)
_FROM_MMA = (0, 7, 3, 6, 2, 5, 4, 1)     # its inverse
_PIECE_BYTES = 16 << 20                  # unpacked bytes converted at a time (bounds the scratch)


def mma_layout_ok(K: int, N: int, groups: int) -> bool:
    """Whether a [K, N] weight with this many groups can take the mma layout (the kernel's constraint)."""
    gs = K // groups if groups > 0 and K % groups == 0 else 0
    return K % 64 == 0 and N % 16 == 0 and (gs == 32 or (gs > 0 and gs % 64 == 0))


def _relayout(qweight: torch.Tensor, to_mma: bool) -> torch.Tensor:
    """A nibble permutation inside each 64 K chunk, through pack_int4 / unpack_int4, a piece at a time."""
    K8, N = qweight.shape
    out = torch.empty_like(qweight)
    step = max(8, _PIECE_BYTES // (64 * N) * 8)       # packed rows a piece, whole chunks of 64 K
    for r0 in range(0, K8, step):
        q = unpack_int4(qweight[r0:r0 + step])
        C = q.shape[0] // 64
        if to_mma:
            q = q.view(C, *_MMA_DIMS, N // 16, 2, 8).permute(*_TO_MMA)
        else:
            q = q.view(C, 8, 2, 2, 2, N // 16, 4, 4).permute(*_FROM_MMA)
        out[r0:r0 + step] = pack_int4(q.reshape(C * 64, N))
    return out


def to_mma_layout(qweight: torch.Tensor) -> torch.Tensor:
    """Row-layout qweight [K // 8, N] -> the same weights in the mma layout (K % 64 == 0, N % 16 == 0)."""
    K8, N = qweight.shape
    if K8 % 8 or N % 16:
        raise ValueError(f"mma layout needs K % 64 == 0 and N % 16 == 0, got K={K8 * 8} N={N}")
    return _relayout(qweight, True)


def from_mma_layout(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of to_mma_layout."""
    return _relayout(qweight, False)


def group_size_of(qweight: torch.Tensor, scales: torch.Tensor) -> int:
    return qweight.shape[0] * 8 // scales.shape[0]


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
               dtype: torch.dtype = torch.float32, mma: bool = False) -> torch.Tensor:
    """Reference dequantization to W^T of shape [K, N] (inputs along rows); mma: qweight is in the mma layout."""
    q = unpack_int4(from_mma_layout(qweight) if mma else qweight)
    G, N = scales.shape
    w = q.view(G, -1, N).to(dtype) * scales.to(dtype).view(G, 1, N) + offsets.to(dtype).view(G, 1, N)
    return w.view(-1, N)


def q4_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  offsets: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
    """y = x[..., perm] @ W^T computed in fp32 (the reference every kernel is checked against)."""
    if perm is not None:
        x = x.index_select(-1, perm)
    w = dequantize(qweight, scales, offsets, torch.float32)
    return (x.float() @ w).to(x.dtype)


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              g_idx: torch.Tensor | None, zero_offset: int = 1):
    """Convert a GPTQ layer to (qweight, scales, offsets, perm).

    GPTQ stores `zero - 1` in qzeros (the "zeros minus one" convention of AutoGPTQ and
    GPTQ-for-LLaMa), so the true zero is stored + zero_offset. With act-order, rows come in
    any group order; sorting rows by g_idx makes each group contiguous, and the layer then
    reads its input through `perm`.
    """
    K = qweight.shape[0] * 8
    G, N = scales.shape
    if K % G:
        raise ValueError(f"{G} groups do not divide K={K}")
    gs = K // G
    zeros = unpack_cols_int4(qzeros)[:, :N].float() + zero_offset
    scales32 = scales.float()
    offsets = (-scales32 * zeros).to(torch.float16)
    scales16 = scales32.to(torch.float16)
    perm = None
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64)
        trivial = torch.arange(K, device=g_idx.device) // gs
        if not torch.equal(g_idx, trivial):
            counts = torch.bincount(g_idx, minlength=G)
            if not bool((counts == gs).all()):
                raise ValueError("g_idx does not give every group the same number of rows")
            perm = torch.argsort(g_idx, stable=True)
            qweight = pack_int4(unpack_int4(qweight).index_select(0, perm))
    return qweight.contiguous(), scales16.contiguous(), offsets.contiguous(), perm


def quantize_rtn(w: torch.Tensor, group_size: int, sym: bool = False):
    """Round-to-nearest 4-bit quantization of W [N, K] into GPTQ tensors (qweight, qzeros, scales, g_idx).

    Used by tests and the random-checkpoint tool; the real quantizer is GPTQ.
    """
    N, K = w.shape
    gs = K if group_size <= 0 else group_size
    wt = w.t().float().reshape(K // gs, gs, N)  # [G, gs, N]
    if sym:
        amax = wt.abs().amax(dim=1).clamp(min=1e-8)
        scale = amax / 7.5
        zero = torch.full_like(scale, 8.0)
    else:
        lo, hi = wt.amin(dim=1), wt.amax(dim=1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        # Zero 0 cannot be stored under the zeros-minus-one convention, so the range starts at 1.
        zero = torch.round(-lo / scale).clamp(1, 15)
    scale16 = scale.to(torch.float16)
    q = torch.clamp(torch.round(wt / scale16.float().unsqueeze(1) + zero.unsqueeze(1)), 0, 15)
    qweight = pack_int4(q.reshape(K, N).to(torch.int32))
    qzeros = pack_cols_int4((zero - 1).to(torch.int32))
    g_idx = torch.arange(K, dtype=torch.int32) // gs
    return qweight, qzeros, scale16, g_idx
