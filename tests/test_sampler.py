"""Tests for model/sampler.py: settings, each filter on hand-made logits, and the Sampler."""

import math

import pytest
import torch

from model.sampler import (
    Sampler,
    SamplerSettings,
    allow_only,
    apply_penalties,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_temperature,
    as_history,
    ban_tokens,
    min_p_filter,
    mirostat_v2_filter,
    repetition_strength,
    top_k_filter,
    top_p_filter,
    typical_filter,
)

INF = float("inf")
TIGHT = dict(rtol=0, atol=1e-6)


pytestmark = pytest.mark.usefixtures("one_thread")


def logits_of(*probs):
    """[1, V] logits whose softmax is exactly `probs` (up to fp32 rounding)."""
    return torch.tensor([probs], dtype=torch.float64).log().float()


def dist(*vals):
    return torch.tensor([vals], dtype=torch.float32)


def softmax(x):
    return torch.softmax(x, -1)


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

def test_settings_defaults_and_presets():
    s = SamplerSettings()
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty) == (0.8, 50, 0.9, 0.05, 1.1)
    assert not s.is_greedy
    g = SamplerSettings.greedy()
    assert g.is_greedy and g.temperature == 0 and g.repetition_penalty == 1.0
    assert SamplerSettings.greedy(repetition_penalty=1.2).repetition_penalty == 1.2
    assert SamplerSettings.neutral(top_k=1).is_greedy
    n = SamplerSettings.neutral()
    assert (n.temperature, n.top_k, n.top_p, n.min_p, n.typical, n.has_penalties) == (1, 0, 1, 0, 1, False)


def test_settings_replace_clone_roundtrip():
    s = SamplerSettings(seed=7, banned_tokens=[5, 3, 5], allowed_tokens=(1, 2, 3))
    assert s.banned_tokens == (3, 5)  # normalised: sorted, unique tuple
    t = s.replace(top_k=10)
    assert t.top_k == 10 and s.top_k == 50 and t.seed == 7
    assert s.clone() == s and s.clone() is not s
    d = s.to_dict()
    assert d["banned_tokens"] == [3, 5] and isinstance(d["allowed_tokens"], list)
    assert SamplerSettings.from_dict(d) == s
    with pytest.raises(ValueError, match="top_p"):
        s.replace(top_p=1.5)
    with pytest.raises(TypeError):
        s.replace(no_such_field=1)


def test_settings_from_dict_lenient_input():
    s = SamplerSettings.from_dict({"temperature": "0.5", "top_k": 40.0, "mirostat": 2,
                                   "unknown_key": 123, "seed": None, "top_p": None})
    assert s.temperature == 0.5 and s.top_k == 40 and isinstance(s.top_k, int)
    assert s.mirostat is True and s.seed is None and s.top_p == 0.9
    assert SamplerSettings.from_dict(None) == SamplerSettings()
    assert SamplerSettings.from_dict({"mirostat": 0}).mirostat is False


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_k", -1), ("top_k", 2.5),
    ("top_k", True), ("top_p", 0.0), ("top_p", 1.01), ("min_p", -0.01), ("min_p", 1.5),
    ("typical", 0.0), ("typical", 2.0), ("repetition_penalty", 0.0),
    ("repetition_penalty_sustain", -2), ("repetition_penalty_decay", -1),
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("banned_tokens", [-1]),
    ("banned_tokens", "abc"), ("mirostat", 1), ("mirostat_tau", 0), ("mirostat_eta", -0.1),
    ("seed", -1), ("seed", 1.5), ("temperature", "warm"),
])
def test_settings_validation(field, value):
    with pytest.raises(ValueError, match=field.split("_tokens")[0]):
        SamplerSettings.from_dict({field: value})


def test_settings_allowed_all_banned_rejected():
    with pytest.raises(ValueError, match="allowed_tokens"):
        SamplerSettings(allowed_tokens=[1, 2], banned_tokens=[1, 2, 3])


# ---------------------------------------------------------------------------------------------
# Filters, exact distributions
# ---------------------------------------------------------------------------------------------

def test_temperature_exact():
    x = dist(1.0, 2.0, 3.0)
    out = apply_temperature(x, 2.0)
    assert torch.allclose(softmax(out), softmax(dist(0.5, 1.0, 1.5)), **TIGHT)
    e = [math.exp(v) for v in (0.5, 1.0, 1.5)]
    assert torch.allclose(softmax(out), dist(*[v / sum(e) for v in e]), **TIGHT)
    assert apply_temperature(x, 1.0) is x
    with pytest.raises(ValueError):
        apply_temperature(x, 0.0)


