"""Export a loaded model (the embedded GGUF by default) as an HF-layout Llama checkpoint.

    python -m model.export OUT_DIR [-d MODEL] [--dtype float16|bfloat16|float32]
    python quantize.py --export-fp16 OUT_DIR [-d MODEL]

The folder holds what transformers and our own loader read: `config.json` (LlamaForCausalLM,
`tie_word_embeddings`), `model.safetensors` with HF tensor names (sharded with an index past
`max_shard_bytes`), `generation_config.json`, and the tokenizer: `tokenizer.json` (the
`tokenizers.Tokenizer` our Tokenizer wraps, saved as is; a sentencepiece `tokenizer.model` is
copied) with `tokenizer_config.json` (chat template, special tokens) and `special_tokens_map.json`.

Q/K rows need no permutation: the engine already holds HF's rotate-half layout (the GGUF loader
undoes llama.cpp's interleaving). Weights come from `Linear.dense_weight()`, so 4-bit layers are
written dequantized. fp16 is not exact for Q4_1 weights (`d * q + m` needs up to ~15 significant
bits, fp16 keeps 11): the rounding is at most 2^-11 relative per weight; `--dtype float32` is exact.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from .config import ModelConfig, RuntimeConfig

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json", "added_tokens.json")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ShardWriter:
    """Writes tensors to safetensors files as they come, keeping at most one shard in memory.

    One shard ends as `model.safetensors`; several as `model-0000i-of-0000n.safetensors` with
    `model.safetensors.index.json`, the layout transformers and our loader read.
    """

    def __init__(self, folder: Path, max_shard_bytes: int = 2 * 2**30):
        self.folder = Path(folder)
        self.max_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor):
        t = t.detach().to("cpu").clone(memory_format=torch.contiguous_format)  # own storage: no views shared
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = t
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self):
        from safetensors.torch import save_file
        if not self.pending:
            return
        path = self.folder / f".shard-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        self.flush()
        n = len(self.files)
        out = []
        if n == 1:
            final = self.folder / "model.safetensors"
            self.files[0][0].replace(final)
            return [final]
        weight_map = {}
        for i, (path, names) in enumerate(self.files, 1):
            final = self.folder / f"model-{i:05d}-of-{n:05d}.safetensors"
            path.replace(final)
            out.append(final)
            weight_map.update({k: final.name for k in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return out


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float16) -> dict:
    """config.json for a ModelConfig (the fields transformers' LlamaConfig reads)."""
    eos = list(cfg.eos_token_ids)
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(f"{cfg.rms_norm_eps:.7g}"),   # GGUF keeps it as float32: 1e-5, not 9.99999974e-06
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "torch_dtype": str(dtype).replace("torch.", ""),
    }
    if d["rope_scaling"] and "type" in d["rope_scaling"]:
        d["rope_scaling"].setdefault("rope_type", d["rope_scaling"]["type"])
    return d


def iter_hf_tensors(model):
    """(HF name, fp32 tensor on the CPU) for every weight of a loaded LlamaModel, in file order."""
    cfg = model.cfg
    yield "model.embed_tokens.weight", model.dense_embedding().float().cpu()
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", layer.input_layernorm.weight.float().cpu()
        for name in LINEARS:
            lin = layer.get_submodule(name)
            yield f"{p}.{name}.weight", lin.dense_weight(torch.float32).cpu()
            if lin.bias is not None:
                yield f"{p}.{name}.bias", lin.bias.float().cpu()
        yield f"{p}.post_attention_layernorm.weight", layer.post_attention_layernorm.weight.float().cpu()
    yield "model.norm.weight", model.norm.weight.float().cpu()
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", model.lm_head.dense_weight(torch.float32).cpu()


