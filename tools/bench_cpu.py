"""CPU speed and memory of the embedded model: our engine against transformers and llama.cpp on the same file.

    python tools/bench_cpu.py [--tokens 128] [--prompt 512] [--runs 3] [--ppl] [--dense]
                              [--llama-python PYTHON]   # an interpreter with llama-cpp-python, if not this one

Every system runs in a fresh process of its own (so peak RSS is its own), with torch's / llama.cpp's threads =
the cores torch uses here. Decode: greedy tokens with a KV cache after a 13-token prompt, tokens/s of the median
run; prompt: a --prompt-token forward on an empty cache, median; peak RSS: the process's maximum resident set
after the decode runs, and after the prompt runs too (2048-token caches).
Rows: ours (the default CPU path: 4-bit layers packed for the CPU kernels, 8-bit LM head), ours with --dense (the
4-bit weights dequantized to fp32 at load, the previous default), transformers fp32 (if installed) and llama.cpp
(llama-cpp-python, where importable). --ppl adds Botchan perplexity (16 x 512) for ours: through the prompt path
(fp32 GEMM on dequantized weights) and through the decode path (every row through the int8-activation GEMV).
The targets (docs/performance.md) are checked at the end: decode >= llama.cpp, prompt >= 2x llama.cpp,
peak RSS <= 400 MB, decode-path perplexity within 0.2% of the prompt path's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Once upon a time, in a small village by the sea,"

# Each child defines decode() and prompt() (-> t/s), runs MEASURE and prints one JSON line of `out`.
MEASURE = r'''decode()                                    # warm-up (first-call allocations)
out = {{"decode": statistics.median(decode() for _ in range(a["runs"]))}}
out["rss_decode_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
prompt()
out["prompt"] = statistics.median(prompt() for _ in range(a["runs"]))
out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
'''
CHILD_OURS = r'''
import json, resource, statistics, sys, time
sys.path.insert(0, {root!r})
import torch
from model.config import RuntimeConfig
from model.loader import load
a = json.loads({args!r})
model, tok = load(None, RuntimeConfig(device="cpu", dtype="float32", cpu_weights=a["mode"]), progress=False)
ids = torch.tensor([tok.encode(a["text"])])
def decode():
    cache = model.new_cache()
    logits = model(ids, cache)
    t0 = time.perf_counter()
    for _ in range(a["tokens"]):
        logits = model(logits[:, -1].argmax(-1, keepdim=True), cache)
    return a["tokens"] / (time.perf_counter() - t0)
long = torch.randint(100, 40000, (1, a["prompt"]), generator=torch.Generator().manual_seed(0))
def prompt():
    cache = model.new_cache()
    t0 = time.perf_counter()
    model(long, cache)
    return a["prompt"] / (time.perf_counter() - t0)
''' + MEASURE + r'''if a["ppl"]:
    from model.perplexity import perplexity
    text = tok.encode(open(a["botchan"], encoding="utf-8").read())
    out["ppl"] = perplexity(model, text, 512, 16, progress=False)
    model.ops.CPU_GEMV_MAX_ROWS = 1 << 30
    out["ppl_decode_path"] = perplexity(model, text, 512, 16, progress=False)
print(json.dumps(out))
'''

CHILD_HF = r'''
import json, resource, statistics, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from model.embedded import embedded_gguf_path
a = json.loads({args!r})
p = Path(embedded_gguf_path())
tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
m = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
ids = tok(a["text"], return_tensors="pt").input_ids
def decode():
    with torch.no_grad():
        t0 = time.perf_counter()
        out = m.generate(ids, max_new_tokens=a["tokens"], min_new_tokens=a["tokens"], do_sample=False)
        return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0)
long = torch.randint(100, 40000, (1, a["prompt"]), generator=torch.Generator().manual_seed(0))
def prompt():
    with torch.no_grad():
        t0 = time.perf_counter()
        m(long, use_cache=True)
        return a["prompt"] / (time.perf_counter() - t0)
''' + MEASURE + "print(json.dumps(out))\n"

CHILD_LLAMA = r'''
import json, resource, statistics, time
import numpy as np
from llama_cpp import Llama
a = json.loads({args!r})
llm = Llama(model_path=a["gguf"], n_ctx=2048, n_threads=a["threads"], n_threads_batch=a["threads"],
            n_batch=512, verbose=False)
ids = llm.tokenize(a["text"].encode())
def decode():
    llm.reset()
    llm.eval(ids)
    t0 = time.perf_counter()
    for _ in range(a["tokens"]):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])
    return a["tokens"] / (time.perf_counter() - t0)
rng = np.random.default_rng(0)
long = [int(t) for t in rng.integers(100, 40000, a["prompt"])]
def prompt():
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(long)
    return a["prompt"] / (time.perf_counter() - t0)
''' + MEASURE + "print(json.dumps(out))\n"


def run_child(python: str, code: str, args: dict) -> dict | None:
    src = code.format(root=str(ROOT), args=json.dumps(args))
    r = subprocess.run([python, "-c", src], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"  (failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode})", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                flags = Path("/proc/cpuinfo").read_text()
                isa = "AVX-512" if " avx512f" in flags else ("AVX2" if " avx2" in flags else "no AVX2")
                return f"{name}, {os.cpu_count()} cores, {isa}"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ppl", action="store_true", help="Botchan perplexity of ours (prompt and decode paths)")
    ap.add_argument("--dense", action="store_true", help="also the dense fp32 path (4-bit dequantized at load)")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--llama-python", default=sys.executable, help="a Python with llama-cpp-python installed")
    args = ap.parse_args()

    import torch
    from model.embedded import embedded_gguf_path
    from cuda_ext import build
    threads = torch.get_num_threads()
    kern = build.cpu.load().isa() if build.cpu.is_available() else f"none ({build.cpu.failure_reason()})"
    print(f"CPU: {cpu_name()}; torch threads {threads}; CPU kernels: {kern}")
    print(f"decode: {args.tokens} greedy tokens after a short prompt; prompt: {args.prompt} tokens; "
          f"median of {args.runs}", flush=True)
    common = {"text": PROMPT, "tokens": args.tokens, "prompt": args.prompt, "runs": args.runs,
              "threads": threads, "gguf": str(embedded_gguf_path()), "botchan": str(ROOT / "data" / "botchan.txt")}
    rows = [("ours (4-bit packed, default)", sys.executable, CHILD_OURS, {"mode": "auto", "ppl": args.ppl})]
    if args.dense:
        rows.append(("ours (dense fp32 weights)", sys.executable, CHILD_OURS, {"mode": "dense", "ppl": False}))
    if not args.no_transformers:
        rows.append(("transformers fp32", sys.executable, CHILD_HF, {}))
    rows.append(("llama.cpp (llama-cpp-python)", args.llama_python, CHILD_LLAMA, {}))
    print(f"| system | decode t/s | {args.prompt}-token prompt t/s | peak RSS: decode / with the prompt | "
          "ppl 16x512 (prompt / decode path) |")
    print("|---|---|---|---|---|")
    res = {}
    for name, py, code, extra in rows:
        r = run_child(py, code, {**common, **extra})
        if r is None:
            print(f"| {name} | - | - | - | - |", flush=True)
            continue
        res[name] = r
        ppl = f"{r['ppl']:.4f} / {r['ppl_decode_path']:.4f}" if "ppl" in r else "-"
        print(f"| {name} | {r['decode']:.1f} | {r['prompt']:.1f} | {r['rss_decode_mb']:.0f} / {r['rss_mb']:.0f} MB "
              f"| {ppl} |", flush=True)
    ours, llama = res.get(rows[0][0]), res.get("llama.cpp (llama-cpp-python)")
    if ours:
        print("targets:")
        if llama:
            print(f"  decode >= llama.cpp: {ours['decode'] / llama['decode']:.2f}x "
                  f"({'met' if ours['decode'] >= llama['decode'] else 'missed'})")
            print(f"  prompt >= 2x llama.cpp: {ours['prompt'] / llama['prompt']:.2f}x "
                  f"({'met' if ours['prompt'] >= 2 * llama['prompt'] else 'missed'})")
        for what, key in (("decoding", "rss_decode_mb"), (f"with the {args.prompt}-token prompt", "rss_mb")):
            print(f"  peak RSS <= 400 MB, {what}: {ours[key]:.0f} MB ({'met' if ours[key] <= 400 else 'missed'})")
        if "ppl" in ours:
            d = ours["ppl_decode_path"] / ours["ppl"] - 1
            print(f"  decode-path perplexity within 0.2%: {d * 100:+.3f}% ({'met' if abs(d) <= 2e-3 else 'missed'})")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
