"""One call of each 7B-shaped decode GEMV (with the fused prologues the decode step uses), for ncu.

    ncu --clock-control none --kernel-name regex:q4_gemm --section SpeedOfLight ... python tools/ncu_q4.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cuda_ext import ops  # noqa: E402
from model.quant import pack_int4  # noqa: E402

dev = torch.device("cuda")
for K, N, kind in ((4096, 12288, "norm"), (4096, 4096, "res"), (4096, 22016, "norm"), (11008, 4096, "silu")):
    G = K // 128
    qw = pack_int4(torch.randint(0, 16, (K, N), device=dev))
    sc = (torch.rand(G, N, device=dev) * 0.01).half()
    of = (-sc.float() * 8).half()
    x = torch.randn(1, 2 * K if kind == "silu" else K, device=dev).half()
    kw = {}
    if kind == "norm":
        kw = dict(norm_weight=torch.ones(K, device=dev), norm_eps=1e-5)
    elif kind == "silu":
        kw = dict(silu_up=True)
    res = torch.randn(1, N, device=dev).half() if kind == "res" else None
    ops.q4_gemm_small(x, qw, sc, of, residual=res, **kw)
    torch.cuda.synchronize()
    print(K, N, kind, "done")
