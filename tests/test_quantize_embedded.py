"""Export of the embedded SmolLM2-135M (Q4_1 GGUF) to an HF fp16 checkpoint, and quantizing it (CPU).

The export's weights are the GGUF's dequantized Q4_1 values rounded to fp16: not exact (d * q + m
needs more than fp16's 11 significant bits) but within half an fp16 ulp; the logits then agree with
the GGUF's to ~1e-3 relative. transformers reads the export and computes the same logits as we do.
"""
from __future__ import annotations

import json

import pytest
import torch

from model.config import RuntimeConfig


def rt(**kw):
    return RuntimeConfig(**{"device": "cpu", "dtype": "float32", "weight_dtype": "float32", "cpu_weights": "dense",
                            "max_seq_len": 256, **kw})


@pytest.fixture(scope="module")
def exported(embedded_fp32, tmp_path_factory):
    from model.export import export
    model, tok = embedded_fp32
    return export(model, tok, tmp_path_factory.mktemp("export") / "smollm2-fp16")


@pytest.fixture(scope="module")
def export_loaded(exported):
    """The export loaded by our engine (fp32 on the CPU), with its tokenizer; loaded once."""
    from model.loader import load
    return load(str(exported), rt(), progress=False)


@pytest.fixture(scope="module")
def sample_ids(embedded_fp32, botchan_text):
    return torch.tensor([embedded_fp32[1].encode(botchan_text[:2000])[:96]])


def test_export_layout(exported):
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "float16"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (576, 30, 3)
    from safetensors import safe_open
    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys and len(keys) == 1 + 30 * 9 + 1
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").dtype == torch.float16
        assert f.get_slice("model.layers.3.mlp.down_proj.weight").get_shape() == [576, 1536]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (exported / name).is_file()


def test_export_weights_within_fp16_rounding(embedded_fp32, exported):
    """Every exported weight is the engine's fp32 weight to within half an fp16 ulp (2^-11 relative)."""
    from safetensors import safe_open
    model, _ = embedded_fp32
    worst = 0.0
    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        for i in (0, 17, 29):
            for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
                ours = model.layers[i].get_submodule(name).dense_weight()
                got = f.get_tensor(f"model.layers.{i}.{name}.weight").float()
                rel = ((got - ours).abs() / ours.abs().clamp(min=2.0 ** -14)).max().item()
                worst = max(worst, rel)
        emb = f.get_tensor("model.embed_tokens.weight").float()
        assert ((emb - model.embed_tokens).abs() <= model.embed_tokens.abs() * 2.0 ** -11 + 2.0 ** -25).all()
    assert worst <= 2.0 ** -11 * 1.001


def test_export_logits_match_gguf(embedded_fp32, export_loaded, sample_ids):
    ref = embedded_fp32[0](sample_ids, last_only=False)[0]
    got = export_loaded[0](sample_ids, last_only=False)[0]
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 2e-3, rel
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.97


def test_export_tokenizer_roundtrip(embedded_fp32, exported):
    from model.tokenizer import Tokenizer
    gguf_tok = embedded_fp32[1]
    tok = Tokenizer.from_dir(exported)
    text = "<|im_start|>user\nHello, wörld! 日本語 ☃  spaces\ttabs<|im_end|>\n"
    assert tok.encode(text) == gguf_tok.encode(text)
    assert tok.encode(text, special=False) == gguf_tok.encode(text, special=False)
    ids = gguf_tok.encode(text)
    assert tok.decode(ids) == gguf_tok.decode(ids) == text
    assert (tok.bos_id, tok.eos_ids, tok.pad_id, tok.add_bos_token, tok.vocab_size) == \
        (gguf_tok.bos_id, gguf_tok.eos_ids, gguf_tok.pad_id, gguf_tok.add_bos_token, gguf_tok.vocab_size)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == gguf_tok.apply_chat_template(msgs)


def test_transformers_reads_the_export(exported, export_loaded, sample_ids):
    """The export is a checkpoint transformers loads as is: same logits as our engine on it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(sample_ids).logits[0]
    ours, tok = export_loaded
    got = ours(sample_ids, last_only=False)[0]
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    hf_tok = AutoTokenizer.from_pretrained(str(exported))
    text = "Botchan's <|im_start|>ünïcode  text"
    assert hf_tok(text, add_special_tokens=True)["input_ids"] == tok.encode(text, add_bos=tok.add_bos_token)


def test_rtn_of_the_export_loads(exported, export_loaded, tmp_path, sample_ids):
    """The real shapes (576 / 1536 inputs, 192-row k/v) through the writer, loaded back with the tokenizer."""
    from model.gptq import QuantSettings, quantize_checkpoint
    from model.loader import load
    from model.perplexity import window_nll
    out = tmp_path / "rtn-g64"
    quantize_checkpoint(exported, out, QuantSettings(group_size=64, method="rtn"), None, device="cpu", progress=False)
    model, tok = load(str(out), rt(), progress=False)
    assert tok is not None and tok.chat_template and tok.eos_ids == [2]
    assert model.cfg.quant.group_size == 64 and model.layers[0].self_attn.k_proj.out_features == 192
    ids = sample_ids[0]
    nll_fp, n = window_nll(export_loaded[0](sample_ids, last_only=False)[0], ids)
    nll_q, _ = window_nll(model(sample_ids, last_only=False)[0], ids)
    assert nll_q / n < nll_fp / n + 0.5, (nll_fp / n, nll_q / n)    # 4-bit costs ~0.2 nats/token here