def test_top_k_exact():
    x = logits_of(0.1, 0.4, 0.2, 0.3)
    out = top_k_filter(x, 2)
    assert torch.allclose(softmax(out), dist(0, 4 / 7, 0, 3 / 7), **TIGHT)
    assert torch.isinf(out[0, 0]) and torch.isinf(out[0, 2])
    assert top_k_filter(x, 0) is x and top_k_filter(x, 4) is x
    # ties: exactly k survive
    assert torch.isfinite(top_k_filter(torch.zeros(1, 5), 3)).sum() == 3


def test_top_p_exact():
    x = logits_of(0.15, 0.5, 0.05, 0.3)  # unsorted on purpose
    assert torch.allclose(softmax(top_p_filter(x, 0.75)), dist(0, 0.5 / 0.8, 0, 0.3 / 0.8), **TIGHT)
    assert torch.allclose(softmax(top_p_filter(x, 0.85)), dist(0.15 / 0.95, 0.5 / 0.95, 0, 0.3 / 0.95), **TIGHT)
    assert torch.allclose(softmax(top_p_filter(x, 0.3)), dist(0, 1, 0, 0), **TIGHT)  # top always kept
    assert top_p_filter(x, 1.0) is x
    # presorted path and log_total (head of a larger distribution) agree with the full computation
    full = logits_of(0.5, 0.3, 0.15, 0.05)
    head = full[:, :2]
    lt = torch.logsumexp(full, -1, keepdim=True)
    out = top_p_filter(head, 0.75, presorted=True, log_total=lt)
    assert torch.allclose(softmax(out), dist(0.625, 0.375), **TIGHT)


def test_min_p_exact():
    x = logits_of(0.05, 0.5, 0.15, 0.3)
    out = min_p_filter(x, 0.2)  # threshold 0.2 * 0.5 = 0.1
    assert torch.allclose(softmax(out), dist(0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95), **TIGHT)
    assert torch.allclose(softmax(min_p_filter(x, 0.5)), dist(0, 0.5 / 0.8, 0, 0.3 / 0.8), **TIGHT)
    assert min_p_filter(x, 0.0) is x


def test_typical_exact():
    p = [0.4, 0.3, 0.2, 0.1]
    h = -sum(q * math.log(q) for q in p)  # 1.2799
    shifted = [abs(-math.log(q) - h) for q in p]
    # typicality ranking: token 1 (0.076), token 2 (0.329), token 0 (0.364), token 3 (1.023)
    assert sorted(range(4), key=lambda i: shifted[i]) == [1, 2, 0, 3]
    x = logits_of(*p)
    assert torch.allclose(softmax(typical_filter(x, 0.45)), dist(0, 0.6, 0.4, 0), **TIGHT)
    assert torch.allclose(softmax(typical_filter(x, 0.6)), dist(0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0), **TIGHT)
    assert torch.allclose(softmax(typical_filter(x, 0.1)), dist(0, 1, 0, 0), **TIGHT)
    assert typical_filter(x, 1.0) is x
    # -inf logits stay out
    y = torch.cat([x, torch.full((1, 1), -INF)], 1)
    assert torch.allclose(softmax(typical_filter(y, 0.6)), dist(0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0, 0), **TIGHT)


def test_mirostat_filter_exact():
    x = logits_of(0.5, 0.25, 0.125, 0.125)  # surprises 1, 2, 3, 3 bits
    assert torch.allclose(softmax(mirostat_v2_filter(x, 2.5)), dist(2 / 3, 1 / 3, 0, 0), **TIGHT)
    assert torch.allclose(softmax(mirostat_v2_filter(x, 3.5)), softmax(x), **TIGHT)
    assert torch.allclose(softmax(mirostat_v2_filter(x, 0.1)), dist(1, 0, 0, 0), **TIGHT)  # top kept


def test_bans_and_allowed():
    x = logits_of(0.1, 0.2, 0.3, 0.4)
    assert torch.allclose(softmax(ban_tokens(x, [3])), dist(1 / 6, 2 / 6, 3 / 6, 0), **TIGHT)
    assert torch.allclose(softmax(allow_only(x, [0, 2])), dist(0.25, 0, 0.75, 0), **TIGHT)
    assert allow_only(x, []) is x and ban_tokens(x, []) is x
    with pytest.raises(ValueError, match="out of range"):
        ban_tokens(x, [4])


# ---------------------------------------------------------------------------------------------
# Penalties
# ---------------------------------------------------------------------------------------------

