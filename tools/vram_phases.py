"""Where benchmark.py's peak VRAM comes from: peak allocated memory phase by phase.

    python tools/vram_phases.py [-d DIR] [-l 2048]

Loads the model (weights), allocates the cache, then reports the peak above that baseline for the
prompt of l - 128 tokens, the capture of the decode graphs, and decoding, plus the largest live
blocks at the prompt's peak (torch's allocator history).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import RuntimeConfig  # noqa: E402
from model.graph import GraphDecoder  # noqa: E402
from model.loader import load  # noqa: E402

MB = 2 ** 20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-d", "--directory", default=None)
    ap.add_argument("-l", "--length", type=int, default=2048)
    args = ap.parse_args()
    model, _ = load(args.directory, RuntimeConfig(max_seq_len=args.length), progress=False, tokenizer=False)
    print(f"weights: {torch.cuda.memory_allocated() / MB:.0f} MB")
    cache = model.new_cache(max_seq_len=args.length)
    base = torch.cuda.memory_allocated()
    print(f"+ cache: {base / MB:.0f} MB")
    ids = torch.randint(0, model.cfg.vocab_size, (1, args.length - 128), device=model.device)

    def phase(name, fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        print(f"{name:28s} peak {peak / MB:8.0f} MB (+{(peak - base) / MB:6.0f} over weights + cache), "
              f"live after {torch.cuda.memory_allocated() / MB:8.0f} MB")

    phase("prompt (first)", lambda: model(ids, cache))
    cache.reset()
    torch.cuda.memory._record_memory_history(max_entries=100000)
    phase("prompt (again)", lambda: model(ids, cache))
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    cache.reset()
    dec = GraphDecoder(model, cache)
    tok = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    phase("decode (captures graphs)", lambda: [dec(tok) for _ in range(16)])
    model(ids, cache)
    phase("decode at the full context", lambda: [dec(tok) for _ in range(16)])
    # biggest allocations made during the second prompt (trace events), to see what dominates its peak
    sizes = {}
    for dev_trace in snap.get("device_traces", []):
        for ev in dev_trace:
            if ev.get("action") == "alloc":
                frames = ev.get("frames") or []
                where = next((f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames
                              if "/model/" in f["filename"] or "/cuda_ext/" in f["filename"]), "?")
                sizes.setdefault(where, []).append(ev["size"])
    print("largest allocations in the prompt (where: count x max MB):")
    for where, s in sorted(sizes.items(), key=lambda kv: -max(kv[1]))[:12]:
        print(f"  {where:60s} {len(s):5d} x {max(s) / MB:7.1f}")


if __name__ == "__main__":
    main()