def save_tokenizer(tokenizer, folder: Path, cfg: ModelConfig | None = None):
    """tokenizer.json (or tokenizer.model) + tokenizer_config.json + special_tokens_map.json."""
    folder = Path(folder)
    backend = tokenizer._b
    if hasattr(backend, "tok"):                      # tokenizers.Tokenizer (GGUF vocabularies, tokenizer.json)
        backend.tok.save(str(folder / "tokenizer.json"))
    else:                                            # sentencepiece: copy the model file it came from
        src = Path(tokenizer.source) / "tokenizer.model"
        if not src.is_file():
            raise FileNotFoundError(f"{src}: the sentencepiece tokenizer file to copy is missing")
        shutil.copyfile(src, folder / "tokenizer.model")

    def piece(i):
        return None if i is None else tokenizer.piece(i)

    ts = dict(tokenizer._token_strings)
    special = {
        "bos_token": ts.get("bos_token") or piece(tokenizer.bos_id),
        "eos_token": ts.get("eos_token") or (piece(tokenizer.eos_ids[0]) if tokenizer.eos_ids else None),
        "pad_token": ts.get("pad_token") or piece(tokenizer.pad_id),
        "unk_token": ts.get("unk_token"),
    }
    special = {k: v for k, v in special.items() if v is not None}
    tc = {
        "tokenizer_class": "PreTrainedTokenizerFast" if hasattr(backend, "tok") else "LlamaTokenizer",
        **special,
        "add_bos_token": bool(tokenizer.add_bos_token),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_position_embeddings if cfg else 2048,
    }
    if tokenizer.chat_template:
        tc["chat_template"] = tokenizer.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False))
    gen = {"bos_token_id": tokenizer.bos_id,
           "eos_token_id": tokenizer.eos_ids[0] if len(tokenizer.eos_ids) == 1 else tokenizer.eos_ids}
    if tokenizer.pad_id is not None:
        gen["pad_token_id"] = tokenizer.pad_id
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer side files of a checkpoint folder (whichever exist)."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def export(model, tokenizer, out_dir, dtype: torch.dtype = torch.float16,
           max_shard_bytes: int = 2 * 2**30) -> Path:
    """Write `model` (any loaded LlamaModel) and `tokenizer` (or None) as an HF Llama checkpoint.

    Load the model with fp32 weight storage (`weight_dtype="float32"`) for a faithful export: the
    CPU default stores dense weights in bf16, which would already have rounded them.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    w = model.layers[0].self_attn.q_proj.weight
    if w is not None and w.dtype == torch.bfloat16 and dtype != torch.bfloat16:
        print("warning: the model holds bf16 weights; load it with weight_dtype='float32' "
              "for an export without that rounding", file=sys.stderr)
    writer = ShardWriter(out, max_shard_bytes)
    for name, t in iter_hf_tensors(model):
        if dtype == torch.float16 and t.abs().max().item() > 65504:
            raise ValueError(f"{name}: values beyond the float16 range; export with --dtype bfloat16 or float32")
        writer.add(name, t.to(dtype))
    writer.close()
    (out / "config.json").write_text(json.dumps(hf_config(model.cfg, dtype), indent=2))
    if tokenizer is not None:
        save_tokenizer(tokenizer, out, model.cfg)
    return out


def export_path(src: str | None, out_dir, dtype: torch.dtype = torch.float16, progress=True) -> Path:
    """Load `src` (None: the embedded GGUF) on the CPU with fp32 weights and export it."""
    from .loader import load
    rt = RuntimeConfig(device="cpu", dtype="float32", weight_dtype="float32", cpu_weights="dense", max_seq_len=16)
    model, tok = load(src, rt, progress=progress)
    return export(model, tok, out_dir, dtype)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Export a model (default: the embedded GGUF) as an HF fp16 checkpoint")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("-d", "--directory", default=None, help="model folder or .gguf file (default: embedded SmolLM2-135M)")
    ap.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    args = ap.parse_args(argv)
    t0 = time.time()
    out = export_path(args.directory, args.out_dir, DTYPES[args.dtype])
    print(f"exported to {out} ({args.dtype}) in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
