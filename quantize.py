"""Quantize an HF-layout Llama checkpoint to 4-bit GPTQ, or export a model as fp16.

    python quantize.py -i FP16_DIR -o OUT_DIR [--bits 4] [--group-size 128] [--act-order] [--sym]
                       [--method gptq|rtn] [--calibration FILE] [--samples N] [--seq-len L] [--damp 0.01]
    python quantize.py --export-fp16 OUT_DIR [-d MODEL]     # default MODEL: the embedded SmolLM2-135M GGUF

GPTQ runs one decoder layer at a time (see model/gptq.py), on the GPU when there is one. The default
calibration text is Botchan (data/botchan.txt) without its first 8192 tokens, which are the 16x512
windows `benchmark.py -ppl` scores, so perplexity stays measured on held-out text. The output folder
is a standard GPTQ checkpoint (qweight/qzeros/scales/g_idx, quantization_config), tokenizer files
copied, ready for `-d`. Progress goes to stderr, the per-layer error figures (relative output error
of each linear on the calibration set) to stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from model.gptq import (QuantizeError, QuantSettings, calibration_windows, check_shapes, default_device,  # noqa: E402
                        quantize_checkpoint, read_config)

DEFAULT_TEXT = ROOT / "data" / "botchan.txt"
PPL_TOKENS = 16 * 512      # what benchmark.py -ppl scores by default; kept out of the calibration


def load_calibration(args, src: Path):
    """Token windows [samples, seq_len] from --calibration (text, or 'random'), tokenized by the input's tokenizer."""
    if args.method == "rtn" and not args.act_order and args.samples == 0:
        return None
    if args.samples <= 0:
        raise QuantizeError(f"--samples {args.samples}: GPTQ and act-order need calibration samples")
    if args.calibration == "random":
        from model.config import ModelConfig
        vocab = ModelConfig.from_file(src / "config.json").vocab_size
        g = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, vocab, (args.samples, args.seq_len), generator=g)
    path = Path(args.calibration) if args.calibration else DEFAULT_TEXT
    if not path.is_file():
        hint = " (run `python tools/fetch_botchan.py`)" if path == DEFAULT_TEXT else ""
        raise QuantizeError(f"{path}: calibration text not found{hint}")
    from model.tokenizer import Tokenizer, TokenizerError
    try:
        tok = Tokenizer.from_dir(src)
    except TokenizerError as e:
        raise QuantizeError(f"{e} (the calibration text needs the model's tokenizer; "
                            "use --calibration random for a tokenizer-less checkpoint)") from None
    ids = tok.encode(path.read_text(encoding="utf-8"))
    skip = args.skip if args.skip is not None else (PPL_TOKENS if path.resolve() == DEFAULT_TEXT.resolve() else 0)
    if len(ids) - skip < args.samples * args.seq_len:
        print(f"note: {path.name} has {len(ids) - skip} tokens after skipping {skip}; "
              f"{args.samples} windows of {args.seq_len} overlap", file=sys.stderr)
    return calibration_windows(ids, args.samples, args.seq_len, skip)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-i", "--input", type=Path, help="HF-layout fp16/bf16/fp32 Llama checkpoint folder")
    ap.add_argument("-o", "--output", type=Path, help="output folder (new or empty)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128, help="columns per group; -1: one group per row")
    ap.add_argument("--act-order", action="store_true", help="quantize columns by descending Hessian diagonal (desc_act)")
    ap.add_argument("--sym", action="store_true", help="symmetric (zero fixed at 8); default asymmetric")
    ap.add_argument("--method", choices=("gptq", "rtn"), default="gptq")
    ap.add_argument("--calibration", default=None, help="calibration text file (default: Botchan), or 'random'")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    ap.add_argument("--skip", type=int, default=None, help="tokens to skip at the start of the text "
                    f"(default: {PPL_TOKENS} for Botchan, the perplexity slice; 0 otherwise)")
    ap.add_argument("--damp", type=float, default=0.01, help="dampening, fraction of mean(diag H)")
    ap.add_argument("--batch-size", type=int, default=4, help="calibration windows per forward pass")
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    ap.add_argument("--seed", type=int, default=0, help="seed for --calibration random")
    ap.add_argument("--json", action="store_true", help="print a JSON summary line at the end")
    ap.add_argument("--export-fp16", type=Path, metavar="OUT_DIR",
                    help="export a model (-d, default the embedded GGUF) as an HF fp16 checkpoint and exit")
    ap.add_argument("-d", "--directory", default=None, help="with --export-fp16: the model to export")
    ap.add_argument("--export-dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    args = ap.parse_args(argv)

    if args.export_fp16:
        from model.export import DTYPES, export_path
        t0 = time.time()
        out = export_path(args.directory, args.export_fp16, DTYPES[args.export_dtype])
        print(f"exported to {out} ({args.export_dtype}) in {time.time() - t0:.1f} s")
        return 0
    if not args.input or not args.output:
        ap.error("give -i INPUT and -o OUTPUT (or --export-fp16 OUT_DIR)")

    settings = QuantSettings(bits=args.bits, group_size=args.group_size, act_order=args.act_order,
                             sym=args.sym, method=args.method, damp=args.damp)
    try:
        settings.check()
        cfg, _ = read_config(args.input)        # input and group-size errors before the calibration text
        check_shapes(cfg, settings, str(args.input / "config.json"))
        calib = load_calibration(args, args.input)
        dev = args.device or str(default_device())
        what = f"{args.method.upper()} {args.bits}-bit, group {args.group_size}, " \
               f"{'act-order' if args.act_order else 'natural order'}, {'sym' if args.sym else 'asym'}"
        cal = f"{calib.shape[0]}x{calib.shape[1]} calibration tokens" if calib is not None else "no calibration"
        print(f"quantizing {args.input} -> {args.output}: {what}; {cal}; device {dev}", flush=True)
        res = quantize_checkpoint(args.input, args.output, settings, calib, device=dev, batch_size=args.batch_size)
    except QuantizeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    errs = list(res["errors"].values())
    if errs:
        print(f"mean rel. output error {sum(errs) / len(errs):.4f}, max {max(errs):.4f} over {len(errs)} linears")
    print(f"wrote {args.output} in {res['seconds']:.1f} s")
    if args.json:
        print(json.dumps({"output": str(args.output), "seconds": res["seconds"], **res["settings"],
                          "calibration": res["calibration"],
                          "mean_error": sum(errs) / len(errs) if errs else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
