"""Benchmark and evaluation tool: perplexity, speed, VRAM.

    python benchmark.py -ppl [-d DIR] [--ppl-len 512] [--ppl-windows 16]
    python benchmark.py -p [-d DIR] [-l 2048]

-p measures, as the seed did: prompt tokens/s over l - 128 tokens; decode tokens/s for 128
tokens on an empty cache ("best") and at the end of the full context ("worst"); peak VRAM.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from model.config import RuntimeConfig
from model.loader import load

DEFAULT_TEXT = Path(__file__).parent / "data" / "botchan.txt"


def add_engine_args(ap: argparse.ArgumentParser):
    """Options shared by every tool that loads a model."""
    ap.add_argument("-d", "--directory", default=None, help="model folder or .gguf file (default: embedded SmolLM2-135M)")
    ap.add_argument("-l", "--length", type=int, default=2048, help="maximum sequence length")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--dtype", default="auto", help="auto, float16, bfloat16, float32")
    ap.add_argument("-cpe", "--compress-pos-emb", type=float, default=1.0, help="linear RoPE scaling factor")
    ap.add_argument("-a", "--alpha", type=float, default=1.0, help="NTK RoPE alpha")
    ap.add_argument("--reference", action="store_true", help="use the torch reference path, no CUDA kernels")
    ap.add_argument("-gs", "--gpu-split", default=None, help="GB of weights per GPU (A,B,...) or 'auto'")


def runtime_from_args(args) -> RuntimeConfig:
    split = args.gpu_split
    if split and split != "auto":
        split = [float(x) for x in split.split(",")]
    return RuntimeConfig(max_seq_len=args.length, device=args.device, dtype=args.dtype,
                         compress_pos_emb=args.compress_pos_emb, alpha=args.alpha,
                         force_reference=args.reference, gpu_split=split)


def _sync(model):
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def _decoder(model, cache, graphs: bool):
    """The decode step the tools use: graph-captured on GPUs (unless off), eager elsewhere."""
    if model.device.type == "cuda" and graphs:
        from model.graph import GraphDecoder
        return GraphDecoder(model, cache)
    return lambda ids: model(ids, cache)


def decode_speed(model, cache, n: int, graphs: bool) -> float:
    step = _decoder(model, cache, graphs)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 1), device=model.device)
    start = cache.length
    for _ in range(3):           # warm-up (graph capture, allocator)
        step(ids)
    cache.truncate(start)
    _sync(model)
    t0 = time.perf_counter()
    for _ in range(n):
        ids = step(ids)[:, -1].argmax(-1, keepdim=True)
    _sync(model)
    return n / (time.perf_counter() - t0)


def speed(model, length: int, graphs: bool = True) -> dict:
    gen = 128
    prompt_len = max(1, length - gen)
    ids = torch.randint(0, model.cfg.vocab_size, (1, prompt_len), device=model.device)
    cache = model.new_cache(max_seq_len=length)
    model(ids[:, :min(prompt_len, 16)], cache)   # warm-up
    cache.reset()
    _sync(model)
    t0 = time.perf_counter()
    model(ids, cache)
    _sync(model)
    prompt = prompt_len / (time.perf_counter() - t0)
    cache.reset()
    best = decode_speed(model, cache, gen, graphs)
    cache.truncate(0)
    model(ids, cache)                               # fill the context, then decode at its end
    worst = decode_speed(model, cache, gen, graphs)
    r = {"prompt_tokens": prompt_len, "prompt_tps": prompt, "best_tps": best, "worst_tps": worst}
    if model.device.type == "cuda":
        r["vram_mb"] = torch.cuda.max_memory_allocated(model.device) / 2**20
    return r


def describe(model) -> dict:
    from model.linear import Linear
    q = model.cfg.quant
    linear = sum(m.in_features * m.out_features for m in model.modules()
                 if isinstance(m, Linear) and not (m is model.lm_head and model.cfg.tie_word_embeddings))
    return {"model": Path(getattr(model, "source", "?")).name,
            "params_m": round((linear + model.embed_tokens.numel()) / 1e6, 1),
            "group_size": q.group_size if q else None, "act_order": q.desc_act if q else None,
            "device": str(model.device), "dtype": str(model.dtype).replace("torch.", "")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap)
    ap.add_argument("-p", "--speed", action="store_true", help="measure prompt and decode speed, VRAM")
    ap.add_argument("--no-graphs", action="store_true", help="decode without CUDA graphs")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    ap.add_argument("-ppl", "--perplexity", action="store_true", help="measure perplexity")
    ap.add_argument("--ppl-len", type=int, default=512, help="tokens per window")
    ap.add_argument("--ppl-windows", type=int, default=16, help="number of windows")
    ap.add_argument("--ppl-text", type=Path, default=DEFAULT_TEXT, help="text file (default: Botchan)")
    args = ap.parse_args(argv)
    if not (args.perplexity or args.speed):
        ap.error("nothing to do: give -p and/or -ppl")
    if args.perplexity:
        args.length = max(args.length, args.ppl_len)
    model, tokenizer = load(args.directory, runtime_from_args(args), tokenizer=args.perplexity)
    result = describe(model)
    if args.speed:
        result.update(speed(model, args.length, graphs=not args.no_graphs))
        print(f"prompt: {result['prompt_tps']:.1f} t/s over {result['prompt_tokens']} tokens")
        print(f"decode best (empty cache): {result['best_tps']:.1f} t/s")
        print(f"decode worst (at {args.length} tokens): {result['worst_tps']:.1f} t/s")
        if "vram_mb" in result:
            print(f"VRAM: {result['vram_mb']:.0f} MB")
    if args.perplexity:
        from model.perplexity import perplexity
        if not args.ppl_text.is_file():
            sys.exit(f"{args.ppl_text}: not found (run `python tools/fetch_botchan.py`)")
        ids = tokenizer.encode(args.ppl_text.read_text(encoding="utf-8"))
        ppl = perplexity(model, ids, args.ppl_len, args.ppl_windows)
        result["perplexity"] = ppl
        if args.json:
            print(json.dumps(result))
        print(f"perplexity: {ppl:.4f}")
    elif args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
