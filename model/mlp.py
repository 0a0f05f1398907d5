"""SwiGLU MLP: down(silu(gate(x)) * up(x))."""
from __future__ import annotations

import math

from torch import nn

from .linear import Linear
from .ops import Ops


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, ops: Ops):
        super().__init__()
        self.ops = ops
        self.gate_proj = Linear(hidden, intermediate, ops)
        self.up_proj = Linear(hidden, intermediate, ops)
        self.down_proj = Linear(intermediate, hidden, ops)
        self.gate_up: Linear | None = None  # fused gate|up on GPUs (model.finalize)

    def forward(self, x, lora=None, residual=None):
        if self.gate_up is None:
            gate, up = self.gate_proj(x, lora), self.up_proj(x, lora)
        else:
            gate, up = self.gate_up(x, lora).chunk(2, dim=-1)    # adapters fused too (model/lora.py)
        return self.down_proj(self.ops.silu_mul(gate, up), lora, residual)

    # Prompts on GPUs: the [T, 2F] gate|up activation of a long prompt is the step's largest buffer;
    # above this many bytes the FFN runs in column slices instead (down accumulates over them).
    SLICE_BYTES = 32 << 20

    def ffn_slices(self, x, lora=None) -> list[tuple[int, int]] | None:
        """FFN column ranges for forward_sliced, or None where the fused path should run (short inputs,
        adapters, dense or act-order down weights, CPUs)."""
        F = self.gate_proj.out_features
        rows = x.numel() // x.shape[-1]
        gu, down = self.gate_up, self.down_proj
        if (gu is None or rows * 2 * F * x.element_size() <= self.SLICE_BYTES or not x.is_cuda or lora in gu.lora
                or lora in down.lora or not down.quantized or down.perm is not None):
            return None
        gs = F // down.scales.shape[0]
        unit = math.lcm(128, gs)
        width = max(unit, self.SLICE_BYTES // (rows * 2 * x.element_size()) // unit * unit)
        if F % unit or width >= F:
            return None
        return [(f0, min(F, f0 + width)) for f0 in range(0, F, width)]

    def forward_sliced(self, x, slices, residual):
        """down(silu(gate(x)) * up(x)) + residual over FFN column slices: the same sums, in slices of the
        activation (x is already normalised)."""
        F = self.gate_proj.out_features
        y = residual
        for f0, f1 in slices:
            gate = self.gate_up.q4_part(cols=(f0, f1))(x)
            up = self.gate_up.q4_part(cols=(F + f0, F + f1))(x)
            act = self.ops.silu_mul(gate, up, out=gate)
            y = self.down_proj.q4_part(rows=(f0, f1))(act, residual=y)
        return y
