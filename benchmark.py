"""Benchmark and evaluation tool: perplexity, speed, VRAM.

    python benchmark.py -ppl [-d DIR] [--ppl-len 512] [--ppl-windows 16]
    python benchmark.py -p [-d DIR] [-l 2048]
    python benchmark.py -v [-d DIR]                 # self-check; exit code 1 on disagreement
    python benchmark.py --plot speed.png [-l 2048] [--plot-steps 8]

-p measures, as the seed did: prompt tokens/s over l - 128 tokens (the median of three passes);
greedy decode tokens/s for 128 tokens on an empty cache ("best") and at the end of the full context
("worst"), on GPUs with the argmax inside the captured step as the generator runs greedy decoding;
peak VRAM.

-v is the seed's self-check: perplexity over a few short windows computed twice, feeding each
window in chunks of at most 8 tokens through the cache (the few-row path: the small-M 4-bit kernel
on GPUs, bf16 activations against bf16 weights on CPUs) and whole (the many-row path: dequantize +
matmul); the two must agree within --verify-tol (relative, default 1%), then a short greedy
completion is printed. --plot draws decode tokens/s over context length and prompt tokens/s over
prompt length (matplotlib, Agg) on whatever device runs it. Every run ends with the results table
row (model, size, group size, act-order, sequence length, VRAM, prompt, best, worst, perplexity).
"""
from __future__ import annotations

import argparse
import json
import statistics
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
    ap.add_argument("--reference", action="store_true", help="use the torch reference path, no CUDA or CPU kernels")
    ap.add_argument("--cpu-weights", default="auto", choices=("auto", "packed", "dense"),
                    help="CPU: 4-bit layers packed for the CPU kernels (auto: where they build) or dequantized")
    ap.add_argument("-gs", "--gpu-split", default=None, help="GB of weights per GPU (A,B,...) or 'auto'")
    ap.add_argument("-lora", "--lora", action="append", default=[], metavar="DIR",
                    help="load a PEFT LoRA adapter (repeatable; the first one is used where one is applied)")
    ap.add_argument("--lora-dir", default=None, metavar="DIR", help="load every adapter in DIR's subfolders")


def runtime_from_args(args) -> RuntimeConfig:
    split = args.gpu_split
    if split and split != "auto":
        split = [float(x) for x in split.split(",")]
    return RuntimeConfig(max_seq_len=args.length, device=args.device, dtype=args.dtype,
                         compress_pos_emb=args.compress_pos_emb, alpha=args.alpha,
                         force_reference=args.reference, gpu_split=split, cpu_weights=args.cpu_weights)


def load_from_args(args, **kw):
    """load() with the engine options, then the LoRA adapters; -> (model, tokenizer, adapter names)."""
    from model.lora import load_lora
    model, tokenizer = load(args.directory, runtime_from_args(args), **kw)
    folders = [Path(d) for d in args.lora]
    if args.lora_dir:
        folders += sorted(p for p in Path(args.lora_dir).iterdir() if (p / "adapter_config.json").is_file())
    names = [load_lora(model, f) for f in folders]
    return model, tokenizer, names


def _gpus(model) -> list[int]:
    """Indices of the GPUs the model is on (several when its layers are split); [] on CPUs."""
    if model.device.type != "cuda":
        return []
    return sorted({d.index or 0 for d in model.layer_devices} | {model.device.index or 0})


def _sync(model):
    """Wait for every GPU the model is on (a split model's last step ends on the last one)."""
    for d in _gpus(model):
        torch.cuda.synchronize(d)


def _decoder(model, cache, graphs: bool, lora=None):
    """The greedy decode step the tools time: step(ids [B, 1] or None) -> the next ids, None continuing from the
    previous step's pick. On GPUs a captured step that takes the argmax itself (GraphDecoder.greedy, what the
    generator runs for greedy decoding); eager elsewhere (or with graphs off)."""
    if model.device.type == "cuda" and graphs:
        from model.graph import GraphDecoder
        dec = GraphDecoder(model, cache)
        return lambda ids: dec.greedy(ids, lora=lora)[:, :1]
    last = None

    def step(ids):
        nonlocal last
        last = model(last if ids is None else ids, cache, lora=lora)[:, -1].argmax(-1, keepdim=True)
        return last
    return step


