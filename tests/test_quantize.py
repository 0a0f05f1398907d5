"""GPTQ / RTN quantizer on tiny random Llama checkpoints (CPU, fast).

(a) GPTQ's per-linear output error on held-out data is below RTN's for >= 95% of the linears, for group
    sizes 32 and 64, act-order on and off, symmetric and asymmetric;
(b) the written checkpoint follows the standard GPTQ layout: unpacked here with numpy bit operations,
    independently of model/quant.py, and decoded by the textbook scale * (q - zero) it matches what the
    engine computes (Linear.dense_weight());
(c) every written checkpoint loads with `load(dir)`, tokenizer included;
(d) clear errors for a group size that does not divide, non-Llama input, missing files;
plus benchmark.py -v's exit code and the --plot PNG on the tiny model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny import hf_tiny, load_ours, save_hf

from model.gptq import QuantizeError, QuantSettings, find_params, pack_rows, quantize_checkpoint, quantize_weight

CONFIGS = [(gs, act, sym) for gs in (32, 64) for act in (False, True) for sym in (False, True)]
VOCAB = 96
SEQ = 64


def _ids(c):
    gs, act, sym = c
    return f"g{gs}-{'act' if act else 'nat'}-{'sym' if sym else 'asym'}"


def write_tiny_tokenizer(folder: Path):
    """A word-level tokenizer over the tiny vocabulary (w3 .. w95), with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
        "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"}))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    m = hf_tiny(hidden_size=128, intermediate_size=256)
    fp = save_hf(m, root / "fp")
    write_tiny_tokenizer(fp)
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, VOCAB, (64, SEQ), generator=g)      # 4096 tokens: 16x the largest K (256)
    held = torch.randint(0, VOCAB, (16, SEQ), generator=g)
    return {"root": root, "fp": fp, "calib": calib, "held": held, "ckpt": {}}


def quantized(work, gs, act, sym, method="gptq") -> Path:
    key = (gs, act, sym, method)
    if key not in work["ckpt"]:
        out = work["root"] / f"{method}-g{gs}-{int(act)}-{int(sym)}"
        quantize_checkpoint(work["fp"], out, QuantSettings(group_size=gs, act_order=act, sym=sym, method=method),
                            work["calib"], device="cpu", progress=False, log=lambda *_: None)
        work["ckpt"][key] = out
    return work["ckpt"][key]


def linears(model):
    from model.linear import Linear
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear) and n.startswith("layers.")}


@pytest.fixture(scope="module")
def held_inputs(work):
    """Inputs of every linear of the fp model on held-out tokens, and the fp weights."""
    ref = load_ours(work["fp"])
    caps, hooks = {}, []
    for n, mod in linears(ref).items():
        hooks.append(mod.register_forward_hook(
            lambda mod, inp, out, n=n: caps.setdefault(n, []).append(inp[0].reshape(-1, inp[0].shape[-1]).float())))
    ref(work["held"], last_only=False)
    for h in hooks:
        h.remove()
    X = {n: torch.cat(v) for n, v in caps.items()}
    W = {n: m.dense_weight() for n, m in linears(ref).items()}
    return X, W


# ---- (a) GPTQ beats RTN on held-out data -------------------------------------------------

@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_gptq_beats_rtn_on_held_out_data(work, held_inputs, cfg):
    X, W = held_inputs
    errs = {}
    for method in ("gptq", "rtn"):
        q = load_ours(quantized(work, *cfg, method=method))
        errs[method] = {n: ((X[n] @ (m.dense_weight() - W[n]).t()).norm() / (X[n] @ W[n].t()).norm()).item()
                        for n, m in linears(q).items()}
    wins = [n for n in X if errs["gptq"][n] < errs["rtn"][n]]
    assert len(X) == 21
    assert len(wins) >= 0.95 * len(X), {n: (errs["gptq"][n], errs["rtn"][n]) for n in X if n not in wins}
    mean = {k: sum(v.values()) / len(v) for k, v in errs.items()}
    assert mean["gptq"] < 0.9 * mean["rtn"], mean


