"""Preallocated KV cache with a current length; rewinding is just moving the length back."""
from __future__ import annotations

import mmap

import numpy as np
import torch

from .config import ModelConfig


class StaticPos:
    """Decode position held on the device ([1] int64) and the number of keys attended to.

    pad: left-padding per row ([B] int64 on the device) or None; fused: the attention layers take the
    fused decode kernels (rope_kv_write + decode_attention, model/ops.py) and need no mask."""

    def __init__(self, pos: torch.Tensor, kv_len: int, pad: torch.Tensor | None = None, fused: bool = False):
        self.pos, self.kv_len, self.pad, self.fused = pos, kv_len, pad, fused


def _zeros(shape, device, dtype) -> torch.Tensor:
    """Zeros; in host memory an anonymous mapping of its own, whose pages the OS provides (zeroed) only once written
    and takes back when the tensor goes: a 2048-token cache costs the process memory for the positions used, not
    all of them (torch.zeros writes every page, and malloc'd memory would stay with the process)."""
    if torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float16):
        nd = np.float32 if dtype == torch.float32 else np.float16
        n = int(np.prod(shape))
        buf = mmap.mmap(-1, max(1, n * np.dtype(nd).itemsize))
        return torch.from_numpy(np.frombuffer(buf, dtype=nd, count=n).reshape(shape))
    return torch.zeros(shape, device=device, dtype=dtype)


class KVCache:
    def __init__(self, cfg: ModelConfig, max_seq_len: int, batch_size: int = 1,
                 device="cpu", dtype=torch.float32, layer_devices: list | None = None):
        self.max_seq_len, self.batch_size = max_seq_len, batch_size
        shape = (batch_size, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)
        devs = layer_devices or [device] * cfg.num_hidden_layers
        self.k = [_zeros(shape, d, dtype) for d in devs]
        self.v = [_zeros(shape, d, dtype) for d in devs]
        self.length = 0
        self._slot: tuple | None = None           # (start, device, [1] int64 tensor): see slot()

    def slot(self, start: int, device) -> torch.Tensor:
        """`start` as a [1] int64 tensor on `device`, made once per forward and shared by its layers
        (filled on the device: no host-to-device copy to wait on)."""
        if self._slot is None or self._slot[:2] != (start, device):
            self._slot = (start, device, torch.full((1,), start, dtype=torch.int64, device=device))
        return self._slot[2]

    def check_room(self, start: int, n: int):
        if start + n > self.max_seq_len:
            raise ValueError(f"sequence of {start + n} tokens exceeds the cache length {self.max_seq_len}")

    def truncate(self, n: int):
        """Rewind to the first n positions (what lies beyond is dead and gets overwritten)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {n}")
        self.length = n

    def reset(self):
        self.length = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start):
        """Store k/v [B, Hkv, T, D] at [start, start+T); return the keys/values up to start+T.

        `start` may be a StaticPos (a device-side position plus a fixed key length), which is
        what a captured CUDA graph needs: no host value decides a shape or an offset.
        """
        if isinstance(start, StaticPos):
            self.k[layer].index_copy_(2, start.pos, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, start.pos, v.to(self.v[layer].dtype))
            return self.k[layer][:, :, :start.kv_len], self.v[layer][:, :, :start.kv_len]
        end = start + k.shape[2]
        self.check_room(start, k.shape[2])
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
