"""GPTQ (and round-to-nearest) quantization of HF-layout Llama checkpoints, one decoder layer at a time.

The algorithm is the GPTQ paper's (Frantar et al., 2022, Algorithm 1): for a linear layer with
weight W [N, K] and calibration inputs X, H = 2/n X^T X; columns are quantized one by one and each
column's rounding error is spread over the columns not yet quantized through the upper Cholesky
factor of H^-1 (damped by `damp * mean(diag H)`); updates are applied lazily per block of columns.
With act-order the columns go by descending diag(H) and groups are formed in that order (the
checkpoint's `g_idx` then maps each input row to its group). A group's scale and zero are found
when the quantizer reaches the group's first column, from the columns as updated so far (blocks
are a whole number of groups, so those columns hold every update made before them).

Pipeline (`quantize_checkpoint`): calibration token windows are embedded, then for each decoder
layer only that layer's weights are read (safetensors, lazily), its linears are quantized in the
order the data flows (q/k/v together, o, gate/up together, down; each sees inputs computed with
the linears before it already quantized), and the layer's output, computed with the quantized
layer, becomes the next layer's input. Memory: one layer's weights plus the calibration hidden
states; quantized tensors stream out to safetensors shards.

Zero points (asymmetric): GPTQ checkpoints store `zero - 1` in 4-bit fields ("zeros minus one",
read back as stored + 1), so a zero of 0 would be stored as -1 = 15 and read as 16. The quantizer
therefore keeps zeros in [1, 2^bits - 1]: where the range would need zero 0 (a group with no
negative weight), it uses zero 1 and widens the scale to max / (2^bits - 2) so nothing is clipped.
Symmetric: zero = 2^(bits-1), scale = 2 * absmax / (2^bits - 1) (GPTQ's own convention).

Output format (standard GPTQ, AutoGPTQ `checkpoint_format: gptq`): qweight int32 [K*bits/32, N]
(row k's value in bits (k % (32/bits))*bits.. of word k // (32/bits)), qzeros int32 [G, N*bits/32]
(zero - 1, packed along N the same way), scales fp16 [G, N], g_idx int32 [K] (group of each input
row in natural order), and `quantization_config` in config.json.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ModelConfig, ModelError, RuntimeConfig, read_json_object, rope_inv_freq


class QuantizeError(ValueError):
    """A checkpoint or setting the quantizer cannot handle; the message names the file or layer."""


@dataclass
class QuantSettings:
    bits: int = 4
    group_size: int = 128          # -1: one group over all of K
    act_order: bool = False        # desc_act: columns by descending diag(H)
    sym: bool = False
    method: str = "gptq"           # gptq | rtn
    damp: float = 0.01             # fraction of mean(diag H) added to the diagonal
    block_size: int = 128          # lazy-update block (rounded to a whole number of groups)

    def check(self):
        if self.bits not in (2, 4, 8):
            raise QuantizeError(f"--bits {self.bits}: only 2, 4 and 8 pack evenly into int32 "
                                "(and the engine loads 4-bit only)")
        if self.method not in ("gptq", "rtn"):
            raise QuantizeError(f"--method {self.method!r}: expected gptq or rtn")
        if self.group_size == 0 or self.group_size < -1:
            raise QuantizeError(f"--group-size {self.group_size}: expected a positive size or -1 (one group per row)")
        if not 0 <= self.damp < 1:
            raise QuantizeError(f"--damp {self.damp}: expected a fraction in [0, 1)")


# ---- the quantizer ----------------------------------------------------------------------

def find_params(x: torch.Tensor, bits: int, sym: bool):
    """Per-row scale and integer zero for x [N, c] (fp32): scale rounded to fp16 (what is stored)."""
    maxq = 2 ** bits - 1
    xmin = x.amin(1).clamp(max=0)
    xmax = x.amax(1).clamp(min=0)
    if sym:
        amax = torch.maximum(-xmin, xmax)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        empty = (xmin == 0) & (xmax == 0)
        xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
        xmax = torch.where(empty, torch.ones_like(xmax), xmax)
        scale = (xmax - xmin) / maxq
        zero = torch.round(-xmin / scale)
        # Zero 0 is not storable as zero - 1 in `bits` bits: use zero 1, widen the scale to fit xmax.
        low = zero < 1
        scale = torch.where(low, torch.maximum(scale, xmax / (maxq - 1)), scale)
        zero = zero.clamp(1, maxq)
    scale = scale.half().float()
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0 ** -24))  # fp16 underflow guard
    return scale, zero


def _quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int):
    """Integer codes and dequantized values (scale * (q - zero)), broadcasting over the last dims."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return q, scale * (q - zero)


