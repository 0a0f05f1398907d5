"""CUDA-graph decoding: the whole decode step captured once per key-length bucket and replayed.

Host overhead (hundreds of kernel launches per token) is what holds eager engines back on fast
GPUs. A captured step reads its token and position from static device buffers, writes the KV
cache through index_copy_ at that position, and attends over a fixed number of keys, masked
past the position. Buckets of key lengths (256 by default) keep short contexts from paying for
the whole cache. On CPUs (or with graphs off) the same static step runs eagerly, so the logic
is tested everywhere.
"""
from __future__ import annotations

import torch

from .cache import KVCache


class GraphDecoder:
    def __init__(self, model, cache: KVCache, bucket: int = 256, use_graphs: bool | None = None):
        self.model, self.cache, self.bucket = model, cache, bucket
        dev = model.device
        self.use_graphs = (dev.type == "cuda") if use_graphs is None else use_graphs
        self.ids = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.pad = torch.zeros(cache.batch_size, dtype=torch.long, device=dev)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _kv_len(self, pos: int) -> int:
        return min(self.cache.max_seq_len, (pos // self.bucket + 1) * self.bucket)

    def _step(self, kv_len, lora, pad):
        return self.model.decode_static(self.ids, self.cache, self.pos, kv_len, pad=pad, lora=lora)

    def _graph(self, kv_len, lora, pad):
        key = (kv_len, lora, pad is not None)
        if key not in self.graphs:
            stream = torch.cuda.Stream(device=self.model.device)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside the graph: lazy init, kernel builds
                    self._step(kv_len, lora, pad)
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = self._step(kv_len, lora, pad)
            self.graphs[key] = (g, out)
        return self.graphs[key]

    def __call__(self, input_ids: torch.Tensor, lora: str | None = None,
                 pad: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, 1] -> logits [B, 1, V]; writes at cache.length and advances it."""
        pos = self.cache.length
        if pos >= self.cache.max_seq_len:
            raise ValueError(f"the cache is full ({self.cache.max_seq_len} tokens)")
        self.ids.copy_(input_ids)
        self.pos.fill_(pos)
        if pad is not None:   # graphs read the static buffer, never the caller's tensor
            self.pad.copy_(pad)
            pad = self.pad
        kv_len = self._kv_len(pos)
        if self.use_graphs:
            graph, out = self._graph(kv_len, lora, pad)
            graph.replay()
            logits = out.clone()
        else:
            logits = self._step(kv_len, lora, pad)
        self.cache.length = pos + 1
        return logits
