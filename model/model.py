"""Llama model assembly: embeddings, decoder layers, final norm, LM head.

Module names follow the HF checkpoint keys (model.layers.N.self_attn.q_proj, ...), so loading
needs no mapping table beyond stripping the `model.` prefix. Layers may sit on several GPUs
(model/split.py plans where); hidden states hop devices between segments of layers.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from .attention import Attention
from .cache import KVCache, StaticPos
from .config import ModelConfig, RuntimeConfig
from .cpu_layout import CpuWeight
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
        # The residual adds ride on the output projections, the norms on the input projections
        # (both fused into the 4-bit kernel on GPUs for a few rows; applied separately otherwise).
        # h is the layer's own residual stream: the output projections may accumulate into it in place
        h = self.self_attn(h, rope, pos, cache, start, mask, lora, residual=h, norm=self.input_layernorm,
                           residual_inplace=True)
        m = self.mlp
        if m.gate_up is not None:
            # down(silu(gate) * up): the norm rides on gate|up, SiLU-mul on down (model/ops.py q4_matmul;
            # Linear applies them separately where an adapter needs the transformed input)
            return m.down_proj(m.gate_up(h, lora, norm=self.post_attention_layernorm), lora, h, silu=True,
                               residual_inplace=True)
        return m(self.post_attention_layernorm(h), lora, residual=h)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, runtime: RuntimeConfig):
        super().__init__()
        self.cfg, self.runtime = cfg, runtime
        self.ops = Ops(use_kernels=not runtime.force_reference, fused_decode=runtime.fused_decode,
                       fused_gemv=runtime.fused_gemv, rope_in_attention=runtime.rope_in_attention,
                       dense_gemv=runtime.dense_gemv)
        self.device = runtime.torch_device()          # embeddings and the first layers
        self.dtype = runtime.torch_dtype()
        self.embed_tokens: torch.Tensor | None = None   # [V, D], dense
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, self.ops) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.ops)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, self.ops)
        self.layer_devices = [self.device] * cfg.num_hidden_layers
        self.rotary: dict[torch.device, Rotary] = {}
        self.lora_adapters: dict = {}
        self.cpu_packed = False       # 4-bit layers in the CPU kernels' layouts (finalize)
        self.cpu_decoder = None       # the packed CPU model's one-call decode step (model/cpu_decode.py)

    @property
    def head_device(self) -> torch.device:
        return self.layer_devices[-1]

    # -- set-up ---------------------------------------------------------------------------
    def finalize(self):
        """Move every weight to its device/dtype once loading is complete."""
        dt, wdt = self.dtype, self.runtime.torch_weight_dtype()
        packed = self._cpu_packed()
        dequant = self.device.type == "cpu" and not self.runtime.keep_q4 and not packed
        host_embed = self._embed_in_host_memory()
        self.layer_devices = self._plan_devices(host_embed)
        tied = self.cfg.tie_word_embeddings and self.lm_head.weight is None and not self.lm_head.quantized
        if isinstance(self.embed_tokens, CpuWeight) and not packed:
            self.embed_tokens = self.embed_tokens.dequantize()    # a GGUF Q8_0 table (gguf_loader) made dense
        # else an 8-bit table stays in its blocks: _pack_for_cpu gives it to a tied head as it is
        if isinstance(self.embed_tokens, torch.Tensor):
            if tied:
                self.lm_head.set_dense(self.embed_tokens)
            if host_embed:
                # Pinned host memory, read by the GPU directly (Ops.embedding): ExLlama's VRAM saving, and
                # graph-safe, unlike a CPU lookup followed by a copy.
                self.embed_tokens = self.embed_tokens.to("cpu", dt).pin_memory()
            else:
                self.embed_tokens = self.embed_tokens.to(self.device, dt)
        for layer, dev in zip(self.layers, self.layer_devices):
            self._place(layer, dev, dt, wdt, dequant)
        self._place(self.norm, self.head_device, dt, wdt, dequant)
        self._place(self.lm_head, self.head_device, dt, wdt, dequant)
        lm = self.lm_head.weight
        if lm is not None and isinstance(self.embed_tokens, torch.Tensor) and lm.dtype == dt \
                and lm.device == self.embed_tokens.device \
                and lm.shape == self.embed_tokens.shape and torch.equal(lm, self.embed_tokens):
            self.lm_head.weight = self.embed_tokens   # one copy of a tied table
        if not dequant:
            for layer in self.layers:
                a, m = layer.self_attn, layer.mlp
                a.qkv = fuse([a.q_proj, a.k_proj, a.v_proj])
                m.gate_up = fuse([m.gate_proj, m.up_proj])
            if packed:
                self._pack_for_cpu(wdt, tied)
            elif self.runtime.mma_gemv and dt == torch.float16:
                self._use_mma_layout()
        for dev in set(self.layer_devices) | {self.device}:
            self.rotary[dev] = Rotary(self.cfg, self.runtime, dev)
        self.cpu_packed = packed
        if packed:
            from . import cpu_decode
            self.cpu_decoder = cpu_decode.build(self)
        return self

    def _cpu_packed(self) -> bool:
        """Whether a CPU model keeps its 4-bit layers packed for the CPU kernels (RuntimeConfig.cpu_weights)."""
        mode = self.runtime.cpu_weights
        if mode not in ("auto", "packed", "dense"):
            raise ValueError(f"unknown cpu_weights {mode!r} (auto, packed or dense)")
        if self.device.type != "cpu" or self.runtime.keep_q4 or mode == "dense":
            return False
        if not any(lin.qweight is not None for lin in self.modules() if isinstance(lin, Linear)):
            return False                  # a dense checkpoint stays dense
        return mode == "packed" or self.ops.cpu_kernels() is not None

    def _pack_for_cpu(self, wdt, tied: bool):
        """4-bit layers (fused ones whole) into the 4-bit CPU layout, the LM head into the 8-bit one (a tied
        embedding table then reads its rows from the same blocks); a layer the layouts cannot take is
        dequantized instead."""
        ext = self.ops.cpu_kernels()
        views = {id(v) for lin in self.modules() if isinstance(lin, Linear) for v in lin.views}
        for lin in [m for m in self.modules() if isinstance(m, Linear) and id(m) not in views]:
            if lin.qweight is not None and not lin.pack_for_cpu(ext):
                for p in [lin, *lin.views]:
                    p.views = []
                    p.set_dense(p.dense_weight(torch.float32).to(wdt), p.bias)
        head = self.lm_head
        if tied and isinstance(self.embed_tokens, CpuWeight):
            head.set_cpu(self.embed_tokens)             # a GGUF Q8_0 table: its own blocks
        elif tied:
            head.set_dense(self.embed_tokens)           # pack the table itself, not a narrower copy of it
            if head.pack_for_cpu(ext):
                self.embed_tokens = head.packed
        elif head.weight is not None:
            head.pack_for_cpu(ext)
        for layer in self.layers:     # a part packed with its fused layer is only reached through it
            if layer.self_attn.qkv is not None and layer.self_attn.qkv.packed is None:
                layer.self_attn.qkv = None
            if layer.mlp.gate_up is not None and layer.mlp.gate_up.packed is None:
                layer.mlp.gate_up = None

    # Smaller layers stay with the CUDA-core GEMV, which is faster there (launch-bound shapes).
    MMA_MIN_WEIGHTS = 8 << 20

    def _use_mma_layout(self):
        """The projections RuntimeConfig.mma_layers names (none by default; >= MMA_MIN_WEIGHTS) go into the
        tensor-core GEMV's layout, in place.

        Measured on an H100 (docs/performance.md, sessions 3, 5 and 6): on 7B shapes the tensor-core kernel took
        o_proj from 11.4 us (CUDA cores, half2 products) to 7.7 us, and down until the half2 products; since the
        CUDA-core kernel's integer products (7.6 us for o_proj) the 7B model is 3% faster on an empty cache with
        o_proj on the CUDA cores too (518.7 against 503.2 t/s; 438 against 440 at 2k). q|k|v and gate|up, whose
        RMSNorm prologue every block repeats, and every SmolLM2-135M shape are slower on the tensor cores."""
        names = {n.strip() for n in self.runtime.mma_layers.split(",")}
        for layer in self.layers:
            for name, lin in (("o_proj", layer.self_attn.o_proj), ("down_proj", layer.mlp.down_proj)):
                if name in names and lin.quantized and lin.in_features * lin.out_features >= self.MMA_MIN_WEIGHTS \
                        and self.ops.kernels_for(lin.qweight):
                    lin.use_mma_layout()

    def _embed_in_host_memory(self) -> bool:
        """The table stays in host memory on GPUs when the LM head does not share it and the kernel
        that reads it from there is available (RuntimeConfig.embed_on_cpu: None = automatic)."""
        want = self.runtime.embed_on_cpu
        if want is False or self.device.type != "cuda" or self.dtype != torch.float16:
            return False
        head = self.lm_head
        tied = (head.weight is None and not head.quantized) or \
            (head.weight is not None and head.weight.data_ptr() == self.embed_tokens.data_ptr())
        if tied or self.embed_tokens.shape[1] % 8:
            return False
        return bool(self.ops.kernels_for(torch.empty(0, device=self.device)))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> hidden states on the first layer's device."""
        if isinstance(self.embed_tokens, CpuWeight):
            return self.embed_tokens.rows(ids).to(self.dtype)
        return self.ops.embedding(self.embed_tokens, ids, self.device)

    def dense_embedding(self) -> torch.Tensor:
        """The token embedding table [V, D] as a dense tensor, whatever its storage."""
        e = self.embed_tokens
        return e.dequantize() if isinstance(e, CpuWeight) else e

    @staticmethod
    def _place(module, dev, dt, wdt, dequant):
        for mod in module.modules():
            if isinstance(mod, Linear):
                mod.to_device(dev, dt, wdt, dequant)
            elif isinstance(mod, RMSNorm):
                mod.weight = mod.weight.to(dev, torch.float32)

    def _plan_devices(self, embed_on_cpu: bool) -> list[torch.device]:
        split = self.runtime.gpu_split
        n = self.cfg.num_hidden_layers
        if not split or self.device.type != "cuda":
            return [self.device] * n
        from . import split as sp
        costs = sp.costs_for(self.cfg, self.runtime.max_seq_len)
        if split == "auto":
            free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
            plan = sp.plan_auto(n, costs, free, embed_on_cpu=embed_on_cpu)
        else:
            if len(split) > torch.cuda.device_count():
                raise sp.SplitError(f"gpu split {split} names {len(split)} devices, "
                                    f"but {torch.cuda.device_count()} are visible")
            plan = sp.plan_manual(n, costs, split)
        for line in sp.describe(plan, costs, max(plan) + 1, embed_on_cpu=embed_on_cpu):
            print(line, file=sys.stderr)
        return [torch.device("cuda", d) for d in plan]

    def segments(self) -> list[tuple[torch.device, int, int]]:
        """Runs of consecutive layers on one device: [(device, first, end)]."""
        segs = []
        for i, dev in enumerate(self.layer_devices):
            if segs and segs[-1][0] == dev:
                segs[-1] = (dev, segs[-1][1], i + 1)
            else:
                segs.append((dev, i, i + 1))
        return segs

    def new_cache(self, batch_size: int = 1, max_seq_len: int | None = None) -> KVCache:
        return KVCache(self.cfg, max_seq_len or self.runtime.max_seq_len, batch_size, self.device, self.cache_dtype,
                       layer_devices=self.layer_devices)

    @property
    def cache_dtype(self) -> torch.dtype:
        """fp16 keys and values for a packed CPU model (its kernels read them directly: half the memory and the
        attention's bytes, as on GPUs), else the activation dtype."""
        return torch.float16 if self.cpu_packed and self.ops.cpu_kernels() is not None else self.dtype

    # -- forward --------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = True,
                lora: str | None = None, pad: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> fp32 logits [B, 1 or T, V] (on the last layer's device).

        With a cache the tokens go at cache.length and the length advances. `pad` [B] counts
        left-padding tokens per row (batched prompts of different lengths): padded keys are
        masked and positions start after the padding.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + T > (cache.max_seq_len if cache else self.runtime.max_seq_len):
            raise ValueError(f"{start + T} tokens exceed the maximum sequence length")
        if self.cpu_decoder is not None and cache is not None and pad is None and lora is None \
                and B * T <= self.ops.CPU_GEMV_MAX_ROWS:
            rope = self.rotary[self.device]
            logits = self.cpu_decoder.step(self.embed(input_ids).contiguous(), rope.cos, rope.sin, start,
                                           cache.k, cache.v, last_only)
            cache.length = start + T
            return logits
        # The embedding goes first: from host memory it is the prompt's longest single kernel (~0.6 ms for
        # 1920 tokens of a 7B), and the GPU reads it while the host sets up the rest. Positions and mask are
        # made on the first layer's device: a host tensor copied there would make the host wait for the
        # queued work (the embedding) before it could queue the first layer.
        h = self.embed(input_ids)
        dev0 = self.layer_devices[0] if self.layer_devices else self.device
        pos = torch.arange(start, start + T, device=dev0).unsqueeze(0).expand(B, T)
        if pad is not None:
            pad = pad.to(dev0)
            pos = (pos - pad.unsqueeze(1)).clamp(min=0)
        mask = self._mask(B, T, start, pad, dev0)
        for dev, first, end in self.segments():
            h = h.to(dev)
            p = pos.to(dev)
            m = mask.to(dev) if mask is not None else None
            for layer in self.layers[first:end]:
                h = layer(h, self.rotary[dev], p, cache, start, m, lora)
        if cache is not None:
            cache.length = start + T
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h, lora, norm=self.norm).float()   # the norm rides on the head's GEMV where it can

    def _mask(self, B, T, start, pad, device):
        """Boolean attention mask, or None where SDPA's own causal flag (or no mask) is right."""
        if pad is None and (start == 0 or T == 1):
            return None
        q = torch.arange(start, start + T, device=device).view(1, T, 1)
        k = torch.arange(start + T, device=device).view(1, 1, -1)
        m = k <= q
        if pad is not None:
            # A padded query still sees itself, so its softmax has no empty row (no NaN).
            m = m & ((k >= pad.view(B, 1, 1)) | (k == q))
        return m.unsqueeze(1).expand(B, 1, T, start + T)

    # -- static decode (what CUDA graphs capture, one graph per device segment) -------------
    @torch.inference_mode()
    def decode_segment(self, seg: int, x: torch.Tensor, cache: KVCache, pos: torch.Tensor, kv_len: int,
                       pad: torch.Tensor | None = None, lora: str | None = None,
                       float_logits: bool = True) -> torch.Tensor:
        """One decode step over one device segment, with no host value deciding a shape or offset.

        x: token ids [B, 1] for the first segment, else the hidden state [B, 1, D] on the
        segment's device; pos: [1] int64 on that device (the cache slot to write); keys up to
        kv_len (> pos) are read and those past pos masked. The last segment returns logits
        [B, 1, V] (fp32, or the model's dtype with float_logits=False); the others the hidden state.
        The caller advances cache.length.
        """
        segs = self.segments()
        dev, first, end = segs[seg]
        B = x.shape[0]
        # A later segment's input is the graph decoder's static buffer: the layers accumulate into the residual
        # stream in place, so work on a copy (warm-up runs before a capture must leave the input as it was).
        h = self.embed(x) if seg == 0 else x.clone()
        rope_pos = pos.view(1, 1).expand(B, 1)
        if pad is not None:
            rope_pos = (rope_pos - pad.view(B, 1)).clamp(min=0)
        fused = self.ops.fused_decode_ok(h, self.cfg)
        mask = None
        if not fused:      # the fused attention kernel masks by position itself
            k = torch.arange(kv_len, device=dev).view(1, 1, 1, kv_len)
            mask = k <= pos.view(1, 1, 1, 1)
            if pad is not None:
                mask = mask & (k >= pad.view(B, 1, 1, 1))
            mask = mask.expand(B, 1, 1, kv_len)
        static = StaticPos(pos, kv_len, pad, fused)
        for layer in self.layers[first:end]:
            h = layer(h, self.rotary[dev], rope_pos, cache, static, mask, lora)
        if seg == len(segs) - 1:
            logits = self.lm_head(h, lora, norm=self.norm)
            return logits.float() if float_logits else logits
        return h

    def decode_static(self, input_ids, cache, pos, kv_len, pad=None, lora=None):
        """decode_segment over all segments (single device: one call)."""
        x = input_ids
        for seg, (dev, _, _) in enumerate(self.segments()):
            x = self.decode_segment(seg, x.to(dev), cache, pos.to(dev), kv_len,
                                    pad.to(dev) if pad is not None else None, lora)
        return x
