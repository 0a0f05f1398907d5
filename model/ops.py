"""One place that picks, per op, a kernel (CUDA, or the CPU kernels for packed CPU weights) or its pure-torch
reference.

The references are the definition of each op: kernels are tested against them, and they run where no kernel
does. `Ops(use_kernels=False)` forces the references everywhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import dequantize



# ---- references -------------------------------------------------------------------------

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Accumulate in fp32 whatever the activation dtype: fp16 sums of squares overflow.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary: x [B, T, H, D]; cos/sin tables [P, D/2] (fp32); pos [B, T]."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    c, s = cos[pos].unsqueeze(2), sin[pos].unsqueeze(2)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def q4_matmul_dequant(x, qweight, scales, offsets, perm, mma=False):
    """x[..., perm] @ W^T with W dequantized to x's dtype (the reference path on any device)."""
    if perm is not None:
        x = x.index_select(-1, perm)
    return x @ dequantize(qweight, scales, offsets, x.dtype, mma)


def rope_kv_write_ref(q, k, v, cos, sin, pos, slot, k_cache, v_cache, rotary=rotary_ref):
    """Rotate q and k (q [B, T, H, D], k/v [B, T, Hkv, D]) at positions pos [B, T], store k and v at cache
    positions slot[0] .. slot[0] + T - 1 (slot: a [1] device tensor, graph-safe index_copy_); returns q."""
    q = rotary(q, cos, sin, pos)
    k = rotary(k, cos, sin, pos)
    T = q.shape[1]
    slots = slot if T == 1 else slot[:1] + torch.arange(T, device=slot.device)
    k_cache.index_copy_(2, slots, k.transpose(1, 2).to(k_cache.dtype))
    v_cache.index_copy_(2, slots, v.transpose(1, 2).to(v_cache.dtype))
    return q


def decode_attention_ref(q, k_cache, v_cache, pos, kv_len, pad=None):
    """q [B, 1, H, D] over cache keys j < kv_len with pad[b] <= j <= pos[0] (SDPA with a boolean mask,
    GQA); returns [B, 1, H, D]."""
    B, _, H, _ = q.shape
    j = torch.arange(kv_len, device=q.device).view(1, 1, 1, kv_len)
    mask = j <= pos.view(1, 1, 1, 1)
    if pad is not None:
        mask = mask & (j >= pad.view(B, 1, 1, 1))
    mask = mask.expand(B, 1, 1, kv_len)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache[:, :, :kv_len].to(q.dtype),
                                       v_cache[:, :, :kv_len].to(q.dtype),
                                       attn_mask=mask, enable_gqa=H != k_cache.shape[1])
    return o.transpose(1, 2)


def argmax_rows_ref(logits: torch.Tensor) -> torch.Tensor:
    """[B, 2] int64: per row of logits [B, V] torch.argmax's index and 1 if that logit is finite, else 0."""
    idx = logits.argmax(-1)
    ok = torch.isfinite(logits.gather(-1, idx.unsqueeze(-1)).squeeze(-1))
    return torch.stack((idx, ok.long()), -1)


# ---- dispatch ---------------------------------------------------------------------------

