"""One place that picks, per op, the CUDA kernel or its pure-torch reference.

The references are the definition of each op: kernels are tested against them, and they are
what runs on CPUs. `Ops(use_kernels=False)` forces the references everywhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import dequantize


# ---- references -------------------------------------------------------------------------

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Accumulate in fp32 whatever the activation dtype: fp16 sums of squares overflow.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary: x [B, T, H, D]; cos/sin tables [P, D/2] (fp32); pos [B, T]."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    c, s = cos[pos].unsqueeze(2), sin[pos].unsqueeze(2)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def q4_matmul_dequant(x, qweight, scales, offsets, perm):
    """x[..., perm] @ W^T with W dequantized to x's dtype (the reference path on any device)."""
    if perm is not None:
        x = x.index_select(-1, perm)
    return x @ dequantize(qweight, scales, offsets, x.dtype)


# ---- dispatch ---------------------------------------------------------------------------

class Ops:
    """Per-model dispatcher; `use_kernels` comes from RuntimeConfig (force_reference turns it off)."""

    def __init__(self, use_kernels: bool = True):
        self._ext = None
        self.use_kernels = use_kernels

    def kernels_for(self, t: torch.Tensor):
        """The cuda_ext ops module when t is on a GPU and the extension builds, else None."""
        if not (self.use_kernels and t.is_cuda):
            return None
        if self._ext is None:
            from cuda_ext import build
            self._ext = build.ops_module() if build.is_available() else False
        return self._ext or None

    def rms_norm(self, x, weight, eps):
        k = self.kernels_for(x)
        return k.rms_norm(x, weight, eps) if k else rms_norm_ref(x, weight, eps)

    def rotary(self, x, cos, sin, pos):
        """x [B, T, H, D] rotated at positions pos [B, T]; may work in place."""
        k = self.kernels_for(x)
        return k.rotary_(x, cos, sin, pos) if k else rotary_ref(x, cos, sin, pos)

    def silu_mul(self, gate, up):
        k = self.kernels_for(gate)
        return k.silu_mul(gate, up) if k else silu_mul_ref(gate, up)

    def q4_matmul(self, x, qweight, scales, offsets, perm, bias=None, residual=None):
        """x[..., perm] @ W^T + bias + residual (the kernel fuses the two adds)."""
        k = self.kernels_for(x)
        if k:
            return k.q4_matmul(x, qweight, scales, offsets, perm, bias=bias, residual=residual)
        y = q4_matmul_dequant(x, qweight, scales, offsets, perm)
        if bias is not None:
            y = y + bias
        return y if residual is None else y + residual
