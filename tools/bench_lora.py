"""Decode cost of one active LoRA adapter (rank 16 on all seven projections by default).

    python tools/bench_lora.py [-d DIR] [--rank 16] [--tokens 128] [--device auto]

Writes a random PEFT-format adapter for the model into a temporary folder, then times decoding
with and without it (the same eager step the tools use on CPUs; graph-captured on GPUs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark import _decoder, decode_speed  # noqa: E402
from model.config import RuntimeConfig  # noqa: E402
from model.loader import load  # noqa: E402
from model.lora import TARGETS, load_lora  # noqa: E402


def write_adapter(model, folder: Path, rank: int, seed: int = 0, std: float = 0.01) -> Path:
    """A random PEFT-format LoRA adapter for `model` (all seven projections of every layer)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, layer in enumerate(model.layers):
        for block, mod in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for name in TARGETS:
                lin = getattr(mod, name, None)
                if lin is None:
                    continue
                p = f"base_model.model.model.layers.{i}.{block}.{name}"
                tensors[f"{p}.lora_A.weight"] = torch.randn(rank, lin.in_features, generator=g) * std
                tensors[f"{p}.lora_B.weight"] = torch.randn(lin.out_features, rank, generator=g) * std
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS)}))
    return folder


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-d", "--directory", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    model, _ = load(args.directory, RuntimeConfig(device=args.device, max_seq_len=1024), progress=False,
                    tokenizer=False)
    with tempfile.TemporaryDirectory() as tmp:
        name = load_lora(model, write_adapter(model, Path(tmp) / "bench", args.rank))
    results = {}
    for label, lora in (("no adapter", None), (f"rank-{args.rank} adapter", name)):
        speeds = []
        for _ in range(args.runs):
            cache = model.new_cache()
            model(torch.randint(0, model.cfg.vocab_size, (1, 16), device=model.device), cache, lora=lora)
            speeds.append(decode_speed(model, cache, args.tokens, _decoder(model, cache, True, lora)))
        results[label] = statistics.median(speeds)
        print(f"{label:22s} {results[label]:8.1f} t/s  ({model.device}, threads {torch.get_num_threads()})")
    base, with_lora = results.values()
    print(f"adapter decode cost: {100 * (base / with_lora - 1):.1f}% more time per token")


if __name__ == "__main__":
    main()
