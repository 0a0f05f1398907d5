"""Linear layers: dense (fp16/bf16/fp32) or 4-bit (the q4 format of quant.py)."""
from __future__ import annotations

import torch
from torch import nn

from . import cpu_layout
from .ops import Ops
from .quant import dequantize, mma_layout_ok, to_mma_layout


class Linear(nn.Module):
    """y = x @ W^T + b, with W dense or 4-bit; LoRA adapters (if any) add their low-rank term."""

    def __init__(self, in_features: int, out_features: int, ops: Ops):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.ops = ops
        self.weight: torch.Tensor | None = None     # dense [N, K]
        self.qweight = self.scales = self.offsets = self.perm = None
        self.mma = False                              # qweight in the mma layout (GPUs, quant.py)
        self.packed: cpu_layout.CpuWeight | None = None  # the weights in a CPU kernel layout (then no qweight)
        self.views: list[Linear] = []                 # parts whose tensors view this one's (fuse)
        self.bias: torch.Tensor | None = None
        self.lora: dict = {}                          # adapter name -> (A [r, K], B [N, r], scale)

    @property
    def quantized(self) -> bool:
        return self.qweight is not None or self.packed is not None

    @property
    def device(self) -> torch.device:
        if self.packed is not None:
            return self.packed.w.device
        return (self.qweight if self.qweight is not None else self.weight).device

    def set_dense(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias
        self.qweight = self.scales = self.offsets = self.perm = self.packed = None

    def set_q4(self, qweight, scales, offsets, perm=None, bias=None, mma=False):
        self.qweight, self.scales, self.offsets, self.perm, self.bias = qweight, scales, offsets, perm, bias
        self.weight, self.mma, self.packed = None, mma, None

    def set_cpu(self, cw: "cpu_layout.CpuWeight", bias=None):
        """Weights in a CPU layout (model/cpu_layout.py); the q4 or dense tensors are dropped."""
        self.set_dense(None, bias)
        self.packed = cw

    def pack_for_cpu(self, ext=None) -> bool:
        """Repack 4-bit weights (and so the views of them) into the 4-bit CPU layout, or dense weights into the
        8-bit one (the LM head of a 4-bit model); returns whether it did. ext: the CPU kernel module (packs
        faster), or None."""
        parts = [self, *self.views]
        if self.qweight is not None:
            if self.mma or not all(cpu_layout.fits(p.in_features, p.out_features,
                                                   p.in_features // p.scales.shape[0]) for p in parts):
                return False
            cw = cpu_layout.pack_q4(self.qweight, self.scales, self.offsets, self.perm, ext)
        elif self.weight is not None and not self.views and cpu_layout.fits(self.in_features, self.out_features, 32):
            cw = cpu_layout.pack_q8(self.weight)
        else:
            return False
        col = 0
        for p in parts:
            n = p.out_features
            t0, t1 = col // cpu_layout.TILE, (col + n) // cpu_layout.TILE
            p.set_cpu(cw if p is self else cpu_layout.CpuWeight(
                cw.bits, cw.w[t0:t1], cw.sc[t0:t1], cw.of[t0:t1] if cw.of is not None else None, cw.K, n, cw.gs,
                cw.perm, cw.levels), p.bias)
            col += n
        return True

    def use_mma_layout(self) -> bool:
        """Rewrite qweight (and so the views of it) in place into the mma layout of the tensor-core GEMV,
        where every part takes it; returns whether it did."""
        if not self.quantized or self.mma:
            return self.mma
        if not all(mma_layout_ok(p.in_features, p.out_features, p.scales.shape[0]) for p in [self, *self.views]):
            return False
        self.qweight.copy_(to_mma_layout(self.qweight))
        for p in [self, *self.views]:
            p.mma = True
        return True

    def dense_weight(self, dtype=torch.float32) -> torch.Tensor:
        """W [N, K] in natural input order (undoing act-order), for tests and export."""
        if self.packed is not None:
            w = self.packed.dequantize().to(dtype)                                       # columns in perm order
            if self.packed.perm is not None:
                full = torch.empty_like(w)
                full[:, self.packed.perm] = w
                w = full
            return w
        if not self.quantized:
            return self.weight.to(dtype)
        wt = dequantize(self.qweight, self.scales, self.offsets, dtype, self.mma)   # rows in perm order
        if self.perm is not None:
            full = torch.empty_like(wt)
            full[self.perm] = wt
            wt = full
        return wt.t().contiguous()

    def to_device(self, device, dtype, weight_dtype, dequantize_q4: bool):
        """Move to the device; on CPUs 4-bit weights become dense (dequantize once, matmul fast)."""
        if self.quantized and dequantize_q4:
            self.set_dense(self.dense_weight(torch.float32).to(device), self.bias)
        if self.weight is not None:
            self.weight = self.weight.to(device, weight_dtype).contiguous()
        for name in ("qweight", "scales", "offsets", "perm"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        if self.bias is not None:
            self.bias = self.bias.to(device, dtype)

    def forward(self, x: torch.Tensor, lora: str | None = None, residual: torch.Tensor | None = None,
                norm=None, silu: bool = False, residual_inplace: bool = False):
        """x @ W^T + b (+ the adapter's term) (+ residual, fused into the 4-bit kernel on GPUs).

        norm (an RMSNorm): the input is norm(x); silu: the input is silu(gate) * up of x = gate|up.
        For 4-bit weights and a few rows on a GPU both run inside the GEMV (model/ops.py), and so does the norm
        for fp16 dense weights (the LM head). residual_inplace: the residual may be overwritten with the result
        (the model's residual stream: saves the copy a GEMM with beta = 1 would make)."""
        if not self.quantized and not silu and self.bias is None and lora not in self.lora:
            y = self.ops.dense_gemv(x, self.weight, (norm.weight, norm.eps) if norm is not None else None)
            if y is not None:
                return y if residual is None else y + residual
        if (norm is not None or silu) and (not self.quantized or lora in self.lora):
            if norm is not None:
                x = norm(x)
            if silu:
                f = x.shape[-1] // 2
                x = self.ops.silu_mul(x[..., :f], x[..., f:])
            norm, silu = None, False
        if self.packed is not None:
            out = residual if residual_inplace and residual is not None and residual.is_contiguous() else None
            y = self.ops.cpu_matmul(x, self.packed, self.bias, residual,
                                    norm=(norm.weight, norm.eps) if norm is not None else None, silu=silu, out=out)
            residual = None
        elif self.quantized:
            out = residual if residual_inplace and residual is not None and residual.is_contiguous() else None
            y = self.ops.q4_matmul(x, self.qweight, self.scales, self.offsets, self.perm, self.bias, residual,
                                   norm=(norm.weight, norm.eps) if norm is not None else None, silu=silu,
                                   mma=self.mma, out=out)
            residual = None
        elif self.weight.dtype == x.dtype:
            y = torch.nn.functional.linear(x, self.weight)
        elif x.numel() <= 8 * x.shape[-1]:
            # A few rows (decode): stream the narrow weights, convert only the activations.
            y = torch.nn.functional.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        else:
            # Many rows (prompt): widen the weights once, keep the activations exact.
            y = torch.nn.functional.linear(x, self.weight.to(x.dtype))
        if self.bias is not None and not self.quantized:
            y = y + self.bias
        if residual is not None:
            y = y + residual
        if lora in self.lora:
            # y + scale * (x A^T) B^T: the add and the scale ride on the second GEMM
            a, b, scale = self.lora[lora]
            x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
            y = torch.addmm(y2, x2 @ a.t(), b.t(), alpha=scale).view(y.shape)
        return y


def fuse(parts: list[Linear]) -> Linear | None:
    """One 4-bit Linear computing several that share their input (q|k|v, gate|up): one launch,
    one pass over the input. The parts keep views of the fused tensors (no second copy) and
    their adapters. None when the parts cannot share a kernel (dense, different act-order
    permutations or group sizes, biases)."""
    first = parts[0]
    if not all(p.quantized and p.bias is None for p in parts):
        return None
    if any(p.scales.shape[0] != first.scales.shape[0] for p in parts):
        return None
    if any((p.perm is None) != (first.perm is None) or (p.perm is not None and not torch.equal(p.perm, first.perm))
           for p in parts):
        return None
    if any(p.mma for p in parts):
        return None                       # fuse before choosing the layout (model.finalize)
    fused = Linear(first.in_features, sum(p.out_features for p in parts), first.ops)
    fused.set_q4(torch.cat([p.qweight for p in parts], 1), torch.cat([p.scales for p in parts], 1),
                 torch.cat([p.offsets for p in parts], 1), first.perm)
    col = 0
    for p in parts:
        n = p.out_features
        p.set_q4(fused.qweight[:, col:col + n], fused.scales[:, col:col + n], fused.offsets[:, col:col + n],
                 fused.perm)
        col += n
    fused.views = list(parts)
    return fused
