"""SwiGLU MLP: down(silu(gate(x)) * up(x))."""
from __future__ import annotations

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

    def forward(self, x, lora=None, residual=None):
        h = self.ops.silu_mul(self.gate_proj(x, lora), self.up_proj(x, lora))
        return self.down_proj(h, lora, residual)
