"""Greedy output of a model split over several GPUs against the same weights on one GPU.

    python tools/split_check.py -d DIR -gs 3.5,20 [--tokens 64] [-l 2048]

Loads DIR on cuda:0 alone, decodes `--tokens` greedy tokens after a fixed random prompt (graph-captured
steps, as the tools run), then loads it again with the split and does the same. Prints both token lists'
agreement, the largest logits difference and each device's peak memory; exit code 1 if the tokens differ.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import RuntimeConfig  # noqa: E402
from model.graph import GraphDecoder  # noqa: E402
from model.loader import load  # noqa: E402


def greedy(model, prompt: torch.Tensor, n: int):
    cache = model.new_cache()
    logits = model(prompt.to(model.device), cache)
    step = GraphDecoder(model, cache)          # captured steps returning logits
    tokens, rows = [], []
    for _ in range(n):
        t = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(t))
        rows.append(logits[0, -1].float().cpu())
        logits = step(t.to(model.device))
    return tokens, torch.stack(rows)


def run(directory, split, length, prompt, n):
    for d in range(torch.cuda.device_count()):
        torch.zeros(1, device=f"cuda:{d}")     # the allocator of a device exists once something used it
        torch.cuda.reset_peak_memory_stats(d)
    model, _ = load(directory, RuntimeConfig(device="cuda:0", max_seq_len=length, gpu_split=split),
                    progress=False, tokenizer=False)
    layers = [str(d) for d in model.layer_devices]
    out = greedy(model, prompt, n)
    peak = {f"cuda:{d}": round(torch.cuda.max_memory_allocated(d) / 2**20) for d in range(torch.cuda.device_count())}
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out, peak, {d: layers.count(d) for d in sorted(set(layers))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-d", "--directory", required=True)
    ap.add_argument("-gs", "--gpu-split", required=True, help="GB of weights per GPU (A,B,...) or 'auto'")
    ap.add_argument("-l", "--length", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=100)
    args = ap.parse_args()
    split = args.gpu_split if args.gpu_split == "auto" else [float(x) for x in args.gpu_split.split(",")]
    vocab = json.loads((Path(args.directory) / "config.json").read_text())["vocab_size"]
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    (one_tok, one_logits), one_peak, one_layers = run(args.directory, None, args.length, prompt, args.tokens)
    (sp_tok, sp_logits), sp_peak, sp_layers = run(args.directory, split, args.length, prompt, args.tokens)
    finite = bool(torch.isfinite(one_logits).all() and torch.isfinite(sp_logits).all())
    if not finite:
        print("the logits are not finite: the comparison says nothing about these weights", file=sys.stderr)
    same = sum(a == b for a, b in zip(one_tok, sp_tok)) if finite else 0
    diff = ((sp_logits - one_logits).norm(dim=-1) / one_logits.norm(dim=-1)).max().item()
    result = {"tokens": args.tokens, "same_tokens": same, "finite": finite, "max_logits_rel_diff": diff,
              "single_gpu": {"layers": one_layers, "peak_mb": one_peak},
              "split": {"gpu_split": args.gpu_split, "layers": sp_layers, "peak_mb": sp_peak}}
    print(f"greedy tokens equal: {same}/{args.tokens}; largest logits rel. difference {diff:.2e}")
    print(f"one GPU: layers {one_layers}, peak {one_peak}")
    print(f"split {args.gpu_split}: layers {sp_layers}, peak {sp_peak}")
    print(json.dumps(result))
    return 0 if same == args.tokens else 1


if __name__ == "__main__":
    sys.exit(main())
