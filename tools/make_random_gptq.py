"""Write a random-weight 4-bit GPTQ checkpoint of a real model shape, for speed measurements.

    python tools/make_random_gptq.py -o /tmp/llama7b --shape 7b [--group-size 128] [--act-order]

Random weights are fine for speed and memory, never for quality. The files follow the standard
GPTQ layout (qweight/qzeros/scales/g_idx + quantization_config), sharded at ~2 GB.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
    # SmolLM2-135M (the embedded model's shape; tied embeddings; its GGUF is Q4_1 with 32-wide blocks)
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
}


def random_gptq(K: int, N: int, gs: int, act_order: bool, gen: torch.Generator) -> dict:
    G = K // gs
    dev = gen.device
    g_idx = torch.arange(K, dtype=torch.int32, device=dev) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen, device=dev)]
    t = {
        "qweight": torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, generator=gen, device=dev),
        # zero points 7 or 8 at random (GPTQ stores zero - 1) and scales giving weights of std ~0.02
        # with no common mean (as an initialised model): activations stay finite through all layers in
        # fp16, so two runs' outputs can be compared. Random zero points 1..16 (or one zero point for
        # all, whose -0.5 * scale mean feeds back through every layer) overflow deep models to NaN.
        "qzeros": 0x66666666 | (torch.randint(-2**31, 2**31 - 1, (G, N // 8), dtype=torch.int32, generator=gen,
                                              device=dev) & 0x11111111),
        "scales": (torch.rand(G, N, generator=gen, device=dev) * 0.002 + 0.0035).half(),
        "g_idx": g_idx,
    }
    return {k: v.cpu() for k, v in t.items()}


def write(out: Path, shape: str, group_size: int, act_order: bool, seed: int = 0, device: str = "cpu"):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, **SHAPES[shape],
           "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": group_size,
                                   "desc_act": act_order, "sym": True}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator(device=device).manual_seed(seed)   # a GPU draws a 70B's 35 GB in seconds
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (d // cfg["num_attention_heads"])
    shard, shard_bytes, index, n = {}, 0, {}, 0

    def flush():
        nonlocal shard, shard_bytes, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(out / name))
            index.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

    def add(key, t):
        nonlocal shard_bytes
        shard[key] = t
        shard_bytes += t.numel() * t.element_size()
        if shard_bytes > 2e9:
            flush()

    add("model.embed_tokens.weight", (torch.randn(cfg["vocab_size"], d, generator=gen, device=device) * 0.02).half().cpu())
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for name, K, N in [("self_attn.q_proj", d, d), ("self_attn.k_proj", d, kv), ("self_attn.v_proj", d, kv),
                           ("self_attn.o_proj", d, d), ("mlp.gate_proj", d, f), ("mlp.up_proj", d, f),
                           ("mlp.down_proj", f, d)]:
            for k, t in random_gptq(K, N, group_size if group_size > 0 else K, act_order, gen).items():
                add(f"{p}.{name}.{k}", t)
        add(f"{p}.input_layernorm.weight", torch.ones(d, dtype=torch.float16))
        add(f"{p}.post_attention_layernorm.weight", torch.ones(d, dtype=torch.float16))
        print(f"\rlayer {i + 1}/{cfg['num_hidden_layers']}", end="", flush=True)
    add("model.norm.weight", torch.ones(d, dtype=torch.float16))
    if not cfg["tie_word_embeddings"]:
        add("lm_head.weight", (torch.randn(cfg["vocab_size"], d, generator=gen, device=device) * 0.02).half().cpu())
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the random numbers are drawn (the same seed gives other weights per device type)")
    a = ap.parse_args()
    write(a.out, a.shape, a.group_size, a.act_order, a.seed, a.device)
