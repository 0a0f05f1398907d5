"""The engine the chat server drives: model + tokenizer + generator, one generation at a time.

`Engine` serialises use of the generator with a FIFO line: a request `join`s the line with a ticket,
polls `position(ticket)` (0 = it holds the engine, 1 = next, ...) so that it can tell its client where
it stands, and `leave`s when done (always, in a `finally`). Only the ticket at the head may call
`generate` / `choose`. Token counting (for context bookkeeping) needs no turn: it only uses the
tokenizer, behind its own lock, with a small cache.

Nothing is loaded at import; `Engine.load(path, runtime)` loads a model (webui/app.py does that before
serving), tests build one from an already loaded (model, tokenizer) or pass a fake generator.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator


class QueueFull(Exception):
    """More requests are waiting than the engine's line allows."""


class Engine:
    def __init__(self, model, tokenizer, generator=None, *, name: str | None = None,
                 max_waiting: int = 64, count_cache: int = 4096):
        self.model, self.tokenizer = model, tokenizer
        if generator is None:
            from model.generator import Generator
            generator = Generator(model, tokenizer)
        self.generator = generator
        self.max_seq_len = int(getattr(generator, "max_seq_len", None)
                               or getattr(getattr(model, "runtime", None), "max_seq_len", 2048))
        source = getattr(model, "source", None)
        self.name = name or (Path(source).name if source else type(model).__name__)
        self.path = source
        self.max_waiting = max_waiting
        self._line: list[object] = []
        self._cond = threading.Condition()
        self._tok_lock = threading.Lock()
        self._counts: OrderedDict[bytes, int] = OrderedDict()
        self._count_cache = count_cache
        pieces = []
        for i in sorted(getattr(tokenizer, "special_ids", ()) or ()):
            try:
                p = tokenizer.decode([i])
            except Exception:  # noqa: BLE001 - an odd vocabulary entry is just not defanged
                continue
            if len(p) >= 2 and p.strip() == p:
                pieces.append(p)
        self._special_pieces = sorted(set(pieces), key=len, reverse=True)

    @classmethod
    def load(cls, path: str | None = None, runtime=None, progress=True) -> "Engine":
        from model.loader import load
        model, tokenizer = load(path, runtime, progress=progress)
        return cls(model, tokenizer)

    @classmethod
    def from_args(cls, args) -> "Engine":
        """The engine as the command line describes it, LoRA adapters included."""
        from benchmark import load_from_args
        model, tokenizer, _ = load_from_args(args)
        return cls(model, tokenizer)

    def adapters(self) -> list[str]:
        """Names of the loaded LoRA adapters (what participants may choose)."""
        return sorted(getattr(self.model, "lora_adapters", {}) or {})

    # ---- the line ------------------------------------------------------------------------------

    def join(self) -> object:
        """Enter the line; returns a ticket. QueueFull when too many are waiting."""
        ticket = object()
        with self._cond:
            if len(self._line) > self.max_waiting:
                raise QueueFull(f"{len(self._line) - 1} generations are already waiting")
            self._line.append(ticket)
        return ticket

    def position(self, ticket: object, wait: float = 0.0) -> int:
        """0 when `ticket` holds the engine, else its place in the line (1 = next). With `wait`,
        blocks up to that many seconds for a change first."""
        with self._cond:
            pos = self._line.index(ticket)
            if pos and wait > 0:
                self._cond.wait(wait)
                pos = self._line.index(ticket)
            return pos

    def leave(self, ticket: object) -> None:
        with self._cond:
            if ticket in self._line:
                self._line.remove(ticket)
                self._cond.notify_all()

    def wake(self) -> None:
        """Let waiters re-check (e.g. a cancel flag)."""
        with self._cond:
            self._cond.notify_all()

    @property
    def busy(self) -> bool:
        return bool(self._line)

    @property
    def waiting(self) -> int:
        return max(0, len(self._line) - 1)

    # ---- model calls (only for the ticket at the head of the line) ------------------------------

    def generate(self, prompt: str, settings, cancel: threading.Event | None = None) -> Iterator[Any]:
        return self.generator.generate(prompt, settings, cancel=cancel)

    def choose(self, prompt: str, options: list[str], lora: str | None = None) -> str:
        if lora is None:
            return self.generator.choose(prompt, options)
        return self.generator.choose(prompt, options, lora=lora)

    def generation_settings(self, **kw):
        from model.generator import GenerationSettings
        from model.sampler import SamplerSettings
        sampler = kw.pop("sampler", None)
        if isinstance(sampler, dict):
            sampler = SamplerSettings(**sampler)
        return GenerationSettings(sampler=sampler or SamplerSettings(), **kw)

    # ---- tokens --------------------------------------------------------------------------------

    def count(self, text: str) -> int:
        """Tokens of `text` (no BOS), cached by content."""
        key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        with self._tok_lock:
            n = self._counts.get(key)
            if n is not None:
                self._counts.move_to_end(key)
                return n
            n = len(self.tokenizer.encode(text, add_bos=False))
            self._counts[key] = n
            if len(self._counts) > self._count_cache:
                self._counts.popitem(last=False)
            return n

    def prompt_tokens(self, prompt: str) -> int:
        """Exact length of a whole prompt as the generator will feed it."""
        enc = getattr(self.generator, "encode", None)
        with self._tok_lock:
            if enc is not None:
                return len(enc(prompt))
            return len(self.tokenizer.encode(prompt, add_bos=False))

    def encode_prompt(self, prompt: str, fmt: str = "raw") -> list[int]:
        """Prompt text -> the exact ids to generate from. The raw format is plain text: text that looks
        like a special token (`<|im_end|>` typed by a user) stays text. A chat-template prompt needs
        its special tokens (message contents were passed through `defang` first)."""
        add_bos = bool(getattr(self.tokenizer, "add_bos_token", False))
        with self._tok_lock:
            return self.tokenizer.encode(prompt, add_bos=add_bos, special=(fmt == "chat"))

    def defang(self, text: str) -> str:
        """Break up special-token strings in message content (they would become control tokens when
        the chat-template prompt is encoded with special tokens on)."""
        for piece in self._special_pieces:
            if piece in text:
                text = text.replace(piece, piece[0] + "\u200b" + piece[1:])
        return text

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        with self._tok_lock:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def info(self) -> dict:
        runtime = getattr(self.model, "runtime", None)
        dev = getattr(self.model, "device", None)
        dt = getattr(self.model, "dtype", None)
        return {"name": self.name, "path": self.path, "max_seq_len": self.max_seq_len,
                "device": str(dev) if dev is not None else getattr(runtime, "device", None),
                "dtype": str(dt).replace("torch.", "") if dt is not None else getattr(runtime, "dtype", None),
                "vocab_size": getattr(self.tokenizer, "vocab_size", None),
                "chat_template": self.has_chat_template, "busy": self.busy, "queue": self.waiting,
                "adapters": self.adapters(), "remote": None, "token_count": "exact",
                "constrained_choice": self.constrained_choice, "notice": None}

    # The engine interface the chat and the API use (webui/remote.py: RemoteEngine is the other one):
    # join/position/leave/wake/busy/waiting, generate, choose (when constrained_choice), generation_settings,
    # count, prompt_tokens, encode_prompt (None: no tokenizer, the text goes as it is), defang,
    # has_chat_template, chat_template, info, adapters, name, max_seq_len.
    constrained_choice = True      # choose() works (turn order "model")


def no_model_info() -> dict:
    return {"name": None, "path": None, "max_seq_len": 0, "device": None, "dtype": None, "vocab_size": None,
            "chat_template": False, "busy": False, "queue": 0, "adapters": [], "remote": None,
            "token_count": None, "constrained_choice": False, "notice": None}
