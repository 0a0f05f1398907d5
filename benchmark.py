"""Benchmark and evaluation tool: perplexity, speed, VRAM.

    python benchmark.py -ppl [-d DIR] [--ppl-len 512] [--ppl-windows 16]
    python benchmark.py -p [-d DIR] [-l 2048]
"""
from __future__ import annotations

import argparse
import sys
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap)
    ap.add_argument("-ppl", "--perplexity", action="store_true", help="measure perplexity")
    ap.add_argument("--ppl-len", type=int, default=512, help="tokens per window")
    ap.add_argument("--ppl-windows", type=int, default=16, help="number of windows")
    ap.add_argument("--ppl-text", type=Path, default=DEFAULT_TEXT, help="text file (default: Botchan)")
    args = ap.parse_args(argv)
    if not args.perplexity:
        ap.error("nothing to do: give -ppl")
    args.length = max(args.length, args.ppl_len)
    model, tokenizer = load(args.directory, runtime_from_args(args))
    if args.perplexity:
        from model.perplexity import perplexity
        if not args.ppl_text.is_file():
            sys.exit(f"{args.ppl_text}: not found (run `python tools/fetch_botchan.py`)")
        ids = tokenizer.encode(args.ppl_text.read_text(encoding="utf-8"))
        ppl = perplexity(model, ids, args.ppl_len, args.ppl_windows)
        print(f"perplexity: {ppl:.4f}")


if __name__ == "__main__":
    main()
