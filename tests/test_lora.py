"""LoRA adapters made with peft: our logits match peft's on the same base weights."""
import json

import pytest
import torch

from tiny import hf_tiny, load_ours, save_hf

from model.config import ModelError
from model.lora import load_lora, unload_lora


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_adapter(hf, folder, seed=0, **cfg):
    from peft import LoraConfig, get_peft_model
    conf = LoraConfig(**{"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"], **cfg})
    pm = get_peft_model(hf, conf).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:        # peft starts B at zero; a zero adapter would prove nothing
                p.normal_(0, 0.05)
    pm.save_pretrained(str(folder))
    return pm


@pytest.mark.parametrize("cfg", [{}, {"use_rslora": True}, {"target_modules": ["q_proj", "down_proj"],
                                                              "rank_pattern": {"down_proj": 4},
                                                              "alpha_pattern": {"down_proj": 3.0}}])
def test_tiny_adapter_matches_peft(tmp_path, cfg):
    hf = hf_tiny(seed=11)
    base_dir = save_hf(hf, tmp_path / "base")
    pm = make_adapter(hf, tmp_path / "ad", **cfg)
    ours = load_ours(base_dir, max_seq_len=64)
    name = load_lora(ours, tmp_path / "ad", "ad")
    ids = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        ref = pm(ids).logits
        with pm.disable_adapter():
            base = pm(ids).logits
    assert rel(ours(ids, last_only=False, lora=name), ref) < 1e-4
    assert rel(ours(ids, last_only=False), base) < 1e-4          # no adapter: the base model
    assert rel(ref, base) > 1e-2                                 # the adapter really changes things


@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj", "up_proj"]])
def test_adapter_on_fused_q4_layers_matches_peft(tmp_path, targets):
    """4-bit layers kept as such (fused q|k|v and gate|up, as on GPUs): the adapter's pairs are fused
    too (stacked A, block-diagonal B; untargeted parts as zero blocks) and still match peft."""
    from tiny import gptq_checkpoint
    hf = hf_tiny(seed=16)
    base_dir = gptq_checkpoint(hf, tmp_path / "base", 32)      # hf now holds the dequantized weights
    extra = {"target_modules": targets, "rank_pattern": {"v_proj": 4}} if targets else {}
    pm = make_adapter(hf, tmp_path / "ad", **extra)
    ours = load_ours(base_dir, max_seq_len=64, keep_q4=True)
    plain = load_ours(base_dir, max_seq_len=64)                  # dense, separate projections
    assert ours.layers[0].self_attn.qkv is not None and ours.layers[0].mlp.gate_up is not None
    name = load_lora(ours, tmp_path / "ad", "ad")
    load_lora(plain, tmp_path / "ad", "ad")
    assert name in ours.layers[0].self_attn.qkv.lora and name in ours.layers[0].mlp.gate_up.lora
    ids = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        ref = pm(ids).logits
        with pm.disable_adapter():
            base = pm(ids).logits
    fused = ours(ids, last_only=False, lora=name)
    assert rel(fused, plain(ids, last_only=False, lora=name)) < 1e-5
    # against peft: the q4 format's fp16 offsets cost ~1e-3 with or without the adapter
    assert rel(fused, ref) < 4e-3 and rel(ours(ids, last_only=False), base) < 4e-3
    assert rel(ref, base) > 1e-2


def test_two_adapters_switch_per_call(tmp_path):
    hf = hf_tiny(seed=12)
    base_dir = save_hf(hf, tmp_path / "base")
    ids = torch.randint(0, 96, (1, 16))
    refs = {}
    for seed, nm in ((1, "one"), (2, "two")):
        pm = make_adapter(hf_tiny(seed=12), tmp_path / nm, seed=seed)
        with torch.no_grad():
            refs[nm] = pm(ids).logits
    ours = load_ours(base_dir, max_seq_len=64)
    load_lora(ours, tmp_path / "one")
    load_lora(ours, tmp_path / "two")
    for nm in ("one", "two", "one"):
        assert rel(ours(ids, last_only=False, lora=nm), refs[nm]) < 1e-4
    unload_lora(ours, "one")
    assert "one" not in ours.lora_adapters
    with torch.no_grad():
        base = hf(ids).logits
    assert rel(ours(ids, last_only=False, lora="one"), base) < 1e-4   # unloaded: base output


