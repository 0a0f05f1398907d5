"""Tokenizer: one interface over HF `tokenizers` and `sentencepiece`.

Sources:
- `Tokenizer.from_gguf(path)`: the vocabulary stored in a GGUF file. `gpt2` (byte-level BPE) and
  `llama` (sentencepiece BPE with byte fallback) vocabularies become a `tokenizers.Tokenizer`.
- `Tokenizer.from_dir(dir)`: `tokenizer.json` (via `tokenizers`) or `tokenizer.model` (via
  `sentencepiece`), plus the JSON side files for special tokens and the chat template.

`StreamDecoder` turns a stream of token ids into text deltas that never split a UTF-8 character.

Heavy imports (tokenizers, sentencepiece, gguf, jinja2) happen inside the functions that need them,
so importing this module costs nothing.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

from .config import read_json_object

__all__ = ["Tokenizer", "TokenizerError", "StreamDecoder"]

SPIECE_SPACE = "\u2581"  # sentencepiece writes a space as "▁"
REPLACEMENT = "\ufffd"  # what a decoder yields for bytes that are not (yet) valid UTF-8

# GGUF token types (llama.cpp), same numbering as sentencepiece's piece types.
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6


class TokenizerError(ValueError):
    """A tokenizer could not be built or used; the message names the file or folder at fault."""


# --------------------------------------------------------------------------------------------
# Backends: the two libraries behind one small surface. Tokenizer adds the shared logic on top.
# --------------------------------------------------------------------------------------------

class _HFBackend:
    """A `tokenizers.Tokenizer`. BOS/EOS are handled by `Tokenizer`, so the post-processor is never run."""

    def __init__(self, tok):
        self.tok = tok
        self._literal = None  # clone that reads special-token text as plain text (special=False)
        self.special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str, special: bool) -> list[int]:
        if special:
            return self.tok.encode(text, add_special_tokens=False).ids
        if self._literal is None:
            # `encode_special_tokens` is a property of the tokenizer object; flipping it on the shared
            # instance would race with other threads, so keep a second instance with it set.
            from tokenizers import Tokenizer as _Tok
            lit = _Tok.from_str(self.tok.to_str())
            lit.encode_special_tokens = True
            self._literal = lit
        return self._literal.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def piece(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def token_to_id(self, s: str) -> int | None:
        return self.tok.token_to_id(s)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def adds_bos(self, bos_id: int | None) -> bool:
        """Whether the tokenizer.json post-processor would put BOS first (how Llama 3 asks for it)."""
        if bos_id is None:
            return False
        return self.tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]


class _SPBackend:
    """A sentencepiece model, plus tokens added on top of it (tokenizer_config's added_tokens_decoder).

    sentencepiece never reads control tokens (`<s>`) out of text, so special-token text is split off
    here first, and each plain segment is encoded on its own. sentencepiece gives every segment its
    dummy-prefix space, the same as HF's legacy Llama tokenizer and llama.cpp (space after a special).

    Decoding is done here from a per-id byte table rather than with `sp.decode`, because sp drops
    control tokens and we want to show them when asked; the rules mirror sp's: "▁" -> " ", byte
    pieces -> raw bytes, one leading space (the dummy prefix) removed from the whole text.
    """

    def __init__(self, path: Path, added: dict[int, tuple[str, bool]]):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a valid sentencepiece model ({e})") from e
        self.sp = sp
        n = sp.get_piece_size()
        self._pieces: list[str | None] = [sp.id_to_piece(i) for i in range(n)]
        self._bytes: list[bytes | None] = []
        self.special_ids: set[int] = set()
        for i, p in enumerate(self._pieces):
            if sp.is_byte(i):  # "<0xE2>"
                self._bytes.append(bytes([int(p[3:-1], 16)]))
            elif sp.is_control(i):
                self._bytes.append(p.encode())
                self.special_ids.add(i)
            elif sp.is_unknown(i):
                self._bytes.append(" \u2047 ".encode())  # how sentencepiece itself renders <unk>
            else:
                self._bytes.append(p.replace(SPIECE_SPACE, " ").encode())
        self._added: dict[str, int] = {}
        for i, (content, special) in sorted(added.items()):
            while len(self._bytes) <= i:  # ids past the sp model (e.g. a fine-tune's <|im_start|>)
                self._bytes.append(None)
                self._pieces.append(None)
            self._bytes[i], self._pieces[i] = content.encode(), content
            self._added[content] = i
            if special:
                self.special_ids.add(i)
            else:
                self.special_ids.discard(i)
        # Text that maps straight to one id: control pieces and added tokens, longest first.
        literal = {p: i for i, p in enumerate(self._pieces[:n]) if sp.is_control(i) and p}
        literal.update(self._added)
        self._literal_ids = literal
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(literal, key=len, reverse=True))) + ")") \
            if literal else None
        # Whether sp adds the dummy-prefix space (Llama: yes); then decode removes it again.
        self.add_dummy_prefix = bool(n) and "".join(sp.encode("a", out_type=str)).startswith(SPIECE_SPACE)

    def encode(self, text: str, special: bool) -> list[int]:
        if not special or self._split is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for k, part in enumerate(self._split.split(text)):
            if k % 2:  # odd parts are the captured special-token texts
                ids.append(self._literal_ids[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        table, n, skip = self._bytes, len(self._bytes), self.special_ids if skip_special else ()
        raw = b"".join(table[i] or b"" for i in ids if 0 <= i < n and i not in skip)
        text = raw.decode("utf-8", errors="replace")
        if self.add_dummy_prefix and text.startswith(" "):
            text = text[1:]
        return text

    def piece(self, i: int) -> str | None:
        return self._pieces[i] if 0 <= i < len(self._pieces) else None

    def token_to_id(self, s: str) -> int | None:
        if s in self._added:
            return self._added[s]
        i = self.sp.piece_to_id(s)
        return None if i == self.sp.unk_id() and s != self._pieces[i] else i

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)


# --------------------------------------------------------------------------------------------
# Building `tokenizers` objects from a GGUF vocabulary
# --------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# `tokenizer.ggml.pre` -> how text is split before BPE (llama.cpp's names). Unknown names fall back
# to GPT-2's split with a warning: close for most, but not exact.
_GGUF_PRE = {
    "default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2",  # ByteLevel(use_regex=True) is GPT-2's split
    "smollm": "digits+gpt2",  # SmolLM's tokenizer.json: Digits(individual) then ByteLevel(regex)
    "starcoder": "digits+gpt2",
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def _byte_level_pre_tokenizer(pre: str | None, source: str):
    from tokenizers import Regex, pre_tokenizers as pt

    kind = _GGUF_PRE.get(pre or "default")
    if kind is None:
        warnings.warn(f"{source}: unknown pre-tokenizer {pre!r}; using GPT-2's split, which may differ slightly")
        kind = "gpt2"
    if kind == "gpt2":
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "digits+gpt2":
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pt.Sequence([pt.Split(Regex(kind), behavior="isolated"),
                        pt.ByteLevel(add_prefix_space=False, use_regex=False)])


def _unique_tokens(tokens: list[str]) -> list[str]:
    """BPE vocabularies are dicts, so a duplicated string would leave an id without a token; rename repeats."""
    seen: set[str] = set()
    out = []
    for i, t in enumerate(tokens):
        if t in seen:
            t = f"<dup_{i}>"
        seen.add(t)
        out.append(t)
    return out


def _add_gguf_added_tokens(tok, tokens: list[str], types: list[int]) -> None:
    """Control tokens become special added tokens (matched whole in text, skippable on decode);
    user-defined ones become plain added tokens (matched whole, always shown). Both keep their ids,
    since their text is already in the vocabulary."""
    from tokenizers import AddedToken

    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == TT_CONTROL and t]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == TT_USER_DEFINED and t]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)


def _gguf_gpt2(tokens: list[str], types: list[int], merges: list[str], pre: str | None, source: str):
    from tokenizers import Tokenizer as _Tok, decoders, models

    spell = _bytes_to_unicode()
    alphabet = set(spell.values())
    vocab: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        # Normal tokens are spelled in the byte alphabet; re-spell the odd one that is not (as transformers does).
        if ty not in (TT_CONTROL, TT_USER_DEFINED) and not set(t) <= alphabet:
            t = "".join(spell[b] for b in t.encode())
        vocab.setdefault(t, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = _Tok(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = _byte_level_pre_tokenizer(pre, source)
    tok.decoder = decoders.ByteLevel()
    _add_gguf_added_tokens(tok, tokens, types)
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """sentencepiece BPE merges the adjacent pair whose union scores best; a GGUF keeps only the
    scores, so list every split of every token into two vocabulary tokens, best union first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for t, score in zip(tokens, scores):
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in vocab and right in vocab:
                found.append((-score, vocab[left], vocab[right], left, right))
    found.sort()
    return [(f[3], f[4]) for f in found]


def _gguf_llama(tokens: list[str], types: list[int], scores: list[float], unk_id: int | None, add_space: bool):
    from tokenizers import Tokenizer as _Tok, decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(tokens)}
    # Only normal tokens take part in merges; control/byte tokens must never be formed from text.
    mergeable = [t if ty in (TT_NORMAL, TT_USER_DEFINED) else "" for t, ty in zip(tokens, types)]
    merges = _merges_from_scores(mergeable, scores)
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tok = _Tok(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # A normalizer rather than Metaspace: Metaspace skips the prefix when text already starts with a
    # space, sentencepiece does not (" hi" -> "▁▁hi"). Normalizers run per segment between added
    # tokens, which gives each segment its prefix like sentencepiece does.
    norm = [normalizers.Replace(" ", SPIECE_SPACE)]
    if add_space:
        norm.insert(0, normalizers.Prepend(SPIECE_SPACE))
    tok.normalizer = normalizers.Sequence(norm)
    tok.pre_tokenizer = None
    dec = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    _add_gguf_added_tokens(tok, tokens, types)
    return tok


# --------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------

def _compile_template(source: str):
    """Compile a model's chat template the way transformers does, in a sandbox (it comes from a file)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # `{% generation %}` marks assistant text for training masks; rendering ignores it.
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------

class Tokenizer:
    """Text <-> token ids for one model. Build with `from_gguf` or `from_dir`.

    Attributes: `bos_id`, `eos_ids`, `pad_id` (int or None; eos_ids a list), `vocab_size`,
    `chat_template` (str or None), `add_bos_token` (whether the model expects BOS before a prompt;
    `encode` only adds it when asked), `special_ids`, `source` (the file or folder it came from).
    """

    def __init__(self, backend, *, bos_id: int | None, eos_ids: Sequence[int], pad_id: int | None,
                 chat_template: str | None, add_bos_token: bool, source: str,
                 token_strings: dict[str, str | None] | None = None):
        self._b = backend
        self.bos_id = None if bos_id is None else int(bos_id)
        self.eos_ids = list(dict.fromkeys(int(i) for i in eos_ids))
        self.pad_id = None if pad_id is None else int(pad_id)
        self.chat_template = chat_template or None
        self.add_bos_token = add_bos_token
        self.source = source
        self.special_ids = frozenset(backend.special_ids)
        self._compiled = None
        ts = dict(token_strings or {})
        for name, i in (("bos_token", self.bos_id), ("eos_token", self.eos_ids[0] if self.eos_ids else None),
                        ("pad_token", self.pad_id)):
            if ts.get(name) is None and i is not None:
                ts[name] = backend.piece(i)
        self._token_strings = ts

    def __repr__(self):
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_ids})"

    # ---- core ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._b.vocab_size

    def encode(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        """Token ids for `text`. `special`: text like `<|im_start|>` maps to its id (else it is spelled
        out as ordinary text, which is what user-typed content should get). `add_bos` prepends BOS unless
        the text already starts with it (a chat template that writes `<s>` itself), or the model has none."""
        ids = self._b.encode(text, special)
        if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text for `ids`; bytes that do not form valid UTF-8 come out as U+FFFD. Ids outside the
        vocabulary (a model's padded logits) decode to nothing."""
        ids = [int(i) for i in ids]
        return self._b.decode([i for i in ids if i >= 0], skip_special)  # -1 is a common padding marker

    def piece(self, token_id: int) -> str:
        """The vocabulary entry for an id as stored (byte-level `Ġthe`, sentencepiece `▁the`, `<0xE2>`)."""
        p = self._b.piece(int(token_id)) if int(token_id) >= 0 else None
        if p is None:
            raise IndexError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return p

    def token_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary entry (e.g. '<|im_end|>'), or None."""
        return self._b.token_to_id(piece)

    # ---- chat ----------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text for a conversation, rendered with the model's own template. Encode the
        result with `add_bos=False` when the template writes BOS itself (most do)."""
        if not self.chat_template:
            raise TokenizerError(f"{self.source}: this model has no chat template; format the prompt yourself")
        import jinja2

        if self._compiled is None:
            try:
                self._compiled = _compile_template(self.chat_template)
            except jinja2.TemplateError as e:
                raise TokenizerError(f"{self.source}: the chat template does not compile: {e}") from e
        values = {**self._token_strings, **kwargs}
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **values)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"{self.source}: chat template error: {e}") from e

    # ---- constructors --------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path_or_reader) -> "Tokenizer":
        """From a GGUF file's own vocabulary. Accepts a path or an open reader (model/gguf_file.py's GGUFFile,
        or gguf-py's GGUFReader; the model loader already has one)."""
        from .gguf_file import GGUFFile

        if isinstance(path_or_reader, (str, os.PathLike)):
            source = str(path_or_reader)
            if not os.path.isfile(source):
                raise TokenizerError(f"{source}: no such GGUF file")
            try:
                reader = GGUFFile(source)
            except Exception as e:  # the reader raises ValueError/struct.error/... on a bad file
                raise TokenizerError(f"{source}: not a readable GGUF file ({e})") from e
        else:
            reader = path_or_reader
            source = str(getattr(reader, "path", "GGUF file"))

        def field(key, default=None):
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        kind = field("tokenizer.ggml.model")
        tokens = field("tokenizer.ggml.tokens")
        if not kind or not tokens:
            raise TokenizerError(f"{source}: the GGUF file has no tokenizer vocabulary (tokenizer.ggml.*)")
        types = field("tokenizer.ggml.token_type") or [TT_NORMAL] * len(tokens)
        if kind == "gpt2":
            merges = field("tokenizer.ggml.merges")
            if not merges:
                raise TokenizerError(f"{source}: byte-level BPE vocabulary without tokenizer.ggml.merges")
            tokens = _unique_tokens(tokens)
            tok = _gguf_gpt2(tokens, types, merges, field("tokenizer.ggml.pre"), source)
            add_bos_default = False
        elif kind == "llama":
            scores = field("tokenizer.ggml.scores")
            if not scores:
                raise TokenizerError(f"{source}: sentencepiece vocabulary without tokenizer.ggml.scores")
            tokens = _unique_tokens(tokens)
            tok = _gguf_llama(tokens, types, scores, field("tokenizer.ggml.unknown_token_id"),
                              bool(field("tokenizer.ggml.add_space_prefix", True)))
            add_bos_default = True  # llama.cpp's default for sentencepiece vocabularies
        else:
            raise TokenizerError(f"{source}: tokenizer type {kind!r} is not supported (only 'gpt2' and 'llama')")

        eos = field("tokenizer.ggml.eos_token_id")
        # Some chat models also name an end-of-turn token (e.g. <|eot_id|>); generation stops on both.
        eot = field("tokenizer.ggml.eot_token_id")
        return cls(_HFBackend(tok),
                   bos_id=field("tokenizer.ggml.bos_token_id"),
                   eos_ids=[i for i in (eos, eot) if i is not None],
                   pad_id=field("tokenizer.ggml.padding_token_id"),
                   chat_template=field("tokenizer.chat_template"),
                   add_bos_token=bool(field("tokenizer.ggml.add_bos_token", add_bos_default)),
                   source=source)

    @classmethod
    def from_dir(cls, folder) -> "Tokenizer":
        """From a model folder: tokenizer.json (tokenizers) or else tokenizer.model (sentencepiece), with
        tokenizer_config.json, special_tokens_map.json, generation_config.json and config.json if present."""
        d = Path(folder)
        if not d.is_dir():
            raise TokenizerError(f"{d}: not a folder")
        cfg = _read_json(d / "tokenizer_config.json")
        smap = _read_json(d / "special_tokens_map.json")
        gen = _read_json(d / "generation_config.json")
        mcfg = _read_json(d / "config.json")

        if (d / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as _Tok
            try:
                backend = _HFBackend(_Tok.from_file(str(d / "tokenizer.json")))
            except Exception as e:  # tokenizers raises a bare Exception for bad JSON or schema
                raise TokenizerError(f"{d / 'tokenizer.json'}: malformed tokenizer.json ({e})") from e
        elif (d / "tokenizer.model").is_file():
            added = {}
            for k, v in (cfg.get("added_tokens_decoder") or {}).items():
                if isinstance(v, dict) and str(k).isdigit() and v.get("content"):
                    added[int(k)] = (v["content"], bool(v.get("special", True)))
            backend = _SPBackend(d / "tokenizer.model", added)
        else:
            raise TokenizerError(f"{d}: no tokenizer.json or tokenizer.model in this folder")

        def token_id(name):  # a special token named in tokenizer_config / special_tokens_map
            for src in (cfg, smap):
                s = _token_str(src.get(name))
                if s is not None and backend.token_to_id(s) is not None:
                    return backend.token_to_id(s), s
            return None, None

        bos_id, bos_s = token_id("bos_token")
        eos_id, eos_s = token_id("eos_token")
        pad_id, pad_s = token_id("pad_token")
        eos_ids = [eos_id] if eos_id is not None else []
        for src in (gen, mcfg):  # int or list; Llama 3 lists <|end_of_text|>, <|eom_id|>, <|eot_id|>
            v = src.get("eos_token_id")
            eos_ids += [v] if isinstance(v, int) else [i for i in (v or []) if isinstance(i, int)]
        if bos_id is None:
            bos_id = next((src["bos_token_id"] for src in (gen, mcfg) if isinstance(src.get("bos_token_id"), int)), None)
        if pad_id is None:
            pad_id = next((src["pad_token_id"] for src in (gen, mcfg) if isinstance(src.get("pad_token_id"), int)), None)
        if isinstance(backend, _SPBackend):  # last resort: the ids the sentencepiece model declares
            sp = backend.sp
            bos_id = bos_id if bos_id is not None else (sp.bos_id() if sp.bos_id() >= 0 else None)
            eos_ids = eos_ids or ([sp.eos_id()] if sp.eos_id() >= 0 else [])
            pad_id = pad_id if pad_id is not None else (sp.pad_id() if sp.pad_id() >= 0 else None)

        add_bos = cfg.get("add_bos_token")
        if not isinstance(add_bos, bool):
            # sentencepiece Llama 1/2 want BOS; a tokenizer.json says so through its post-processor.
            add_bos = True if isinstance(backend, _SPBackend) else backend.adds_bos(bos_id)

        return cls(backend, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id,
                   chat_template=_chat_template(d, cfg), add_bos_token=add_bos, source=str(d),
                   token_strings={"bos_token": bos_s, "eos_token": eos_s, "pad_token": pad_s,
                                  "unk_token": _token_str(cfg.get("unk_token") or smap.get("unk_token"))})


def _read_json(path: Path) -> dict:
    """A JSON side file as a dict ({} when absent); TokenizerError naming the file when malformed."""
    if not path.is_file():
        return {}
    return read_json_object(path, TokenizerError)


def _token_str(v) -> str | None:
    """Special tokens are written as "<s>" or {"content": "<s>", ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) and v else None


def _chat_template(d: Path, cfg: dict) -> str | None:
    # Newer transformers saves the template as its own file; it takes precedence, as in transformers.
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    t = cfg.get("chat_template") or _read_json(d / "chat_template.json").get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) and t else None


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------

class StreamDecoder:
    """Token ids in, text deltas out; the deltas joined equal `tokenizer.decode(all ids)`.

    Each push decodes a short window: tokens already shown (the prefix) plus the new ones. The
    delta is what the window's text gained over the prefix text. Decoding with the prefix keeps
    context the new token needs: sentencepiece drops the leading space of a text's first piece, so
    a new token must never be first in its window. When the window text ends in U+FFFD, the
    last token stopped mid-character: nothing is emitted until the rest of the bytes arrive.
    """

    # A UTF-8 character has at most 4 bytes and every token brings at least one, so text still
    # broken after this many tokens is invalid, not incomplete: emit it as U+FFFD and move on.
    MAX_PENDING = 8

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.reset()

    def reset(self) -> None:
        self._ids: list[int] = []  # window: ids[:read] are shown, ids[read:] pending
        self._read = 0
        self._prefix = ""  # decode(ids[:read])

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self.tokenizer.decode(self._ids, self.skip_special)
        if text.endswith(REPLACEMENT) and len(self._ids) - self._read < self.MAX_PENDING:
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character comes out as U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        return self._emit(self.tokenizer.decode(self._ids, self.skip_special))

    def _emit(self, text: str) -> str:
        if text.startswith(self._prefix):
            delta = text[len(self._prefix):]
        else:  # not seen with the decoders we build; emit what differs rather than fail
            delta = text[len(os.path.commonprefix([text, self._prefix])):]
        # Slide the window to start at the tokens shown just now, if they make text on their own
        # (a lone "▁" or a skipped special token decodes to "", and would then hide the next
        # token's leading space); otherwise keep the older start.
        tail = self._ids[self._read:]
        tail_text = self.tokenizer.decode(tail, self.skip_special)
        if tail_text and not tail_text.startswith(REPLACEMENT):
            self._ids, self._prefix = tail, tail_text
        else:
            self._prefix = text
        self._read = len(self._ids)
        return delta
