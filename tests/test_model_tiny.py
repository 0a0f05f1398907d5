"""Tiny random Llama checkpoints: our forward against transformers, cache, batching, GPTQ."""
import pytest
import torch

from tiny import gptq_checkpoint, greedy_both_ways, hf_tiny, load_ours, save_hf

from model.quant import (dequantize, from_gptq, from_mma_layout, mma_layout_ok, pack_int4, unpack_int4, pack_cols_int4,
                         to_mma_layout, unpack_cols_int4)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def hf_logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True},
    {"num_key_value_heads": 4},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 16},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
    {"attention_bias": True, "mlp_bias": True},
])
def test_forward_matches_transformers(tmp_path, overrides):
    hf = hf_tiny(**overrides)
    # Dynamic NTK: transformers rescales for the current length, we for the cache length
    # (so cached keys stay valid); with the two equal they must agree.
    ours = load_ours(save_hf(hf, tmp_path / "m"), max_seq_len=40)
    ids = torch.randint(0, 96, (2, 40))
    assert rel(ours(ids, last_only=False), hf_logits(hf, ids)) < 1e-4


def test_incremental_equals_full(tmp_path):
    ours = load_ours(save_hf(hf_tiny(seed=1), tmp_path / "m"), max_seq_len=64)
    ids = torch.randint(0, 96, (1, 30))
    full = ours(ids, last_only=False)
    cache = ours.new_cache()
    parts = [ours(ids[:, :10], cache, last_only=False)]          # prefill
    parts.append(ours(ids[:, 10:17], cache, last_only=False))    # a chunk on a warm cache
    parts += [ours(ids[:, i:i + 1], cache) for i in range(17, 30)]  # token by token
    assert cache.length == 30
    assert rel(torch.cat(parts, 1), full) < 1e-5
    # Rewind and re-feed a different continuation: the dead tail must not leak in.
    cache.truncate(12)
    alt = torch.randint(0, 96, (1, 5))
    inc = ours(alt, cache, last_only=False)
    ref = ours(torch.cat([ids[:, :12], alt], 1), last_only=False)[:, 12:]
    assert rel(inc, ref) < 1e-5
    with pytest.raises(ValueError):
        cache.truncate(40)


def test_left_padded_batch_equals_single_rows(tmp_path):
    ours = load_ours(save_hf(hf_tiny(seed=2), tmp_path / "m"), max_seq_len=64)
    a, b = torch.randint(3, 96, (1, 12)), torch.randint(3, 96, (1, 7))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    pad = torch.tensor([0, 5])
    cache = ours.new_cache(batch_size=2)
    out = ours(batch, cache, pad=pad)
    ref_a, ref_b = ours(a), ours(b)
    assert rel(out[0], ref_a[0]) < 1e-5 and rel(out[1], ref_b[0]) < 1e-5
    step = torch.randint(3, 96, (2, 1))
    out2 = ours(step, cache, pad=pad)
    assert rel(out2[1], ours(torch.cat([b, step[1:]], 1))[0]) < 1e-5


def test_pack_unpack_round_trip_is_exact():
    q = torch.randint(0, 16, (96, 40), dtype=torch.int32)
    assert torch.equal(unpack_int4(pack_int4(q)).int(), q)
    z = torch.randint(0, 16, (3, 64), dtype=torch.int32)
    assert torch.equal(unpack_cols_int4(pack_cols_int4(z)).int(), z)
    # Nibble j of word i is row 8i+j, low bits first (GPTQ's layout), checked by hand.
    q = torch.zeros(8, 1, dtype=torch.int32)
    q[1, 0], q[7, 0] = 3, 15
    assert pack_int4(q).item() == (3 << 4) | (15 << 28) - (1 << 32)


@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_checkpoint_equals_dequantized_weights(tmp_path, group_size, sym, act_order):
    hf = hf_tiny(seed=3, hidden_size=128, intermediate_size=256)
    folder = gptq_checkpoint(hf, tmp_path / "q", group_size, sym, act_order)
    ours = load_ours(folder, max_seq_len=64)
    assert ours.layers[0].mlp.up_proj.quantized is False   # CPU: dequantized once at load
    ids = torch.randint(0, 96, (1, 24))
    # hf now holds the independently dequantized weights: the two must agree. The q4 format
    # keeps -scale*zero as an fp16 offset (0.4% of a quantization step at most), which costs
    # ~1e-3 of relative error on these logits; a wrong permutation or zero would cost O(1).
    assert rel(ours(ids, last_only=False), hf_logits(hf, ids)) < 4e-3


