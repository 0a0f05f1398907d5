"""Rotary position embeddings: cos/sin tables for all positions, looked up per token."""
from __future__ import annotations

import torch

from .config import ModelConfig, RuntimeConfig, rope_inv_freq


class Rotary:
    def __init__(self, cfg: ModelConfig, runtime: RuntimeConfig, device):
        self.cfg, self.runtime = cfg, runtime
        n = max(runtime.max_seq_len, 1)
        inv = rope_inv_freq(cfg, runtime, seq_len=n)
        # Tables in fp64 then fp32: fp32 position * freq loses digits at long contexts.
        t = torch.arange(n, dtype=torch.float64)
        freqs = torch.outer(t, inv.double())
        self.cos = freqs.cos().float().to(device)
        self.sin = freqs.sin().float().to(device)