def test_repetition_strength_profile():
    st = repetition_strength(6, sustain=2, decay=2)
    # distances 5,4,3,2,1,0 -> 0, 0, 1/3, 2/3, 1, 1
    assert torch.allclose(st, torch.tensor([0, 0, 1 / 3, 2 / 3, 1, 1]), **TIGHT)
    assert torch.equal(repetition_strength(4, -1, 0), torch.ones(4))
    assert torch.equal(repetition_strength(3, 1, 0), torch.tensor([0.0, 0.0, 1.0]))


def test_repetition_penalty_decay_window():
    x = torch.tensor([[2.0, -1.0, 1.0, 0.5, -2.0, 3.0]])
    hist = [[0, 1, 2, 3, 4]]  # token 4 most recent
    out = apply_repetition_penalty(x, hist, 2.0, sustain=2, decay=2)
    # token4 d=0 full (x2), token3 d=1 full (/2), token2 d=2 pen 1+2/3, token1 d=3 pen 1+1/3,
    # token0 d=4 outside the window (sustain + decay = 4), token5 not in history
    want = torch.tensor([[2.0, -4 / 3, 1 / (5 / 3), 0.25, -4.0, 3.0]])
    assert torch.allclose(out, want, **TIGHT)
    assert torch.equal(x, torch.tensor([[2.0, -1.0, 1.0, 0.5, -2.0, 3.0]]))  # input untouched


def test_repetition_penalty_most_recent_occurrence_wins():
    x = torch.tensor([[0.0, 0.0, 1.5, 0.0, 0.0, 3.0]])
    out = apply_repetition_penalty(x, torch.tensor([[2, 5, 5, 2, 5]]), 2.0, sustain=1, decay=2)
    # token 5 at d=0 (full) -> 1.5; token 2 most recent at d=1 -> strength 2/3 -> /(5/3)
    assert torch.allclose(out, torch.tensor([[0, 0, 0.9, 0, 0, 1.5]]), **TIGHT)
    # whole history (sustain -1): everything full
    out = apply_repetition_penalty(x, [[2, 5]], 1.5, sustain=-1)
    assert torch.allclose(out, torch.tensor([[0, 0, 1.0, 0, 0, 2.0]]), **TIGHT)


def test_presence_frequency_openai():
    x = torch.zeros(1, 4)
    out = apply_presence_frequency(x, [[1, 1, 2, 1]], presence=0.5, frequency=0.25)
    assert torch.allclose(out, torch.tensor([[0.0, -1.25, -0.75, 0.0]]), **TIGHT)
    out = apply_presence_frequency(x, [[1, 1, 2, 1]], presence=0.5, frequency=0.25, window=2)
    assert torch.allclose(out, torch.tensor([[0.0, -0.75, -0.75, 0.0]]), **TIGHT)
    # combined with repetition penalty: rep first, then subtract
    y = torch.tensor([[0.0, 2.0, -1.0]])
    out = apply_penalties(y, [[1, 2, 2]], 2.0, -1, 0, presence=0.5, frequency=0.5)
    assert torch.allclose(out, torch.tensor([[0.0, 1.0 - 1.0, -2.0 - 1.5]]), **TIGHT)


def test_history_forms_ragged_and_padding():
    h = as_history([[1, 2, 3], [4]], 2)
    assert torch.equal(h, torch.tensor([[1, 2, 3], [-1, -1, 4]]))
    assert torch.equal(as_history([7, 8], 1), torch.tensor([[7, 8]]))
    assert as_history([], 1) is None and as_history(None, 3) is None
    assert torch.equal(as_history(torch.arange(10).view(1, 10), 1, window=3), torch.tensor([[7, 8, 9]]))
    with pytest.raises(ValueError, match="rows"):
        as_history([[1], [2]], 3)
    # ragged rows penalise independently, right-aligned; ids < 0 or >= V are ignored
    x = torch.ones(2, 5)
    out = apply_repetition_penalty(x, [[0, 1, 9], [2, -1]], 2.0, sustain=1, decay=1)
    want = torch.tensor([[1.0, 1 / 1.5, 1, 1, 1], [1, 1, 1 / 1.5, 1, 1]])
    assert torch.allclose(out, want, **TIGHT)


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------

def reference_probs(x, hist, s: SamplerSettings):
    """The documented order, composed from the public filters on the full vocabulary."""
    x = apply_penalties(x, hist, s.repetition_penalty, s.repetition_penalty_sustain,
                        s.repetition_penalty_decay, s.presence_penalty, s.frequency_penalty)
    x = ban_tokens(x, s.banned_tokens)
    x = allow_only(x, [i for i in s.allowed_tokens if i not in s.banned_tokens])
    x = apply_temperature(x, s.temperature)
    x = top_k_filter(x, s.top_k)
    x = top_p_filter(x, s.top_p)
    x = min_p_filter(x, s.min_p)
    x = typical_filter(x, s.typical)
    return softmax(x)


