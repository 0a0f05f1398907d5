"""Grouped-query self-attention with rotary embeddings and the KV cache."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .cache import StaticPos
from .config import ModelConfig
from .linear import Linear
from .ops import Ops


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, ops: Ops):
        super().__init__()
        self.layer_idx, self.ops = layer_idx, ops
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = Linear(d, self.n_heads * self.head_dim, ops)
        self.k_proj = Linear(d, self.n_kv * self.head_dim, ops)
        self.v_proj = Linear(d, self.n_kv * self.head_dim, ops)
        self.o_proj = Linear(self.n_heads * self.head_dim, d, ops)
        self.qkv: Linear | None = None      # fused q|k|v on GPUs (model.finalize)

    def _qkv(self, x, lora, norm=None):
        if self.qkv is None:
            if norm is not None:
                x = norm(x)
            return self.q_proj(x, lora), self.k_proj(x, lora), self.v_proj(x, lora)
        # norm fused into the GEMV on GPUs (unless an adapter needs the normed x); adapters of q/k/v
        # were fused too (model/lora.py)
        y = self.qkv(x, lora, norm=norm)
        return y.split([self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], -1)

    def forward(self, x, rope, pos, cache=None, start=0, mask=None, lora=None, residual=None, norm=None,
                residual_inplace=False):
        """x [B, T, D] at rotary positions pos [B, T]; returns o_proj(attention) (+ residual, which
        residual_inplace lets it overwrite).

        norm: an RMSNorm applied to x first (fused into the q|k|v GEMV on GPUs)."""
        B, T, _ = x.shape
        if self.qkv is not None and self.qkv.packed is not None and cache is not None and mask is None \
                and not isinstance(start, StaticPos):
            # CPU, a few tokens: rotary, the cache write and attention in one kernel call on the fused projection
            qkv = self.qkv(x, lora, norm=norm)
            cache.check_room(start, T)
            o = self.ops.cpu_qkv_attention(qkv, rope.cos, rope.sin, start, cache.k[self.layer_idx],
                                           cache.v[self.layer_idx], self.n_heads)
            if o is not None:
                return self.o_proj(o, lora, residual, residual_inplace=residual_inplace)
            q, k, v = qkv.split([self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], -1)
        else:
            q, k, v = self._qkv(x, lora, norm)
        q = q.reshape(B, T, self.n_heads, self.head_dim)
        k = k.reshape(B, T, self.n_kv, self.head_dim)
        v = v.reshape(B, T, self.n_kv, self.head_dim)
        if isinstance(start, StaticPos) and start.fused and T == 1 and cache is not None:
            # Static decode step: rotary, KV write and single-query attention over the cache in one kernel.
            kc, vc = cache.k[self.layer_idx], cache.v[self.layer_idx]
            o = self.ops.rope_decode_attention(q, k, v, rope.cos, rope.sin, pos, start.pos, kc, vc, start.kv_len,
                                               start.pad)
            return self.o_proj(o.reshape(B, T, -1), lora, residual, residual_inplace=residual_inplace)
        if cache is not None and not isinstance(start, StaticPos):
            # Prompt with a cache: rotary of q and k and the cache write in one kernel on GPUs; attention
            # then reads keys and values from the cache.
            cache.check_room(start, T)
            kc, vc = cache.k[self.layer_idx], cache.v[self.layer_idx]
            q = self.ops.rope_kv_write(q, k, v, rope.cos, rope.sin, pos, cache.slot(start, kc.device), kc, vc)
            q, k, v = q.transpose(1, 2), kc[:, :, :start + T], vc[:, :, :start + T]
        else:
            q = self.ops.rotary(q, rope.cos, rope.sin, pos).transpose(1, 2)   # [B, H, T, D]
            k = self.ops.rotary(k, rope.cos, rope.sin, pos).transpose(1, 2)   # [B, Hkv, T, D]
            v = v.transpose(1, 2)
            if cache is not None:
                k, v = cache.write(self.layer_idx, k, v, start)
        causal = mask is None and T > 1
        if k.dtype != q.dtype:            # an fp16 cache under fp32 activations (packed CPU models)
            k, v = k.to(q.dtype), v.to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1), lora, residual, residual_inplace=residual_inplace)