# ---- (b) the standard GPTQ layout, checked independently -----------------------------------

def np_unpack(words: np.ndarray, axis: int) -> np.ndarray:
    """Eight 4-bit fields per int32, low bits first, spread along `axis` (0: rows, 1: columns)."""
    u = words.astype(np.int64) & 0xFFFFFFFF
    fields = np.stack([(u >> (4 * j)) & 0xF for j in range(8)], axis=axis + 1)   # [..., 8, ...]
    shape = list(words.shape)
    shape[axis] *= 8
    return fields.reshape(shape).astype(np.int64)


def test_np_unpack_packing_order():
    # qweight[0, 0] = 0x76543210: rows 0..7 hold 0..7; a word with bit 31 set reads as a negative int32.
    w = np.array([[0x76543210], [np.int64(0xF000000A) - (1 << 32)]], dtype=np.int32)
    assert np_unpack(w, 0)[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 10, 0, 0, 0, 0, 0, 0, 15]
    assert np_unpack(w.T.copy(), 1)[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 10, 0, 0, 0, 0, 0, 0, 15]


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_checkpoint_layout_and_textbook_dequant(work, cfg):
    from safetensors.numpy import load_file
    gs, act, sym = cfg
    out = quantized(work, *cfg)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == gs
    assert qc["desc_act"] is act and qc["sym"] is sym
    t = load_file(str(out / "model.safetensors"))
    ours = linears(load_ours(out))
    shapes = {"self_attn.q_proj": (128, 128), "self_attn.k_proj": (64, 128), "self_attn.v_proj": (64, 128),
              "self_attn.o_proj": (128, 128), "mlp.gate_proj": (256, 128), "mlp.up_proj": (256, 128),
              "mlp.down_proj": (128, 256)}
    nontrivial = 0
    for li in range(3):
        for name, (N, K) in shapes.items():
            p = f"model.layers.{li}.{name}"
            assert f"{p}.weight" not in t
            qweight, qzeros, scales, g_idx = (t[f"{p}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
            G = K // gs
            assert qweight.dtype == np.int32 and qweight.shape == (K // 8, N)
            assert qzeros.dtype == np.int32 and qzeros.shape == (G, N // 8)
            assert scales.dtype == np.float16 and scales.shape == (G, N)
            assert g_idx.dtype == np.int32 and g_idx.shape == (K,)
            q = np_unpack(qweight, 0)                     # [K, N]
            zeros = np_unpack(qzeros, 1) + 1              # stored zero - 1
            assert np.bincount(g_idx, minlength=G).tolist() == [gs] * G
            if act:
                nontrivial += not np.array_equal(g_idx, np.arange(K) // gs)
            else:
                assert np.array_equal(g_idx, np.arange(K) // gs)
            if sym:
                assert (zeros == 8).all()
            else:
                assert zeros.min() >= 1 and zeros.max() <= 15   # zero 0 is not storable as zero - 1
            s = scales.astype(np.float64)[g_idx]          # [K, N]
            z = zeros[g_idx]
            w_textbook = (s * (q - z)).T                  # [N, K]
            w_engine = ours[p[len("model."):]].dense_weight().double().numpy()
            # The engine keeps offset = -scale * zero in fp16: at most half an fp16 ulp of |scale * zero|.
            tol = (np.abs(s * z) * 2.0 ** -11).T + 1e-7
            assert (np.abs(w_textbook - w_engine) <= tol).all(), (p, np.abs(w_textbook - w_engine).max())
    if act:
        assert nontrivial >= 18


def test_act_order_follows_hessian_diagonal(work):
    """Layer 0's q/k/v see rms_norm(embeddings): groups must go by descending diag(X^T X)."""
    from safetensors.torch import load_file
    out = quantized(work, 32, True, False)
    src = load_file(str(work["fp"] / "model.safetensors"))
    x = src["model.embed_tokens.weight"][work["calib"]].double().reshape(-1, 128)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * src["model.layers.0.input_layernorm.weight"].double()
    diag = x.pow(2).sum(0)
    g_idx = load_file(str(out / "model.safetensors"))["model.layers.0.self_attn.q_proj.g_idx"].long()
    for g in range(3):
        lo, hi = diag[g_idx == g].min(), diag[g_idx == g + 1].max()
        assert lo >= hi * (1 - 1e-5), (g, lo.item(), hi.item())


def test_zero_point_never_zero_and_no_clipping():
    """A group with no negative weight would want zero 0; it gets zero 1 and a wider scale instead."""
    x = torch.tensor([[0.0, 0.1, 0.5, 1.5], [0.2, 0.3, 0.4, 0.9], [-1.0, -0.5, 0.0, 0.5]])
    scale, zero = find_params(x, 4, sym=False)
    assert zero.tolist()[:2] == [1.0, 1.0] and zero[2] >= 1
    q = torch.clamp(torch.round(x / scale[:, None]) + zero[:, None], 0, 15)
    deq = scale[:, None] * (q - zero[:, None])
    assert (deq - x).abs().max() <= scale.max() / 2 + 1e-6        # nothing clipped: rounding error only
    assert q.max() <= 15 and q.min() >= 0


def test_pack_rows_other_widths():
    q = torch.randint(0, 256, (8, 5))
    w = pack_rows(q, 8).numpy()
    assert w.shape == (2, 5) and w.dtype == np.int32
    u = w.astype(np.int64) & 0xFFFFFFFF
    back = np.stack([(u >> (8 * j)) & 0xFF for j in range(4)], 1).reshape(8, 5)
    assert np.array_equal(back, q.numpy())


def test_gptq_lowers_calibration_error_on_correlated_inputs():
    """The core algorithm alone: with strongly correlated inputs GPTQ's output error is far below RTN's."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 16, generator=g) @ torch.randn(16, 64, generator=g) + 0.05 * torch.randn(2048, 64, generator=g)
    W = torch.randn(32, 64, generator=g)
    H = 2 * X.t() @ X / X.shape[0]
    for act in (False, True):
        s = QuantSettings(group_size=32, act_order=act)
        gp = quantize_weight(W, H, s).weight
        rt = quantize_weight(W, None if not act else H, QuantSettings(group_size=32, act_order=act, method="rtn")).weight
        e = lambda Wq: ((X @ (Wq - W).t()).norm() / (X @ W.t()).norm()).item()
        assert e(gp) < 0.5 * e(rt), (act, e(gp), e(rt))


# ---- (c) every checkpoint loads from a plain folder, tokenizer included ----------------------

def test_every_checkpoint_loads_with_tokenizer(work):
    from model.config import RuntimeConfig
    from model.loader import load
    for cfg in CONFIGS:
        for method in ("gptq", "rtn"):
            quantized(work, *cfg, method=method)
    assert len(work["ckpt"]) == 16
    ref = load_ours(work["fp"])
    ids = work["held"][:1, :32]
    want = ref(ids)[0, -1]
    for key, folder in work["ckpt"].items():
        model, tok = load(str(folder), RuntimeConfig(device="cpu", dtype="float32", weight_dtype="float32",
                                                     max_seq_len=64), progress=False)
        assert tok is not None and tok.encode("w5 w7") == [5, 7] and tok.bos_id == 1 and tok.eos_ids == [2]
        assert tok.apply_chat_template([{"role": "user", "content": "w9"}]) == "w9 "
        assert model.cfg.quant.group_size == key[0] and model.cfg.quant.desc_act == key[1]
        got = model(ids)[0, -1]
        assert torch.isfinite(got).all()
        assert ((got - want).norm() / want.norm()).item() < 0.5, key


def test_rtn_without_calibration_and_sharding(work, tmp_path):
    from model.config import RuntimeConfig
    from model.loader import load
    out = tmp_path / "rtn-shards"
    r = quantize_checkpoint(work["fp"], out, QuantSettings(group_size=64, method="rtn"), None,
                            device="cpu", progress=False, max_shard_bytes=40_000)
    assert r["errors"] == {}
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*-of-*.safetensors"))) > 2
    model, tok = load(str(out), RuntimeConfig(device="cpu", dtype="float32", max_seq_len=64), progress=False)
    assert tok is not None and torch.isfinite(model(work["held"][:1, :16])).all()


def test_cli_prints_per_layer_errors(work, tmp_path, capsys):
    import quantize
    rc = quantize.main(["-i", str(work["fp"]), "-o", str(tmp_path / "cli"), "--group-size", "32", "--act-order",
                        "--calibration", "random", "--samples", "8", "--seq-len", "32", "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    lines = [ln for ln in cap.out.splitlines() if ln.startswith("layer ")]
    assert len(lines) == 3 and all("rel. output error" in ln and "down" in ln for ln in lines)
    assert "3/3 layers" in cap.err                    # the progress bar
    assert (tmp_path / "cli" / "tokenizer.json").is_file()


# ---- (d) clear errors ------------------------------------------------------------------------

def test_group_size_that_does_not_divide(tmp_path, capsys):
    m = hf_tiny(hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=64)
    fp = save_hf(m, tmp_path / "fp576")
    with pytest.raises(QuantizeError) as e:
        quantize_checkpoint(fp, tmp_path / "out", QuantSettings(group_size=128), torch.zeros(1, 8, dtype=torch.long),
                            device="cpu", progress=False)
    msg = str(e.value)
    assert "config.json" in msg and "group size 128" in msg and "576" in msg and "q_proj" in msg
    assert "32/64/192" in msg and "-1" in msg
    assert not (tmp_path / "out").exists()
    import quantize
    assert quantize.main(["-i", str(fp), "-o", str(tmp_path / "out"), "--group-size", "128", "--method", "rtn",
                          "--samples", "0"]) == 2
    assert "does not divide" in capsys.readouterr().err


def test_non_llama_and_missing_files(work, tmp_path):
    s = QuantSettings(group_size=32, method="rtn")
    with pytest.raises(QuantizeError, match="no such folder"):
        quantize_checkpoint(tmp_path / "nope", tmp_path / "o1", s, None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuantizeError, match=r"config\.json: missing"):
        quantize_checkpoint(tmp_path / "empty", tmp_path / "o2", s, None)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                  "n_embd": 64}))
    with pytest.raises(QuantizeError, match="not a Llama model"):
        quantize_checkpoint(gpt2, tmp_path / "o3", s, None)
    nosafe = tmp_path / "nosafe"
    nosafe.mkdir()
    shutil.copyfile(work["fp"] / "config.json", nosafe / "config.json")
    with pytest.raises(QuantizeError, match="no .safetensors files"):
        quantize_checkpoint(nosafe, tmp_path / "o4", s, None)
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_checkpoint(quantized(work, 32, False, False), tmp_path / "o5", s, None)
    with pytest.raises(QuantizeError, match="calibration"):
        quantize_checkpoint(work["fp"], tmp_path / "o6", QuantSettings(group_size=32), None)


# ---- benchmark.py -v / --plot on the tiny model -------------------------------------------------

def test_benchmark_verify_exit_code(work, tmp_path, capsys):
    import benchmark
    text = tmp_path / "words.txt"
    g = torch.Generator().manual_seed(3)
    text.write_text(" ".join(f"w{i}" for i in torch.randint(3, VOCAB, (600,), generator=g).tolist()))
    args = ["-v", "-d", str(quantized(work, 32, True, False)), "--device", "cpu", "--ppl-text", str(text),
            "--verify-len", "128", "--verify-windows", "4"]
    assert benchmark.main(args) == 0
    out = capsys.readouterr().out
    assert ": OK" in out and "completion: 'Once upon a time," in out and "| model |" in out
    # An impossible tolerance makes the check fail, and the exit code says so.
    assert benchmark.main(args + ["--verify-tol", "-1"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_benchmark_plot_png(work, tmp_path, capsys):
    import benchmark
    png = tmp_path / "speed.png"
    folder = str(quantized(work, 64, False, True))
    assert benchmark.main(["--plot", str(png), "-d", folder, "--device", "cpu", "-l", "160", "--plot-steps", "4",
                           "--plot-decode", "8", "--json"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert res["plot"] == str(png) and res["seq_len"] == 160
    curve = res["speed_curve"]
    assert len(curve["decode_tps"]) == 5 and len(curve["prompt_tps"]) == 4 and curve["prompt_len"][-1] == 160 - 8
    assert all(v > 0 for v in curve["decode_tps"] + curve["prompt_tps"])
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_cli_export_fp16_of_a_folder(work, tmp_path):
    """quantize.py --export-fp16 -d DIR: any loadable model to an HF fp16 folder (here the tiny fp32 one)."""
    import quantize
    from model.tokenizer import Tokenizer
    out = tmp_path / "export"
    assert quantize.main(["--export-fp16", str(out), "-d", str(work["fp"])]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "float16" and cfg["tie_word_embeddings"] is False
    ref, got = load_ours(work["fp"]), load_ours(out)
    ids = work["held"][:1, :32]
    a, b = ref(ids, last_only=False), got(ids, last_only=False)
    assert ((a - b).norm() / a.norm()).item() < 2e-3
    tok = Tokenizer.from_dir(out)
    assert tok.encode("w4 w90") == [4, 90] and tok.bos_id == 1 and tok.eos_ids == [2] and tok.add_bos_token
    assert tok.apply_chat_template([{"role": "user", "content": "w9"}]) == "w9 "


def test_calibration_forward_matches_the_engine(work):
    """The pipeline's own fp32 layer forward (rotary, GQA attention, SwiGLU) is the engine's, to rounding."""
    from safetensors.torch import load_file
    from model.config import ModelConfig
    from model.gptq import _rope, layer_forward
    cfg = ModelConfig.from_file(work["fp"] / "config.json")
    t = load_file(str(work["fp"] / "model.safetensors"))
    ref = load_ours(work["fp"])
    outs = []
    hooks = [layer.register_forward_hook(lambda mod, i, o: outs.append(o)) for layer in ref.layers]
    ids = work["held"][:2, :48]
    ref(ids, last_only=False)
    for hk in hooks:
        hk.remove()
    h = t["model.embed_tokens.weight"][ids].float()
    cos, sin = _rope(cfg, ids.shape[1], "cpu")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = layer_forward(h, lambda x, n: torch.nn.functional.linear(x, t[p + n + ".weight"]),
                          t[p + "input_layernorm.weight"], t[p + "post_attention_layernorm.weight"], cfg, cos, sin)
        assert ((h - outs[i]).norm() / outs[i].norm()).item() < 1e-5, i


def test_one_group_per_row(work, tmp_path):
    """--group-size -1: one group over all of K (scales [1, N], g_idx all zero), act-order too."""
    from safetensors.numpy import load_file
    out = tmp_path / "gm1"
    quantize_checkpoint(work["fp"], out, QuantSettings(group_size=-1, act_order=True), work["calib"][:16],
                        device="cpu", progress=False, log=lambda *_: None)
    t = load_file(str(out / "model.safetensors"))
    assert t["model.layers.1.mlp.down_proj.scales"].shape == (1, 128)
    assert t["model.layers.1.mlp.down_proj.qzeros"].shape == (1, 16)
    assert (t["model.layers.1.mlp.down_proj.g_idx"] == 0).all()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == -1
    model = load_ours(out)
    assert torch.isfinite(model(work["held"][:1, :16])).all()
