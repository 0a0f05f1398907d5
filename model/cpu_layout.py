"""Weights in the CPU kernels' block layouts, and their torch reference.

On CPUs a 4-bit layer stays 4-bit in memory (decode reads ~5 bits a weight instead of 32): at load its q4
tensors (quant.py) are repacked into tiles of TILE output rows x 32 inputs that the kernel reads in one pass
(cuda_ext/cpu/kernels.h; docs/design.md, "CPU layouts"). The LM head (and a tied embedding table) of a
4-bit model is kept in 8 bits the same way (llama.cpp's Q8_0: one fp16 scale per 32 weights), which for a
GGUF file's Q8_0 table is exactly its own values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant import unpack_int4

TILE = 8          # output rows a tile (cuda_ext/cpu/kernels.h)


@dataclass
class CpuWeight:
    """W [N, K] of a linear layer in a CPU layout: bits 4 (w uint8 [N/8, K/32, 8, 16], sc and of fp16
    [N/8, G, 8], W = sc * q + of per group of gs inputs) or 8 (w int8 [N/8, K/32, 8, 32], sc fp16 [N/8, K/32, 8],
    W = sc * q); 8 = TILE. perm: the act-order input permutation (the layer computes x[..., perm] @ W^T).
    levels: how the GEMV quantizes this layer's activations, int8 per block of 32 in one level or two (~15 bits;
    cuda_ext/cpu/kernels.h). The 4-bit layers take two: with one, the embedded model's decode-path perplexity
    rises 0.26-0.40% (q|k|v the most: its errors pass through the softmax), with two 0.03%, for ~6% of decode
    speed; the 8-bit LM head takes one (+0.03%, where two would cost another ~4%). docs/performance.md."""
    bits: int
    w: torch.Tensor
    sc: torch.Tensor
    of: torch.Tensor | None
    K: int
    N: int
    gs: int
    perm: torch.Tensor | None = None
    levels: int = 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w, self.sc, self.of) if t is not None)

    def dequantize(self, n0: int = 0, n1: int | None = None) -> torch.Tensor:
        """Rows n0..n1 of W (multiples of TILE) as fp32 [n1 - n0, K]: the reference the kernels are checked against."""
        n1 = self.N if n1 is None else n1
        t0, t1 = n0 // TILE, n1 // TILE
        w = self.w[t0:t1]
        T = w.shape[0]
        if self.bits == 4:
            q = torch.cat((w & 0xF, w >> 4), -1)                       # [T, K/32, 4, 32]
        else:
            q = w
        q = q.permute(0, 2, 1, 3).reshape(T * TILE, self.K).float()      # [rows, K]
        gs = self.gs if self.bits == 4 else 32
        sc = self.sc[t0:t1].permute(0, 2, 1).reshape(T * TILE, -1).float()
        out = q.view(T * TILE, -1, gs) * sc.unsqueeze(-1)
        if self.of is not None:
            out = out + self.of[t0:t1].permute(0, 2, 1).reshape(T * TILE, -1, 1).float()
        return out.view(T * TILE, self.K)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """W[ids] as fp32 [..., K] (an embedding lookup), read from the blocks of those rows only."""
        flat = ids.reshape(-1)
        t, r = flat // TILE, flat % TILE
        if self.bits == 4:
            w = self.w[t, :, r]                                          # [n, K/32, 16]
            q = torch.cat((w & 0xF, w >> 4), -1).float()
            g = self.K // self.gs
            out = q.view(len(flat), g, -1) * self.sc[t, :, r].float().unsqueeze(-1) \
                + self.of[t, :, r].float().unsqueeze(-1)
        else:
            out = self.w[t, :, r].float() * self.sc[t, :, r].float().unsqueeze(-1)
        return out.reshape(*ids.shape, self.K)


def fits(K: int, N: int, gs: int) -> bool:
    """Whether a [N, K] weight with groups of gs inputs takes the CPU layouts."""
    return K % 32 == 0 and N % TILE == 0 and gs > 0 and gs % 32 == 0 and K % gs == 0


def pack_q4(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, perm: torch.Tensor | None,
            ext=None) -> CpuWeight:
    """q4 tensors (quant.py: qweight [K/8, N], scales/offsets [G, N]) -> the 4-bit CPU layout; ext: the CPU
    kernel module (packs in C++), else torch."""
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    G = scales.shape[0]
    gs = K // G
    if ext is not None:
        w = ext.q4_pack(qweight.contiguous())
    else:
        q = unpack_int4(qweight).t().reshape(N // TILE, TILE, K // 32, 2, 16)      # [t, r, kb, half, j]
        w = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).permute(0, 2, 1, 3).contiguous()
    def tiles(t):
        return t.to(torch.float16).t().reshape(N // TILE, TILE, G).permute(0, 2, 1).contiguous()
    return CpuWeight(4, w, tiles(scales), tiles(offsets), K, N, gs, perm, levels=2)


def pack_q8(weight: torch.Tensor) -> CpuWeight:
    """Dense W [N, K] -> the 8-bit CPU layout, rounding to nearest per block of 32 (scale = max|w| / 127, as
    llama.cpp's Q8_0, so a Q8_0 table dequantized and packed again keeps its values)."""
    N, K = weight.shape
    q = torch.empty(N // TILE, K // 32, TILE, 32, dtype=torch.int8)
    sc = torch.empty(N // TILE, K // 32, TILE, dtype=torch.float16)
    step = 4096                       # rows at a time: a large vocabulary needs no fp32 scratch of its size
    for n0 in range(0, N, step):
        w = weight[n0:n0 + step].float().reshape(-1, K // 32, 32)
        n = w.shape[0]
        d = (w.abs().amax(-1) / 127).to(torch.float16)                    # [n, K/32]
        inv = torch.where(d > 0, 1 / d.float(), torch.zeros_like(d, dtype=torch.float32))
        qi = torch.round(w * inv.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
        q[n0 // TILE:(n0 + n) // TILE] = qi.view(n // TILE, TILE, K // 32, 32).permute(0, 2, 1, 3)
        sc[n0 // TILE:(n0 + n) // TILE] = d.view(n // TILE, TILE, K // 32).permute(0, 2, 1)
    return CpuWeight(8, q, sc, None, K, N, 32)
