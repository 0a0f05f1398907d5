"""Tokenizer tests: the embedded GGUF vocabulary checked against transformers, a small sentencepiece
model trained on Botchan (folder and GGUF forms), StreamDecoder, and clear errors for bad input."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from model.embedded import embedded_gguf_path
from model.tokenizer import StreamDecoder, Tokenizer, TokenizerError

ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    "Hello, world! This is a test.",
    "12345 and 3.14159, 2024-01-02, x=1000000",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Emoji: 😀👍🏽 🇯🇵 and a family 👨‍👩‍👧",
    "日本語のテキストと中文文本，한국어도.",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces,\ttabs\n\nand trailing   ",
    "naïve café — “quotes” ±½",
]
CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? 😀"}],
]


def stream(tok, ids, **kw):
    sd = StreamDecoder(tok, **kw)
    deltas = [sd.push(i) for i in ids]
    deltas.append(sd.flush())
    return deltas


# ---- the embedded model (byte-level BPE from GGUF) vs transformers -----------------------------

@pytest.fixture(scope="module")
def gguf_path():
    return embedded_gguf_path()


@pytest.fixture(scope="module")
def smol(gguf_path):
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def hf_smol(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))


def test_embedded_path_and_attributes(gguf_path, smol, hf_smol):
    assert os.path.isfile(gguf_path)
    assert smol.vocab_size == len(hf_smol) == 49152
    assert (smol.bos_id, smol.eos_ids, smol.pad_id) == (1, [2], 2)
    assert smol.add_bos_token is False
    assert smol.piece(2) == "<|im_end|>" and smol.token_to_id("<|im_start|>") == 1
    assert smol.piece(19556) == hf_smol.convert_ids_to_tokens(19556)
    assert {0, 1, 2} <= smol.special_ids
    with pytest.raises(IndexError):
        smol.piece(10**6)
    assert smol.decode([19556, 10**6, -1, 216]) == "Hello "  # padded-logit ids and -1 padding decode to nothing


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_encode_decode_matches_transformers(smol, hf_smol, text):
    ids = smol.encode(text)
    assert ids == hf_smol.encode(text, add_special_tokens=False)
    assert smol.decode(ids) == text == hf_smol.decode(ids)
    assert smol.decode(ids, skip_special=True) == hf_smol.decode(ids, skip_special_tokens=True)


def test_gguf_digits_split_individually(smol):
    # smollm pre-tokenizer: every digit is its own token.
    assert [smol.piece(i) for i in smol.encode("12345")] == list("12345")


def test_gguf_special_flag_and_bos(smol):
    text = "<|im_start|>user\nHi<|im_end|>"
    assert smol.encode(text)[0] == 1 and smol.encode(text)[-1] == 2
    literal = smol.encode(text, special=False)
    assert not set(literal) & smol.special_ids
    assert smol.decode(literal) == text
    assert smol.encode("Hi", add_bos=True)[0] == smol.bos_id
    assert smol.encode(text, add_bos=True).count(smol.bos_id) == 1  # no double BOS


@pytest.mark.parametrize("messages", CHATS)
def test_chat_template_matches_transformers(smol, hf_smol, messages):
    for gen in (True, False):
        ours = smol.apply_chat_template(messages, add_generation_prompt=gen)
        assert ours == hf_smol.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert ours.startswith("<|im_start|>")


def test_stream_decoder_gguf(smol):
    for text in TEXTS:
        ids = smol.encode(text)
        deltas = stream(smol, ids)
        assert "".join(deltas) == smol.decode(ids) == text
        assert not any("\ufffd" in d for d in deltas)
    # Make sure the case was exercised: an emoji split over byte-level tokens is held back.
    ids = smol.encode("😀")
    assert len(ids) > 1 and stream(smol, ids)[:len(ids)] == [""] * (len(ids) - 1) + ["😀"]
    # skip_special streaming equals skip_special decode.
    ids = smol.encode(TEXTS[5])
    assert "".join(stream(smol, ids, skip_special=True)) == smol.decode(ids, skip_special=True)


def test_from_dir_tokenizer_json(smol, tmp_path):
    """A tokenizer.json folder (the SmolLM/Llama 3 layout), with side files naming special tokens."""
    smol._b.tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "pad_token": None,
        "chat_template": smol.chat_template}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0, "bos_token_id": 1}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size) == (1, [2, 0], smol.vocab_size)
    assert tok.add_bos_token is False
    for text in TEXTS:
        assert tok.encode(text) == smol.encode(text)
    assert tok.apply_chat_template(CHATS[1]) == smol.apply_chat_template(CHATS[1])


# ---- sentencepiece (Llama 1/2 style), trained here on Botchan ------------------------------------

@pytest.fixture(scope="module")
def botchan():
    path = ROOT / "data" / "botchan.txt"
    if not path.exists():
        spec = importlib.util.spec_from_file_location("fetch_botchan", ROOT / "tools" / "fetch_botchan.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.fetch(path)
    return path


@pytest.fixture(scope="module")
def sp_dir(botchan, tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("spm")
    # Llama's settings: BPE, byte fallback, no normalization, whitespace kept as is.
    spm.SentencePieceTrainer.train(
        input=str(botchan), model_prefix=str(d / "tokenizer"), vocab_size=1000, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, num_threads=2, minloglevel=2)
    (d / "tokenizer.vocab").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        # a fine-tune's extra token past the sentencepiece vocabulary
        "added_tokens_decoder": {"1000": {"content": "<|im_start|>", "special": True}},
        "chat_template": "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"}))
    return d


@pytest.fixture(scope="module")
def sp_tok(sp_dir):
    return Tokenizer.from_dir(sp_dir)


@pytest.fixture(scope="module")
def sp_raw(sp_dir):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))


SP_TEXTS = ["Hello world", " leading space", "two  spaces and a tab\there", "line one\n line two\n",
            "I said, \"Botchan!\" 123", "Emoji 😀 and CJK 日本", "trailing space "]


def test_sp_attributes(sp_tok):
    assert (sp_tok.bos_id, sp_tok.eos_ids, sp_tok.pad_id) == (1, [2], None)
    assert sp_tok.add_bos_token is True and sp_tok.vocab_size == 1001
    assert sp_tok.piece(1000) == "<|im_start|>" and sp_tok.token_to_id("<|im_start|>") == 1000
    assert sp_tok.token_to_id("no such piece at all") is None


@pytest.mark.parametrize("text", SP_TEXTS)
def test_sp_round_trip(sp_tok, sp_raw, text):
    ids = sp_tok.encode(text)
    assert ids == sp_raw.encode(text)
    assert sp_tok.decode(ids) == text == sp_raw.decode(ids)
    assert sp_tok.encode(text, add_bos=True) == [1] + ids
    deltas = stream(sp_tok, [1] + ids, skip_special=True)
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)


def test_sp_byte_fallback(sp_tok):
    ids = sp_tok.encode("😀")
    assert [sp_tok.piece(i) for i in ids[-4:]] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    deltas = stream(sp_tok, sp_tok.encode("a 😀 b"))
    assert "".join(deltas) == "a 😀 b" and "😀" in deltas and not any("\ufffd" in d for d in deltas)


def test_sp_stream_keeps_leading_spaces(sp_tok):
    text = "the cat sat on  the mat"
    ids = sp_tok.encode(text)
    deltas = stream(sp_tok, ids)
    assert "".join(deltas) == text
    # Word-initial pieces ("▁sat") come out with their space, as in a chat UI.
    assert " sat" in deltas or " s" in deltas
    # A lone "▁" piece must not swallow the space of the next token.
    lone = sp_tok.token_to_id("\u2581")
    ids = [sp_tok.token_to_id("\u2581the"), lone, lone, sp_tok.token_to_id("\u2581the")]
    assert "".join(stream(sp_tok, ids)) == sp_tok.decode(ids) == "the   the"


def test_sp_special_tokens(sp_tok):
    ids = sp_tok.encode("<s><|im_start|>Hi</s>")
    assert ids[:2] == [1, 1000] and ids[-1] == 2
    assert sp_tok.decode(ids) == "<s><|im_start|> Hi</s>"  # each segment gets its prefix space, as in sentencepiece
    assert sp_tok.decode(ids, skip_special=True) == "Hi"
    assert not {1, 2, 1000} & set(sp_tok.encode("<s><|im_start|>Hi</s>", special=False))
    prompt = sp_tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == "<s><|im_start|>Hi"
    assert sp_tok.encode(prompt, add_bos=True) == ids[:-1]


def test_gguf_llama_vocab_matches_sentencepiece(sp_dir, sp_tok, sp_raw, tmp_path):
    """A `llama` (sentencepiece) GGUF vocabulary built from the same model must tokenize the same."""
    gguf = pytest.importorskip("gguf")
    n = sp_raw.get_piece_size()
    types = [2 if sp_raw.is_unknown(i) else 3 if sp_raw.is_control(i) else 6 if sp_raw.is_byte(i) else 1
             for i in range(n)]
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp_raw.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp_raw.get_score(i) for i in range(n)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = Tokenizer.from_gguf(path)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos_token, tok.chat_template) == (1, [2], True, None)
    for text in SP_TEXTS + [botchan_sample(), "<s>Hi</s> there"]:
        ids = tok.encode(text)
        assert ids == sp_tok.encode(text), text
        assert tok.decode(ids) == sp_tok.decode(ids)
        assert "".join(stream(tok, ids)) == tok.decode(ids)
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template(CHATS[0])


def botchan_sample() -> str:
    return (ROOT / "data" / "botchan.txt").read_text(encoding="utf-8")[5000:7000]


def test_chat_template_helpers(sp_dir, tmp_path):
    """transformers' template helpers: tojson, raise_exception, {% generation %}, loop controls."""
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    template = ("{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
                "{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
                "{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}{{ tools | tojson }}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tok = Tokenizer.from_dir(tmp_path)
    out = tok.apply_chat_template([{"role": "user", "content": "é"}, {"role": "skip", "content": "x"}], tools=[1])
    assert out == '{"role": "user", "content": "é"}[1]'
    with pytest.raises(TokenizerError, match="no bad roles"):
        tok.apply_chat_template([{"role": "bad", "content": ""}])


# ---- errors ---------------------------------------------------------------------------------------

def test_errors_name_the_file(tmp_path, sp_dir):
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        Tokenizer.from_dir(tmp_path)  # empty folder
    with pytest.raises(TokenizerError, match="not a folder"):
        Tokenizer.from_dir(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{ this is not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(TokenizerError, match="does not compile"):
        Tokenizer.from_dir(tmp_path).apply_chat_template(CHATS[0])
    (tmp_path / "bad.gguf").write_bytes(b"GGUF but not really")
    with pytest.raises(TokenizerError, match="bad.gguf"):
        Tokenizer.from_gguf(tmp_path / "bad.gguf")
    with pytest.raises(TokenizerError, match="no such GGUF"):
        Tokenizer.from_gguf(tmp_path / "none.gguf")
    assert issubclass(TokenizerError, ValueError)
