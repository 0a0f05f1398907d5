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
        self.gate_up: Linear | None = None  # fused gate|up on GPUs (model.finalize)

    def forward(self, x, lora=None, residual=None):
        if self.gate_up is None:
            gate, up = self.gate_proj(x, lora), self.up_proj(x, lora)
        else:
            gate, up = self.gate_up(x, lora).chunk(2, dim=-1)    # adapters fused too (model/lora.py)
        return self.down_proj(self.ops.silu_mul(gate, up), lora, residual)
