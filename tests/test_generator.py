"""Tests for model/generator.py.

Stop-string logic runs on a scripted fake model (greedy sampling replays an exact token sequence)
with the real tokenizer, so tokens and UTF-8 boundaries fall exactly where a test wants them. The
rest runs the embedded SmolLM2-135M on the CPU (fp32), with short generations.
"""
import random
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from model.generator import Delta, GenerationSettings, Generator, TextStream
from model.sampler import SamplerSettings

GREEDY = SamplerSettings.greedy()


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_tok(embedded_fp32):
    return embedded_fp32


@pytest.fixture(scope="module")
def tok(model_tok):
    return model_tok[1]


def _byte_pieces():
    """GPT-2 byte-level alphabet: byte -> the vocabulary string of its single-byte token."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_PIECES = _byte_pieces()


def byte_tokens(tok, text: str) -> list[int]:
    """One token per UTF-8 byte of text (splits multi-byte characters across tokens)."""
    ids = [tok.token_to_id(BYTE_PIECES[b]) for b in text.encode("utf-8")]
    assert None not in ids
    return ids


class FakeCache:
    def __init__(self, batch, max_seq_len):
        self.batch_size, self.max_seq_len, self.length = batch, max_seq_len, 0
        self.k = [torch.zeros(batch, 1, max_seq_len, 1)]
        self.v = [torch.zeros(batch, 1, max_seq_len, 1)]

    def truncate(self, n):
        assert 0 <= n <= self.length
        self.length = n

    def reset(self):
        self.length = 0


class ScriptedModel:
    """After a prompt of `prompt_len` tokens, greedy decoding produces `script`, then `end`."""

    def __init__(self, vocab, script, prompt_len, end, max_seq_len=512):
        self.runtime = SimpleNamespace(max_seq_len=max_seq_len)
        self.vocab, self.script, self.P, self.end = vocab, list(script), prompt_len, end
        self.fed = []

    def new_cache(self, batch_size=1, max_seq_len=None):
        return FakeCache(batch_size, max_seq_len or self.runtime.max_seq_len)

    def __call__(self, input_ids, cache=None, last_only=True, lora=None, pad=None):
        B, T = input_ids.shape
        assert cache.length + T <= cache.max_seq_len
        self.fed.append(T)
        cache.length += T
        i = cache.length - self.P
        t = self.script[i] if 0 <= i < len(self.script) else self.end
        logits = torch.zeros(B, 1, self.vocab)
        logits[:, :, t] = 10.0
        return logits


class TokProxy:
    """The real tokenizer with other EOS ids."""

    def __init__(self, tok, eos_ids):
        self._tok, self.eos_ids = tok, list(eos_ids)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def run_script(tok, script, stop=(), newline=False, max_new=200, tokenizer=None):
    prompt = tok.encode("Q: say it\nA:")
    m = ScriptedModel(tok.vocab_size, script, len(prompt), tok.eos_ids[0])
    g = Generator(m, tokenizer or tok)
    s = GenerationSettings(GREEDY, max_new_tokens=max_new, stop_strings=list(stop), break_on_newline=newline)
    deltas = list(g.generate(prompt, s))
    return deltas, "".join(d.text for d in deltas)


def check_stream(deltas, text, stop_strings=()):
    """Deltas join to the text, only the last has a finish reason, nothing was retracted."""
    assert all(isinstance(d, Delta) for d in deltas)
    assert [d.finish_reason is not None for d in deltas] == [False] * (len(deltas) - 1) + [True]
    shown = ""
    for d in deltas:
        shown += d.text
        assert text.startswith(shown)
        assert "\ufffd" not in d.text
    for s in stop_strings:
        assert s not in text


# ----------------------------------------------------------------------------------------------
# stop conditions on a scripted model
# ----------------------------------------------------------------------------------------------

def test_stop_string_split_across_tokens(tok):
    pieces = ["The", " answer", " is", " 4", "2", "</", "ans", ">", " and", " more"]
    script = [i for p in pieces for i in tok.encode(p)]
    deltas, text = run_script(tok, script, stop=["</ans>"])
    assert text == "The answer is 42"
    assert deltas[-1].finish_reason == "stop"
    check_stream(deltas, text, ["</ans>"])
    assert not any("<" in d.text for d in deltas)  # the start of the stop string was held, never shown


def test_stop_string_split_inside_a_utf8_character(tok):
    # "€" is 3 bytes; one token each, so the stop string starts in the middle of a character's bytes
    script = tok.encode("Price: 5") + byte_tokens(tok, "€") + tok.encode("uro and more")
    deltas, text = run_script(tok, script, stop=["€uro"])
    assert text == "Price: 5"
    assert deltas[-1].finish_reason == "stop"
    check_stream(deltas, text, ["€uro"])
    assert not any("€" in d.text for d in deltas)
    # the stop string ends inside a character: "5\xe2\x82" is not text yet, the match waits for "€"
    deltas, text = run_script(tok, script, stop=["5€"])
    assert text == "Price: " and deltas[-1].finish_reason == "stop"
    check_stream(deltas, text)


def test_held_text_is_released_when_the_stop_string_does_not_complete(tok):
    script = tok.encode("Price: 5") + byte_tokens(tok, "€") + tok.encode("uro, or 6") + byte_tokens(tok, "€")
    deltas, text = run_script(tok, script, stop=["€UR", "or 7"])
    assert text == "Price: 5€uro, or 6€"
    assert deltas[-1].finish_reason == "eos"
    check_stream(deltas, text)
    # "€" came out together with "uro" (held while it could start "€UR"), never alone then retracted
    euro = next(d for d in deltas if "€" in d.text)
    assert "€u" in euro.text


def test_stop_strings_fuzz(tok):
    rng = random.Random(0)
    words = ["hello", " world", " é", "tat", " naïve", " 日本", "語", "!", " <", "/", "s", ">", " ok", "\n", " →", " x"]
    for trial in range(40):
        script = []
        for _ in range(rng.randint(3, 14)):
            w = rng.choice(words)
            script += byte_tokens(tok, w) if rng.random() < 0.4 else tok.encode(w)
        full = tok.decode(script)
        if rng.random() < 0.7 and len(full) > 2:
            a = rng.randrange(len(full) - 1)
            stop = full[a:a + rng.randint(1, 4)]
        else:
            stop = "zz"
        deltas, text = run_script(tok, script, stop=[stop])
        i = full.find(stop)
        expect = full if i < 0 else full[:i]
        assert text == expect, (trial, script, stop)
        assert deltas[-1].finish_reason == ("eos" if i < 0 else "stop")
        check_stream(deltas, text, [stop])


def test_several_eos_ids(tok):
    words = tok.encode("one two three four")
    proxy = TokProxy(tok, [tok.eos_ids[0], words[2]])  # " three" is an end token now
    deltas, text = run_script(tok, words, tokenizer=proxy)
    assert text == "one two" and deltas[-1].finish_reason == "eos"
    assert deltas[-1].token_ids == []  # the EOS token is not part of the reply


def test_break_on_newline_and_max_tokens(tok):
    script = tok.encode("\n\nHello there\nMore text")
    deltas, text = run_script(tok, script, newline=True)
    assert text == "\n\nHello there" and deltas[-1].finish_reason == "newline"
    check_stream(deltas, text)
    deltas, text = run_script(tok, script, max_new=3)
    assert deltas[-1].finish_reason == "length" and deltas[-1].n_tokens == 3
    assert text == tok.decode(script[:3])
    assert [d.n_tokens for d in deltas] == [1, 2, 3]
    deltas, text = run_script(tok, script, max_new=0)
    assert text == "" and [d.finish_reason for d in deltas] == ["length"]


def test_text_stream_unit(tok):
    st = TextStream(tok, ["\nUser:"], break_on_newline=False)
    shown = [st.push(i) for i in tok.encode(" Fine, thanks.\nUser: hi")]
    assert "".join(shown) == " Fine, thanks." and st.finish_reason == "stop"
    st = TextStream(tok, ["\nUser:"])
    shown = [st.push(i) for i in tok.encode(" Fine.\nUse")] + [st.close()]
    assert shown[-1] == "\nUse" and "".join(shown) == " Fine.\nUse"


def test_cache_bookkeeping_on_scripted_model(tok):
    prompt = tok.encode("Q: say it\nA:")
    script = tok.encode(" one two three four five")
    m = ScriptedModel(tok.vocab_size, script, len(prompt), tok.eos_ids[0])
    g = Generator(m, tok)
    out = [d for d in g.generate(prompt, GenerationSettings(GREEDY, max_new_tokens=3))]
    assert g.last_prefill_tokens == len(prompt) and g.last_reused_tokens == 0
    gen = [t for d in out for t in d.token_ids]
    assert gen == script[:3]
    assert g.ids == prompt + gen[:-1] and g.cache.length == len(g.ids)  # last sampled token not fed
    # continue: only the last sampled token and the new text are prefilled
    extra = tok.encode(" and")
    list(g.generate(prompt + gen + extra, GenerationSettings(GREEDY, max_new_tokens=1)))
    assert g.last_prefill_tokens == 1 + len(extra) and g.last_reused_tokens == len(prompt) + 2


# ----------------------------------------------------------------------------------------------
# the embedded model
# ----------------------------------------------------------------------------------------------

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived",
           "def fibonacci(n):"]


@pytest.fixture(scope="module")
def gen(model_tok):
    model, tok = model_tok
    return Generator(model, tok)


def greedy_ids(gen, prompt, n):
    d = list(gen.generate(prompt, GenerationSettings(GREEDY, max_new_tokens=n, stop_on_eos=False)))
    return [t for x in d for t in x.token_ids], "".join(x.text for x in d)


def test_cache_reuse_prefills_only_the_suffix(model_tok, gen):
    model, tok = model_tok
    p1 = tok.encode(PROMPTS[0])
    ids1, _ = greedy_ids(gen, p1, 4)
    assert gen.last_prefill_tokens == len(p1)
    extra = tok.encode(" not London but")
    p2 = p1 + extra
    ids2, text2 = greedy_ids(gen, p2, 6)
    assert ids1[0] != extra[0]
    assert gen.last_reused_tokens == len(p1) and gen.last_prefill_tokens == len(extra)
    fresh = Generator(model, tok, max_seq_len=128)
    ref_ids, ref_text = greedy_ids(fresh, p2, 6)
    assert fresh.last_prefill_tokens == len(p2)
    assert ids2 == ref_ids and text2 == ref_text


def test_greedy_inside_the_decode_step_gives_the_same_reply(model_tok):
    """With a graph decoder (here run eagerly on the CPU) plain greedy decoding takes each next token from the
    step itself (GraphDecoder.greedy) instead of sampling its logits: same tokens, cache reuse included; with a
    penalty the logits path runs."""
    from model.graph import GraphDecoder
    model, tok = model_tok
    plain = Generator(model, tok, max_seq_len=128)
    inside = Generator(model, tok, max_seq_len=128)
    inside._graph = GraphDecoder(model, inside.cache, use_graphs=False)
    calls = {"greedy": 0}
    real = inside._graph.greedy

    def counted(*a, **k):
        calls["greedy"] += 1
        return real(*a, **k)
    inside._graph.greedy = counted
    p = tok.encode(PROMPTS[2])
    for prompt in (p, p + tok.encode(" return")):        # the second reuses the cache
        assert greedy_ids(inside, prompt, 7) == greedy_ids(plain, prompt, 7)
        assert inside.ids == plain.ids and inside.cache.length == plain.cache.length
    assert calls["greedy"] == 2 * 6                       # tokens 2..7 of each reply came from inside the step
    pen = GenerationSettings(SamplerSettings.greedy(repetition_penalty=1.3), max_new_tokens=5, stop_on_eos=False)
    assert not pen.sampler.plain_greedy
    ref = [t for d in plain.generate(p, pen) for t in d.token_ids]
    assert [t for d in inside.generate(p, pen) for t in d.token_ids] == ref
    assert calls["greedy"] == 12


def test_rewind(gen, tok):
    p = tok.encode(PROMPTS[1])
    a, text_a = greedy_ids(gen, p, 5)
    assert gen.cache.length == len(p) + 4
    gen.rewind(len(p))
    assert gen.cache.length == len(p) and gen.ids == p
    b, text_b = greedy_ids(gen, p, 5)
    assert gen.last_prefill_tokens == 1  # the prompt's last token is re-fed for its logits
    assert a == b and text_a == text_b


def test_cancel_from_another_thread(gen, tok):
    cancel = threading.Event()
    go = threading.Event()
    seen = {"n": 0, "at_cancel": None}

    def canceller():
        go.wait(30)
        seen["at_cancel"] = seen["n"]
        cancel.set()

    th = threading.Thread(target=canceller)
    th.start()
    deltas = []
    for d in gen.generate(PROMPTS[1], GenerationSettings(GREEDY, max_new_tokens=200, stop_on_eos=False), cancel):
        deltas.append(d)
        seen["n"] = d.n_tokens
        if d.n_tokens == 3:
            go.set()
            time.sleep(0.05)  # let the other thread set the event while we "render"
    th.join()
    assert deltas[-1].finish_reason == "cancelled"
    assert deltas[-1].n_tokens <= seen["at_cancel"] + 1
    assert gen.cache.length == len(gen.ids)
    # an event that is already set: nothing runs
    d = list(gen.generate(PROMPTS[0], GenerationSettings(GREEDY), cancel))
    assert [x.finish_reason for x in d] == ["cancelled"]


def test_context_overflow_never_crashes(model_tok):
    model, tok = model_tok
    g = Generator(model, tok, max_seq_len=32)
    long_prompt = [tok.bos_id] + tok.encode(" the quick brown fox jumps over the lazy dog," * 6)
    assert len(long_prompt) > 50
    d = list(g.generate(long_prompt, GenerationSettings(GREEDY, max_new_tokens=4, stop_on_eos=False)))
    assert d[-1].finish_reason == "length" and d[-1].n_tokens == 4
    assert d[-1].prompt_tokens == 28 and d[-1].dropped == len(long_prompt) - 28
    assert g.ids[0] == tok.bos_id and g.ids[1:28] == long_prompt[-27:]
    # max_new_tokens beyond the whole cache: the prompt keeps half, the reply gets the rest
    d = list(g.generate(long_prompt, GenerationSettings(GREEDY, max_new_tokens=500, stop_on_eos=False)))
    assert d[-1].prompt_tokens == 16 and d[-1].n_tokens == 16 and d[-1].finish_reason == "length"
    assert g.cache.length <= 32
    assert g.complete("", GenerationSettings(GREEDY, max_new_tokens=2)) is not None  # empty prompt
    assert len(g.generate_batch([long_prompt, "Hi"], GenerationSettings(GREEDY, max_new_tokens=4))) == 2


def test_seed_reproducibility(gen):
    s = GenerationSettings(SamplerSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1234),
                           max_new_tokens=8, stop_on_eos=False)
    a = gen.complete(PROMPTS[1], s)
    b = gen.complete(PROMPTS[1], s)
    assert a == b and len(a) > 0


def test_batch_equals_single_greedy(gen):
    s = GenerationSettings(GREEDY.replace(repetition_penalty=1.2), max_new_tokens=6, stop_on_eos=False)
    batch = gen.generate_batch(PROMPTS, s)
    single = [gen.complete(p, s) for p in PROMPTS]
    assert batch == single
    assert gen.last_batch_finish_reasons == ["length"] * 3


def test_beam_search(gen, tok):
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    s = GenerationSettings(GREEDY, max_new_tokens=8)
    greedy = gen.complete(chat, s)
    assert gen.beam_search(chat, s, beams=1) == greedy
    b3 = gen.beam_search(chat, s, beams=3)
    assert "Paris" in b3
    streamed = list(gen.beam_generate(chat, s, beams=2, beam_length=3))
    assert streamed[-1].finish_reason in ("eos", "length") and len(streamed) > 1  # sliding window streams
    assert "Paris" in "".join(d.text for d in streamed)


def test_choose(gen, tok):
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    prompt = chat + "The capital of France is"
    options = [" London", " Paris", " Berlin", " Madrid"]
    assert gen.choose(prompt, options) == " Paris"
    for opts in (["yes", "no"], ["A", "B", "C"], ["", "something"], ["Paris"]):
        assert gen.choose("Is Paris in France? Answer:", opts) in opts
    scores = gen.score_options(prompt, options)
    assert len(scores) == 4 and all(s < 0 for s in scores)


# ----------------------------------------------------------------------------------------------
# beam search, exactly, on the tiny random model (ids as text)
# ----------------------------------------------------------------------------------------------

class IdTokenizer:
    """Token ids spelled out as "[id]" (the tiny model has no vocabulary)."""
    bos_id, eos_ids, pad_id, add_bos_token, vocab_size = 1, [2], None, False, 96

    def encode(self, text, add_bos=False, special=True):
        return [int(x) for x in text.replace("[", " ").replace("]", " ").split()]

    def decode(self, ids, skip_special=False):
        return "".join(f"[{i}]" for i in ids)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Llama (tests/tiny.py's shape), written directly: no transformers import."""
    import json
    from safetensors.torch import save_file
    from tiny import TINY, load_ours
    folder = tmp_path_factory.mktemp("tiny")
    c = dict(TINY, architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu")
    (folder / "config.json").write_text(json.dumps(c))
    D, F, V, H, KV = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = D // H
    gen = torch.Generator().manual_seed(3)
    rnd = lambda *shape: torch.randn(*shape, generator=gen) * 0.08  # noqa: E731
    state = {"model.embed_tokens.weight": rnd(V, D), "model.norm.weight": torch.ones(D), "lm_head.weight": rnd(V, D)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state.update({p + "self_attn.q_proj.weight": rnd(H * hd, D), p + "self_attn.k_proj.weight": rnd(KV * hd, D),
                      p + "self_attn.v_proj.weight": rnd(KV * hd, D), p + "self_attn.o_proj.weight": rnd(D, H * hd),
                      p + "mlp.gate_proj.weight": rnd(F, D), p + "mlp.up_proj.weight": rnd(F, D),
                      p + "mlp.down_proj.weight": rnd(D, F), p + "input_layernorm.weight": torch.ones(D),
                      p + "post_attention_layernorm.weight": torch.ones(D)})
    save_file(state, str(folder / "model.safetensors"))
    return load_ours(folder, max_seq_len=64)


def test_beam_search_is_exact_over_two_steps(tiny):
    g = Generator(tiny, IdTokenizer())
    prompt = [1, 17, 33, 5, 60]
    with torch.inference_mode():
        lp1 = torch.log_softmax(tiny(torch.tensor([prompt]))[0, -1].double(), -1)
        firsts = torch.arange(96)
        x = torch.cat([torch.tensor([prompt]).expand(96, -1), firsts.view(96, 1)], 1)
        lp2 = torch.log_softmax(tiny(x)[:, -1].double(), -1)          # [t1, t2]
    total = lp1.view(96, 1) + lp2
    s = GenerationSettings(GREEDY, max_new_tokens=2, stop_on_eos=False)
    for K in (1, 3, 5):
        top = lp1.topk(K).indices
        sub = total[top]
        i = int(sub.argmax())
        expect = [int(top[i // 96]), i % 96]
        got = [t for d in g.beam_generate(prompt, s, beams=K) for t in d.token_ids]
        assert got == expect, K
    # the whole vocabulary as beams: the exact optimum
    i = int(total.argmax())
    assert [t for d in g.beam_generate(prompt, s, beams=96) for t in d.token_ids] == [i // 96, i % 96]
    # a one-token look-ahead commits the best next token each step: greedy
    s4 = GenerationSettings(GREEDY, max_new_tokens=6, stop_on_eos=False)
    assert g.beam_search(prompt, s4, beams=4, beam_length=1) == g.complete(prompt, s4)
