"""Model configuration (from config.json or GGUF metadata) and runtime options, kept apart."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch


class ModelError(ValueError):
    """A model folder or file that cannot be loaded; the message names the file and the problem."""


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int = 128          # -1: one group over all of K
    desc_act: bool = False         # act-order: rows quantized in a permuted order (g_idx)
    sym: bool = True


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None        # {"type": linear|dynamic|llama3, "factor": ..., ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    quant: QuantConfig | None = None
    architecture: str = "LlamaForCausalLM"

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        def need(key):
            if key not in d:
                raise ModelError(f"{source}: missing required field '{key}'")
            v = d[key]
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ModelError(f"{source}: field '{key}' must be a positive integer, got {v!r}")
            return v

        archs = d.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0] if isinstance(archs, list) and archs else str(archs)
        model_type = d.get("model_type", "llama")
        if model_type not in ("llama", "mistral") and arch not in ("LlamaForCausalLM", "MistralForCausalLM"):
            raise ModelError(f"{source}: unsupported architecture {arch!r} (model_type {model_type!r}); "
                             "only Llama-family models are supported")
        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = d.get("num_key_value_heads") or heads
        head_dim = d.get("head_dim") or hidden // heads
        if heads % kv_heads:
            raise ModelError(f"{source}: num_attention_heads={heads} is not a multiple of "
                             f"num_key_value_heads={kv_heads}")
        eos = d.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        # Newer checkpoints (transformers 5) keep theta and scaling together in rope_parameters.
        rope_params = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or (rope_params if rope_params.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("linear", "dynamic", "llama3", "default"):
                raise ModelError(f"{source}: unsupported rope_scaling type {kind!r}")
            scaling = None if kind == "default" else {**scaling, "type": kind}
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(d.get("rope_theta", rope_params.get("rope_theta", 10000.0))),
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id", 1),
            eos_token_ids=eos_ids,
            quant=_quant_from_dict(d.get("quantization_config"), source),
            architecture=arch,
        )

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: config.json not found")
        return cls.from_dict(read_json_object(path), str(path))


def read_json_object(path: Path, error: type[Exception] = ModelError) -> dict:
    """A JSON file that must hold an object; `error` naming the file when it is unreadable or malformed."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _quant_from_dict(q: dict | None, source: str) -> QuantConfig | None:
    if not q:
        return None
    method = q.get("quant_method", "gptq")
    if method != "gptq":
        raise ModelError(f"{source}: unsupported quant_method {method!r} (GPTQ only)")
    bits = q.get("bits", 4)
    if bits != 4:
        raise ModelError(f"{source}: unsupported bit width {bits} (only 4-bit GPTQ is supported)")
    return QuantConfig(bits=bits, group_size=int(q.get("group_size", 128)),
                       desc_act=bool(q.get("desc_act", False)), sym=bool(q.get("sym", True)))


