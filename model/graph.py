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
    """Decode steps replayed from CUDA graphs: one graph per (device segment, key bucket, adapter).

    With layers split over several GPUs each device's segment is its own graph and the hidden
    state hops between them through static buffers.
    """

    def __init__(self, model, cache: KVCache, bucket: int | None = None, use_graphs: bool | None = None):
        self.model, self.cache = model, cache
        self.bucket = bucket or model.runtime.graph_bucket
        self.use_graphs = (model.device.type == "cuda") if use_graphs is None else use_graphs
        B = cache.batch_size
        self.segs = model.segments()
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=model.device)
        self.pos = [torch.zeros(1, dtype=torch.long, device=d) for d, _, _ in self.segs]
        self.pad = [torch.zeros(B, dtype=torch.long, device=d) for d, _, _ in self.segs]
        self.h_in = [None] + [torch.zeros(B, 1, model.cfg.hidden_size, dtype=model.dtype, device=d)
                              for d, _, _ in self.segs[1:]]
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # One memory pool per device for all its graphs: steps never run concurrently and each replay
        # writes its intermediates before reading them, so the buckets' graphs reuse one set of scratch
        # blocks instead of reserving one each; outputs stay referenced here, so no capture reuses them.
        self.pools: dict[torch.device, tuple] = {}

    def _kv_len(self, pos: int) -> int:
        return min(self.cache.max_seq_len, (pos // self.bucket + 1) * self.bucket)

    def _step(self, seg, kv_len, lora, padded):
        x = self.ids if seg == 0 else self.h_in[seg]
        return self.model.decode_segment(seg, x, self.cache, self.pos[seg], kv_len,
                                         self.pad[seg] if padded else None, lora)

    def _graph(self, seg, kv_len, lora, padded):
        key = (seg, kv_len, lora, padded)
        if key not in self.graphs:
            dev = self.segs[seg][0]
            with torch.cuda.device(dev):
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up outside the graph: lazy init, kernel builds
                        self._step(seg, kv_len, lora, padded)
                torch.cuda.current_stream().wait_stream(stream)
                g = torch.cuda.CUDAGraph()
                if dev not in self.pools:
                    self.pools[dev] = torch.cuda.graph_pool_handle()
                # the capture stream must be this device's: torch's default one belongs to the first
                # device that captured, and a later device's kernels would run uncaptured
                with torch.cuda.graph(g, pool=self.pools[dev], stream=stream):
                    out = self._step(seg, kv_len, lora, padded)
            self.graphs[key] = (g, out)
        return self.graphs[key]

    def __call__(self, input_ids: torch.Tensor, lora: str | None = None,
                 pad: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, 1] -> logits [B, 1, V]; writes at cache.length and advances it."""
        pos = self.cache.length
        if pos >= self.cache.max_seq_len:
            raise ValueError(f"the cache is full ({self.cache.max_seq_len} tokens)")
        kv_len = self._kv_len(pos)
        self.ids.copy_(input_ids)
        out = None
        for seg in range(len(self.segs)):
            self.pos[seg].fill_(pos)
            if pad is not None:   # graphs read the static buffers, never the caller's tensors
                self.pad[seg].copy_(pad)
            if seg:
                self.h_in[seg].copy_(out)
            if self.use_graphs:
                graph, out = self._graph(seg, kv_len, lora, pad is not None)
                graph.replay()
            else:
                out = self._step(seg, kv_len, lora, pad is not None)
        self.cache.length = pos + 1
        return out.clone()