def test_embedded_model_adapter_matches_peft(tmp_path, embedded_fp32):
    from transformers import AutoModelForCausalLM
    from model.embedded import embedded_gguf_path
    from pathlib import Path
    p = Path(embedded_gguf_path())
    hf = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    pm = make_adapter(hf, tmp_path / "smol", r=16, lora_alpha=32,
                      target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    model, tok = embedded_fp32
    name = load_lora(model, tmp_path / "smol", "smol-test")
    try:
        ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog.")])
        with torch.no_grad():
            ref = pm(ids).logits
        assert rel(model(ids, last_only=False, lora=name), ref) < 1e-3
    finally:
        unload_lora(model, name)


def _adapter(tmp_path, hf, **cfg):
    make_adapter(hf, tmp_path / "ad", **cfg)
    return tmp_path / "ad"


def test_adapter_for_another_model_is_refused(tmp_path):
    ad = _adapter(tmp_path, hf_tiny(seed=13, hidden_size=128, intermediate_size=256))
    ours = load_ours(save_hf(hf_tiny(seed=13), tmp_path / "base"))
    with pytest.raises(ModelError, match="do not fit"):
        load_lora(ours, ad)
    assert all(not m.lora for m in ours.modules() if hasattr(m, "lora"))   # nothing half-attached


@pytest.mark.parametrize("patch,match", [
    ({"use_dora": True}, "DoRA"),
    ({"peft_type": "IA3"}, "unsupported adapter type"),
    ({"target_modules": ["q_proj", "lm_head"]}, "unknown target modules"),
])
def test_unsupported_adapters_are_refused(tmp_path, patch, match):
    ad = _adapter(tmp_path, hf_tiny(seed=14))
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg.update(patch)
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    ours = load_ours(save_hf(hf_tiny(seed=14), tmp_path / "base"))
    with pytest.raises(ModelError, match=match):
        load_lora(ours, ad)


def test_missing_adapter_files(tmp_path):
    ours = load_ours(save_hf(hf_tiny(seed=15), tmp_path / "base"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="adapter_config.json missing"):
        load_lora(ours, tmp_path / "empty")


def test_generator_switches_adapters_on_one_cache(tmp_path, embedded_fp32):
    """An adapter change invalidates the reused prefix; each output equals a fresh generator's."""
    from model.generator import GenerationSettings, Generator
    from model.sampler import SamplerSettings
    from tools.bench_lora import write_adapter
    model, tok = embedded_fp32
    name = load_lora(model, write_adapter(model, tmp_path / "rand", rank=8, std=0.05), "rand-test")
    try:
        prompt = "The old castle on the hill was"
        n_prompt = len(tok.encode(prompt))

        def settings(lora):
            return GenerationSettings(sampler=SamplerSettings.greedy(), max_new_tokens=8, lora=lora)

        fresh = {lora: Generator(model, tok).complete(prompt, settings(lora)) for lora in (None, name)}
        assert fresh[None] != fresh[name]                      # the adapter really changes the output
        gen = Generator(model, tok)
        for lora in (None, name, name, None):
            again = gen.complete(prompt, settings(lora))
            assert again == fresh[lora]
        # Same adapter as last time: the prompt comes from the cache; another adapter: all of it again.
        gen.complete(prompt, settings(None))
        assert gen.last_reused_tokens > 0
        gen.complete(prompt, settings(name))
        assert gen.last_reused_tokens == 0 and gen.last_prefill_tokens == n_prompt
        gen.complete(prompt, settings(name))
        assert gen.last_reused_tokens > 0
    finally:
        unload_lora(model, name)
