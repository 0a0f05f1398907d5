"""Fused decode kernels against the separate kernels, both against the CPU fp32 reference, on a
random 4-bit GPTQ model (runs wherever a GPU is, no embedded model needed)."""
import pytest
import torch

from tiny import gptq_checkpoint, greedy_both_ways, hf_tiny, load_ours

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from cuda_ext import build
    if not build.is_available():
        pytest.skip(f"CUDA extension unavailable: {build.failure_reason()}")
    hf = hf_tiny(seed=21, vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                 num_key_value_heads=2, num_hidden_layers=4, max_position_embeddings=512)
    folder = gptq_checkpoint(hf, tmp_path_factory.mktemp("q") / "m", 32, False, True)
    cpu = load_ours(folder, max_seq_len=256)
    gpu = load_ours(folder, device="cuda", dtype="float16", weight_dtype="float16", max_seq_len=256)
    return cpu, gpu


def test_fused_decode_as_accurate_as_unfused(models):
    cpu, gpu = models
    ids = torch.randint(0, 512, (1, 120), generator=torch.Generator().manual_seed(0))
    ref = cpu(ids, last_only=False)[0]
    n_prompt = 8
    errs, agree = {}, {}
    for fused in (False, True):      # ends on the default (on)
        gpu.ops.fused_decode = gpu.ops.fused_gemv = fused
        c = gpu.new_cache()
        gpu(ids[:, :n_prompt].cuda(), c)
        e, a = [], 0
        for t in range(n_prompt, ids.shape[1]):
            pos = torch.tensor([c.length], device="cuda")
            kv_len = min(c.max_seq_len, (c.length // 64 + 1) * 64)
            out = gpu.decode_static(ids[:, t:t + 1].cuda(), c, pos, kv_len)[0, -1].cpu()
            c.length += 1
            e.append(((out - ref[t]).norm() / ref[t].norm()).item())
            a += int(out.argmax() == ref[t].argmax())
        errs[fused], agree[fused] = sum(e) / len(e), a
    n = ids.shape[1] - n_prompt
    print(f"random GPTQ model, mean rel err vs CPU fp32: fused {errs[True]:.2e} unfused {errs[False]:.2e}; "
          f"top-1 agreement fused {agree[True]}/{n} unfused {agree[False]}/{n}")
    assert errs[False] < 2e-2
    assert errs[True] <= 1.25 * errs[False] + 1e-3
    assert agree[True] >= agree[False] - 2


def test_every_layer_in_mma_layout_matches_row_layout(models, tmp_path):
    """All 4-bit layers in the tensor-core GEMV's layout (the model itself picks only big o/down projections):
    the prompt forward (mma dequantization + cuBLAS) and static decode steps (tensor-core GEMV, fused
    prologues) agree with the row-layout model."""
    _, gpu = models
    hf = hf_tiny(seed=21, vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                 num_key_value_heads=2, num_hidden_layers=4, max_position_embeddings=512)
    folder = gptq_checkpoint(hf, tmp_path / "m", 32, False, True)
    mma = load_ours(folder, device="cuda", dtype="float16", weight_dtype="float16", max_seq_len=256)
    views = {id(v) for m in mma.modules() for v in getattr(m, "views", [])}
    linears = [m for m in mma.modules() if getattr(m, "quantized", False) and id(m) not in views]
    assert all(lin.use_mma_layout() for lin in linears)
    ids = torch.randint(0, 512, (1, 48), generator=torch.Generator().manual_seed(5)).cuda()
    a, b = mma(ids, last_only=False).float(), gpu(ids, last_only=False).float()
    assert ((a - b).norm() / b.norm()).item() < 2e-3
    caches = mma.new_cache(), gpu.new_cache()
    for m, c in zip((mma, gpu), caches):
        m(ids[:, :8], c)
    for t in range(8, 48):
        outs = []
        for m, c in zip((mma, gpu), caches):
            pos = torch.tensor([c.length], device="cuda")
            outs.append(m.decode_static(ids[:, t:t + 1], c, pos, 64)[0, -1].float())
            c.length += 1
        # the tensor-core GEMV sums in fp32, the row-layout one four fp16 products a lane first (half2): their
        # logits differ by up to ~5e-3 a step; a layout error would be O(1)
        assert ((outs[0] - outs[1]).norm() / outs[1].norm()).item() < 1e-2, t


def test_embedding_table_in_host_memory(models, tmp_path):
    """An untied model keeps its embedding table in pinned host memory on GPUs (no VRAM); logits of
    the forward and of the captured decode step equal those with the table on the GPU."""
    from model.graph import GraphDecoder
    _, gpu = models
    assert not gpu.embed_tokens.is_cuda and gpu.embed_tokens.is_pinned()
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(3))
    on_gpu_table = gpu.embed_tokens
    try:
        outs = []
        for table in (on_gpu_table, on_gpu_table.cuda()):
            gpu.embed_tokens = table
            c = gpu.new_cache(batch_size=2)
            full = gpu(ids.cuda(), c, last_only=False)
            dec = GraphDecoder(gpu, c, bucket=64)
            steps = [dec(ids[:, t:t + 1].cuda()) for t in range(5)]
            outs.append((full, torch.cat(steps, 1)))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    finally:
        gpu.embed_tokens = on_gpu_table
    with pytest.raises(IndexError, match="out of range"):
        gpu(torch.tensor([[512]]))


def test_lora_inside_the_captured_step(models, tmp_path):
    """A rank-8 adapter on all seven projections: the captured decode step with the adapter matches
    the CPU fp32 model with the same adapter, and switching to no adapter gives the base output."""
    from model.graph import GraphDecoder
    from model.lora import load_lora, unload_lora
    from tools.bench_lora import write_adapter
    cpu, gpu = models
    folder = write_adapter(cpu, tmp_path / "ad", rank=8, std=0.05)
    for m in (cpu, gpu):
        load_lora(m, folder, "ad")
    try:
        ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(5))
        ref = {name: cpu(ids, last_only=False, lora=name)[0, 16:] for name in ("ad", None)}
        assert ((ref["ad"] - ref[None]).norm() / ref[None].norm()).item() > 0.05   # the adapter matters
        for name in ("ad", None, "ad"):
            c = gpu.new_cache()
            gpu(ids[:, :16].cuda(), c, lora=name)
            dec = GraphDecoder(gpu, c, bucket=64)
            out = torch.cat([dec(ids[:, t:t + 1].cuda(), lora=name)[0].cpu() for t in range(16, 24)])
            err = ((out - ref[name]).norm() / ref[name].norm()).item()   # logits at positions 16..23
            assert err < 2e-2, (name, err)
    finally:
        for m in (cpu, gpu):
            unload_lora(m, "ad")


def test_captured_greedy_step_picks_what_the_logits_step_picks(models):
    """GraphDecoder.greedy (argmax kernel and position advance inside the CUDA graph, the pick fed straight
    back as the next input) gives the tokens the captured logits step's argmax gives, across key buckets and
    after a rewind."""
    _, gpu = models
    ids = torch.randint(0, 512, (1, 41), generator=torch.Generator().manual_seed(3)).cuda()
    picks = greedy_both_ways(gpu, ids, 40, 40, bucket=16, use_graphs=True)   # positions 40..79: three key buckets
    assert picks["greedy"] == picks["logits"]
