"""PEFT LoRA adapters applied on top of (quantized) base layers, several loaded at once.

An adapter is never merged into the 4-bit weights: each Linear keeps, per adapter name, its
low-rank pair (A [r, K], B [N, r]) and scale, and a forward call names the adapter to use (or
none). Scale is alpha / r, or alpha / sqrt(r) with rsLoRA; rank_pattern / alpha_pattern
override per module.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from .config import ModelError, read_json_object
from .linear import Linear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


def _read_config(folder: Path) -> dict:
    f = folder / "adapter_config.json"
    if not f.is_file():
        raise ModelError(f"{folder}: not a LoRA adapter (adapter_config.json missing)")
    cfg = read_json_object(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{f}: unsupported adapter type {cfg.get('peft_type')!r} (LoRA only)")
    if cfg.get("use_dora"):
        raise ModelError(f"{f}: DoRA adapters are not supported")
    if cfg.get("fan_in_fan_out"):
        raise ModelError(f"{f}: fan_in_fan_out adapters (Conv1D bases) are not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise ModelError(f"{f}: adapters that train biases or whole modules are not supported")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        raise ModelError(f"{f}: regex target_modules are not supported; list the module names")
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ModelError(f"{f}: unknown target modules {unknown} (supported: {', '.join(TARGETS)})")
    return cfg


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    st, bin_ = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file
            return load_file(str(st))
        if bin_.is_file():
            return torch.load(str(bin_), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"{folder}: cannot read adapter weights ({e})") from None
    raise ModelError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")


def load_lora(model, folder, name: str | None = None) -> str:
    """Load the adapter in `folder` under `name` (default: the folder's name); returns the name."""
    folder = Path(folder)
    name = name or folder.name
    cfg = _read_config(folder)
    tensors = _read_tensors(folder)
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    pairs: dict[tuple, dict] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise ModelError(f"{folder}: unexpected tensor '{key}' (not a LoRA A/B of a Llama projection)")
        layer, block, proj, ab = int(m[1]), m[2], m[3], m[4]
        if proj not in TARGETS:
            raise ModelError(f"{folder}: unknown module '{proj}' in '{key}'")
        pairs.setdefault((layer, block, proj), {})[ab] = t
    if not pairs:
        raise ModelError(f"{folder}: the adapter holds no LoRA weights")
    staged = []
    for (layer, block, proj), ab in sorted(pairs.items()):
        if layer >= len(model.layers) or set(ab) != {"A", "B"}:
            raise ModelError(f"{folder}: layer {layer} {proj}: needs lora_A and lora_B within the model's "
                             f"{len(model.layers)} layers")
        lin: Linear = model.layers[layer].get_submodule(f"{block}.{proj}")
        a, b = ab["A"], ab["B"]
        rr = int(cfg.get("rank_pattern", {}).get(proj, r))
        al = float(cfg.get("alpha_pattern", {}).get(proj, alpha))
        if a.shape != (a.shape[0], lin.in_features) or b.shape != (lin.out_features, a.shape[0]) or a.shape[0] != rr:
            raise ModelError(f"{folder}: layer {layer} {proj}: adapter shapes A {tuple(a.shape)} / B "
                             f"{tuple(b.shape)} do not fit a {lin.out_features}x{lin.in_features} layer "
                             f"with rank {rr}")
        scale = al / math.sqrt(rr) if cfg.get("use_rslora") else al / rr
        staged.append((lin, a, b, scale))
    # Attach only once every pair checked out: a bad adapter leaves the model untouched.
    dt = model.dtype
    for lin, a, b, scale in staged:
        dev = lin.device            # the layer's GPU when layers are split over several
        lin.lora[name] = (a.to(dev, dt).contiguous(), b.to(dev, dt).contiguous(), scale)
    for layer in model.layers:
        _fuse(layer.self_attn.qkv, (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj), name)
        _fuse(layer.mlp.gate_up, (layer.mlp.gate_proj, layer.mlp.up_proj), name)
    model.lora_adapters[name] = str(folder)
    return name


def _fuse(fused: Linear | None, parts, name: str):
    """The adapter's pairs of q|k|v (or gate|up) as one pair of the fused layer: A stacked over the ranks,
    B block-diagonal with each scale folded in, so a decode step runs two small GEMMs instead of six."""
    if fused is None or not any(name in p.lora for p in parts):
        return
    a_parts, b_parts = [], []
    for p in parts:
        if name in p.lora:
            a, b, scale = p.lora[name]
            a_parts.append(a)
            b_parts.append(b * scale)
        else:                       # not targeted: a rank-0 block
            ref = next(q.lora[name][0] for q in parts if name in q.lora)
            a_parts.append(ref.new_zeros(0, p.in_features))
            b_parts.append(ref.new_zeros(p.out_features, 0))
    fused.lora[name] = (torch.cat(a_parts).contiguous(), torch.block_diag(*b_parts).contiguous(), 1.0)


def unload_lora(model, name: str):
    for mod in model.modules():
        if isinstance(mod, Linear):
            mod.lora.pop(name, None)
    model.lora_adapters.pop(name, None)
