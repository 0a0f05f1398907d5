"""Bad model folders get a clear ModelError that names the file and the problem."""
import json

import pytest
import torch
from safetensors.torch import save_file

from tiny import gptq_checkpoint, hf_tiny, load_ours, save_hf

from model.config import ModelError, RuntimeConfig
from model.loader import load


@pytest.fixture
def good(tmp_path):
    return save_hf(hf_tiny(), tmp_path / "m")


def expect_error(folder, *words):
    with pytest.raises(ModelError) as e:
        load_ours(folder)
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    return msg


def test_missing_config(good):
    (good / "config.json").unlink()
    with pytest.raises(ModelError, match="no config.json"):
        load(good, RuntimeConfig(device="cpu"), progress=False)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="empty"):
        load(tmp_path / "empty", RuntimeConfig(device="cpu"), progress=False)


def test_missing_path(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        load(tmp_path / "nope", RuntimeConfig(device="cpu"), progress=False)


def test_malformed_config(good):
    (good / "config.json").write_text("{not json")
    expect_error(good, "config.json", "malformed JSON")


@pytest.mark.parametrize("change,words", [
    ({"hidden_size": None}, ["hidden_size"]),
    ({"num_hidden_layers": -1}, ["num_hidden_layers", "positive"]),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, ["unsupported architecture"]),
    ({"quantization_config": {"quant_method": "gptq", "bits": 3}}, ["bit width 3"]),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, ["awq"]),
    ({"rope_scaling": {"type": "yarn", "factor": 4}}, ["rope_scaling"]),
])
def test_bad_config_fields(good, change, words):
    cfg = json.loads((good / "config.json").read_text())
    for k, v in change.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    cfg.pop("rope_parameters", None) if "rope_scaling" in change else None
    (good / "config.json").write_text(json.dumps(cfg))
    expect_error(good, "config.json", *words)


def test_truncated_safetensors(good):
    f = good / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    expect_error(good, "model.safetensors")


def test_garbage_safetensors(good):
    (good / "model.safetensors").write_bytes(b"\x00" * 64)
    expect_error(good, "model.safetensors", "not a readable safetensors file")


def test_missing_tensor(good):
    from safetensors.torch import load_file
    st = load_file(good / "model.safetensors")
    st.pop("model.layers.1.mlp.down_proj.weight")
    save_file(st, str(good / "model.safetensors"))
    expect_error(good, "missing tensor", "model.layers.1.mlp.down_proj.weight")


def test_misshaped_tensor(good):
    from safetensors.torch import load_file
    st = load_file(good / "model.safetensors")
    st["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(10, 64)
    save_file(st, str(good / "model.safetensors"))
    expect_error(good, "q_proj.weight", "shape (10, 64)", "expected (64, 64)")


def test_sharded_index_missing_shard(good):
    (good / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    expect_error(good, "model-00002-of-00002.safetensors", "missing")


def test_sharded_checkpoint_loads(tmp_path):
    hf = hf_tiny(seed=5)
    folder = save_hf(hf, tmp_path / "m")
    from safetensors.torch import load_file
    st = load_file(folder / "model.safetensors")
    keys = sorted(st)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: st[k] for k in ks}, str(folder / name))
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        ref = hf(ids).logits
    out = load_ours(folder)(ids, last_only=False)
    assert ((out - ref).norm() / ref.norm()) < 1e-4


def test_gptq_misshaped_scales(tmp_path):
    folder = gptq_checkpoint(hf_tiny(seed=6, hidden_size=128, intermediate_size=256), tmp_path / "q", 32)
    from safetensors.torch import load_file
    st = load_file(folder / "model.safetensors")
    st["model.layers.0.mlp.up_proj.scales"] = torch.ones(3, 256, dtype=torch.float16)
    save_file(st, str(folder / "model.safetensors"))
    expect_error(folder, "up_proj.scales", "does not fit")


def test_bad_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(ModelError, match="model.gguf"):
        load(f, RuntimeConfig(device="cpu"), progress=False)