def _inverse_cholesky(H: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, in fp64; more damping if needed."""
    H = H.double()
    mean = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    d = damp
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + d * mean * eye)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0:
                if d != damp:
                    print(f"\n{name}: H was not positive definite with damp {damp}; used {d:g}", file=sys.stderr)
                return U.float()
        d = max(d * 10, 1e-4)
    raise QuantizeError(f"{name}: the Hessian stays singular even with damp {d:g} (too little calibration data?)")


@dataclass
class QuantResult:
    qint: torch.Tensor      # uint8 [N, K] codes, natural column order
    scales: torch.Tensor    # fp16 [G, N]
    zeros: torch.Tensor     # int32 [G, N] (true zeros, not minus one)
    g_idx: torch.Tensor     # int32 [K]
    weight: torch.Tensor    # fp32 [N, K]: scale * (q - zero), what the checkpoint decodes to


def quantize_weight(W: torch.Tensor, H: torch.Tensor | None, s: QuantSettings, name: str = "layer") -> QuantResult:
    """GPTQ (s.method == "gptq", needs H) or round-to-nearest quantization of W [N, K]."""
    N, K = W.shape
    maxq = 2 ** s.bits - 1
    gs = K if s.group_size <= 0 or s.group_size >= K else s.group_size
    if K % gs:
        raise QuantizeError(f"{name}: group size {gs} does not divide K={K}")
    G = K // gs
    W = W.float().clone()
    dev = W.device
    perm = None
    if H is not None:
        H = H.float().clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        if s.act_order:
            perm = torch.argsort(torch.diag(H), descending=True)
            W, H = W[:, perm], H[perm][:, perm]
    elif s.act_order or s.method == "gptq":
        raise QuantizeError(f"{name}: {'act-order' if s.act_order else 'GPTQ'} needs calibration data (a Hessian)")

    scales = torch.empty(G, N, device=dev)
    zeros = torch.empty(G, N, device=dev)
    qint = torch.empty(N, K, device=dev)
    Q = torch.empty(N, K, device=dev)

    if s.method == "rtn":
        for g in range(G):
            cols = slice(g * gs, (g + 1) * gs)
            sc, z = find_params(W[:, cols], s.bits, s.sym)
            scales[g], zeros[g] = sc, z
            qint[:, cols], Q[:, cols] = _quant(W[:, cols], sc[:, None], z[:, None], maxq)
    else:
        Hinv = _inverse_cholesky(H, s.damp, name)
        bs = s.block_size if gs >= K else gs * max(1, s.block_size // gs)
        sc = z = None
        if gs >= K:
            sc, z = find_params(W, s.bits, s.sym)
            scales[0], zeros[0] = sc, z
        for i1 in range(0, K, bs):
            i2 = min(i1 + bs, K)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                c = i1 + i
                if gs < K and c % gs == 0:
                    sc, z = find_params(W1[:, i:i + gs], s.bits, s.sym)
                    scales[c // gs], zeros[c // gs] = sc, z
                w = W1[:, i]
                q, dq = _quant(w, sc, z, maxq)
                qint[:, c], Q[:, c] = q, dq
                err = (w - dq) / Hinv1[i, i]
                W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    g_idx = torch.arange(K, device=dev, dtype=torch.int32) // gs
    if perm is not None:
        inv = torch.argsort(perm)
        qint, Q, g_idx = qint[:, inv], Q[:, inv], g_idx[inv]
    return QuantResult(qint.to(torch.uint8), scales.half(), zeros.to(torch.int32), g_idx.contiguous(), Q)


def relative_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """||X (Wq - W)^T||_F / ||X W^T||_F over the calibration inputs, from H = X^T X (any scale)."""
    D = (Wq - W).double()
    Wd = W.double()
    Hd = H.double()
    num = ((D @ Hd) * D).sum().clamp(min=0)
    den = ((Wd @ Hd) * Wd).sum().clamp(min=1e-300)
    return math.sqrt((num / den).item())


# ---- packing (standard GPTQ layout) -----------------------------------------------------

def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [K, N] (0 .. 2^bits - 1) -> int32 [K * bits / 32, N]; value j of word i is row i * (32/bits) + j."""
    per = 32 // bits
    K, N = q.shape
    if K % per:
        raise QuantizeError(f"{K} rows do not pack {per} to an int32")
    q = q.to(torch.int64).reshape(K // per, per, N)
    packed = torch.zeros(K // per, N, dtype=torch.int64, device=q.device)
    for j in range(per):
        packed |= (q[:, j, :] & (2 ** bits - 1)) << (bits * j)
    return (packed - ((packed >> 31) << 32)).to(torch.int32)   # reinterpret the low 32 bits as signed


def gptq_tensors(r: QuantResult, bits: int) -> dict[str, torch.Tensor]:
    """qweight / qzeros (zero - 1) / scales / g_idx, on the CPU."""
    return {
        "qweight": pack_rows(r.qint.t().contiguous(), bits).cpu(),
        "qzeros": pack_rows((r.zeros - 1).t().contiguous(), bits).t().contiguous().cpu(),
        "scales": r.scales.cpu().contiguous(),
        "g_idx": r.g_idx.cpu().contiguous(),
    }


# ---- checkpoint pipeline ----------------------------------------------------------------

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SHORT = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
         "up_proj": "up", "down_proj": "down"}


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(N, K) of each linear of a decoder layer."""
    d, f, qd, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim, cfg.kv_dim
    return {"self_attn.q_proj": (qd, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
            "self_attn.o_proj": (d, qd), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}


def suggest_group_sizes(ks) -> list[int]:
    g = 0
    for k in ks:
        g = math.gcd(g, k)
    out = [x for x in (32, 64, 128, 256) if g % x == 0]
    if g >= 8 and g % 8 == 0 and g not in out:
        out.append(g)
    return out


def read_config(src: Path) -> tuple[ModelConfig, dict]:
    src = Path(src)
    if not src.exists():
        raise QuantizeError(f"{src}: no such folder")
    if not src.is_dir():
        raise QuantizeError(f"{src}: expected an HF-layout model folder (config.json + *.safetensors)")
    path = src / "config.json"
    if not path.is_file():
        raise QuantizeError(f"{path}: missing (the input must be an HF-layout Llama checkpoint)")
    raw = read_json_object(path, QuantizeError)
    archs = raw.get("architectures") or []
    mtype = raw.get("model_type")
    if mtype not in (None, "llama", "mistral") or (archs and archs[0] not in ("LlamaForCausalLM", "MistralForCausalLM")):
        raise QuantizeError(f"{path}: not a Llama model (model_type {mtype!r}, architectures {archs}); "
                            "only Llama-family checkpoints can be quantized")
    if raw.get("quantization_config"):
        raise QuantizeError(f"{path}: the checkpoint is already quantized "
                            f"({raw['quantization_config'].get('quant_method', '?')}); give an fp16/bf16/fp32 one")
    try:
        cfg = ModelConfig.from_dict(raw, str(path))
    except ModelError as e:
        raise QuantizeError(str(e)) from None
    return cfg, raw


def check_shapes(cfg: ModelConfig, s: QuantSettings, where: str):
    """Every linear's K must split into whole groups and pack; N must pack for qzeros."""
    per = 32 // s.bits
    shapes = linear_shapes(cfg)
    for name, (N, K) in shapes.items():
        layer = f"model.layers.*.{name}"
        if s.group_size > 0 and K % s.group_size:
            ks = sorted({k for _, k in shapes.values()})
            sug = "/".join(str(x) for x in suggest_group_sizes(ks))
            raise QuantizeError(
                f"{where}: group size {s.group_size} does not divide the input size {K} of {layer} "
                f"(every linear's input size must be a whole number of groups; input sizes here: "
                f"{', '.join(map(str, ks))}). Use --group-size {sug} or -1 (one group per row)")
        if K % per or N % per:
            raise QuantizeError(f"{where}: {layer} is {N}x{K}, not a multiple of {per} for {s.bits}-bit packing")


def calibration_windows(token_ids: list[int], samples: int, seq_len: int, skip: int = 0) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens, evenly spaced over token_ids[skip:] (deterministic)."""
    ids = token_ids[skip:]
    if len(ids) < seq_len:
        raise QuantizeError(f"the calibration text has {len(ids)} tokens (after skipping {skip}), "
                            f"fewer than one window of {seq_len}")
    room = len(ids) - seq_len
    n = samples
    starts = [round(i * room / max(n - 1, 1)) for i in range(n)] if n > 1 else [0]
    return torch.tensor([ids[s:s + seq_len] for s in starts], dtype=torch.long)


def _rope(cfg: ModelConfig, T: int, device):
    inv = rope_inv_freq(cfg, RuntimeConfig(max_seq_len=T), seq_len=T).double()
    f = torch.outer(torch.arange(T, dtype=torch.float64), inv)
    return f.cos().float().to(device), f.sin().float().to(device)


def _rotary(x, cos, sin):
    """Rotate-half rotary on x [B, T, H, D] with cos/sin [T, D/2] (the engine's convention)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _attention(x, lin, cfg: ModelConfig, cos, sin):
    """Self-attention up to (not including) o_proj; lin(x, name) applies a linear. x: [B, T, D]."""
    b, T, _ = x.shape
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = _rotary(lin(x, "self_attn.q_proj").view(b, T, H, hd), cos, sin).transpose(1, 2)
    k = _rotary(lin(x, "self_attn.k_proj").view(b, T, KV, hd), cos, sin).transpose(1, 2)
    v = lin(x, "self_attn.v_proj").view(b, T, KV, hd).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=KV != H)
    return o.transpose(1, 2).reshape(b, T, -1)


def _mlp_act(x, lin):
    return F.silu(lin(x, "mlp.gate_proj")) * lin(x, "mlp.up_proj")


def layer_forward(h, lin, ln1, ln2, cfg: ModelConfig, cos, sin):
    """One decoder layer in fp32, as the calibration pipeline computes it (tests compare it with the engine)."""
    h = h + lin(_attention(_rms(h, ln1, cfg.rms_norm_eps), lin, cfg, cos, sin), "self_attn.o_proj")
    return h + lin(_mlp_act(_rms(h, ln2, cfg.rms_norm_eps), lin), "mlp.down_proj")


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.t0 = total, enabled, time.time()

    def show(self, done: int, what: str = ""):
        if not self.enabled:
            return
        el = time.time() - self.t0
        eta = el / done * (self.total - done) if done else 0
        w = 30
        bar = "#" * int(w * done / self.total) + "-" * (w - int(w * done / self.total))
        tty = sys.stderr.isatty()
        print(f"\r[{bar}] {done}/{self.total} layers {what}{el:6.1f} s elapsed, ~{eta:5.0f} s left",
              end="\n" if done == self.total or not tty else "", file=sys.stderr, flush=True)

    def clear(self):
        if self.enabled and sys.stderr.isatty():  # the log line takes the bar's place; the bar comes back
            print("\r" + " " * 90 + "\r", end="", file=sys.stderr, flush=True)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantize_checkpoint(src, dst, settings: QuantSettings, calibration: torch.Tensor | None,
                        device=None, batch_size: int = 4, progress: bool = True, log=None,
                        max_shard_bytes: int = 2 * 2**30) -> dict:
    """Quantize the HF Llama checkpoint in `src` into a GPTQ checkpoint in `dst`, layer by layer.

    calibration: LongTensor [samples, seq_len] of token ids (None: RTN without act-order only).
    Returns {"errors": {tensor prefix: relative output error on the calibration set}, "seconds": ...}.
    """
    from .export import ShardWriter, copy_tokenizer_files
    from .weights import SafetensorsDir

    t0 = time.time()
    log = log or (lambda msg: print(msg, flush=True))
    s = settings
    s.check()
    src, dst = Path(src), Path(dst)
    cfg, raw = read_config(src)
    check_shapes(cfg, s, str(src / "config.json"))
    if calibration is None and (s.method == "gptq" or s.act_order):
        raise QuantizeError("GPTQ and act-order need calibration data")
    if dst.resolve() == src.resolve():
        raise QuantizeError(f"{dst}: the output folder must differ from the input")
    if dst.exists() and any(dst.iterdir()):
        raise QuantizeError(f"{dst}: the output folder exists and is not empty")
    try:
        st = SafetensorsDir(src)
    except ModelError as e:
        raise QuantizeError(str(e)) from None
    dev = torch.device(device) if device is not None else default_device()

    def get(key, shape=None):
        try:
            return st.get(key, shape)
        except ModelError as e:
            raise QuantizeError(str(e)) from None

    dst.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(dst, max_shard_bytes)
    fp = torch.float16

    def keep(name, t):
        """Unquantized tensors (embeddings, norms, lm_head, biases) go out as fp16 where they fit."""
        t16 = t.to(fp)
        writer.add(name, t16 if torch.isfinite(t16).all() or not torch.isfinite(t).all() else t)

    D = cfg.hidden_size
    E = get("model.embed_tokens.weight", (cfg.vocab_size, D))
    keep("model.embed_tokens.weight", E)
    hs: list[torch.Tensor] = []
    cos = sin = None
    if calibration is not None:
        calibration = torch.as_tensor(calibration, dtype=torch.long)
        if calibration.dim() != 2:
            raise QuantizeError("calibration must be token ids [samples, seq_len]")
        if int(calibration.max()) >= cfg.vocab_size or int(calibration.min()) < 0:
            raise QuantizeError(f"calibration token ids outside the vocabulary (size {cfg.vocab_size})")
        T = calibration.shape[1]
        hs = [E[b].float().to(dev) for b in calibration.split(batch_size)]
        cos, sin = _rope(cfg, T, dev)
    del E

    eps = cfg.rms_norm_eps
    shapes = linear_shapes(cfg)
    errors: dict[str, float] = {}
    bar = _Progress(cfg.num_hidden_layers, progress)
    bar.show(0)

    def hessian(xs, K):
        """2/n X^T X over an iterable of input batches [..., K] (fp32 sums)."""
        Hs = torch.zeros(K, K, device=dev)
        n = 0
        for x in xs:
            x2 = x.reshape(-1, K).float()
            Hs.addmm_(x2.t(), x2)
            n += x2.shape[0]
        return Hs * (2.0 / max(n, 1))

    for li in range(cfg.num_hidden_layers):
        p = f"model.layers.{li}"
        W, B = {}, {}
        for name, (N, K) in shapes.items():
            W[name] = get(f"{p}.{name}.weight", (N, K)).float().to(dev)
            if f"{p}.{name}.bias" in st:
                B[name] = get(f"{p}.{name}.bias", (N,)).float().to(dev)
        ln1 = get(f"{p}.input_layernorm.weight", (D,)).float().to(dev)
        ln2 = get(f"{p}.post_attention_layernorm.weight", (D,)).float().to(dev)
        keep(f"{p}.input_layernorm.weight", ln1)
        keep(f"{p}.post_attention_layernorm.weight", ln2)
        deq: dict[str, torch.Tensor] = {}
        layer_err: dict[str, float] = {}

        def quantize_group(names, xs):
            """Quantize linears that share their input (one Hessian, rows fused: GPTQ is row-wise).
            xs: an iterable of their input batches (None without calibration)."""
            Hm = hessian(xs, W[names[0]].shape[1]) if hs else None
            Wcat = torch.cat([W[n] for n in names])
            r = quantize_weight(Wcat, Hm, s, f"{p}.{'/'.join(names)}")
            row = 0
            for n in names:
                N = W[n].shape[0]
                part = QuantResult(r.qint[row:row + N], r.scales[:, row:row + N], r.zeros[:, row:row + N],
                                   r.g_idx, r.weight[row:row + N])
                for k, t in gptq_tensors(part, s.bits).items():
                    writer.add(f"{p}.{n}.{k}", t)
                if n in B:
                    keep(f"{p}.{n}.bias", B[n])
                deq[n] = part.weight
                if Hm is not None:
                    layer_err[n] = errors[f"{p}.{n}"] = relative_error(W[n], part.weight, Hm)
                row += N

        def lin(x, n):
            return F.linear(x, deq[n], B.get(n))

        # q, k, v: input = norm(h)
        quantize_group(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                       (_rms(h, ln1, eps) for h in hs))
        attn = [_attention(_rms(h, ln1, eps), lin, cfg, cos, sin) for h in hs]
        quantize_group(["self_attn.o_proj"], attn)
        hs = [h + lin(a, "self_attn.o_proj") for h, a in zip(hs, attn)]
        del attn
        quantize_group(["mlp.gate_proj", "mlp.up_proj"], (_rms(h, ln2, eps) for h in hs))

        def act(h):
            return _mlp_act(_rms(h, ln2, eps), lin)

        # Keep the down_proj inputs if they are small, else recompute them for the output pass.
        small = sum(h.numel() for h in hs) * cfg.intermediate_size // D * 4 <= 2**30
        acts = [act(h) for h in hs] if small else None
        quantize_group(["mlp.down_proj"], (acts[i] if acts else act(h) for i, h in enumerate(hs)))
        hs = [h + lin(acts[i] if acts else act(h), "mlp.down_proj") for i, h in enumerate(hs)]
        del acts              # (W, deq: rebound at the next layer)
        bar.clear()
        if layer_err:
            log(f"layer {li + 1:3d}/{cfg.num_hidden_layers}  rel. output error: "
                + "  ".join(f"{SHORT[n.split('.')[-1]]} {e:.4f}" for n, e in layer_err.items()))
        bar.show(li + 1)

    keep("model.norm.weight", get("model.norm.weight", (D,)))
    if "lm_head.weight" in st:
        keep("lm_head.weight", get("lm_head.weight", (cfg.vocab_size, D)))
    elif not cfg.tie_word_embeddings:
        raise QuantizeError(f"{src}: missing tensor 'lm_head.weight' (and tie_word_embeddings is false)")
    writer.close()

    out_cfg = {k: v for k, v in raw.items() if k not in ("quantization_config",)}
    out_cfg["torch_dtype"] = "float16"
    out_cfg["quantization_config"] = {
        "quant_method": "gptq", "bits": s.bits,
        "group_size": s.group_size,
        "desc_act": bool(s.act_order), "sym": bool(s.sym),
        "damp_percent": s.damp, "true_sequential": True, "static_groups": False,
        "checkpoint_format": "gptq", "method": s.method,
    }
    (dst / "config.json").write_text(json.dumps(out_cfg, indent=2))
    copy_tokenizer_files(src, dst)
    secs = time.time() - t0
    return {"errors": errors, "seconds": secs, "settings": asdict(s),
            "calibration": list(calibration.shape) if calibration is not None else None}