def decode_speed(model, cache, n: int, step) -> float:
    """Greedy decode tokens/s for n tokens from the cache's current length. An untimed pass over the same
    positions first keeps one-off costs (graph captures, one per key bucket) out of the timing."""
    ids = torch.randint(0, model.cfg.vocab_size, (1, 1), device=model.device)
    start = cache.length
    for i in range(n):
        step(ids if i == 0 else None)
    cache.truncate(start)
    _sync(model)
    t0 = time.perf_counter()
    for i in range(n):
        step(ids if i == 0 else None)
    _sync(model)
    return n / (time.perf_counter() - t0)


PROMPT_RUNS = 3     # timed prompt passes (median); one pass of a 7B's 1920 tokens is ~50 ms on an H100


def _peak_mb(model) -> float:
    """Peak allocated memory over the model's GPUs (0 on CPUs)."""
    return sum(torch.cuda.max_memory_allocated(d) for d in _gpus(model)) / 2**20


def speed(model, length: int, graphs: bool = True, lora: str | None = None) -> dict:
    gen = 128
    prompt_len = max(1, length - gen)
    ids = torch.randint(0, model.cfg.vocab_size, (1, prompt_len), device=model.device)
    cache = model.new_cache(max_seq_len=length)
    model(ids, cache, lora=lora)                    # warm-up at full length (kernel selection, autotuning)
    times = []
    for _ in range(PROMPT_RUNS):                    # the median: one host stall must not make the figure
        cache.reset()
        _sync(model)
        t0 = time.perf_counter()
        model(ids, cache, lora=lora)
        _sync(model)
        times.append(time.perf_counter() - t0)
    prompt = prompt_len / statistics.median(times)
    phases = {"prompt": _peak_mb(model)}            # where the VRAM peak happens (cumulative peaks)
    cache.reset()
    step = _decoder(model, cache, graphs, lora)
    best = decode_speed(model, cache, gen, step)
    phases["decode"] = _peak_mb(model)
    cache.truncate(0)
    model(ids, cache, lora=lora)                    # fill the context, then decode at its end
    phases["prompt with graphs held"] = _peak_mb(model)
    worst = decode_speed(model, cache, gen, step)
    phases["decode at the full context"] = _peak_mb(model)
    r = {"prompt_tokens": prompt_len, "prompt_tps": prompt, "best_tps": best, "worst_tps": worst}
    if model.device.type == "cuda":
        r["vram_phases_mb"] = phases
        r["vram_mb"] = phases["decode at the full context"]      # the run's peak (peaks are cumulative)
        if len(_gpus(model)) > 1:
            r["vram_per_device_mb"] = {f"cuda:{d}": torch.cuda.max_memory_allocated(d) / 2**20 for d in _gpus(model)}
    return r


def verify(model, tokenizer, text: str, n_windows: int = 4, length: int = 256, chunk: int = 8,
           tol: float = 0.01, prompt: str = "Once upon a time,", new_tokens: int = 32) -> dict:
    """The -v self-check: few-row (chunked, cached) and many-row (whole window) perplexity must agree."""
    from model.perplexity import window_nll, windows
    wins = windows(tokenizer.encode(text), length, n_windows)
    cache = model.new_cache(max_seq_len=length)
    nll_full = nll_chunk = 0.0
    count, max_diff = 0, 0.0
    for w in wins:
        full = model(w.unsqueeze(0), last_only=False)[0]
        cache.reset()
        parts = [model(w[s:s + chunk].unsqueeze(0), cache, last_only=False)[0] for s in range(0, length, chunk)]
        chunked = torch.cat(parts)
        a, c = window_nll(full, w)
        b, _ = window_nll(chunked, w)
        nll_full, nll_chunk, count = nll_full + a, nll_chunk + b, count + c
        lp = torch.log_softmax(full.float(), -1) - torch.log_softmax(chunked.float(), -1)
        max_diff = max(max_diff, lp.abs().max().item())
    import math
    ppl_full, ppl_chunk = math.exp(nll_full / count), math.exp(nll_chunk / count)
    rel = abs(ppl_full - ppl_chunk) / ppl_full
    ok = rel <= tol and math.isfinite(ppl_full) and math.isfinite(ppl_chunk)
    # A short greedy completion, fed token by token through the cache.
    ids = tokenizer.encode(prompt, add_bos=tokenizer.add_bos_token)
    cache = model.new_cache(max_seq_len=len(ids) + new_tokens + 1)
    logits = model(torch.tensor([ids]), cache)
    out = []
    for _ in range(new_tokens):
        nxt = int(logits[0, -1].argmax())
        if nxt in tokenizer.eos_ids:
            break
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]), cache)
    return {"verify_ppl_full": ppl_full, "verify_ppl_chunked": ppl_chunk, "verify_rel_diff": rel,
            "verify_max_logprob_diff": max_diff, "verify_tol": tol, "verify_ok": ok,
            "verify_windows": f"{len(wins)}x{length}", "verify_chunk": chunk,
            "completion": prompt + tokenizer.decode(out)}


