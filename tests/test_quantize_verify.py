"""`benchmark.py -v` on the embedded model, as CI runs it (a subprocess on the CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_verify_embedded():
    """Few-row (chunks of 8 through the cache) and whole-window perplexity agree within 1%, exit code 0,
    and a greedy completion is printed."""
    p = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "-v", "--json", "--device", "cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["verify_ok"] and res["verify_rel_diff"] < 0.01 and res["verify_windows"] == "4x256"
    assert 10 < res["verify_ppl_full"] < 100
    assert res["completion"].startswith("Once upon a time,") and len(res["completion"]) > 40
    assert "| model | size | group | act | seq len | VRAM | prompt | best | worst | ppl |" in p.stdout
