"""CUDA-graph decoding: the whole decode step captured once per key-length bucket and replayed.

Host overhead (hundreds of kernel launches per token) is what holds eager engines back on fast
GPUs. A captured step reads its token and position from static device buffers, writes the KV
cache at that position, attends over a fixed number of keys, masked past the position, and
advances the position itself; a greedy step (`GraphDecoder.greedy`) also picks the next token
and writes it into the token buffer, so consecutive greedy steps need nothing from the host.
Buckets of key lengths (256 by default) keep short contexts from paying for the whole cache. On
CPUs (or with graphs off) the same static step runs eagerly, so the logic is tested everywhere.
"""
from __future__ import annotations

import torch

from .cache import KVCache


class GraphDecoder:
    """Decode steps replayed from CUDA graphs: one graph per (device segment, key bucket, adapter, kind).

    With layers split over several GPUs each device's segment is its own graph and the hidden
    state hops between them through static buffers. Each step ends by advancing its segment's
    static position on the device, so consecutive steps need no host write of it.
    """

    def __init__(self, model, cache: KVCache, bucket: int | None = None, use_graphs: bool | None = None):
        self.model, self.cache = model, cache
        self.bucket = bucket or model.runtime.graph_bucket
        self.use_graphs = (model.device.type == "cuda") if use_graphs is None else use_graphs
        B = cache.batch_size
        self.segs = model.segments()
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=model.device)
        self.pos = [torch.zeros(1, dtype=torch.long, device=d) for d, _, _ in self.segs]
        self._pos_held: list[int | None] = [None] * len(self.segs)   # what each pos buffer holds (None: unknown)
        self.pad = [torch.zeros(B, dtype=torch.long, device=d) for d, _, _ in self.segs]
        self.h_in = [None] + [torch.zeros(B, 1, model.cfg.hidden_size, dtype=model.dtype, device=d)
                              for d, _, _ in self.segs[1:]]
        last_dev = self.segs[-1][0]
        self.picked = torch.zeros(B, 2, dtype=torch.long, device=last_dev)   # greedy steps' (token, finite)
        # the pick goes straight into the next step's input when both live on one device
        self._pick_into_ids = last_dev == self.ids.device
        self._holds_pick = False                 # the last step was greedy (greedy(None) may continue it)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # One memory pool per device for all its graphs: steps never run concurrently and each replay
        # writes its intermediates before reading them, so the buckets' graphs reuse one set of scratch
        # blocks instead of reserving one each; outputs stay referenced here, so no capture reuses them.
        self.pools: dict[torch.device, tuple] = {}

    def _kv_len(self, pos: int) -> int:
        return min(self.cache.max_seq_len, (pos // self.bucket + 1) * self.bucket)

    def _step(self, seg, kv_len, lora, padded, greedy):
        last = seg == len(self.segs) - 1
        x = self.ids if seg == 0 else self.h_in[seg]
        out = self.model.decode_segment(seg, x, self.cache, self.pos[seg], kv_len,
                                        self.pad[seg] if padded else None, lora, float_logits=not greedy)
        self.pos[seg].add_(1)
        if greedy and last:
            out = self.model.ops.argmax_rows(out[:, -1], self.picked, self.ids if self._pick_into_ids else None)
        return out

    def _set_pos(self, seg: int, pos: int):
        if self._pos_held[seg] != pos:
            self.pos[seg].fill_(pos)

    def _graph(self, seg, kv_len, lora, padded, greedy, pos):
        key = (seg, kv_len, lora, padded, greedy)
        if key not in self.graphs:
            dev = self.segs[seg][0]
            ids = self.ids.clone() if greedy else None      # a greedy warm-up overwrites the input with its pick
            with torch.cuda.device(dev):
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up outside the graph: lazy init, kernel builds
                        self.pos[seg].fill_(pos)
                        self._step(seg, kv_len, lora, padded, greedy)
                torch.cuda.current_stream().wait_stream(stream)
                g = torch.cuda.CUDAGraph()
                if dev not in self.pools:
                    self.pools[dev] = torch.cuda.graph_pool_handle()
                # the capture stream must be this device's: torch's default one belongs to the first
                # device that captured, and a later device's kernels would run uncaptured
                with torch.cuda.graph(g, pool=self.pools[dev], stream=stream):
                    out = self._step(seg, kv_len, lora, padded, greedy)
            if ids is not None:
                self.ids.copy_(ids)
            self._pos_held[seg] = None
            self.graphs[key] = (g, out)
        return self.graphs[key]

    def _run(self, input_ids, lora, pad, greedy) -> torch.Tensor:
        pos = self.cache.length
        if pos >= self.cache.max_seq_len:
            raise ValueError(f"the cache is full ({self.cache.max_seq_len} tokens)")
        kv_len = self._kv_len(pos)
        if input_ids is not None:
            self.ids.copy_(input_ids)
        out = None
        for seg in range(len(self.segs)):
            if pad is not None:   # graphs read the static buffers, never the caller's tensors
                self.pad[seg].copy_(pad)
            if seg:
                self.h_in[seg].copy_(out)
            if self.use_graphs:
                graph, out = self._graph(seg, kv_len, lora, pad is not None, greedy, pos)
                self._set_pos(seg, pos)
                graph.replay()
            else:
                self._set_pos(seg, pos)
                out = self._step(seg, kv_len, lora, pad is not None, greedy)
            self._pos_held[seg] = pos + 1
        self.cache.length = pos + 1
        return out

    def __call__(self, input_ids: torch.Tensor, lora: str | None = None,
                 pad: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, 1] -> logits [B, 1, V]; writes at cache.length and advances it."""
        self._holds_pick = False
        return self._run(input_ids, lora, pad, greedy=False).clone()

    def greedy(self, input_ids: torch.Tensor | None = None, lora: str | None = None) -> torch.Tensor:
        """One greedy step with the argmax inside the captured step (no logits leave the graph):
        -> [B, 2] int64 on the last layer's device, per row (picked token, 1 if its logit is finite else 0).

        input_ids [B, 1]: this step's tokens; None: the tokens the previous greedy step picked, which are
        already the graph's input (no copy). The result is a static buffer, overwritten by the next
        greedy step: read it first."""
        if input_ids is None:
            if not self._holds_pick:
                raise ValueError("greedy(None) continues from a greedy step's pick, and there is none")
            if not self._pick_into_ids:
                input_ids = self.picked[:, :1]      # split models: the pick hops back to the first device
        out = self._run(input_ids, lora, None, greedy=True)
        self._holds_pick = True
        return out