def speed_curve(model, length: int, steps: int = 8, decode_tokens: int = 32, graphs: bool = True) -> dict:
    """Prompt tokens/s over prompt length and decode tokens/s over context length, `steps` points each.

    Each point prefills p tokens (timed: the prompt speed at p), then decodes `decode_tokens` at
    context p (the decode speed at p); the first decode point is the empty cache. One decoder serves
    every point, and each timed run is preceded by an untimed one of the same shape (prefill) or over
    the same positions (decode), so one-off costs (kernel selection at a new length, CUDA-graph
    captures, one per 256-key bucket) stay out of the timings.
    """
    room = length - decode_tokens
    if room < steps:
        raise ValueError(f"-l {length} leaves no room for {steps} points of {decode_tokens} decode tokens")
    lens = sorted({max(1, round(room * (i + 1) / steps)) for i in range(steps)})
    ids = torch.randint(0, model.cfg.vocab_size, (1, room), device=model.device)
    cache = model.new_cache(max_seq_len=length)
    step = _decoder(model, cache, graphs)
    model(ids[:, :min(room, 16)], cache)         # warm-up
    cache.reset()

    ctx, dec = [0], [decode_speed(model, cache, decode_tokens, step)]
    prompt_len, prompt_tps = [], []
    for p in lens:
        cache.reset()
        model(ids[:, :p], cache)                  # untimed: the first call at a new length pays set-up costs
        cache.reset()
        _sync(model)
        t0 = time.perf_counter()
        model(ids[:, :p], cache)
        _sync(model)
        prompt_len.append(p)
        prompt_tps.append(p / (time.perf_counter() - t0))
        ctx.append(p)
        dec.append(decode_speed(model, cache, decode_tokens, step))
    return {"context": ctx, "decode_tps": dec, "prompt_len": prompt_len, "prompt_tps": prompt_tps}


