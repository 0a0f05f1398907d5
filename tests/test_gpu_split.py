"""Layers split over two GPUs: the same logits as on one GPU, in the forward and in the captured
decode step (one graph per device segment). Needs two CUDA devices; skipped otherwise."""
import pytest
import torch

from tiny import gptq_checkpoint, hf_tiny, load_ours

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]


def test_split_model_equals_one_gpu(tmp_path):
    from cuda_ext import build
    from model.graph import GraphDecoder
    from model.split import GB, costs_for
    if not build.is_available():
        pytest.skip(f"CUDA extension unavailable: {build.failure_reason()}")
    hf = hf_tiny(seed=31, vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                 num_key_value_heads=2, num_hidden_layers=4, max_position_embeddings=512)
    folder = gptq_checkpoint(hf, tmp_path / "m", 32, False, True)
    kw = dict(device="cuda:0", dtype="float16", weight_dtype="float16", max_seq_len=256)
    one = load_ours(folder, **kw)
    per_layer = costs_for(one.cfg, 256).layer_weights / GB
    two = load_ours(folder, gpu_split=[2.5 * per_layer, 1.0], **kw)
    assert [d.index for d in two.layer_devices] == [0, 0, 1, 1]
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(1))
    outs = []
    for m in (one, two):
        c = m.new_cache()
        full = m(ids[:, :30], c, last_only=False).cpu()
        dec = GraphDecoder(m, c, bucket=16)
        steps = torch.cat([dec(ids[:, t:t + 1].cuda()).cpu() for t in range(30, 40)], 1)
        assert dec.graphs and all(key[0] in (0, 1) for key in dec.graphs)
        outs.append((full, steps))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