def test_act_order_layer_keeps_its_permutation(tmp_path):
    hf = hf_tiny(seed=4, hidden_size=128, intermediate_size=256)
    folder = gptq_checkpoint(hf, tmp_path / "q", 32, False, True)
    from model.config import ModelConfig, RuntimeConfig
    from model.model import LlamaModel
    from model.weights import load_safetensors_model
    cfg = ModelConfig.from_file(folder / "config.json")
    m = load_safetensors_model(LlamaModel(cfg, RuntimeConfig(device="cpu")), folder)
    lin = m.layers[0].self_attn.q_proj
    assert lin.quantized and lin.perm is not None
    # The q4 reference product through the permutation equals the dense product.
    x = torch.randn(3, 128)
    y = m.ops.q4_matmul(x, lin.qweight, lin.scales, lin.offsets, lin.perm)
    assert rel(y, x @ hf.model.layers[0].self_attn.q_proj.weight.t()) < 1e-3


def test_from_gptq_rejects_uneven_groups():
    qweight = torch.zeros(4, 8, dtype=torch.int32)
    qzeros = torch.zeros(1, 1, dtype=torch.int32)
    scales = torch.ones(1, 8, dtype=torch.float16)
    g_idx = torch.tensor([0] * 32, dtype=torch.int32)
    from_gptq(qweight, qzeros, scales, g_idx)   # fine: one group
    scales2 = torch.ones(2, 8, dtype=torch.float16)
    qzeros2 = torch.zeros(2, 1, dtype=torch.int32)
    bad = torch.tensor([0] * 20 + [1] * 12, dtype=torch.int32)
    with pytest.raises(ValueError):
        from_gptq(qweight, qzeros2, scales2, bad)


