"""tools/make_random_gptq.py: the random-weight checkpoints the speed measurements use load as real GPTQ models."""
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import RuntimeConfig  # noqa: E402
from model.loader import load  # noqa: E402
from tools.make_random_gptq import SHAPES, write  # noqa: E402


def _keys(folder: Path) -> set[str]:
    keys = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            keys |= set(st.keys())
    return keys


def test_untied_shape_has_its_own_head_and_decodes(tmp_path):
    write(tmp_path, "tiny", 64, act_order=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["quantization_config"]["desc_act"] is True
    assert "lm_head.weight" in _keys(tmp_path)
    model, _ = load(tmp_path, RuntimeConfig(max_seq_len=64), progress=False, tokenizer=False)
    logits = model(torch.randint(0, cfg["vocab_size"], (1, 7)))
    assert logits.shape == (1, 1, cfg["vocab_size"]) and torch.isfinite(logits).all()


def test_smollm_shape_ties_the_head_to_the_embedding(tmp_path):
    """The 135m shape (the embedded model's) writes no lm_head: the loader uses the embedding as the head."""
    write(tmp_path, "135m", 32, act_order=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    assert {k: cfg[k] for k in SHAPES["135m"]} == SHAPES["135m"]
    keys = _keys(tmp_path)
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    model, _ = load(tmp_path, RuntimeConfig(max_seq_len=64), progress=False, tokenizer=False)
    ids = torch.randint(0, cfg["vocab_size"], (1, 5))
    logits = model(ids)
    assert logits.shape == (1, 1, cfg["vocab_size"]) and torch.isfinite(logits).all()