@pytest.mark.parametrize("settings", [
    SamplerSettings(),
    SamplerSettings(top_k=20, top_p=0.8, min_p=0.02, typical=0.9, temperature=0.7,
                    presence_penalty=0.3, frequency_penalty=0.2, banned_tokens=[0, 5]),
    SamplerSettings.neutral(top_p=0.95),          # partial-topk top_p path, head grows
    SamplerSettings.neutral(top_p=0.3, temperature=1.3),
    SamplerSettings.neutral(min_p=0.1),
    SamplerSettings.neutral(typical=0.8, repetition_penalty=1.3),
    SamplerSettings(allowed_tokens=list(range(10, 400, 3)), banned_tokens=[13], top_k=30),
])
def test_sampler_probs_match_reference_order(settings):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5000, generator=g) * 2.0
    hist = torch.randint(0, 5000, (2, 300), generator=g)
    got = Sampler(settings, seed=1).probs(x, hist)
    want = reference_probs(x, hist, settings)
    assert got.shape == (2, 5000)
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(2), atol=1e-5)


def test_greedy_is_argmax_without_rng():
    x = torch.tensor([[0.1, 2.0, 0.3], [5.0, 1.0, 4.9]])
    for s in (SamplerSettings.greedy(), SamplerSettings(top_k=1), SamplerSettings(temperature=0)):
        sm = Sampler(s, seed=3)
        state = sm.generator().get_state()
        assert sm.sample(x).tolist() == [1, 0]
        assert torch.equal(sm.generator().get_state(), state)
        assert torch.equal(sm.probs(x), torch.tensor([[0.0, 1, 0], [1, 0, 0]]))
    # greedy still honours penalties and bans
    s = SamplerSettings.greedy(repetition_penalty=10.0, banned_tokens=[0])
    assert Sampler(s).sample(x, [[1], [2]]).tolist() == [2, 1]


def test_sampling_frequencies():
    x = logits_of(0.5, 0.3, 0.2).expand(20000, 3)
    toks = Sampler(SamplerSettings.neutral(), seed=11).sample(x)
    freq = torch.bincount(toks, minlength=3).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.015)


def test_seed_reproducible_and_different_seeds_differ():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 1000, generator=g) * 0.5
    s = SamplerSettings.neutral(temperature=1.0)

    def run(seed):
        sm = Sampler(s.replace(seed=seed))
        return [int(sm.sample(x)) for _ in range(50)]

    assert run(123) == run(123)
    assert run(123) != run(124)
    # reset() replays; a Sampler without a seed picks one and reports it
    sm = Sampler(s)
    a = [int(sm.sample(x)) for _ in range(20)]
    sm.reset()
    assert [int(sm.sample(x)) for _ in range(20)] == a
    assert [int(Sampler(s, seed=sm.seed).sample(x)) for _ in range(1)] == a[:1]


def test_banned_and_allowed_in_sampler():
    x = torch.zeros(1, 50)
    x[0, 7] = 10.0
    s = SamplerSettings.neutral(banned_tokens=[7])
    toks = Sampler(s, seed=0).sample(x.expand(500, 50))
    assert not (toks == 7).any()
    s = SamplerSettings.neutral(allowed_tokens=[3, 4, 7], banned_tokens=[7])
    toks = Sampler(s, seed=0).sample(x.expand(500, 50))
    assert set(toks.tolist()) == {3, 4}
    p = Sampler(s).probs(x)
    assert torch.allclose(p[0, [3, 4]], torch.tensor([0.5, 0.5]), **TIGHT) and p.sum() == 1
    with pytest.raises(ValueError, match="out of range"):
        Sampler(SamplerSettings(allowed_tokens=[60])).sample(x)
    with pytest.raises(ValueError, match="no token"):
        Sampler(SamplerSettings(banned_tokens=[0, 1])).sample(torch.zeros(1, 2))
    for s in (SamplerSettings.greedy(), SamplerSettings.neutral()):
        with pytest.raises(ValueError, match="nan"):
            Sampler(s).sample(torch.tensor([[0.0, float("nan"), 1.0]]))


def test_logits_shapes_and_dtypes():
    sm = Sampler(SamplerSettings.greedy())
    assert sm.sample(torch.tensor([0.0, 3.0, 1.0])).tolist() == [1]
    assert sm.sample(torch.tensor([[[9.0, 0.0], [0.0, 3.0]]])).tolist() == [1]  # [B, T, V]: last
    assert Sampler(SamplerSettings(), seed=0).sample(torch.randn(2, 100).half()).dtype == torch.long


