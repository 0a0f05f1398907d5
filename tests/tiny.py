"""Tiny random Llama checkpoints for tests: written with transformers, read by our engine."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.config import ModelConfig, RuntimeConfig
from model.model import LlamaModel
from model.quant import pack_cols_int4, pack_int4
from model.weights import load_safetensors_model

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)


def hf_tiny(seed=0, **overrides):
    """A random transformers LlamaForCausalLM in fp32 (norm weights randomised too)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY, **overrides})
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.08)
    return m


def save_hf(m, folder: Path, state: dict | None = None, quant: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    d = m.config.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    if quant:
        d["quantization_config"] = {"quant_method": "gptq", "bits": 4, **quant}
    (folder / "config.json").write_text(json.dumps(d))
    if state is None:
        state = {k: v.contiguous() for k, v in m.state_dict().items()}
    if m.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"))
    return folder


def gptq_quantize(w: torch.Tensor, group_size: int, sym: bool, g_idx: torch.Tensor | None = None):
    """Quantize W [N, K] GPTQ-style (round to nearest) under any g_idx.

    Returns the GPTQ tensors and the dequantized weight computed independently of the engine.
    """
    N, K = w.shape
    gs = K if group_size <= 0 else group_size
    G = K // gs
    if g_idx is None:
        g_idx = torch.arange(K) // gs
    scales = torch.empty(G, N)
    zeros = torch.empty(G, N)
    for g in range(G):
        rows = w[:, g_idx == g]                      # [N, rows]
        if sym:
            s = rows.abs().amax(1).clamp(min=1e-6) / 7.5
            z = torch.full((N,), 8.0)
        else:
            lo, hi = rows.amin(1), rows.amax(1)
            s = ((hi - lo) / 15).clamp(min=1e-6)
            z = torch.round(-lo / s).clamp(1, 15)
        scales[g], zeros[g] = s, z
    scales = scales.half().float()
    sk, zk = scales[g_idx].t(), zeros[g_idx].t()     # [N, K]
    q = torch.clamp(torch.round(w / sk + zk), 0, 15)
    deq = sk * (q - zk)
    tensors = {
        "qweight": pack_int4(q.t().to(torch.int32)),
        "qzeros": pack_cols_int4((zeros - 1).to(torch.int32)),
        "scales": scales.half(),
        "g_idx": g_idx.to(torch.int32),
    }
    return tensors, deq


def gptq_checkpoint(m, folder: Path, group_size=32, sym=False, act_order=False, seed=0):
    """Write m's linear layers as GPTQ; load the dequantized weights back into m (the reference)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    with torch.no_grad():
        for name, p in m.named_parameters():
            prefix = name[: -len(".weight")]
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                K = p.shape[1]
                g_idx = None
                if act_order:
                    perm = torch.randperm(K, generator=gen)
                    g_idx = torch.empty(K, dtype=torch.long)
                    g_idx[perm] = torch.arange(K) // (K if group_size <= 0 else group_size)
                t, deq = gptq_quantize(p.detach(), group_size, sym, g_idx)
                state.update({f"{prefix}.{k}": v for k, v in t.items()})
                p.copy_(deq)
            else:
                state[name] = p.detach().contiguous()
    quant = {"group_size": group_size, "desc_act": act_order, "sym": sym}
    return save_hf(m, folder, state, quant)


def load_ours(folder: Path, **runtime) -> LlamaModel:
    cfg = ModelConfig.from_file(folder / "config.json")
    # dense CPU weights unless asked: these tests compare with exact references (tests/test_cpu_kernels.py: packed)
    rt = RuntimeConfig(**{"dtype": "float32", "weight_dtype": "float32", "device": "cpu", "cpu_weights": "dense",
                          **runtime})
    return load_safetensors_model(LlamaModel(cfg, rt), folder, None).finalize()


def greedy_both_ways(ours, ids, prefix, n, bucket=8, use_graphs=False):
    """n greedy tokens after ids[:, :prefix]: from the logits step (argmax outside) and from the greedy step
    (argmax inside), each on its own cache and GraphDecoder(bucket, use_graphs); the greedy one is rewound and
    replayed once on the way. -> {"logits": tokens, "greedy": tokens}"""
    from model.graph import GraphDecoder
    picks = {}
    for mode in ("logits", "greedy"):
        cache = ours.new_cache()
        ours(ids[:, :prefix], cache)
        dec = GraphDecoder(ours, cache, bucket=bucket, use_graphs=use_graphs)
        tok, toks = ids[:, prefix:prefix + 1], []
        for i in range(n):
            if mode == "logits":
                tok = dec(tok)[:, -1].argmax(-1, keepdim=True)
            else:
                fed = tok.clone()
                res = dec.greedy(tok if i == 0 else None).clone()
                assert int(res[0, 1]) == 1                    # the picked logit is finite
                if i == n // 2:                                # jump back: the position is written again
                    cache.truncate(cache.length - 1)
                    assert torch.equal(dec.greedy(fed), res)
                tok = res[:, :1]
            toks.append(int(tok))
        picks[mode] = toks
    return picks
