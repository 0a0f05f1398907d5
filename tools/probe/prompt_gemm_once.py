"""One 7B-shaped prompt GEMM through q4_matmul (for ncu / nsys): python tools/probe/prompt_gemm_once.py [SHAPE] [BN]
SHAPE one of qkv, o, gate|up, down (default qkv); BN the fused GEMM's token tile (default 0: automatic; -1 cuBLAS).
Runs it twice (profile the second: --launch-skip 1)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cuda_ext import ops  # noqa: E402
from tools.bench_prompt_gemm import SHAPES, random_layer  # noqa: E402

name = sys.argv[1] if len(sys.argv) > 1 else "qkv"
bn = int(sys.argv[2]) if len(sys.argv) > 2 else 0
_, K, N = next(s for s in SHAPES if s[0] == name)
dev = torch.device("cuda")
qw, sc, of = random_layer(K, N, dev)
x = torch.randn(1920, K, device=dev, dtype=torch.float16)
for _ in range(2):
    ops.q4_matmul(x, qw, sc, of, prompt_bn=bn)
torch.cuda.synchronize()