def test_batch_rows_independent():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3000, generator=g) * 3
    x[1] = x[1] * 0.2  # very different shapes: row 1 is flat, row 0 peaked
    hist = [[1, 2, 3, 4, 5], [6, 7]]
    s = SamplerSettings(top_k=0, top_p=0.9, presence_penalty=0.5)
    both = Sampler(s).probs(x, hist)
    for i in range(2):
        alone = Sampler(s).probs(x[i:i + 1], [hist[i]])
        assert torch.allclose(both[i:i + 1], alone, rtol=0, atol=1e-7)
    # mirostat: per-row mu evolves independently
    m = Sampler(SamplerSettings.neutral(mirostat=True, mirostat_tau=3.0), seed=0)
    for _ in range(30):
        m.sample(x)
    mu = m.mirostat_mu
    assert mu.shape == (2,) and mu[0] != mu[1]


def test_mirostat_surprise_tracks_tau():
    v = 1000
    zipf = torch.tensor([1.0 / (r + 1) for r in range(v)], dtype=torch.float64)
    x = (zipf / zipf.sum()).log().float().unsqueeze(0)
    x = x[:, torch.randperm(v, generator=torch.Generator().manual_seed(0))]
    entropy = float(-(softmax(x) * torch.log2(softmax(x))).sum())
    for tau in (3.0, 5.0):
        assert tau < entropy + 2  # reachable
        sm = Sampler(SamplerSettings.neutral(mirostat=True, mirostat_tau=tau, mirostat_eta=0.1), seed=42)
        surprises = []
        for step in range(800):
            p = sm.probs(x)  # the truncated distribution for the current mu
            tok = sm.sample(x)
            s = float(-torch.log2(p[0, tok]))
            assert s == pytest.approx(float(sm.last_surprise), abs=1e-4)
            if step >= 200:
                surprises.append(s)
        mean = sum(surprises) / len(surprises)
        assert abs(mean - tau) < 0.15, (tau, mean)
        assert math.isfinite(float(sm.mirostat_mu))
    # mirostat replaces top_k/top_p: they have no effect
    a = Sampler(SamplerSettings(mirostat=True, top_k=2, top_p=0.1), seed=1).probs(x)
    b = Sampler(SamplerSettings(mirostat=True, top_k=0, top_p=1.0), seed=1).probs(x)
    assert torch.equal(a, b) and int((a > 0).sum()) > 2


def test_top_p_partial_head_growth_matches_full_sort():
    # ~3000 tokens share the nucleus: the first 1024-token head is too small, the sampler must grow it
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40000, generator=g) * 0.01
    x[:, :3000] += 5.0
    x = x[:, torch.randperm(40000, generator=g)]
    s = SamplerSettings.neutral(top_p=0.9)
    got = Sampler(s).probs(x)
    assert torch.allclose(got, reference_probs(x, None, s), rtol=0, atol=1e-7)
    assert 2000 < int((got[0] > 0).sum()) < 3000


def test_draw_never_picks_zero_weight():
    x = torch.full((4000, 7), -INF)
    x[:, 3] = 0.0
    x[:1000, 6] = 0.0
    toks = Sampler(SamplerSettings.neutral(), seed=9).sample(x)
    assert set(toks[1000:].tolist()) == {3} and set(toks[:1000].tolist()) == {3, 6}


def test_large_row_compaction_paths_sample_only_survivors():
    # B = 1, V > 8192: min_p / mirostat / top_p-full-sort survivors are compacted before the draw
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 20000, generator=g)
    x[0, 123] = 9.0
    x[0, 4567] = 8.5
    for s in (SamplerSettings.neutral(min_p=0.3),
              SamplerSettings.neutral(mirostat=True, mirostat_tau=0.5, mirostat_eta=0.5),
              SamplerSettings.neutral(allowed_tokens=list(range(0, 20000, 2)) + [123, 4567], min_p=0.3),
              SamplerSettings.neutral(top_p=0.999, min_p=0.3)):
        sm = Sampler(s, seed=0)
        seen = set()
        for _ in range(60):  # support checked every step: mirostat's mu moves after each draw
            support = set((sm.probs(x)[0] > 0).nonzero().squeeze(1).tolist())
            assert support <= {123, 4567} and 123 in support
            tok = int(sm.sample(x))
            assert tok in support
            seen.add(tok)
        assert seen == {123, 4567}