def plot_speed(curve: dict, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(curve["context"], curve["decode_tps"], "o-", color="tab:blue")
    a.set_xlabel("context length (tokens in the cache)")
    a.set_ylabel("decode tokens/s")
    a.set_title("decode speed")
    b.plot(curve["prompt_len"], curve["prompt_tps"], "o-", color="tab:orange")
    b.set_xlabel("prompt length (tokens)")
    b.set_ylabel("prompt tokens/s")
    b.set_title("prompt speed")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


TABLE_HEAD = ("| model | size | group | act | seq len | VRAM | prompt | best | worst | ppl |\n"
              "|---|---|---|---|---|---|---|---|---|---|")


def table_row(r: dict) -> str:
    """The seed's results table row; '-' for what was not measured."""
    def f(key, fmt):
        v = r.get(key)
        return "-" if v is None else fmt.format(v)
    return "| " + " | ".join([
        f"{r.get('model', '?')} ({r.get('device', '?')})", f"{r.get('params_m', 0):g}M",
        f("group_size", "{}"), "-" if r.get("act_order") is None else ("yes" if r["act_order"] else "no"),
        f("seq_len", "{}"), f("vram_mb", "{:.0f} MB"), f("prompt_tps", "{:.0f} t/s"),
        f("best_tps", "{:.1f} t/s"), f("worst_tps", "{:.1f} t/s"), f("perplexity", "{:.4f}")]) + " |"


def describe(model) -> dict:
    from model.linear import Linear
    q = model.cfg.quant
    fused = {id(m) for layer in model.layers for m in (layer.self_attn.qkv, layer.mlp.gate_up) if m is not None}
    linear = sum(m.in_features * m.out_features for m in model.modules()
                 if isinstance(m, Linear) and id(m) not in fused
                 and not (m is model.lm_head and model.cfg.tie_word_embeddings))
    return {"model": Path(getattr(model, "source", "?")).name,
            "params_m": round((linear + model.cfg.vocab_size * model.cfg.hidden_size) / 1e6, 1),
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
    ap.add_argument("-v", "--verify", action="store_true",
                    help="self-check: few-row vs whole-window perplexity agree, then a greedy completion")
    ap.add_argument("--verify-tol", type=float, default=0.01, help="-v: allowed relative perplexity difference")
    ap.add_argument("--verify-windows", type=int, default=4, help="-v: windows of --verify-len tokens")
    ap.add_argument("--verify-len", type=int, default=256, help="-v: tokens per window")
    ap.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                    help="plot decode t/s over context length and prompt t/s over prompt length (up to -l)")
    ap.add_argument("--plot-steps", type=int, default=8, help="--plot: points per curve")
    ap.add_argument("--plot-decode", type=int, default=32, help="--plot: tokens decoded per point")
    args = ap.parse_args(argv)
    if not (args.perplexity or args.speed or args.verify or args.plot):
        ap.error("nothing to do: give -p, -ppl, -v and/or --plot")
    if args.perplexity:
        args.length = max(args.length, args.ppl_len)
    if args.verify:
        args.length = max(args.length, args.verify_len)
    need_text = args.perplexity or args.verify
    if need_text and not args.ppl_text.is_file():
        sys.exit(f"{args.ppl_text}: not found (run `python tools/fetch_botchan.py`)")
    model, tokenizer, adapters = load_from_args(args, tokenizer=need_text)
    lora = adapters[0] if adapters else None
    result = describe(model)
    if model.device.type == "cuda":
        # what the weights hold once loaded, and the peak while loading (the run's peak is "VRAM")
        result["vram_weights_mb"] = sum(torch.cuda.memory_allocated(d) for d in _gpus(model)) / 2**20
        result["vram_load_peak_mb"] = _peak_mb(model)
    result["seq_len"] = args.length
    if args.speed:
        result.update(speed(model, args.length, graphs=not args.no_graphs, lora=lora))
        print(f"prompt: {result['prompt_tps']:.1f} t/s over {result['prompt_tokens']} tokens")
        print(f"decode best (empty cache): {result['best_tps']:.1f} t/s")
        print(f"decode worst (at {args.length} tokens): {result['worst_tps']:.1f} t/s")
        if "vram_mb" in result:
            print(f"VRAM: {result['vram_mb']:.0f} MB (peak allocated; weights {result['vram_weights_mb']:.0f} MB, "
                  f"peak while loading {result['vram_load_peak_mb']:.0f} MB)")
        for dev, mb in result.get("vram_per_device_mb", {}).items():
            print(f"  {dev}: {mb:.0f} MB")
    if args.perplexity:
        from model.perplexity import perplexity
        if not args.ppl_text.is_file():
            sys.exit(f"{args.ppl_text}: not found (run `python tools/fetch_botchan.py`)")
        ids = tokenizer.encode(args.ppl_text.read_text(encoding="utf-8"))
        ppl = perplexity(model, ids, args.ppl_len, args.ppl_windows, lora=lora)
        result["perplexity"] = ppl
        print(f"perplexity: {ppl:.4f}")
    if args.plot:
        curve = speed_curve(model, args.length, args.plot_steps, args.plot_decode, graphs=not args.no_graphs)
        title = f"{result['model']} on {_device_name(model)}, {result['dtype']}"
        plot_speed(curve, args.plot, title)
        result["plot"] = str(args.plot)
        result["speed_curve"] = curve
        print(f"plot: {args.plot}")
    if args.verify:
        v = verify(model, tokenizer, args.ppl_text.read_text(encoding="utf-8"), args.verify_windows,
                   args.verify_len, tol=args.verify_tol)
        result.update(v)
        print(f"verify: perplexity {v['verify_ppl_chunked']:.4f} in chunks of {v['verify_chunk']}, "
              f"{v['verify_ppl_full']:.4f} whole ({v['verify_windows']}); relative difference "
              f"{v['verify_rel_diff']:.2e} (tolerance {args.verify_tol:g}), max |d logprob| "
              f"{v['verify_max_logprob_diff']:.3g}: {'OK' if v['verify_ok'] else 'FAILED'}")
        print(f"completion: {v['completion']!r}")
    print(TABLE_HEAD)
    print(table_row(result))
    if args.json:
        print(json.dumps(result))
    if args.verify and not result["verify_ok"]:
        return 1
    return 0


def _device_name(model) -> str:
    if model.device.type == "cuda":
        return torch.cuda.get_device_name(model.device)
    import os
    return f"CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    sys.exit(main())