def test_dequantize_matches_formula():
    K, N, gs = 64, 16, 32
    q = torch.randint(0, 16, (K, N))
    s, o = torch.rand(K // gs, N).half(), torch.randn(K // gs, N).half()
    w = dequantize(pack_int4(q), s, o)
    expect = q.float() * s.float().repeat_interleave(gs, 0) + o.float().repeat_interleave(gs, 0)
    assert torch.equal(w, expect)


def test_static_decode_step_equals_dynamic(tmp_path):
    """The graph-capturable step (device position, fixed key length) equals the normal one."""
    from model.graph import GraphDecoder
    ours = load_ours(save_hf(hf_tiny(seed=7), tmp_path / "m"), max_seq_len=64)
    ids = torch.randint(0, 96, (1, 20))
    ref = ours(ids, last_only=False)
    cache = ours.new_cache()
    ours(ids[:, :6], cache)
    dec = GraphDecoder(ours, cache, bucket=8, use_graphs=False)
    outs = [dec(ids[:, i:i + 1]) for i in range(6, 20)]
    assert cache.length == 20
    assert rel(torch.cat(outs, 1), ref[:, 6:]) < 1e-5


def test_fused_projections_equal_separate(tmp_path):
    """q|k|v and gate|up fused into one 4-bit layer (the GPU layout) give the same output."""
    hf = hf_tiny(seed=8, hidden_size=128, intermediate_size=256)
    folder = gptq_checkpoint(hf, tmp_path / "q", 32, False, False)
    fused = load_ours(folder, keep_q4=True)
    assert fused.layers[0].self_attn.qkv is not None and fused.layers[0].mlp.gate_up is not None
    separate = load_ours(folder)
    assert separate.layers[0].self_attn.qkv is None
    ids = torch.randint(0, 96, (1, 12))
    assert rel(fused(ids, last_only=False), separate(ids, last_only=False)) < 1e-5


def test_mma_layout_is_the_documented_nibble_permutation():
    """quant.py's mma layout (what the tensor-core GEMV reads) against its formula, element by element."""
    K, N = 128, 48
    q = torch.randint(0, 16, (K, N), dtype=torch.int32)
    m = to_mma_layout(pack_int4(q))
    nib = unpack_int4(m).view(K // 8, 8, N)                 # [packed row, nibble, column]
    r, i, col = torch.meshgrid(torch.arange(K // 8), torch.arange(8), torch.arange(N), indexing="ij")
    c, g = r // 8, r % 8
    j, t, s = col // 16, (col % 16) // 4, col % 4
    n = 16 * j + g + 8 * (i & 1)
    k = 64 * c + 16 * s + 2 * t + 8 * ((i >> 1) & 1) + (i >> 2)
    assert torch.equal(nib.long(), q[k, n].long())
    assert torch.equal(from_mma_layout(m), pack_int4(q))
    # column slices at multiples of 16 are the layout of the slice (fused q|k|v parts stay valid views)
    assert torch.equal(m[:, 16:48], to_mma_layout(pack_int4(q[:, 16:48])))
    assert mma_layout_ok(4096, 12288, 32) and mma_layout_ok(576, 960, 18) and mma_layout_ok(11008, 4096, 1)
    assert not mma_layout_ok(576, 200, 18) and not mma_layout_ok(4096, 256, 256) and not mma_layout_ok(4104, 16, 1)


@pytest.mark.parametrize("act_order", [False, True])     # with act-order q|k|v stay separate layers
def test_model_in_mma_layout_gives_the_same_output(tmp_path, act_order):
    """Switching the 4-bit layers (fused ones and their views) to the mma layout changes nothing but the layout."""
    hf = hf_tiny(seed=9, hidden_size=128, intermediate_size=256)
    folder = gptq_checkpoint(hf, tmp_path / "q", 32, False, act_order)
    model = load_ours(folder, keep_q4=True)
    ids = torch.randint(0, 96, (1, 10))
    before = model(ids, last_only=False)
    attn = model.layers[0].self_attn
    w_q = attn.q_proj.dense_weight()
    views = {id(v) for m in model.modules() for v in getattr(m, "views", [])}
    linears = [m for m in model.modules() if getattr(m, "quantized", False) and id(m) not in views]
    assert all(lin.use_mma_layout() for lin in linears)
    assert attn.q_proj.mma and model.layers[0].mlp.down_proj.mma
    if not act_order:
        assert attn.qkv.mma and attn.q_proj.qweight.data_ptr() == attn.qkv.qweight.data_ptr()
    assert torch.equal(attn.q_proj.dense_weight(), w_q)
    assert torch.equal(model(ids, last_only=False), before)


def test_greedy_step_picks_the_argmax_of_the_logits_step(tmp_path):
    """GraphDecoder.greedy (argmax inside the step, the position advanced by the step itself) gives the tokens
    the logits step's argmax gives, also after a rewind; greedy(None) needs a previous greedy step."""
    from model.graph import GraphDecoder
    ours = load_ours(save_hf(hf_tiny(seed=7), tmp_path / "m"), max_seq_len=64)
    ids = torch.randint(0, 96, (1, 8))
    picks = greedy_both_ways(ours, ids, 6, 12)
    assert picks["greedy"] == picks["logits"]
    cache = ours.new_cache()
    ours(ids, cache)
    dec = GraphDecoder(ours, cache, bucket=8, use_graphs=False)
    with pytest.raises(ValueError, match="continues from a greedy step"):
        dec.greedy(None)
    dec.greedy(ids[:, :1])
    dec(ids[:, :1])                                   # a logits step in between ends the greedy run
    with pytest.raises(ValueError, match="continues from a greedy step"):
        dec.greedy(None)


def test_argmax_rows_reference_follows_torch_argmax():
    from model.ops import Ops, argmax_rows_ref
    x = torch.tensor([[1.0, 3.0, 3.0, -1.0], [float("-inf")] * 4, [0.0, float("nan"), 5.0, float("nan")],
                      [float("inf"), 1.0, float("inf"), 0.0]])
    assert argmax_rows_ref(x).tolist() == [[1, 1], [0, 0], [1, 0], [0, 0]]
    out, ids = torch.empty(4, 2, dtype=torch.long), torch.zeros(4, 1, dtype=torch.long)
    Ops(False).argmax_rows(x, out, ids)
    assert out.tolist() == [[1, 1], [0, 0], [1, 0], [0, 0]] and ids.view(-1).tolist() == [1, 0, 1, 0]


def test_layers_split_over_devices_give_the_same_output(tmp_path):
    """Hidden states hop between device segments (here two 'devices' that are both the CPU)."""
    from model.graph import GraphDecoder
    from model.rope import Rotary
    ours = load_ours(save_hf(hf_tiny(seed=9), tmp_path / "m"), max_seq_len=64)
    ids = torch.randint(0, 96, (1, 16))
    ref = ours(ids, last_only=False)
    other = torch.device("cpu", 0)              # compares unequal to "cpu": a second segment
    ours.layer_devices = [ours.device, other, other]
    ours.rotary[other] = Rotary(ours.cfg, ours.runtime, other)
    assert len(ours.segments()) == 2
    assert rel(ours(ids, last_only=False), ref) < 1e-6
    cache = ours.new_cache()
    ours(ids[:, :5], cache)
    dec = GraphDecoder(ours, cache, bucket=8, use_graphs=False)
    outs = [dec(ids[:, i:i + 1]) for i in range(5, 16)]
    assert rel(torch.cat(outs, 1), ref[:, 5:]) < 1e-5
    picks = greedy_both_ways(ours, ids, 5, 8)       # the greedy pick hops back to the first segment
    assert picks["greedy"] == picks["logits"]
