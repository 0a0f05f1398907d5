"""Reading safetensors checkpoints (single file or sharded with an index) into the model."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig, ModelError
from .quant import from_gptq

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class SafetensorsDir:
    """Lazy access to the tensors of a checkpoint folder, by key."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.where: dict[str, Path] = {}
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ModelError(f"{index}: malformed index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{self.folder}: no .safetensors files found")
        self._handles = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise ModelError(f"{path}: listed in the index but missing")
            try:
                h = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
            self._handles[path] = h
            for key in h.keys():
                self.where[key] = path

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str, shape: tuple | None = None) -> torch.Tensor:
        path = self.where.get(key)
        if path is None:
            raise ModelError(f"{self.folder}: missing tensor '{key}'")
        try:
            t = self._handles[path].get_tensor(key)
        except Exception as e:
            raise ModelError(f"{path}: cannot read tensor '{key}' (file truncated or corrupt: {e})") from None
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ModelError(f"{path}: tensor '{key}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t


def load_linear(st: SafetensorsDir, prefix: str, lin, cfg: ModelConfig, bias: bool):
    """Fill a Linear from `prefix.weight` (dense) or `prefix.qweight/qzeros/scales/g_idx` (GPTQ)."""
    K, N = lin.in_features, lin.out_features
    b = st.get(f"{prefix}.bias", (N,)) if bias or f"{prefix}.bias" in st else None
    if f"{prefix}.qweight" in st:
        if K % 8 or N % 8:
            raise ModelError(f"{st.folder}: {prefix} has shape {N}x{K}, not a multiple of 8 for 4-bit packing")
        qweight = st.get(f"{prefix}.qweight", (K // 8, N))
        if qweight.dtype != torch.int32:
            raise ModelError(f"{st.folder}: {prefix}.qweight must be int32, got {qweight.dtype}")
        scales = st.get(f"{prefix}.scales")
        if scales.dim() != 2 or scales.shape[1] != N or K % scales.shape[0]:
            raise ModelError(f"{st.folder}: {prefix}.scales has shape {tuple(scales.shape)}, "
                             f"which does not fit a {N}x{K} layer")
        G = scales.shape[0]
        qzeros = st.get(f"{prefix}.qzeros", (G, N // 8))
        g_idx = st.get(f"{prefix}.g_idx", (K,)) if f"{prefix}.g_idx" in st else None
        try:
            lin.set_q4(*from_gptq(qweight, qzeros, scales, g_idx), bias=b)
        except ValueError as e:
            raise ModelError(f"{st.folder}: {prefix}: {e}") from None
    else:
        lin.set_dense(st.get(f"{prefix}.weight", (N, K)), b)


def load_safetensors_model(model, folder: Path, progress=None):
    cfg = model.cfg
    st = SafetensorsDir(folder)
    if cfg.quant is not None and cfg.quant.bits != 4:
        raise ModelError(f"{folder}: unsupported bit width {cfg.quant.bits}")
    model.embed_tokens = st.get("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}"
        for name in LINEARS:
            mod = layer.get_submodule(name)
            has_bias = cfg.attention_bias if name.startswith("self_attn") else cfg.mlp_bias
            if name == "self_attn.o_proj":
                has_bias = False
            load_linear(st, f"{p}.{name}", mod, cfg, has_bias)
        layer.input_layernorm.weight = st.get(f"{p}.input_layernorm.weight", (cfg.hidden_size,))
        layer.post_attention_layernorm.weight = st.get(f"{p}.post_attention_layernorm.weight", (cfg.hidden_size,))
        if progress:
            progress(i + 1, len(model.layers))
    model.norm.weight = st.get("model.norm.weight", (cfg.hidden_size,))
    if "lm_head.weight" in st or "lm_head.qweight" in st:
        load_linear(st, "lm_head", model.lm_head, cfg, False)
    elif not cfg.tie_word_embeddings:
        raise ModelError(f"{folder}: missing tensor 'lm_head.weight' (and tie_word_embeddings is false)")
    return model