class Ops:
    """Per-model dispatcher, set from RuntimeConfig: `use_kernels` (force_reference turns it off) and
    the fused kernels (GPU, fp16 only; on by default, GPU-tested, docs/performance.md):
    fused_decode: the static decode step uses rope_kv_write + decode_attention instead of
    rotary + index_copy_ + SDPA with a mask; fused_gemv: rms_norm (before q|k|v, gate|up, lm_head) and
    silu_mul (before down) run in the q4 GEMV's prologue instead of as their own kernels;
    rope_in_attention: rope_kv_write's work inside decode_attention; dense_gemv: the fp16 LM head's GEMV."""

    # CPU: up to this many rows a layer takes the block-quantized GEMV (int8 activations, the weights read once
    # for all rows; its cost grows with the rows, ~decode speed a row); more rows (prompts) are multiplied by the
    # dense GEMM on fp32 weights dequantized a slice of at most CPU_SLICE_BYTES at a time, whose dequantization
    # is a fixed cost a forward: the embedded model's crossover is ~32 rows (docs/performance.md).
    CPU_GEMV_MAX_ROWS = 32
    CPU_SLICE_BYTES = 8 << 20

    def __init__(self, use_kernels: bool = True, fused_decode: bool = False, fused_gemv: bool = False,
                 rope_in_attention: bool = True, dense_gemv: bool = True):
        self._ext = None
        self._cpu = None
        self._cpu_scratch = None
        self.use_kernels = use_kernels
        self.fused_decode, self.fused_gemv = fused_decode, fused_gemv
        self.rope_in_attention, self.use_dense_gemv = rope_in_attention, dense_gemv

    def kernels_for(self, t: torch.Tensor):
        """The cuda_ext ops module when t is on a GPU and the extension builds, else None."""
        if not (self.use_kernels and t.is_cuda):
            return None
        if self._ext is None:
            from cuda_ext import build
            self._ext = build.ops_module() if build.is_available() else False
        return self._ext or None

    def cpu_kernels(self):
        """The CPU kernel module (cuda_ext/cpu) when kernels are on and it builds, else None."""
        if not self.use_kernels:
            return None
        if self._cpu is None:
            from cuda_ext import build
            self._cpu = build.cpu.load() if build.cpu.is_available() else False
        return self._cpu or None

    def cpu_matmul(self, x, cw, bias=None, residual=None, norm=None, silu=False, out=None):
        """x[..., perm] @ W^T + bias + residual for a CpuWeight W (model/cpu_layout.py), with q4_matmul's norm / silu
        prologues. A few rows take the kernel's GEMV (prologue, int8 activations and the adds inside); more rows,
        or no kernel, the dense GEMM on dequantized slices, where silu(gate) * up overwrites the gate half of an fp32
        x (x is consumed, as q4_matmul's on GPUs)."""
        kern = self.cpu_kernels()
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, x.shape[-1]).float()
        rows = x2.shape[0]
        res = residual.reshape(rows, cw.N).float() if residual is not None else None
        if kern and rows <= self.CPU_GEMV_MAX_ROWS:
            o = out.view(rows, cw.N) if out is not None and out.dtype == torch.float32 and out.is_contiguous() else None
            y = kern.q_gemv(x2.contiguous(), cw.bits, cw.w, cw.sc, cw.of, cw.K, cw.gs,
                            norm[0] if norm is not None else None, norm[1] if norm is not None else 0.0, silu,
                            bias.float() if bias is not None else None, res.contiguous() if res is not None else None, o,
                            cw.levels, cw.perm)
            return y.view(*lead, cw.N).to(dtype)
        if norm is not None:
            x2 = rms_norm_ref(x2, norm[0], norm[1])
        if silu:
            # in place into the gate half (x is gate|up, consumed, as on GPUs): a prompt's [T, F] activations
            # cost no second buffer
            gate = F.silu(x2[:, :cw.K], inplace=True)
            x2 = gate.mul_(x2[:, cw.K:])
        if cw.perm is not None:
            x2 = x2.index_select(-1, cw.perm)
        step = max(8, self.CPU_SLICE_BYTES // (4 * cw.K) // 8 * 8)
        y = torch.empty(rows, cw.N)
        if kern and (self._cpu_scratch is None or self._cpu_scratch.numel() < step * cw.K):
            # one slice buffer reused by every layer: no fresh megabytes per call for the allocator to keep
            self._cpu_scratch = torch.empty(max(self.CPU_SLICE_BYTES // 4, step * cw.K))
        for n0 in range(0, cw.N, step):
            n1 = min(cw.N, n0 + step)
            w = kern.q_dequant(cw.bits, cw.w, cw.sc, cw.of, cw.K, cw.gs, n0, n1, self._cpu_scratch) if kern \
                else cw.dequantize(n0, n1)
            if n1 - n0 == cw.N:
                torch.mm(x2, w.t(), out=y)
            else:
                y[:, n0:n1] = x2 @ w.t()
        if bias is not None:
            y += bias
        if res is not None:
            y += res
        return y.view(*lead, cw.N).to(dtype)

    def cpu_qkv_attention(self, qkv, cos, sin, start: int, k_cache, v_cache, n_heads: int):
        """For a few tokens on a CPU: rotate q and k of the fused projection qkv [B, T, (H + 2 Hkv) D] at positions
        start.., write k and v into the caches and attend (causally) over them -> [B, T, H D]; None where the
        kernel does not run (the caller takes the torch path)."""
        kern = self.cpu_kernels()
        if not (kern and qkv.shape[1] <= self.CPU_GEMV_MAX_ROWS and qkv.dtype == torch.float32
                and qkv.is_contiguous() and k_cache.dtype in (torch.float32, torch.float16)):
            return None
        return kern.qkv_attention(qkv, cos, sin, start, k_cache, v_cache, n_heads)

    def embedding(self, table, ids, device):
        """table[ids] on `device`. A GPU reads a table kept in pinned host memory directly (graph-safe);
        without the kernel the rows are gathered on the CPU and copied."""
        if table.device.type == device.type:
            return table[ids.to(table.device)]
        if not ids.is_cuda and ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < table.shape[0]:
            raise IndexError(f"token id out of range [0, {table.shape[0]})")
        ids = ids.to(device)
        k = self.kernels_for(ids)
        if k and table.is_pinned() and table.dtype == torch.float16:
            return k.embed_gather(ids, table)     # ids already on the GPU come from our own sampling
        return table[ids.cpu()].to(device)

    def rms_norm(self, x, weight, eps):
        k = self.kernels_for(x)
        return k.rms_norm(x, weight, eps) if k else rms_norm_ref(x, weight, eps)

    def rotary(self, x, cos, sin, pos):
        """x [B, T, H, D] rotated at positions pos [B, T]; may work in place."""
        k = self.kernels_for(x)
        return k.rotary_(x, cos, sin, pos) if k else rotary_ref(x, cos, sin, pos)

    def silu_mul(self, gate, up):
        k = self.kernels_for(gate)
        return k.silu_mul(gate, up) if k else silu_mul_ref(gate, up)

    def fused_decode_ok(self, x, cfg) -> bool:
        """Whether the static decode step can use rope_kv_write + decode_attention for x's device."""
        if not (self.fused_decode and x.dtype == torch.float16 and self.kernels_for(x)):
            return False
        H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        return D in (64, 128) and H % Hkv == 0 and H // Hkv <= 8

    def rope_kv_write(self, q, k, v, cos, sin, pos, slot, k_cache, v_cache):
        """Rotate q [B, T, H, D] (in place where possible) and k at positions pos [B, T], write k and v at cache
        slots slot[0] .. slot[0] + T - 1 (decode: T = 1; prompts); returns q."""
        kern = self.kernels_for(q)
        if kern and self.fused_decode and q.dtype == torch.float16 and k_cache.dtype == q.dtype \
                and q.shape[-1] % 4 == 0:
            return kern.rope_kv_write(q, k, v, cos, sin, pos, slot, k_cache, v_cache)
        return rope_kv_write_ref(q, k, v, cos, sin, pos, slot, k_cache, v_cache, rotary=self.rotary)

    def rope_decode_attention(self, q, k, v, cos, sin, rope_pos, pos, k_cache, v_cache, kv_len, pad=None):
        """rope_kv_write then decode_attention (T = 1), in one kernel where it runs: [B, 1, H, D].
        rope_pos must be the model's (pos - pad, clamped at 0): the kernel derives it."""
        kern = self.kernels_for(q)
        if kern and self.fused_decode and self.rope_in_attention and kern.decode_attention_supported(q, k_cache):
            return kern.decode_attention(q, k_cache, v_cache, pos, kv_len, pad, rope=(k, v, cos, sin))
        q = self.rope_kv_write(q, k, v, cos, sin, rope_pos, pos, k_cache, v_cache)
        return self.decode_attention(q, k_cache, v_cache, pos, kv_len, pad)

    def decode_attention(self, q, k_cache, v_cache, pos, kv_len, pad=None):
        """Decode (T = 1) attention over the cache, keys pad[b] <= j <= pos[0], j < kv_len: [B, 1, H, D]."""
        kern = self.kernels_for(q)
        if kern and self.fused_decode and kern.decode_attention_supported(q, k_cache):
            return kern.decode_attention(q, k_cache, v_cache, pos, kv_len, pad)
        return decode_attention_ref(q, k_cache, v_cache, pos, kv_len, pad)

    def dense_gemv(self, x, weight, norm=None):
        """x [..., K] (rms_norm'd first with norm=(weight, eps)) @ weight [N, K]^T for a few fp16 rows on a GPU
        by the extension's GEMV (the decode step's fp16 LM head); None where it does not apply
        (or use_dense_gemv is off)."""
        k = self.kernels_for(x)
        K = x.shape[-1]
        rows = x.numel() // max(K, 1)
        if not (k and self.use_dense_gemv and x.dtype == torch.float16
                and weight.dtype == torch.float16 and 1 <= rows <= 8 and K % 8 == 0
                and weight.stride(-1) == 1 and weight.stride(0) % 8 == 0 and weight.data_ptr() % 16 == 0
                and rows * K * 4 <= 96 * 1024 and weight.device == x.device):
            return None
        nw, eps = norm if norm is not None else (None, 0.0)
        y = k.dense_gemv(x.reshape(rows, K), weight, norm_weight=nw, norm_eps=eps)
        return y.view(*x.shape[:-1], weight.shape[0])

    def argmax_rows(self, logits, out, ids=None):
        """out [B, 2] int64 = (argmax, finite?) per row of logits [B, V]; ids (B values on the same device), if
        given, receives the argmax too. Graph-safe (the greedy decode step)."""
        k = self.kernels_for(logits)
        if k and logits.dtype in (torch.float16, torch.float32):
            return k.argmax_rows(logits, out=out, ids=ids)
        out.copy_(argmax_rows_ref(logits))
        if ids is not None:
            ids.view(-1).copy_(out[:, 0])
        return out

    def q4_matmul(self, x, qweight, scales, offsets, perm, bias=None, residual=None, norm=None, silu=False,
                  mma=False, out=None):
        """x[..., perm] @ W^T + bias + residual (the kernel fuses the two adds); mma: qweight is in the mma
        layout (quant.py), read by the tensor-core kernels. `out` (e.g. the residual itself) may receive the
        result where a kernel runs; use the return value.

        norm=(weight, eps): x is rms_norm(x) first; silu: x is gate|up [..., 2K] and becomes
        silu(gate) * up first. For <= 8 fp16 rows on a GPU both run in the q4 kernel's prologue; for
        more rows (a prompt) on a GPU, silu(gate) * up overwrites the gate half of x (x is consumed).
        """
        k = self.kernels_for(x)
        if norm is not None or silu:
            rows = x.numel() // max(x.shape[-1], 1)
            if (k and self.fused_gemv and x.dtype == torch.float16 and 1 <= rows <= 8 and qweight.shape[1] % 4 == 0
                    and x.shape[-1] % 8 == 0 and x.is_contiguous()):
                x2 = x.reshape(rows, x.shape[-1])
                nw, eps = norm if norm is not None else (None, 0.0)
                y = k.q4_gemm_small(x2, qweight, scales, offsets, perm, bias=bias, residual=residual,
                                    out=out.view(rows, qweight.shape[1]) if out is not None else None,
                                    norm_weight=nw, norm_eps=eps, silu_up=silu, mma=mma)
                return y.reshape(*x.shape[:-1], qweight.shape[1])
            if norm is not None:
                x = self.rms_norm(x, norm[0], norm[1])
            if silu:
                f = x.shape[-1] // 2
                if k and x.dtype == torch.float16 and rows > 8:
                    # into the gate half, in place: a long prompt's [T, F] activation costs no second buffer
                    x = k.silu_mul(x[..., :f], x[..., f:], out=x[..., :f])
                else:
                    x = self.silu_mul(x[..., :f], x[..., f:])
        if k:
            return k.q4_matmul(x, qweight, scales, offsets, perm, bias=bias, residual=residual, mma=mma, out=out)
        y = q4_matmul_dequant(x, qweight, scales, offsets, perm, mma)
        if bias is not None:
            y = y + bias
        return y if residual is None else y + residual
