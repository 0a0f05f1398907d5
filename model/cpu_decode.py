"""The CPU decode step in one call: a packed model's layers handed to the CPU kernels' `CpuDecoder`.

For a few tokens (B T <= Ops.CPU_GEMV_MAX_ROWS) on a CPU, the Python layers cost more than their kernels (~100 us
of module calls and tensor bookkeeping a layer against ~150 us of GEMV); the C++ decoder runs every layer's
kernels (the same ones the Python path calls, model/ops.py) back to back without the GIL. LoRA adapters, left
padding and anything not packed take the Python path (LlamaModel.forward decides).
"""
from __future__ import annotations

import torch

from .linear import Linear


def _packed(lin: Linear | None) -> tuple | None:
    if lin is None or lin.packed is None:
        return None
    cw = lin.packed
    bias = lin.bias.float().contiguous() if lin.bias is not None else None
    return (cw.w, cw.sc, cw.of, cw.bits, cw.K, cw.gs, cw.levels, cw.perm, bias)


def build(model):
    """A CpuDecoder for a packed fp32 CPU model, or None where some layer cannot take it."""
    ext = model.ops.cpu_kernels()
    if ext is None or model.device.type != "cpu" or model.dtype != torch.float32:
        return None
    cfg = model.cfg
    dec = ext.CpuDecoder(cfg.num_attention_heads, cfg.hidden_size, cfg.rms_norm_eps)
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        parts = [_packed(a.qkv), _packed(a.o_proj), _packed(m.gate_up), _packed(m.down_proj)]
        if any(p is None for p in parts) or layer.input_layernorm.eps != cfg.rms_norm_eps:
            return None
        dec.add_layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, *parts)
    head = _packed(model.lm_head)
    if head is None:
        return None
    dec.set_head(model.norm.weight, head)
    return dec
