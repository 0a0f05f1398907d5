"""The embedded model on a GPU (CUDA kernels, fp16) against the CPU reference path (fp32)."""
import pytest
import torch

from model.config import RuntimeConfig
from model.loader import load
from model.perplexity import window_nll, windows

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


@pytest.fixture(scope="module")
def gpu_model():
    model, tok = load(None, RuntimeConfig(device="cuda", max_seq_len=2048), progress=False)
    from cuda_ext import build
    if not build.is_available():
        pytest.skip(f"CUDA extension unavailable: {build.failure_reason()}")
    return model, tok


def test_perplexity_and_top1_agree_with_cpu(gpu_model, embedded_fp32, botchan_text):
    gpu, tok = gpu_model
    cpu, _ = embedded_fp32
    ids = tok.encode(botchan_text)
    tot = {"cpu": 0.0, "gpu": 0.0}
    n = agree = 0
    for w in windows(ids, 512, 16):
        lc = cpu(w.unsqueeze(0), last_only=False)[0]
        lg = gpu(w.unsqueeze(0), last_only=False)[0].cpu()
        for name, lg_ in (("cpu", lc), ("gpu", lg)):
            tot[name] += window_nll(lg_, w)[0]
        agree += int((lc[:-1].argmax(-1) == lg[:-1].argmax(-1)).sum())
        n += w.numel() - 1
    ppl = {k: float(torch.tensor(v / n).exp()) for k, v in tot.items()}
    print(f"perplexity cpu {ppl['cpu']:.4f} gpu {ppl['gpu']:.4f}; top-1 agreement {agree / n:.4%}")
    assert abs(ppl["gpu"] - ppl["cpu"]) / ppl["cpu"] < 0.005
    assert agree / n >= 0.99


def test_graph_decode_equals_eager(gpu_model):
    """The captured step replays what the same static step computes eagerly, across key buckets."""
    from model.graph import GraphDecoder
    model, tok = gpu_model
    ids = torch.tensor([tok.encode("The history of the Roman Empire begins")], device="cuda")
    c1, c2 = model.new_cache(), model.new_cache()
    l1, l2 = model(ids, c1), model(ids, c2)
    eager_dec = GraphDecoder(model, c1, bucket=16, use_graphs=False)
    graph_dec = GraphDecoder(model, c2, bucket=16)
    eager, graphed = [], []
    for _ in range(40):          # crosses several key-length buckets
        t1, t2 = l1[:, -1].argmax(-1, keepdim=True), l2[:, -1].argmax(-1, keepdim=True)
        eager.append(int(t1)), graphed.append(int(t2))
        l1, l2 = eager_dec(t1), graph_dec(t2)
        rel = ((l1 - l2).norm() / l1.norm()).item()
        assert rel < 1e-3, rel
    assert eager == graphed
    assert c1.length == c2.length


def test_static_decode_step_close_to_forward(gpu_model):
    """The static decode step (fused kernels by default) against the plain cached forward (separate
    kernels, SDPA): fp16 rounding differs, the logits must not."""
    from model.graph import GraphDecoder
    model, tok = gpu_model
    ids = torch.tensor([tok.encode("Once upon a time, in a small village by the sea,")], device="cuda")
    c1, c2 = model.new_cache(), model.new_cache()
    l1, l2 = model(ids, c1), model(ids, c2)
    dec = GraphDecoder(model, c2, bucket=16)
    worst = 0.0
    for _ in range(24):
        t = l1[:, -1].argmax(-1, keepdim=True)
        l1, l2 = model(t, c1), dec(t)            # same tokens into both (teacher-forced)
        worst = max(worst, ((l1 - l2).norm() / l1.norm()).item())
    print(f"static step vs forward: worst logits rel. difference {worst:.2e}")
    assert worst < 2e-2


def test_q4_layers_use_the_kernels(gpu_model):
    model, _ = gpu_model
    lin = model.layers[0].self_attn.qkv
    assert lin is not None and lin.quantized          # fused, still 4-bit on the GPU
    x = torch.randn(1, model.cfg.hidden_size, device="cuda", dtype=torch.float16)
    from model.ops import q4_matmul_dequant
    ref = q4_matmul_dequant(x.float(), lin.qweight, lin.scales, lin.offsets, lin.perm)
    y = lin(x).float()
    assert ((y - ref).norm() / ref.norm()).item() < 2e-3



def test_fused_decode_as_accurate_as_unfused(gpu_model, embedded_fp32):
    """The static decode step with the fused kernels (norm/SiLU in the GEMVs, rope_kv_write,
    decode_attention) and with the separate kernels + SDPA, both against the CPU fp32 reference on
    the same (teacher-forced) tokens: the fused step must be about as close to it as the unfused one.
    (A first H200 run found the two fp16 paths 0.6-0.75% apart in logits, over the 0.5% that
    test_graph_decode_equals_eager allows; which one is closer to fp32 is what this measures.)"""
    gpu, tok = gpu_model
    cpu, _ = embedded_fp32
    ids = tok.encode("The history of the Roman Empire begins with the founding of the city, and over the "
                     "centuries it grew from a small town on the Tiber into a state that ruled the whole")
    n_prompt = 8
    ref = cpu(torch.tensor([ids]), last_only=False)[0]             # [T, V] fp32, CPU
    errs, agree = {}, {}
    for fused in (False, True):      # ends on the default (on)
        gpu.ops.fused_decode = gpu.ops.fused_gemv = fused
        c = gpu.new_cache()
        gpu(torch.tensor([ids[:n_prompt]], device="cuda"), c)
        e, a = [], 0
        for t in range(n_prompt, len(ids)):
            pos = torch.tensor([c.length], device="cuda")
            kv_len = min(c.max_seq_len, (c.length // 64 + 1) * 64)
            out = gpu.decode_static(torch.tensor([[ids[t]]], device="cuda"), c, pos, kv_len)[0, -1].cpu()
            c.length += 1
            r = ref[t]
            e.append(((out - r).norm() / r.norm()).item())
            a += int(out.argmax() == r.argmax())
        errs[fused], agree[fused] = sum(e) / len(e), a
    print(f"mean rel err vs CPU fp32: fused {errs[True]:.2e} unfused {errs[False]:.2e}; "
          f"top-1 agreement fused {agree[True]} unfused {agree[False]} of {len(ids) - n_prompt}")
    assert errs[True] <= 1.25 * errs[False] + 1e-3
    assert agree[True] >= agree[False] - 1


def test_generator_decodes_through_the_graph(gpu_model):
    """The Generator replays the captured step on GPUs; its greedy text equals the eager one's."""
    from model.generator import GenerationSettings, Generator
    from model.sampler import SamplerSettings
    model, tok = gpu_model
    settings = GenerationSettings(sampler=SamplerSettings.greedy(), max_new_tokens=24)
    graphed = Generator(model, tok)
    assert graphed._graph is not None
    eager = Generator(model, tok)
    from model.graph import GraphDecoder
    eager._graph = GraphDecoder(model, eager.cache, use_graphs=False)   # the same step, not captured
    prompt = "Write one sentence about the sea."
    assert graphed.complete(prompt, settings) == eager.complete(prompt, settings)