@dataclass
class RuntimeConfig:
    """How to run a model: everything that is not a fact about the checkpoint."""
    max_seq_len: int = 2048        # KV-cache length
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    dtype: str = "auto"            # activations: auto (fp16 on GPU, fp32 on CPU) | float16 | bfloat16 | float32
    compress_pos_emb: float = 1.0  # linear RoPE scaling factor applied on top of the model's
    alpha: float = 1.0             # NTK-aware RoPE alpha (scales the base)
    weight_dtype: str = "auto"     # CPU weight storage: auto (bfloat16 where the CPU has native bf16
                                   # dot products, else the activation dtype) | float32 | bfloat16 | float16
    # CPU weights of a 4-bit model: auto (the 4-bit layers packed for the CPU kernels, read 4-bit by their GEMV,
    # and the LM head and a tied embedding in 8 bits, where the kernels build; else dense) | packed (the same
    # layouts even without the kernels: the torch reference dequantizes per call) | dense (dequantized at load)
    cpu_weights: str = "auto"
    keep_q4: bool = False          # CPU: keep the GPUs' q4 format and dequantize per call (tests of that format)
    force_reference: bool = False  # never use the CUDA kernels
    # Fused decode kernels (model/ops.py Ops), on by default; EXLLAMA_FUSED_DECODE=0 / EXLLAMA_FUSED_GEMV=0
    # turn them off (to compare, or to rule them out).
    fused_decode: bool = field(default_factory=lambda: os.environ.get("EXLLAMA_FUSED_DECODE", "1") != "0")
    fused_gemv: bool = field(default_factory=lambda: os.environ.get("EXLLAMA_FUSED_GEMV", "1") != "0")
    # 4-bit weights in the mma layout read by the tensor-core GEMV (GPUs, fp16); EXLLAMA_MMA_GEMV=0: row layout
    mma_gemv: bool = field(default_factory=lambda: os.environ.get("EXLLAMA_MMA_GEMV", "1") != "0")
    # which projections take the mma layout (>= 8M weights; o_proj, down_proj), comma-separated; none by default
    # since the integer-product GEMV; env EXLLAMA_MMA_LAYERS
    mma_layers: str = field(default_factory=lambda: os.environ.get("EXLLAMA_MMA_LAYERS", ""))
    # fp16 LM head (a few rows) by the extension's GEMV instead of cuBLAS; EXLLAMA_DENSE_GEMV=0 turns it off
    dense_gemv: bool = field(default_factory=lambda: os.environ.get("EXLLAMA_DENSE_GEMV", "1") != "0")
    # decode: rotary and KV write inside the attention kernel (faster on every measured size since the
    # attention loads its cache rows before waiting on the previous kernel); EXLLAMA_FUSED_ROPE_ATTN=0 turns it off
    rope_in_attention: bool = field(default_factory=lambda: os.environ.get("EXLLAMA_FUSED_ROPE_ATTN", "1") != "0")
    embed_on_cpu: bool | None = None   # GPUs: the token embedding table in pinned host memory, read by
                                       # the GPU (no VRAM); None: when the LM head does not share it
    cuda_graph: bool = True        # capture the decode step as a CUDA graph where possible
    # keys a captured step attends to come in buckets of this many (one graph per bucket); env EXLLAMA_GRAPH_BUCKET
    graph_bucket: int = field(default_factory=lambda: int(os.environ.get("EXLLAMA_GRAPH_BUCKET", "256")))
    gpu_split: list[float] | str | None = None   # GB of weights per device, or "auto"
    extra: dict = field(default_factory=dict)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if self.torch_device().type == "cuda" else torch.float32
        return _dtype(self.dtype)

    def torch_weight_dtype(self) -> torch.dtype:
        """Dense weight storage. On CPUs decode is bound by memory bandwidth, so bf16 weights
        (half the bytes of fp32) nearly double decode speed where bf16 dot products are native."""
        if self.weight_dtype != "auto":
            return _dtype(self.weight_dtype)
        act = self.torch_dtype()
        if self.torch_device().type == "cpu" and act == torch.float32 and _cpu_has_bf16():
            return torch.bfloat16
        return act


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (float16, bfloat16 or float32)") from None


def _cpu_has_bf16() -> bool:
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


def rope_inv_freq(cfg: ModelConfig, runtime: RuntimeConfig, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies for rotary embeddings with the config's scaling applied.

    Linear scaling divides positions (done by scaling inv_freq), dynamic NTK grows the base
    once the sequence passes the trained length, llama3 rescales bands of frequencies.
    """
    dim = cfg.head_dim
    base = cfg.rope_theta * runtime.alpha ** (dim / (dim - 2))
    sc = cfg.rope_scaling or {}
    kind = sc.get("type")
    if kind == "dynamic" and seq_len and seq_len > cfg.max_position_embeddings:
        f = sc["factor"]
        base = base * ((f * seq_len / cfg.max_position_embeddings) - (f - 1)) ** (dim / (dim - 2))
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor = sc["factor"]
        lo, hi = sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old_len = sc.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        lo_wl, hi_wl = old_len / lo, old_len / hi
        smooth = (old_len / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > lo_wl, inv / factor, inv)
        mid = (wavelen <= lo_wl) & (wavelen >= hi_wl)
        scaled = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
        inv = scaled
    return (inv / runtime.compress_pos_emb).float()
