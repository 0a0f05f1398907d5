"""Llama model assembly: embeddings, decoder layers, final norm, LM head.

Module names follow the HF checkpoint keys (model.layers.N.self_attn.q_proj, ...), so loading
needs no mapping table beyond stripping the `model.` prefix.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .cache import KVCache, StaticPos
from .config import ModelConfig, RuntimeConfig
from .linear import Linear, fuse
from .mlp import MLP
from .norm import RMSNorm
from .ops import Ops
from .rope import Rotary


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, ops: Ops):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = Attention(cfg, idx, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, ops)

    def forward(self, h, rope, pos, cache, start, mask, lora):
        # The residual adds ride on the output projections (fused into the 4-bit kernel on GPUs).
        h = self.self_attn(self.input_layernorm(h), rope, pos, cache, start, mask, lora, residual=h)
        return self.mlp(self.post_attention_layernorm(h), lora, residual=h)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, runtime: RuntimeConfig):
        super().__init__()
        self.cfg, self.runtime = cfg, runtime
        self.ops = Ops(use_kernels=not runtime.force_reference)
        self.device = runtime.torch_device()
        self.dtype = runtime.torch_dtype()
        self.embed_tokens: torch.Tensor | None = None   # [V, D], dense
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, self.ops) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.ops)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, self.ops)
        self.rotary: Rotary | None = None
        self.lora_adapters: dict = {}

    # -- set-up ---------------------------------------------------------------------------
    def finalize(self):
        """Move every weight to the runtime device/dtype once loading is complete."""
        dev, dt, wdt = self.device, self.dtype, self.runtime.torch_weight_dtype()
        dequant = dev.type == "cpu" and not self.runtime.keep_q4
        if self.cfg.tie_word_embeddings and self.lm_head.weight is None and not self.lm_head.quantized:
            self.lm_head.set_dense(self.embed_tokens)
        self.embed_tokens = self.embed_tokens.to(dev, dt)
        for mod in self.modules():
            if isinstance(mod, Linear):
                mod.to_device(dev, dt, wdt, dequant)
            elif isinstance(mod, RMSNorm):
                mod.weight = mod.weight.to(dev, torch.float32)
        if self.cfg.tie_word_embeddings and self.lm_head.weight is not None \
                and self.lm_head.weight.dtype == dt and self.lm_head.weight.shape == self.embed_tokens.shape:
            self.lm_head.weight = self.embed_tokens   # one copy of the tied table
        if not dequant:
            for layer in self.layers:
                a, m = layer.self_attn, layer.mlp
                a.qkv = fuse([a.q_proj, a.k_proj, a.v_proj])
                m.gate_up = fuse([m.gate_proj, m.up_proj])
        self.rotary = Rotary(self.cfg, self.runtime, dev)
        return self

    def new_cache(self, batch_size: int = 1, max_seq_len: int | None = None) -> KVCache:
        return KVCache(self.cfg, max_seq_len or self.runtime.max_seq_len, batch_size, self.device, self.dtype)

    # -- forward --------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = True,
                lora: str | None = None, pad: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> fp32 logits [B, 1 or T, V].

        With a cache the tokens go at cache.length and the length advances. `pad` [B] counts
        left-padding tokens per row (batched prompts of different lengths): padded keys are
        masked and positions start after the padding.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + T > (cache.max_seq_len if cache else self.runtime.max_seq_len):
            raise ValueError(f"{start + T} tokens exceed the maximum sequence length")
        input_ids = input_ids.to(self.device)
        pos = torch.arange(start, start + T, device=self.device).unsqueeze(0).expand(B, T)
        if pad is not None:
            pad = pad.to(self.device)
            pos = (pos - pad.unsqueeze(1)).clamp(min=0)
        mask = self._mask(B, T, start, pad)
        h = self._layers(input_ids, pos, cache, start, mask, lora)
        if cache is not None:
            cache.length = start + T
        if last_only:
            h = h[:, -1:]
        return self.lm_head(self.norm(h), lora).float()

    def _layers(self, input_ids, pos, cache, start, mask, lora):
        h = self.embed_tokens[input_ids]
        for layer in self.layers:
            h = layer(h, self.rotary, pos, cache, start, mask, lora)
        return h

    @torch.inference_mode()
    def decode_static(self, input_ids: torch.Tensor, cache: KVCache, pos: torch.Tensor, kv_len: int,
                      pad: torch.Tensor | None = None, lora: str | None = None) -> torch.Tensor:
        """One decode step whose shapes and host values do not depend on the position.

        input_ids [B, 1]; pos [1] int64 on the device (the cache slot to write); keys up to
        kv_len (> pos) are read and those past pos masked. The caller advances cache.length.
        This is the step a CUDA graph captures (model/graph.py).
        """
        B = input_ids.shape[0]
        rope_pos = pos.view(1, 1).expand(B, 1)
        if pad is not None:
            rope_pos = (rope_pos - pad.view(B, 1)).clamp(min=0)
        k = torch.arange(kv_len, device=self.device).view(1, 1, 1, kv_len)
        mask = k <= pos.view(1, 1, 1, 1)
        if pad is not None:
            mask = mask & (k >= pad.view(B, 1, 1, 1))
        mask = mask.expand(B, 1, 1, kv_len)
        h = self._layers(input_ids, rope_pos, cache, StaticPos(pos, kv_len), mask, lora)
        return self.lm_head(self.norm(h), lora).float()

    def _mask(self, B, T, start, pad):
        """Boolean attention mask, or None where SDPA's own causal flag (or no mask) is right."""
        if pad is None and (start == 0 or T == 1):
            return None
        q = torch.arange(start, start + T, device=self.device).view(1, T, 1)
        k = torch.arange(start + T, device=self.device).view(1, 1, -1)
        m = k <= q
        if pad is not None:
            # A padded query still sees itself, so its softmax has no empty row (no NaN).
            m = m & ((k >= pad.view(B, 1, 1)) | (k == q))
        return m.unsqueeze(1).expand(B, 1, T, start + T)
