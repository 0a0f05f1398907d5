"""Loading Llama GGUF files: config from metadata, tensors mapped to HF names.

Q4_0/Q4_1 tensors go straight into the engine's q4 format (their float offsets are kept,
nothing is re-quantized). Other types (Q8_0, F16, F32 and whatever gguf-py can dequantize)
become dense weights. llama.cpp stores Q/K rows permuted for interleaved-pair rotary; we
undo that so the rotate-half convention of HF checkpoints applies to every format.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig, ModelError

_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}


def open_gguf(path: Path):
    from .gguf_file import GGUFFile
    try:
        return GGUFFile(path)
    except Exception as e:
        raise ModelError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def config_from_gguf(reader, path) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelError(f"{path}: unsupported GGUF architecture {arch!r} (llama only)")
    names = {t.name for t in reader.tensors}
    p = "llama."
    heads = _field(reader, p + "attention.head_count")
    hidden = _field(reader, p + "embedding_length")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    d = {
        "vocab_size": _field(reader, p + "vocab_size") or len(tokens),
        "hidden_size": hidden,
        "intermediate_size": _field(reader, p + "feed_forward_length"),
        "num_hidden_layers": _field(reader, p + "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, p + "attention.head_count_kv", heads),
        "head_dim": _field(reader, p + "attention.key_length", hidden // heads),
        "rms_norm_eps": _field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": _field(reader, p + "rope.freq_base", 10000.0),
        "max_position_embeddings": _field(reader, p + "context_length", 2048),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    kind = _field(reader, p + "rope.scaling.type")
    if kind in ("linear", "yarn"):
        if kind == "yarn":
            raise ModelError(f"{path}: YaRN rope scaling is not supported")
        d["rope_scaling"] = {"type": "linear", "factor": _field(reader, p + "rope.scaling.factor")}
    return ModelConfig.from_dict(d, str(path))


def _unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation (interleaved pairs -> halves) on raw rows."""
    n = rows.shape[0]
    return rows.reshape(n_head, n // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _q4_from_blocks(raw: np.ndarray, n_rows: int, with_min: bool):
    """GGUF Q4_0 / Q4_1 block rows [N, nb * bs] -> (qweight, scales, offsets) in the q4 format."""
    bs = 20 if with_min else 18
    blocks = raw.reshape(n_rows, -1, bs)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]                    # [N, nb]
    qs = blocks[..., 4 if with_min else 2:]                                 # [N, nb, 16]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(n_rows, -1)   # [N, K]: low nibbles first
    if with_min:
        offs = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].copy())
    else:
        offs = (torch.from_numpy(d.copy()).float() * -8).half()
    # Pack along K while K is the fast axis: two nibbles a byte, four bytes a little-endian word.
    words = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8).view("<i4")    # [N, K/8]
    qweight = torch.from_numpy(words.T.copy())
    return qweight, torch.from_numpy(d.T.copy()).contiguous(), offs.t().contiguous()


def _q8_table(t, n_rows: int, width: int):
    """A Q8_0 table [n_rows, width] kept in its 8 bits (the CPU layout of model/cpu_layout.py: the same blocks,
    re-tiled), or None where the layout does not take it; LlamaModel.finalize dequantizes it where no CPU kernel
    reads it."""
    from .cpu_layout import TILE, CpuWeight
    if n_rows % TILE or width % 32:
        return None
    blocks = np.array(t.data).reshape(n_rows, width // 32, 34)
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0])          # [N, KB]
    q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8))                       # [N, KB, 32]
    q = q.view(n_rows // TILE, TILE, width // 32, 32).permute(0, 2, 1, 3).contiguous()
    sc = d.view(n_rows // TILE, TILE, width // 32).permute(0, 2, 1).contiguous()
    return CpuWeight(8, q, sc, None, width, n_rows, 32)


def _dense(t) -> torch.Tensor:
    import gguf
    arr = gguf.quants.dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.array(arr, dtype=np.float32))  # a copy: the mmap is read-only


def load_gguf_model(model, reader, path, progress=None):
    import gguf
    cfg = model.cfg
    Q = gguf.GGMLQuantizationType
    tensors = {t.name: t for t in reader.tensors}

    def get(name):
        if name not in tensors:
            raise ModelError(f"{path}: missing tensor '{name}'")
        return tensors[name]

    def fill(lin, t, n_head=None):
        N, K = lin.out_features, lin.in_features
        if tuple(int(x) for x in t.shape) != (K, N):
            raise ModelError(f"{path}: tensor '{t.name}' has shape {list(t.shape)}, expected {[K, N]}")
        if t.tensor_type in (Q.Q4_0, Q.Q4_1):
            raw = np.array(t.data).reshape(N, -1)   # a plain array: memmap slicing is slow
            if n_head:
                raw = _unpermute_rows(raw, n_head)
            lin.set_q4(*_q4_from_blocks(raw, N, t.tensor_type == Q.Q4_1))
        else:
            w = _dense(t).reshape(N, K)
            if n_head:
                w = torch.from_numpy(_unpermute_rows(w.numpy(), n_head))
            lin.set_dense(w)

    emb = get("token_embd.weight")
    if tuple(int(x) for x in emb.shape) != (cfg.hidden_size, cfg.vocab_size):
        raise ModelError(f"{path}: tensor 'token_embd.weight' has shape {list(emb.shape)}, "
                         f"expected {[cfg.hidden_size, cfg.vocab_size]}")
    model.embed_tokens = (_q8_table(emb, cfg.vocab_size, cfg.hidden_size) if emb.tensor_type == Q.Q8_0 else None)
    if model.embed_tokens is None:
        model.embed_tokens = _dense(emb).reshape(cfg.vocab_size, cfg.hidden_size)
    for i, layer in enumerate(model.layers):
        for short, long in _NAMES.items():
            n_head = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(short)
            fill(layer.get_submodule(long), get(f"blk.{i}.{short}.weight"), n_head)
        layer.input_layernorm.weight = _dense(get(f"blk.{i}.attn_norm.weight"))
        layer.post_attention_layernorm.weight = _dense(get(f"blk.{i}.ffn_norm.weight"))
        if progress:
            progress(i + 1, len(model.layers))
    model.norm.weight = _dense(get("output_norm.weight"))
    if "output.weight" in tensors:
        fill(model.lm_head, tensors["output.weight"])
    return model
