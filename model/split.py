"""Placing decoder layers on several GPUs (the seed's -gs), manually or automatically.

Manual: `gpu_split=[A, B, ...]` gives GB of layer weights per device, filled in order.
Auto: each device's usable memory must hold its layers' weights AND their share of the KV
cache at the configured sequence length, plus a reserve for activations; the first device also
holds the embeddings (unless they stay on the CPU) and the last the final norm and LM head. The
seed counted weights only, and users hit out-of-memory errors at long contexts; here a plan
that cannot fit is refused before anything is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass

GB = 1024 ** 3


class SplitError(ValueError):
    pass


@dataclass(frozen=True)
class Costs:
    layer_weights: int       # bytes of one decoder layer's weights
    layer_kv: int            # bytes of one layer's KV cache at the configured length and batch
    embed: int               # token embedding table
    head: int                # final norm + LM head (+ logits buffer)
    reserve: int             # activations and scratch per device


def costs_for(cfg, max_seq_len: int, batch: int = 1, kv_bytes: int = 2, bits: float | None = 4.125,
              dtype_bytes: int = 2) -> Costs:
    """Estimate costs from a ModelConfig: 4-bit layers (~4.125 bits a weight with g128 scales/offsets)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    per_layer = d * (cfg.num_attention_heads * cfg.head_dim) * 2 + d * cfg.kv_dim * 2 + 3 * d * f
    w = per_layer * bits / 8 if bits else per_layer * dtype_bytes
    kv = 2 * batch * max_seq_len * cfg.kv_dim * kv_bytes
    embed = cfg.vocab_size * d * dtype_bytes
    head = cfg.vocab_size * d * dtype_bytes + cfg.vocab_size * 4 * max(256, batch)
    # Prompt processing dequantizes one projection at a time and holds a few [T, F] activations.
    reserve = max(f * d * dtype_bytes, 6 * max_seq_len * max(f, d) * dtype_bytes) + 512 * 2**20
    return Costs(int(w), int(kv), int(embed), int(head), int(reserve))


def plan_manual(n_layers: int, c: Costs, split_gb: list[float]) -> list[int]:
    """Layers to devices by GB of layer weights per device, in order."""
    if not split_gb or any(g <= 0 for g in split_gb):
        raise SplitError(f"gpu split {split_gb}: every device needs a positive number of GB")
    plan, dev, used = [], 0, 0.0
    for i in range(n_layers):
        while used + c.layer_weights > split_gb[dev] * GB:
            if used == 0:
                raise SplitError(f"layer {i} needs {c.layer_weights / GB:.2f} GB, more than the "
                                 f"{split_gb[dev]} GB given to device {dev}")
            dev, used = dev + 1, 0.0
            if dev == len(split_gb):
                raise SplitError(f"gpu split {split_gb} GB holds only {i} of {n_layers} layers "
                                 f"({c.layer_weights / GB:.2f} GB each); give more GB")
        plan.append(dev)
        used += c.layer_weights
    return plan


def plan_auto(n_layers: int, c: Costs, free_bytes: list[int], embed_on_cpu: bool = True) -> list[int]:
    """Layers to devices so that weights + KV cache + reserve fit each device's free memory.

    Layers are spread in proportion to capacity (not packed onto the first card), which leaves
    every device headroom; the last device also carries the LM head.
    """
    n = len(free_bytes)
    if n == 0:
        raise SplitError("no GPU to place layers on")
    fixed = [c.reserve] * n
    if not embed_on_cpu:
        fixed[0] += c.embed
    fixed[-1] += c.head
    room = [max(0, f - x) for f, x in zip(free_bytes, fixed)]
    per = c.layer_weights + c.layer_kv
    fits = [r // per for r in room]
    if sum(fits) < n_layers:
        need = n_layers * per + sum(fixed)
        raise SplitError(f"the model does not fit: {n_layers} layers x {per / GB:.2f} GB (weights + KV cache) "
                         f"+ {sum(fixed) / GB:.2f} GB fixed = {need / GB:.1f} GB, but the devices have "
                         f"{sum(free_bytes) / GB:.1f} GB free ({', '.join(f'{b / GB:.1f}' for b in free_bytes)}); "
                         "use a shorter sequence length or more devices")
    # Proportional share, capped by what fits, remainders to the roomiest devices.
    share = [min(fits[i], int(n_layers * room[i] / sum(room))) for i in range(n)]
    while sum(share) < n_layers:
        i = max((i for i in range(n) if share[i] < fits[i]), key=lambda i: room[i] - share[i] * per)
        share[i] += 1
    return [d for d in range(n) for _ in range(share[d])]


def describe(plan: list[int], c: Costs, n_devices: int, embed_on_cpu: bool) -> list[str]:
    lines = []
    for d in range(n_devices):
        n = plan.count(d)
        if not n:
            continue
        gb = (n * (c.layer_weights + c.layer_kv)
              + (c.embed if d == 0 and not embed_on_cpu else 0) + (c.head if d == n_devices - 1 else 0)) / GB
        first = plan.index(d)
        lines.append(f"cuda:{d}: layers {first}-{first + n - 1} ({n}), ~{gb:.1f} GB with KV cache")
    return lines
