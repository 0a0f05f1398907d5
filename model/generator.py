"""Text generation on top of `LlamaModel`: prefill, decode, stop conditions, cache reuse.

    gen = Generator(model, tokenizer)
    for d in gen.generate("Once upon a time", GenerationSettings(max_new_tokens=64)):
        print(d.text, end="", flush=True)          # d.finish_reason is set on the last delta
    gen.complete(prompt, settings) -> str          # the same, joined
    gen.generate_batch([p1, p2], settings) -> [str, str]
    gen.beam_search(prompt, settings, beams=4, beam_length=0) -> str
    gen.choose(prompt, ["Alice", "Bob"]) -> "Bob"

The pieces are small functions: `_prefill` (cache reuse + chunked forward), `_forward` (one forward
that keeps `ids` in step with the cache), `Sampler.sample` for the next token, and `TextStream`
(streaming detokenisation with stop strings held back). `generate` strings them together.

Semantics, in one place:

* **Cache reuse.** The generator owns a batch-1 `KVCache` and `ids`, the token ids whose K/V are in
  it (always ``len(ids) == cache.length``). A new prompt that shares a prefix with `ids` keeps that
  prefix and prefills only the rest; `last_prefill_tokens` / `last_reused_tokens` say how many.
  At least one prompt token is always fed, because its logits choose the first new token (so a
  prompt that is entirely in the cache costs one token). `rewind(n)` keeps the first n tokens
  (``cache.truncate``). Changing `settings.lora` drops the cache (its K/V belong to the adapter).
* **After a generation** the cache holds the prompt plus every accepted token except the last one
  sampled: that token's K/V would cost a forward pass no one may need; a follow-up prompt that
  continues the text simply prefills it. An EOS token is never fed.
* **Stop conditions**, checked after every token: an EOS id (``tokenizer.eos_ids``, one or
  several; ``stop_on_eos``) -> "eos"; a stop string in the text -> "stop" (the reply ends right
  before it); ``break_on_newline``: a newline after the reply's first non-blank character ->
  "newline" (the reply ends before it; leading blank lines are kept); ``max_new_tokens`` sampled ->
  "length"; the cancel event -> "cancelled". Text that could be the *start* of a stop string is held
  back until it either completes the stop string (then it is dropped) or stops matching (then it is
  streamed); text is never streamed and then retracted. Detokenisation goes through
  `StreamDecoder`, so a character split over several byte tokens comes out whole, and stop
  strings are matched on text, across token and UTF-8 boundaries.
* **Context overflow.** When prompt + max_new_tokens exceeds the cache (`max_seq_len`), the oldest
  prompt tokens are dropped (a leading BOS is kept) so that the reply fits; the prompt keeps at
  least half of the cache (or all of itself if shorter), and max_new_tokens is lowered when even that
  does not fit. `Delta.dropped` / `last_dropped_tokens` report it. The chat layers trim whole turns
  before this ever happens; this is the generator's guarantee that it never crashes on length.
* **Penalties** see the prompt plus the generated ids (the sampler's sustain/decay window).
* **Cancellation**: the event is checked before every model call; a set event ends the stream
  within one step with a final delta whose finish_reason is "cancelled".

Batch generation left-pads the prompts (the model's `pad` argument masks the padding and starts
each row's positions at 0) and runs one cache of batch B. Beam search is deterministic: B = beams rows
in one cache, each beam proposes its `beams` most likely next tokens (penalties applied, no
temperature or truncation), the best `beams` cumulative log-probs survive, finished hypotheses are
ranked by length-normalised log-prob, and cache rows are reordered with index_select.
`choose` scores each option's tokens (sum of log-probs) from a shared prefix.

A Generator is not thread-safe: run one generation at a time (cancel from any thread). Starting
a new generation invalidates an unfinished iterator of an older one (it raises if resumed).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from .sampler import Sampler, SamplerSettings, apply_penalties
from .tokenizer import StreamDecoder

__all__ = ["GenerationSettings", "Delta", "TextStream", "Generator", "FINISH_REASONS"]

FINISH_REASONS = ("eos", "stop", "length", "cancelled", "newline")


# ----------------------------------------------------------------------------------------------
# Settings and results
# ----------------------------------------------------------------------------------------------

@dataclass
class GenerationSettings:
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    max_new_tokens: int = 256
    stop_strings: list[str] = field(default_factory=list)  # end the reply; never streamed, not in it
    stop_on_eos: bool = True
    break_on_newline: bool = False      # the seed's "break on newline"
    lora: str | None = None

    def __post_init__(self):
        if self.sampler is None:
            self.sampler = SamplerSettings()
        elif isinstance(self.sampler, dict):
            self.sampler = SamplerSettings.from_dict(self.sampler)
        if isinstance(self.max_new_tokens, bool) or int(self.max_new_tokens) != self.max_new_tokens \
                or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        self.max_new_tokens = int(self.max_new_tokens)
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        self.stop_strings = [s for s in (self.stop_strings or []) if isinstance(s, str) and s]


@dataclass
class Delta:
    text: str                  # new text to show ("" while text is held back)
    token_ids: list[int]       # tokens accepted this step (an EOS token is not accepted)
    n_tokens: int              # tokens sampled so far (what max_new_tokens limits)
    tokens_per_s: float        # decode speed so far (0.0 until two tokens were sampled)
    prompt_tokens: int         # prompt length in tokens (after any overflow trimming)
    finish_reason: str | None = None  # None while running; then one of FINISH_REASONS
    reused: int = 0            # prompt tokens that came from the cache (not prefilled)
    dropped: int = 0           # prompt tokens dropped from the front to fit the context


def _settings(settings) -> GenerationSettings:
    if settings is None:
        return GenerationSettings()
    if isinstance(settings, SamplerSettings):
        return GenerationSettings(sampler=settings)
    return settings


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case (a chat that grew), one C-level comparison
        return n
    lo, hi = 0, n       # binary search on prefix equality: O(n log n) in C, not a Python loop
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ----------------------------------------------------------------------------------------------
# Streaming text with stop strings
# ----------------------------------------------------------------------------------------------

class TextStream:
    """Token ids in, text deltas out, with stop strings and the newline break applied.

    `push(id)` returns the text that is safe to show now. The text that ends in a (proper) prefix
    of a stop string is held back; once a stop string is complete, the reply ends right before it
    (`finish_reason` = "stop", or "newline" for the newline break) and the held text is dropped.
    `close()` returns what is still held (an unfinished stop string prefix is real text after all).
    `text` is everything returned so far; it only ever grows.
    """

    def __init__(self, tokenizer, stop_strings: Iterable[str] = (), break_on_newline: bool = False):
        self.decoder = StreamDecoder(tokenizer)
        self.stops = [s for s in dict.fromkeys(stop_strings or ()) if s]
        self.newline = bool(break_on_newline)
        self.text = ""
        self.held = ""
        self.finish_reason: str | None = None
        self._content = False  # the shown text has a non-blank character (newline break armed)

    def push(self, token_id: int) -> str:
        if self.finish_reason is not None:
            return ""
        piece = self.decoder.push(token_id)
        return self._add(piece) if piece else ""

    def close(self) -> str:
        if self.finish_reason is not None:
            return ""
        return self._add(self.decoder.flush(), final=True)

    def _add(self, piece: str, final: bool = False) -> str:
        buf = self.held + piece
        cut, reason = -1, None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut, reason = i, "stop"
        if self.newline:
            start = 0
            if not self._content:
                start = len(buf) - len(buf.lstrip())  # first non-blank character
            i = buf.find("\n", start)
            if i >= 0 and (cut < 0 or i < cut):
                cut, reason = i, "newline"
        if cut >= 0:
            out, self.held, self.finish_reason = buf[:cut], "", reason
        elif final:
            out, self.held = buf, ""
        else:
            k = self._hold_length(buf)
            out, self.held = buf[:len(buf) - k], buf[len(buf) - k:]
        if out:
            self.text += out
            if not self._content and out.strip():
                self._content = True
        return out

    def _hold_length(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        k = 0
        for s in self.stops:
            for j in range(min(len(s) - 1, len(buf)), k, -1):
                if buf.endswith(s[:j]):
                    k = j
                    break
        return k


# ----------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------

class Generator:
    PREFILL_CHUNK = 2048  # prompt tokens per forward pass while prefilling

    def __init__(self, model, tokenizer, max_seq_len: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_len = int(max_seq_len or model.runtime.max_seq_len)
        self.cache = model.new_cache(1, self.max_seq_len)
        self.ids: list[int] = []         # token ids whose K/V are in the cache
        self.eos_ids = frozenset(int(i) for i in tokenizer.eos_ids)
        self._lora: str | None = None
        self._epoch = 0
        self.last_prefill_tokens = 0     # tokens the last prefill fed through the model
        self.last_reused_tokens = 0      # prompt tokens the last prefill found in the cache
        self.last_dropped_tokens = 0     # prompt tokens dropped to fit the context
        self.last_finish_reason: str | None = None
        self.last_batch_finish_reasons: list[str] = []
        # On GPUs single-token steps replay a captured CUDA graph (model/graph.py): host overhead,
        # not the GPU, is what limits eager decoding there.
        self._graph = None
        runtime = getattr(model, "runtime", None)
        if getattr(getattr(model, "device", None), "type", None) == "cuda" and getattr(runtime, "cuda_graph", False):
            from .graph import GraphDecoder
            self._graph = GraphDecoder(model, self.cache)

    # -- cache ------------------------------------------------------------------------------

    def _sampler_kernels(self):
        """The CPU kernels for a model whose logits come to the CPU (model/sampler.py samples one row there)."""
        ops = getattr(self.model, "ops", None)
        head = getattr(self.model, "head_device", None)
        return ops.cpu_kernels() if ops is not None and head is not None and head.type == "cpu" else None

    def reset(self) -> None:
        """Forget the cache contents."""
        self.cache.reset()
        self.ids = []

    def rewind(self, n: int) -> None:
        """Keep only the first n tokens of the cache (n > cached length: no-op)."""
        n = max(0, min(int(n), len(self.ids)))
        self.cache.truncate(n)
        del self.ids[n:]

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Prompt text -> ids (BOS added when the tokenizer wants it); a list of ids passes through."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_bos=bool(getattr(self.tokenizer, "add_bos_token", False)))
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.reshape(-1).tolist()
        return [int(i) for i in prompt]

    def _start_token(self) -> int:
        t = self.tokenizer
        if t.bos_id is not None:
            return t.bos_id
        return next(iter(t.eos_ids), 0)

    def fit(self, ids: list[int], max_new: int) -> tuple[list[int], int, int]:
        """Context overflow policy -> (ids, max_new, dropped). See the module docstring."""
        if not ids:
            ids = [self._start_token()]
        S = self.max_seq_len
        if len(ids) + max_new <= S:
            return ids, max_new, 0
        keep = max(S - max_new, min(len(ids), S // 2), 1)
        dropped = 0
        if keep < len(ids):
            bos = self.tokenizer.bos_id
            dropped = len(ids) - keep
            if bos is not None and ids[0] == bos and keep >= 2:
                ids = [ids[0]] + ids[len(ids) - (keep - 1):]
            else:
                ids = ids[len(ids) - keep:]
        return ids, min(max_new, S - len(ids)), dropped

    @torch.inference_mode()
    def _forward(self, tokens: list[int], lora: str | None) -> torch.Tensor:
        """Feed tokens (batch 1) at the end of the cache -> logits [1, V] of the last one."""
        x = torch.tensor([tokens], dtype=torch.long)
        if self._graph is not None and len(tokens) == 1:
            logits = self._graph(x, lora=lora)
        else:
            logits = self.model(x, self.cache, last_only=True, lora=lora)
        self.ids.extend(tokens)
        return logits[:, -1]

    @torch.inference_mode()
    def _greedy_step(self, tok: int, lora: str | None, continuing: bool) -> int:
        """Feed tok through a captured greedy step (GraphDecoder.greedy) -> the next token, picked inside the
        graph. continuing: tok is the previous greedy step's pick, already the graph's input."""
        ids = None if continuing else torch.tensor([[tok]], dtype=torch.long)
        nxt, finite = self._graph.greedy(ids, lora=lora)[0].tolist()
        self.ids.append(tok)
        if not finite:
            raise ValueError("no token can be sampled: the logits contain nan")
        return nxt

    def _prefill(self, ids: list[int], lora: str | None = None) -> torch.Tensor:
        """Bring the cache to exactly `ids`, reusing the common prefix -> logits [1, V] for the next token."""
        if lora != self._lora:
            self.reset()
            self._lora = lora
        if len(self.ids) != self.cache.length:  # someone touched the cache behind our back
            self.reset()
        p = min(_common_prefix(self.ids, ids), len(ids) - 1)
        self.rewind(p)
        self.last_reused_tokens, self.last_prefill_tokens = p, len(ids) - p
        logits = None
        for s in range(p, len(ids), self.PREFILL_CHUNK):
            logits = self._forward(ids[s:s + self.PREFILL_CHUNK], lora)
        return logits

    def _check_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            raise RuntimeError("this generation was superseded by a newer one on the same Generator")

    # -- streaming generation ----------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], settings: GenerationSettings | None = None,
                 cancel: threading.Event | None = None) -> Iterator[Delta]:
        """Stream the reply to `prompt` as Deltas; the last one has a finish_reason. See the module doc."""
        settings = _settings(settings)
        ids = self.encode(prompt)
        return self._generate(ids, settings, cancel)

    def _generate(self, ids: list[int], settings: GenerationSettings, cancel) -> Iterator[Delta]:
        self._epoch += 1
        epoch = self._epoch
        ids, max_new, dropped = self.fit(ids, settings.max_new_tokens)
        self.last_dropped_tokens = dropped
        P = len(ids)
        if cancel is not None and cancel.is_set():
            self.last_finish_reason = "cancelled"
            yield Delta("", [], 0, 0.0, P, "cancelled", 0, dropped)
            return
        logits = self._prefill(ids, settings.lora)
        reused = self.last_reused_tokens

        sampler = Sampler(settings.sampler, kernels=self._sampler_kernels())
        ss = settings.sampler
        window = ss.penalty_window if ss.has_penalties else 0
        hist = None
        if window != 0:
            hist = torch.full((1, P + max_new), -1, dtype=torch.long)
            hist[0, :P] = torch.tensor(ids, dtype=torch.long)
        stream = TextStream(self.tokenizer, settings.stop_strings, settings.break_on_newline)
        eos = self.eos_ids if settings.stop_on_eos else frozenset()
        n, n_hist, t_first, tps = 0, P, 0.0, 0.0
        # Plain greedy decoding on a GPU: the argmax runs inside the captured step, no logits leave it.
        in_graph = self._graph is not None and ss.plain_greedy
        picked: int | None = None

        def final(text: str, toks: list[int], reason: str) -> Delta:
            reason = stream.finish_reason or reason  # the flushed tail may complete a stop string
            self.last_finish_reason = reason
            return Delta(text, toks, n, tps, P, reason, reused, dropped)

        while True:
            if n >= max_new:
                yield final(stream.close(), [], "length")
                return
            if cancel is not None and cancel.is_set():
                yield final(stream.close(), [], "cancelled")
                return
            history = None
            if hist is not None:
                history = hist[:, (0 if window < 0 else max(0, n_hist - window)):n_hist]
            tok = int(sampler.sample(logits, history)[0]) if picked is None else picked
            n += 1
            now = time.perf_counter()
            if n == 1:
                t_first = now
            elif now > t_first:
                tps = (n - 1) / (now - t_first)
            if tok in eos:
                yield final(stream.close(), [], "eos")
                return
            if hist is not None:
                hist[0, n_hist] = tok
            n_hist += 1
            text = stream.push(tok)
            if stream.finish_reason is not None:
                yield final(text, [tok], stream.finish_reason)
                return
            if n >= max_new:
                yield final(text + stream.close(), [tok], "length")
                return
            yield Delta(text, [tok], n, tps, P, None, reused, dropped)
            self._check_epoch(epoch)
            if cancel is not None and cancel.is_set():
                yield final(stream.close(), [], "cancelled")
                return
            if in_graph:
                picked = self._greedy_step(tok, settings.lora, continuing=picked is not None)
            else:
                logits = self._forward([tok], settings.lora)

    def complete(self, prompt: str | Sequence[int], settings: GenerationSettings | None = None,
                 cancel: threading.Event | None = None) -> str:
        """The whole reply as one string (finish reason in `last_finish_reason`)."""
        return "".join(d.text for d in self.generate(prompt, settings, cancel))

    # -- batches -----------------------------------------------------------------------------

    def _new_cache(self, batch: int, length: int):
        return self.model.new_cache(batch, max(1, length))

    @staticmethod
    @torch.inference_mode()
    def _copy_prefix(src, dst, n: int, row: int = 0) -> None:
        """Copy the first n positions of row `row` of cache src into every row of cache dst."""
        for ks, vs, kd, vd in zip(src.k, src.v, dst.k, dst.v):
            kd[:, :, :n] = ks[row:row + 1, :, :n]
            vd[:, :, :n] = vs[row:row + 1, :, :n]
        dst.length = n

    @staticmethod
    @torch.inference_mode()
    def _reorder(cache, rows: torch.Tensor) -> None:
        """Beam bookkeeping: cache row i becomes old row rows[i] (index_select on k / v)."""
        n = cache.length
        for layer in range(len(cache.k)):
            for t in (cache.k[layer], cache.v[layer]):
                t[:, :, :n] = t[:, :, :n].index_select(0, rows.to(t.device))

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], settings: GenerationSettings | None = None,
                       cancel: threading.Event | None = None) -> list[str]:
        """Replies to several prompts at once: left padding, one cache of batch B. Each row stops on
        its own; finish reasons in `last_batch_finish_reasons`. Uses its own cache (the generator's
        batch-1 cache is left as it was)."""
        settings = _settings(settings)
        prompts = list(prompts)
        if not prompts:
            self.last_batch_finish_reasons = []
            return []
        lora = settings.lora
        max_new = settings.max_new_tokens
        rows = []
        for p in prompts:
            ids, mn, _ = self.fit(self.encode(p), max_new)
            rows.append(ids)
            max_new = min(max_new, mn)
        B, T = len(rows), max(len(r) for r in rows)
        max_new = min(max_new, self.max_seq_len - T)
        pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        pad = torch.tensor([T - len(r) for r in rows], dtype=torch.long)
        x = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows], dtype=torch.long)
        hist = torch.tensor([[-1] * (T - len(r)) + r for r in rows], dtype=torch.long)
        hist = torch.cat([hist, torch.full((B, max_new), -1, dtype=torch.long)], 1)
        streams = [TextStream(self.tokenizer, settings.stop_strings, settings.break_on_newline) for _ in rows]
        reasons: list[str | None] = [None] * B
        eos = self.eos_ids if settings.stop_on_eos else frozenset()
        sampler = Sampler(settings.sampler, kernels=self._sampler_kernels())
        ss = settings.sampler
        window = ss.penalty_window if ss.has_penalties else 0

        cache = self._new_cache(B, T + max_new)
        logits = None
        with torch.inference_mode():
            for s in range(0, T, self.PREFILL_CHUNK):
                logits = self.model(x[:, s:s + self.PREFILL_CHUNK], cache, last_only=True, lora=lora, pad=pad)
        for step in range(max_new):
            if cancel is not None and cancel.is_set():
                break
            n_hist = T + step
            history = None if window == 0 else hist[:, (0 if window < 0 else max(0, n_hist - window)):n_hist]
            toks = sampler.sample(logits[:, -1], history)
            hist[:, n_hist] = toks.cpu()
            for b, tok in enumerate(toks.tolist()):
                if reasons[b] is not None:
                    continue
                if tok in eos:
                    reasons[b] = "eos"
                    continue
                streams[b].push(tok)
                reasons[b] = streams[b].finish_reason
            if all(r is not None for r in reasons) or step == max_new - 1:
                break
            feed = toks.cpu().clone()
            for b, r in enumerate(reasons):
                if r is not None:
                    feed[b] = pad_id  # finished rows idle along
            with torch.inference_mode():
                logits = self.model(feed.view(B, 1), cache, last_only=True, lora=lora, pad=pad)
        cancelled = cancel is not None and cancel.is_set()
        out = []
        for b, st in enumerate(streams):
            if reasons[b] is None:
                reasons[b] = "cancelled" if cancelled else "length"
            out.append(st.text + st.close())
        self.last_batch_finish_reasons = list(reasons)
        return out

    # -- beam search -------------------------------------------------------------------------

    def beam_search(self, prompt: str | Sequence[int], settings: GenerationSettings | None = None,
                    beams: int = 4, beam_length: int | None = None,
                    cancel: threading.Event | None = None) -> str:
        """The best reply by beam search (see `beam_generate`)."""
        return "".join(d.text for d in self.beam_generate(prompt, settings, beams, beam_length, cancel))

    def beam_generate(self, prompt: str | Sequence[int], settings: GenerationSettings | None = None,
                      beams: int = 4, beam_length: int | None = None,
                      cancel: threading.Event | None = None, length_penalty: float = 1.0) -> Iterator[Delta]:
        """Deterministic beam search, streamed as committed tokens.

        `beams` rows live in one cache. Each step every beam proposes its `beams` most likely next
        tokens (log-softmax of the logits after the sampler's penalties; temperature and truncation
        are ignored: beam search is not sampling), and the `beams` best cumulative log-probs survive
        (cache rows reordered with index_select). A candidate ending in EOS, a stop string or the
        newline break is a finished hypothesis, ranked by log-prob / length ** length_penalty. The
        search stops when the best finished hypothesis beats every live beam (by the same
        normalised score), or at max_new_tokens (best of finished and live).

        `beam_length` (ExLlama's -beamlen): once the beams are that many tokens ahead of the
        committed text, the first token of the best beam is committed and streamed, and beams that
        disagree with it die. None or 0: the whole reply is one search (nothing streams until the end).
        beams=1 is greedy decoding.
        """
        settings = _settings(settings)
        ids = self.encode(prompt)
        beams = max(1, int(beams))
        return self._beam(ids, settings, beams, int(beam_length or 0), cancel, float(length_penalty))

    def _beam(self, ids, settings, K, beam_length, cancel, alpha) -> Iterator[Delta]:
        self._epoch += 1
        epoch = self._epoch
        ids, max_new, dropped = self.fit(ids, settings.max_new_tokens)
        self.last_dropped_tokens = dropped
        P = len(ids)
        lora = settings.lora
        if beam_length <= 0:
            beam_length = max_new + 1
        if (cancel is not None and cancel.is_set()) or max_new == 0:
            reason = "cancelled" if max_new else "length"
            self.last_finish_reason = reason
            yield Delta("", [], 0, 0.0, P, reason, 0, dropped)
            return
        logits = self._prefill(ids, lora).expand(K, -1)
        reused = self.last_reused_tokens
        cache = self._new_cache(K, P + max_new)
        self._copy_prefix(self.cache, cache, P)
        ss = settings.sampler
        window = ss.penalty_window if ss.has_penalties else 0
        hist = torch.full((K, P + max_new), -1, dtype=torch.long)
        hist[:, :P] = torch.tensor(ids, dtype=torch.long)
        eos = self.eos_ids if settings.stop_on_eos else frozenset()
        check_text = bool(settings.stop_strings) or settings.break_on_newline
        out = TextStream(self.tokenizer, settings.stop_strings, settings.break_on_newline)

        committed: list[int] = []
        committed_lp = 0.0
        scores = [0.0] + [float("-inf")] * (K - 1)   # sum of log-probs of each beam's pending tokens
        seqs: list[list[int]] = [[] for _ in range(K)]
        lps: list[list[float]] = [[] for _ in range(K)]
        finished: list[tuple[float, list[int], list[float], str]] = []  # (norm, seq, lps, reason)
        n_steps, t_first, tps = 0, time.perf_counter(), 0.0

        def norm(lp_sum: float, n: int) -> float:
            return (committed_lp + lp_sum) / max(1, len(committed) + n) ** alpha

        def ends(seq: list[int]) -> str | None:
            """Does the reply committed + seq hit a stop string / the newline break?"""
            if not check_text:
                return None
            text = self.tokenizer.decode(committed + seq).rstrip("\ufffd")  # an unfinished character: not yet
            if any(s in text for s in settings.stop_strings):
                return "stop"
            if settings.break_on_newline and "\n" in text.lstrip():
                return "newline"
            return None

        def delta(text, toks, reason=None):
            if reason:
                self.last_finish_reason = reason
            return Delta(text, toks, len(committed), tps, P, reason, reused, dropped)

        reason = "length"
        while True:
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
            with torch.inference_mode():
                x = logits.float()
                if window != 0:
                    n_hist = P + len(committed) + len(seqs[0])
                    x = apply_penalties(x, hist[:, (0 if window < 0 else max(0, n_hist - window)):n_hist],
                                        ss.repetition_penalty, ss.repetition_penalty_sustain,
                                        ss.repetition_penalty_decay, ss.presence_penalty, ss.frequency_penalty)
                if ss.banned_tokens:
                    x[:, list(ss.banned_tokens)] = float("-inf")
                logp = torch.log_softmax(x, -1)
                vals, toks = logp.topk(K, dim=-1)
                cand = (torch.tensor(scores, dtype=torch.float64).unsqueeze(1) + vals.double()).flatten()
                order = cand.argsort(descending=True, stable=True).tolist()
            cand, toks, vals = cand.tolist(), toks.flatten().tolist(), vals.double().flatten().tolist()
            new: list[tuple[int, int, float, float]] = []  # (row, token, score, token logp)
            for c in order:
                if cand[c] == float("-inf") or len(new) == K:
                    break
                r, t = divmod(c, K)[0], toks[c]
                seq = seqs[r] + [t]
                if t in eos:
                    finished.append((norm(cand[c], len(seq)), seq, lps[r] + [vals[c]], "eos"))
                    continue
                why = ends(seq)
                if why:
                    finished.append((norm(cand[c], len(seq)), seq, lps[r] + [vals[c]], why))
                    continue
                new.append((r, t, cand[c], vals[c]))
            n_steps += 1
            now = time.perf_counter()
            tps = n_steps / (now - t_first) if now > t_first else 0.0
            if not new:
                reason = None
                break
            while len(new) < K:  # fewer live candidates than beams: dead filler rows
                new.append((new[0][0], new[0][1], float("-inf"), 0.0))
            rows = torch.tensor([r for r, *_ in new], dtype=torch.long)
            seqs = [seqs[r] + [t] for r, t, _, _ in new]
            lps = [lps[r] + [lp] for r, _, _, lp in new]
            scores = [s for _, _, s, _ in new]
            hist = hist.index_select(0, rows)
            hist[:, P + len(committed) + len(seqs[0]) - 1] = torch.tensor([s[-1] for s in seqs])
            if not all(r == i for i, r in enumerate(rows.tolist())):
                self._reorder(cache, rows)
            best_live = norm(scores[0], len(seqs[0]))
            if finished and max(f[0] for f in finished) >= best_live:
                reason = None
                break
            if len(committed) + len(seqs[0]) >= max_new:
                break
            if len(seqs[0]) >= beam_length:  # slide: commit the best beam's first token
                t0, lp0 = seqs[0][0], lps[0][0]
                committed.append(t0)
                committed_lp += lp0
                for i in range(K):
                    if seqs[i][0] != t0:
                        scores[i] = float("-inf")
                    else:
                        scores[i] -= lps[i][0]
                    seqs[i], lps[i] = seqs[i][1:], lps[i][1:]
                finished = [(f[0], f[1][1:], f[2][1:], f[3]) for f in finished if f[1] and f[1][0] == t0]
                text = out.push(t0)
                if out.finish_reason:  # not expected: live beams never hold a stop string
                    yield delta(text, [t0], out.finish_reason)
                    return
                yield delta(text, [t0])
                self._check_epoch(epoch)
            with torch.inference_mode():
                last = [[q[-1] if q else committed[-1]] for q in seqs]
                logits = self.model(torch.tensor(last, dtype=torch.long), cache, last_only=True, lora=lora)[:, -1]
        # pick the winner: best finished, else the best live beam
        best_seq, best_reason = seqs[0], reason
        if finished:
            f = max(finished, key=lambda f: f[0])
            if reason is None or f[0] >= norm(scores[0], len(seqs[0])):
                best_seq, best_reason = f[1], f[3]
        if best_reason is None:
            best_reason = "length"
        text, toks = "", []
        for t in best_seq:
            if t in eos:
                break
            text += out.push(t)
            toks.append(t)
            committed.append(t)
            if out.finish_reason:
                break
        text += out.close()
        yield delta(text, toks, out.finish_reason or best_reason)

    # -- constrained choice ------------------------------------------------------------------

    def score_options(self, prompt: str | Sequence[int], options: Sequence[str], lora: str | None = None) -> list[float]:
        """Log-probability of each option's tokens as the continuation of `prompt` (sum)."""
        options = list(options)
        if not options:
            raise ValueError("choose: no options")
        if isinstance(prompt, str):
            p_ids = self.encode(prompt)
            full = [self.encode(prompt + o) for o in options]
        else:
            p_ids = self.encode(prompt)
            full = [p_ids + self.tokenizer.encode(o, add_bos=False) for o in options]
        # each option's own tokens start where it departs from the prompt (a token can straddle the seam)
        own = [_common_prefix(p_ids, f) for f in full]
        shared = min(own)
        if shared == 0:  # nothing left to condition on: start from BOS (or EOS)
            start = self._start_token()
            p_ids, full, own, shared = [start] + p_ids, [[start] + f for f in full], [o + 1 for o in own], 1
        longest = max(len(f) - shared for f in full)
        over = shared + longest - self.max_seq_len
        if over > 0:  # drop the oldest shared tokens (keep BOS)
            b0 = 1 if self.tokenizer.bos_id is not None and p_ids[0] == self.tokenizer.bos_id else 0
            if shared - b0 - over < 1:
                raise ValueError("choose: the options do not fit in the context")
            full = [f[:b0] + f[b0 + over:] for f in full]
            own = [o - over for o in own]
            shared -= over
        self._epoch += 1  # the main cache changes: an unfinished generate() must not resume
        prefix_logits = self._prefill(full[0][:shared], lora)
        tails = [f[shared:] for f in full]
        with torch.inference_mode():
            lp0 = torch.log_softmax(prefix_logits[0].float(), -1)
            scores = [0.0] * len(options)
            T = max(len(t) for t in tails)
            if T >= 2:
                B = len(tails)
                pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
                cache = self._new_cache(B, shared + T)
                self._copy_prefix(self.cache, cache, shared)
                x = torch.tensor([t + [pad_id] * (T - len(t)) for t in tails], dtype=torch.long)
                lp = torch.log_softmax(self.model(x[:, :-1], cache, last_only=False, lora=lora).float(), -1)
            for i, t in enumerate(tails):
                first = own[i] - shared  # tokens before this are the prompt's own (not scored)
                for j in range(max(first, 0), len(t)):
                    scores[i] += float(lp0[t[0]]) if j == 0 else float(lp[i, j - 1, t[j]])
        return scores

    def choose(self, prompt: str | Sequence[int], options: Sequence[str], lora: str | None = None) -> str:
        """The option the model finds most likely after `prompt` (one of `options`, exactly).
        Scores are sums of log-probs, so a shorter option that is a prefix of a longer one wins
        unless the model prefers the longer text; end options with a delimiter (e.g. "Bob:") to
        compare whole names."""
        options = list(options)
        if len(options) == 1:
            return options[0]
        scores = self.score_options(prompt, options, lora)
        return options[max(range(len(options)), key=lambda i: (scores[i], -i))]
