"""Token sampling: settings, composable logit filters and the `Sampler`.

This is the "companion library of funky sampling functions". Every filter is a small function on
fp32 logits of shape ``[B, N]`` that returns a *new* tensor (the input is never modified; a filter
that has nothing to do may return its input). Removed tokens get ``-inf``. All filters except the
penalties, bans and allowed-set (which index into the vocabulary) are position-agnostic, so they work
equally on the full vocabulary ``N = V`` or on a compacted candidate set, which is how `Sampler`
keeps a 128k-vocabulary step cheap.

Order of operations (fixed, the same in `Sampler.sample` and `Sampler.probs`)::

    1. penalties      repetition penalty (ExLlama sustain/decay window), then presence and
                      frequency penalty (OpenAI semantics) over the same history window
    2. bans/allowed   banned ids -> -inf; if an allowed set is given, only those ids remain
                      (a banned id is never allowed)
    3. greedy?        temperature == 0 or top_k == 1: argmax of the logits after step 2, no RNG
    4. temperature    logits / T
    5. top_k          keep the k largest (exactly k; ties broken by index order of torch.topk)
    6. top_p          keep the smallest prefix of the sorted distribution whose mass reaches p
    7. min_p          keep tokens with p >= min_p * p_max (independent of top_p)
    8. typical        locally typical sampling (Meister et al. 2022), mass `typical`
    9. sample         draw from softmax of what is left (inverse CDF: one uniform from the
                      sampler's seeded torch.Generator per row)

With mirostat on (v2), steps 5-8 are replaced by the mirostat truncation (keep tokens whose
surprise -log2 p is <= mu, always keeping the most likely one); after the draw,
``mu -= eta * (surprise - tau)`` where surprise is measured on the truncated, renormalised
distribution (as llama.cpp does). mu starts at 2 * tau and is kept per sequence (batch row).

Each filter after the first sees the distribution left by the previous one (renormalised over the
survivors), exactly like chaining HF-style logits warpers. Speed notes: `Sampler` applies top_k
before dividing by the temperature (same set: dividing by T > 0 keeps the order) and from then on works
on the k sorted candidates only; top_p without top_k takes a partial `topk` that is grown until it
holds the mass p (falling back to one full sort), and trims the candidates to the survivors;
typical without top_k / top_p does the same on its own ranking; min_p needs no softmax and no sort;
an allowed set compacts the vocabulary to those ids first; the draw is an inverse-CDF lookup (one
cumsum and one uniform per row; torch.multinomial draws one exponential per vocabulary entry).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping, Sequence

import torch

__all__ = [
    "SamplerSettings",
    "Sampler",
    "as_history",
    "repetition_strength",
    "apply_penalties",
    "apply_repetition_penalty",
    "apply_presence_frequency",
    "ban_tokens",
    "allow_only",
    "apply_temperature",
    "top_k_filter",
    "top_p_filter",
    "min_p_filter",
    "typical_filter",
    "mirostat_v2_filter",
]

NEG_INF = float("-inf")
_NO_IDS = torch.empty(0, dtype=torch.long)
LN2 = math.log(2.0)
_SEED_MAX = 2**64 - 1


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------

def _num(name: str, value: Any) -> float:
    """A finite real number from an int/float (or a numeric string, from forms); bools are refused."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got a bool ({value!r})")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _int(name: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    v = _num(name, value)
    if not v.is_integer():
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(v)


def _range(name: str, v: float, lo: float | None, hi: float | None, *, lo_open: bool = False,
           hint: str = "") -> None:
    bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi)
    if bad:
        lo_s = "-inf" if lo is None else repr(lo)
        hi_s = "inf" if hi is None else repr(hi)
        rng = f"{'(' if lo_open or lo is None else '['}{lo_s}, {hi_s}{']' if hi is not None else ')'}"
        raise ValueError(f"{name} must be in {rng}, got {v!r}" + (f" ({hint})" if hint else ""))


def _ids(name: str, value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1).tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a list of token ids, got {value!r}")
    out = set()
    for x in value:
        i = _int(f"{name} entry", x)
        if i < 0:
            raise ValueError(f"{name} entries must be token ids >= 0, got {i}")
        out.add(i)
    return tuple(sorted(out))


@dataclass(frozen=True)
class SamplerSettings:
    """Sampling parameters. Immutable; derive variants with `replace`. Invalid values raise ValueError.

    The defaults are the app's defaults (temperature 0.8, top_k 50, top_p 0.9, min_p 0.05,
    repetition penalty 1.1 with ExLlama's sustain 256 / decay 128); `neutral()` switches every
    filter off (temperature 1), `greedy()` gives argmax decoding.
    """

    temperature: float = 0.8          # >= 0; 0 = greedy (argmax)
    top_k: int = 50                   # >= 0; 0 = off, 1 = greedy
    top_p: float = 0.9                # (0, 1]; 1 = off
    min_p: float = 0.05               # [0, 1]; 0 = off. Keep p >= min_p * p_max
    typical: float = 1.0              # (0, 1]; 1 = off. Locally typical sampling mass
    repetition_penalty: float = 1.1   # > 0; 1 = off. Positive logits / pen, negative * pen
    repetition_penalty_sustain: int = 256  # >= -1; most recent tokens with the full penalty; -1 = all
    repetition_penalty_decay: int = 128    # >= 0; tokens before those over which it fades to 1
    presence_penalty: float = 0.0     # [-2, 2]; subtracted once from every token in the window
    frequency_penalty: float = 0.0    # [-2, 2]; subtracted per occurrence in the window
    banned_tokens: tuple[int, ...] = ()    # never sampled
    allowed_tokens: tuple[int, ...] = ()   # if non-empty: only these may be sampled (empty = no limit)
    mirostat: bool = False            # mirostat v2 (replaces top_k/top_p/min_p/typical)
    mirostat_tau: float = 5.0         # > 0; target surprise in bits
    mirostat_eta: float = 0.1         # >= 0; learning rate of mu
    seed: int | None = None           # None = a random seed, picked by the Sampler

    # -- construction / validation -------------------------------------------------------------

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise in place during init only

        t = _num("temperature", self.temperature)
        _range("temperature", t, 0.0, None, hint="0 = greedy")
        set_(self, "temperature", t)

        k = _int("top_k", self.top_k)
        _range("top_k", k, 0, None, hint="0 = off")
        set_(self, "top_k", k)

        for name in ("top_p", "typical"):
            v = _num(name, getattr(self, name))
            _range(name, v, 0.0, 1.0, lo_open=True, hint="1 = off")
            set_(self, name, v)

        mp = _num("min_p", self.min_p)
        _range("min_p", mp, 0.0, 1.0, hint="0 = off")
        set_(self, "min_p", mp)

        rp = _num("repetition_penalty", self.repetition_penalty)
        _range("repetition_penalty", rp, 0.0, None, lo_open=True, hint="1 = off")
        set_(self, "repetition_penalty", rp)

        sus = _int("repetition_penalty_sustain", self.repetition_penalty_sustain)
        _range("repetition_penalty_sustain", sus, -1, None, hint="-1 = whole history")
        set_(self, "repetition_penalty_sustain", sus)

        dec = _int("repetition_penalty_decay", self.repetition_penalty_decay)
        _range("repetition_penalty_decay", dec, 0, None)
        set_(self, "repetition_penalty_decay", dec)

        for name in ("presence_penalty", "frequency_penalty"):
            v = _num(name, getattr(self, name))
            _range(name, v, -2.0, 2.0, hint="0 = off")
            set_(self, name, v)

        banned = _ids("banned_tokens", self.banned_tokens)
        allowed = _ids("allowed_tokens", self.allowed_tokens)
        if allowed and not set(allowed) - set(banned):
            raise ValueError("allowed_tokens and banned_tokens leave no token that may be sampled")
        set_(self, "banned_tokens", banned)
        set_(self, "allowed_tokens", allowed)

        m = self.mirostat
        if isinstance(m, bool):
            pass
        elif isinstance(m, (int, float)) and m in (0, 2):
            m = m == 2
        else:
            raise ValueError(f"mirostat must be a bool (or 0 = off, 2 = mirostat v2), got {m!r}")
        set_(self, "mirostat", m)

        tau = _num("mirostat_tau", self.mirostat_tau)
        _range("mirostat_tau", tau, 0.0, None, lo_open=True)
        set_(self, "mirostat_tau", tau)
        eta = _num("mirostat_eta", self.mirostat_eta)
        _range("mirostat_eta", eta, 0.0, None)
        set_(self, "mirostat_eta", eta)

        if self.seed is not None:
            s = _int("seed", self.seed)
            _range("seed", s, 0, _SEED_MAX)
            set_(self, "seed", s)

    @classmethod
    def neutral(cls, **overrides: Any) -> "SamplerSettings":
        """Temperature 1 and every filter and penalty off: the model's own distribution."""
        base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical=1.0,
                    repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def greedy(cls, **overrides: Any) -> "SamplerSettings":
        """Argmax decoding (temperature 0), penalties off unless given in `overrides`."""
        return cls.neutral(**{"temperature": 0.0, **overrides})

    def replace(self, **changes: Any) -> "SamplerSettings":
        """A copy with `changes` applied (validated). Unknown names raise TypeError."""
        return dataclasses.replace(self, **changes)

    def clone(self) -> "SamplerSettings":
        return dataclasses.replace(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (token id tuples become lists)."""
        d = dataclasses.asdict(self)
        d["banned_tokens"] = list(self.banned_tokens)
        d["allowed_tokens"] = list(self.allowed_tokens)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "SamplerSettings":
        """Build from a dict (e.g. JSON from the UI). Unknown keys are ignored; a value of None means
        "the default"; numeric strings are accepted; bad values raise ValueError naming the field."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError(f"sampler settings must be a mapping, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names and v is not None})

    # -- derived -------------------------------------------------------------------------------

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing before the argmax (no penalties, bans or allowed set): the pick needs only the
        logits, so a captured decode step can make it itself (model/graph.py GraphDecoder.greedy)."""
        return self.is_greedy and not self.has_penalties and not self.banned_tokens and not self.allowed_tokens

    @property
    def penalty_window(self) -> int:
        """How many most recent history tokens the penalties look at (-1 = all)."""
        if self.repetition_penalty_sustain < 0:
            return -1
        return self.repetition_penalty_sustain + self.repetition_penalty_decay

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


# ----------------------------------------------------------------------------------------------
# History
# ----------------------------------------------------------------------------------------------

def as_history(history: Any, batch_size: int, device: torch.device | str | None = None,
               window: int = -1) -> torch.Tensor | None:
    """Normalise a history to a LongTensor ``[B, T]``, right-aligned (the last column is the most
    recent token), left-padded with -1. Negative ids count as padding.

    Accepts a ``[B, T]`` (or ``[T]`` when B == 1) tensor, a list of ``B`` token lists (ragged is
    fine) or, when B == 1, one flat list of ints. ``window >= 0`` keeps only the last `window`
    tokens of each row. Returns None when there is nothing to look at.
    """
    if history is None or window == 0:
        return None
    if isinstance(history, torch.Tensor):
        h = history
        if h.dim() == 1:
            h = h.unsqueeze(0)
        if h.dim() != 2:
            raise ValueError(f"history must be [B, T], got shape {tuple(history.shape)}")
        if h.shape[0] != batch_size:
            raise ValueError(f"history has {h.shape[0]} rows but the logits have {batch_size}")
        if window > 0 and h.shape[1] > window:
            h = h[:, -window:]
        h = h.to(device=device, dtype=torch.long)
    else:
        rows = list(history)
        if batch_size == 1 and (not rows or not isinstance(rows[0], (Sequence, torch.Tensor))
                                or isinstance(rows[0], (str, bytes))):
            rows = [rows]  # one flat sequence
        if len(rows) != batch_size:
            raise ValueError(f"history has {len(rows)} rows but the logits have {batch_size}")
        rows = [r.tolist() if isinstance(r, torch.Tensor) else list(r) for r in rows]
        if window > 0:
            rows = [r[-window:] for r in rows]
        t = max((len(r) for r in rows), default=0)
        h = torch.tensor([[-1] * (t - len(r)) + r for r in rows], dtype=torch.long,
                         device=device).reshape(batch_size, t)
    if h.shape[1] == 0:
        return None
    return h


# ----------------------------------------------------------------------------------------------
# Filters (each a function on logits [B, N] -> new logits [B, N])
# ----------------------------------------------------------------------------------------------

def repetition_strength(length: int, sustain: int, decay: int,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Penalty strength per history position (``[length]``, right-aligned, in [0, 1]).

    With d = distance from the end (0 = most recent token): d < sustain -> 1 (full penalty);
    sustain <= d < sustain + decay -> (sustain + decay - d) / (decay + 1), i.e. a linear fade
    decay/(decay+1), ..., 1/(decay+1); beyond -> 0. sustain < 0 -> 1 everywhere.
    The effective penalty of a token is 1 + (penalty - 1) * strength of its most recent occurrence.
    """
    if sustain < 0:
        return torch.ones(length, device=device)
    d = torch.arange(length - 1, -1, -1, device=device, dtype=torch.float32)
    return ((sustain + decay - d) / (decay + 1)).clamp_(0.0, 1.0)


def apply_penalties(logits: torch.Tensor, history: Any, repetition_penalty: float = 1.0,
                    sustain: int = -1, decay: int = 0, presence: float = 0.0,
                    frequency: float = 0.0) -> torch.Tensor:
    """Repetition penalty (ExLlama: a logit l > 0 becomes l / pen, otherwise l * pen, with pen
    faded by `repetition_strength`), then ``l -= presence * (count > 0) + frequency * count``
    (OpenAI), where count is the number of occurrences in the window ``sustain + decay`` (all of the
    history when sustain < 0). History ids outside ``[0, V)`` are ignored. Touches only the columns
    of tokens in the window (gather / scatter), never a full pass over the vocabulary."""
    if repetition_penalty == 1.0 and presence == 0.0 and frequency == 0.0:
        return logits
    b, v = logits.shape
    window = -1 if sustain < 0 else sustain + decay
    h = as_history(history, b, logits.device, window)
    if h is None:
        return logits
    valid = (h >= 0) & (h < v)
    ids = torch.where(valid, h, torch.zeros_like(h))  # padding -> column 0 with weight 0
    vals = logits.gather(1, ids)
    if repetition_penalty != 1.0:
        st = repetition_strength(h.shape[1], sustain, decay, logits.device).expand(b, -1)
        st = st * valid
        per_token = torch.zeros_like(logits).scatter_reduce_(1, ids, st, "amax")
        pen = 1.0 + (repetition_penalty - 1.0) * per_token.gather(1, ids)
        vals = torch.where(vals > 0, vals / pen, vals * pen)
    if presence != 0.0 or frequency != 0.0:
        counts = torch.zeros_like(logits).scatter_add_(1, ids, valid.to(logits.dtype))
        c = counts.gather(1, ids)
        vals = vals - frequency * c - presence * (c > 0).to(logits.dtype)
    # Duplicate ids (and padding on column 0) all carry the same value, so the scatter is exact.
    return logits.clone().scatter_(1, ids, vals)


def apply_repetition_penalty(logits: torch.Tensor, history: Any, penalty: float,
                             sustain: int = -1, decay: int = 0) -> torch.Tensor:
    """Repetition penalty only (see `apply_penalties`)."""
    return apply_penalties(logits, history, penalty, sustain, decay)


def apply_presence_frequency(logits: torch.Tensor, history: Any, presence: float = 0.0,
                             frequency: float = 0.0, window: int = -1) -> torch.Tensor:
    """OpenAI presence / frequency penalties over the last `window` tokens (-1 = all)."""
    return apply_penalties(logits, history, 1.0, window, 0, presence, frequency)


def _id_tensor(ids: Any, n: int, device: torch.device, what: str) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long, device=device).reshape(-1)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        bad = [i for i in t.tolist() if i < 0 or i >= n][:5]
        raise ValueError(f"{what} token id(s) {bad} out of range for a vocabulary of {n}")
    return t


def ban_tokens(logits: torch.Tensor, ids: Any) -> torch.Tensor:
    """Set the logits of `ids` to -inf."""
    t = _id_tensor(ids, logits.shape[-1], logits.device, "banned")
    if t.numel() == 0:
        return logits
    return logits.index_fill(-1, t, NEG_INF)


def allow_only(logits: torch.Tensor, ids: Any) -> torch.Tensor:
    """Keep only the logits of `ids`; everything else -inf. An empty `ids` means no restriction."""
    t = _id_tensor(ids, logits.shape[-1], logits.device, "allowed")
    if t.numel() == 0:
        return logits
    out = torch.full_like(logits, NEG_INF)
    out[:, t] = logits[:, t]
    return out


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T (T > 0; greedy decoding is the sampler's business)."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0 here (0 means greedy: take the argmax)")
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits per row (k <= 0 or k >= N: off)."""
    n = logits.shape[-1]
    if k <= 0 or k >= n:
        return logits
    vals, idx = logits.topk(k, dim=-1)
    return torch.full_like(logits, NEG_INF).scatter_(-1, idx, vals)


def top_p_filter(logits: torch.Tensor, p: float, *, presorted: bool = False,
                 log_total: torch.Tensor | None = None) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability mass reaches p
    (token i is kept if the mass of the tokens ranked above it is < p; the top token always is).

    presorted: the rows are already sorted in descending order (skips the sort).
    log_total: ``[B, 1]`` log of the full normaliser when `logits` is only the head of a larger
    sorted distribution (the sampler's partial-topk path); default: softmax over the row.
    """
    if p >= 1.0:
        return logits
    if presorted:
        sl, order = logits, None
    else:
        sl, order = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(sl, -1) if log_total is None else (sl - log_total).exp()
    before = probs.cumsum(-1) - probs
    remove = before >= p
    remove[..., 0] = False
    out = sl.masked_fill(remove, NEG_INF)
    if order is None:
        return out
    return torch.empty_like(logits).scatter_(-1, order, out)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens with p >= min_p * p_max, i.e. logit >= max logit + log(min_p). No softmax."""
    if min_p <= 0.0:
        return logits
    thr = logits.amax(-1, keepdim=True) + math.log(min_p)
    return logits.masked_fill(logits < thr, NEG_INF)


def typical_filter(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling: rank tokens by |-log p - H| (H = entropy of the row) and keep the
    smallest prefix of that ranking whose probability mass reaches `mass` (same rule as top_p)."""
    if mass >= 1.0:
        return logits
    logp = torch.log_softmax(logits, -1)
    p = logp.exp()
    ent = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1, keepdim=True)
    shifted = (-logp - ent).abs()  # +inf for -inf logits: ranked last
    _, order = shifted.sort(dim=-1, stable=True)
    sp = p.gather(-1, order)
    before = sp.cumsum(-1) - sp
    remove_sorted = before >= mass
    remove_sorted[..., 0] = False
    remove = torch.empty_like(remove_sorted).scatter_(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def mirostat_v2_filter(logits: torch.Tensor, mu: torch.Tensor | float) -> torch.Tensor:
    """Mirostat v2 truncation: keep tokens whose surprise -log2 p <= mu (bits, per row ``[B]``);
    the most likely token is always kept."""
    logp = torch.log_softmax(logits, -1)
    mu_t = torch.as_tensor(mu, dtype=logp.dtype, device=logp.device).reshape(-1, 1)
    thr = torch.minimum(-mu_t * LN2, logp.amax(-1, keepdim=True))
    return logits.masked_fill(logp < thr, NEG_INF)


# ----------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------

def _compose(idx: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor:
    """Vocabulary ids of candidate positions `pos` ([B, C] or [B]) given the current map `idx`
    (None = identity, [C] = shared by all rows, [B, C] = per row)."""
    if idx is None:
        return pos
    if idx.dim() == 1:
        return idx[pos]
    if pos.dim() == 1:
        return idx.gather(1, pos.unsqueeze(1)).squeeze(1)
    return idx.gather(1, pos)


class Sampler:
    """Draws the next token of each batch row. See the module docstring for the filter order.

    ``Sampler(settings=None, seed=None)``: `seed` (else ``settings.seed``, else a random one) seeds a
    ``torch.Generator`` per device; the seed in use is ``self.seed``, so a run can be replayed.
    The sampler also keeps the mirostat state (mu per batch row; re-initialised to 2 * tau when the
    batch size changes). `reset()` restarts both.
    """

    _PARTIAL_TOP_P_K = 1024  # first guess of the head size for top_p / typical without top_k
    _PARTIAL_TYPICAL_MIN_N = 4096  # rows longer than this use the partial-topk typical path
    _COMPACT_MIN_N = 8192  # single rows longer than this are compacted to their survivors to draw

    def __init__(self, settings: SamplerSettings | None = None, seed: int | None = None, kernels=None):
        """kernels: the CPU kernel module (Ops.cpu_kernels()); with it, one row of CPU logits is sampled by its
        `sample_row` in one call (same rules, same survivor sets and distribution; a draw may walk the survivors in
        another order than this module's, so a seed gives other text than here, the same text again each time)."""
        self._settings = settings if settings is not None else SamplerSettings()
        self.kernels = kernels
        self._ids_cache: dict[tuple, torch.Tensor | None] = {}
        self.seed: int = 0
        self.last_surprise: torch.Tensor | None = None
        self.reset(seed)

    # -- state ---------------------------------------------------------------------------------

    @property
    def settings(self) -> SamplerSettings:
        return self._settings

    @settings.setter
    def settings(self, value: SamplerSettings) -> None:
        """Swap settings mid-stream; the generator and mirostat state are kept."""
        self._settings = value
        self._ids_cache.clear()

    def reset(self, seed: int | None = None) -> None:
        """Restart the RNG (with `seed`, else the seed in use, else settings.seed / a random one)
        and forget the mirostat state."""
        if seed is None:
            seed = self._settings.seed if not hasattr(self, "_gens") else self.seed
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") & (2**63 - 1)
        seed = _int("seed", seed)
        _range("seed", seed, 0, _SEED_MAX)
        self.seed = seed
        self._gens: dict[torch.device, torch.Generator] = {}
        self._mu: torch.Tensor | None = None
        self.last_surprise = None

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        g = self._gens.get(device)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._gens[device] = g
        return g

    @property
    def mirostat_mu(self) -> torch.Tensor | None:
        """Current mu per row (bits), or None before the first mirostat step."""
        return None if self._mu is None else self._mu.clone()

    def _mu_for(self, b: int, device: torch.device) -> torch.Tensor:
        if self._mu is None or self._mu.shape[0] != b or self._mu.device != device:
            self._mu = torch.full((b,), 2.0 * self._settings.mirostat_tau, device=device)
        return self._mu

    # -- pipeline ------------------------------------------------------------------------------

    @staticmethod
    def _as_2d(logits: torch.Tensor) -> torch.Tensor:
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"logits must be a tensor, got {type(logits).__name__}")
        if logits.dim() == 1:
            logits = logits.unsqueeze(0)
        elif logits.dim() == 3:
            logits = logits[:, -1]  # model output [B, T, V]: the last position
        elif logits.dim() != 2:
            raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
        return logits.float()

    def _ids(self, kind: str, v: int, device: torch.device) -> torch.Tensor | None:
        key = (kind, v, device)
        if key not in self._ids_cache:
            s = self._settings
            if kind == "allowed":
                ids = [i for i in s.allowed_tokens if i not in set(s.banned_tokens)]
            else:
                ids = list(s.banned_tokens)
            self._ids_cache[key] = _id_tensor(ids, v, device, kind) if ids else None
        return self._ids_cache[key]

    def _prefilter(self, logits: torch.Tensor, history: Any):
        """Steps 1-2: penalties and bans / allowed set. Returns (x [B, C], idx map)."""
        s = self._settings
        x = self._as_2d(logits)
        b, v = x.shape
        if s.has_penalties and history is not None:
            x = apply_penalties(x, history, s.repetition_penalty, s.repetition_penalty_sustain,
                                s.repetition_penalty_decay, s.presence_penalty, s.frequency_penalty)
        idx = None
        allowed = self._ids("allowed", v, x.device) if s.allowed_tokens else None
        if allowed is not None:
            x, idx = x.index_select(1, allowed), allowed  # compact to the allowed ids
        elif s.banned_tokens:
            banned = self._ids("banned", v, x.device)
            if banned is not None:
                x = x.index_fill(1, banned, NEG_INF)
        return x, idx

    def _truncate(self, x: torch.Tensor, idx: torch.Tensor | None):
        """Steps 4-8 on candidates. Returns (x [B, C], idx map)."""
        s = self._settings
        n = x.shape[1]
        is_sorted = False
        if 0 < s.top_k < n:
            x, pos = x.topk(s.top_k, dim=-1)  # sorted, descending; same set as after temperature
            idx, is_sorted = _compose(idx, pos), True
        if s.temperature != 1.0:
            x = x / s.temperature
        if s.top_p < 1.0:
            log_total = None
            if not is_sorted:
                lse = torch.logsumexp(x, -1, keepdim=True)
                k = self._PARTIAL_TOP_P_K
                while True:
                    if 2 * k >= n:  # a head this big costs as much as the sort
                        vals, pos = x.sort(dim=-1, descending=True)
                        break
                    vals, pos = x.topk(k, dim=-1)
                    mass = (vals - lse).exp().sum(-1)
                    if bool((mass >= s.top_p + 1e-4).all()):  # the nucleus fits in the head
                        log_total = lse
                        break
                    k *= 8
                x, idx, is_sorted = vals, _compose(idx, pos), True
            x = top_p_filter(x, s.top_p, presorted=True, log_total=log_total)
            keep = max(1, int(torch.isfinite(x).sum(-1).max()))  # survivors are a prefix
            if keep < x.shape[1]:
                x, idx = x[:, :keep], idx[:, :keep]
        if s.min_p > 0.0:
            x = min_p_filter(x, s.min_p)
        if s.typical < 1.0:
            if x.shape[1] > self._PARTIAL_TYPICAL_MIN_N:
                x, idx = self._typical_head(x, idx, s.typical)
            else:
                x = typical_filter(x, s.typical)
        return x, idx

    def _typical_head(self, x: torch.Tensor, idx: torch.Tensor | None, mass: float):
        """`typical_filter` on a large row without a full sort: take the most typical tokens with a
        partial topk that grows until it holds `mass`, then keep and return only the survivors."""
        n = x.shape[1]
        logp = torch.log_softmax(x, -1)
        p = logp.exp()
        ent = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1, keepdim=True)
        shifted = (-logp - ent).abs()
        k = self._PARTIAL_TOP_P_K
        while True:
            if 2 * k >= n:
                _, pos = shifted.sort(dim=-1, stable=True)
                ph = p.gather(1, pos)
                break
            _, pos = shifted.topk(k, dim=-1, largest=False)  # ascending
            ph = p.gather(1, pos)
            if bool((ph.sum(-1) >= mass + 1e-4).all()):
                break
            k *= 8
        remove = (ph.cumsum(-1) - ph) >= mass
        remove[:, 0] = False
        xh = x.gather(1, pos).masked_fill(remove, NEG_INF)
        keep = max(1, int(torch.isfinite(xh).sum(-1).max()))  # survivors are a prefix
        return xh[:, :keep], _compose(idx, pos[:, :keep])

    @staticmethod
    def _check_rows(x: torch.Tensor) -> None:
        if not bool(torch.isfinite(x).any(-1).all()):
            raise ValueError("no token can be sampled: every candidate of a row has logit -inf "
                             "(all banned / not allowed, or the model produced -inf / nan)")

    def _final(self, logits: torch.Tensor, history: Any):
        """(x, idx, mode) with mode 'greedy' | 'mirostat' | 'sample'."""
        s = self._settings
        x, idx = self._prefilter(logits, history)
        if s.is_greedy:
            return x, idx, "greedy"
        if s.mirostat:
            x = apply_temperature(x, s.temperature)
            x = mirostat_v2_filter(x, self._mu_for(x.shape[0], x.device))
            return x, idx, "mirostat"
        x, idx = self._truncate(x, idx)
        return x, idx, "sample"

    # -- public --------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, history: Any = None) -> torch.Tensor:
        """Next token per row: LongTensor ``[B]`` on the logits' device.

        logits: ``[B, V]`` (also ``[V]`` -> B = 1, or ``[B, T, V]`` -> last position), any float dtype.
        history: the tokens so far per row (prompt + generated) for the penalties:
        LongTensor ``[B, T]`` (ids < 0 = padding), a list of B token lists, or None.
        """
        if self.kernels is not None:
            fast = self._sample_row(logits, history)
            if fast is not None:
                return fast
        x, idx, mode = self._final(logits, history)
        if mode == "greedy":
            pos = x.argmax(-1)
            if not bool(torch.isfinite(x.gather(1, pos.unsqueeze(1))).all()):
                self._check_rows(x)
                raise ValueError("no token can be sampled: the logits contain nan")
            return _compose(idx, pos)
        x, idx = self._compact_finite(x, idx)
        shifted = x - x.amax(-1, keepdim=True)
        pos, total = self._draw(shifted.exp())
        if mode == "mirostat":
            s = self._settings
            logp = shifted.gather(1, pos.unsqueeze(1)).squeeze(1).double() - total.log()
            surprise = (-logp / LN2).float()
            self._mu = self._mu - s.mirostat_eta * (surprise - s.mirostat_tau)
            self.last_surprise = surprise
        return _compose(idx, pos)

    def _sample_row(self, logits: torch.Tensor, history: Any) -> torch.Tensor | None:
        """One CPU row through the kernel (no mirostat, no allowed set), else None."""
        s = self._settings
        x = self._as_2d(logits)
        if x.shape[0] != 1 or x.device.type != "cpu" or s.mirostat or s.allowed_tokens:
            return None
        h = as_history(history, 1, "cpu", s.penalty_window) if s.has_penalties else None
        banned = self._ids("banned", x.shape[1], x.device) if s.banned_tokens else None
        u = 0.0 if s.is_greedy else float(torch.rand((1, 1), generator=self.generator("cpu"), dtype=torch.float64))
        tok = self.kernels.sample_row(
            x[0].contiguous(), h[0].contiguous() if h is not None else _NO_IDS,
            banned if banned is not None else _NO_IDS, s.repetition_penalty, s.repetition_penalty_sustain,
            s.repetition_penalty_decay, s.presence_penalty, s.frequency_penalty, s.temperature, s.top_k, s.top_p,
            s.min_p, s.typical, u)
        return torch.tensor([tok])

    def _compact_finite(self, x: torch.Tensor, idx: torch.Tensor | None):
        """A long single row with few survivors (min_p / mirostat on the full vocabulary) is cut down
        to its finite entries: exp() of ~1e5 -inf entries costs more than finding the survivors."""
        n = x.shape[1]
        if x.shape[0] != 1 or n <= self._COMPACT_MIN_N:
            return x, idx
        nz = torch.isfinite(x[0]).nonzero().squeeze(1)
        if nz.numel() == 0 or nz.numel() * 4 > n:
            return x, idx
        if idx is not None and idx.dim() == 2:
            return x[:, nz], idx[:, nz]
        return x[:, nz], _compose(idx, nz)

    def _draw(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse-CDF draw from unnormalised weights ``[B, C]`` (>= 0): one cumsum (fp64) and one
        uniform per row (torch.multinomial draws an exponential per vocabulary entry: ~10x slower
        on a 128k row). Returns (positions [B], totals [B] fp64)."""
        cdf = weights.double().cumsum(-1)
        total = cdf[:, -1:]
        if not bool(((total > 0) & torch.isfinite(total)).all()):
            self._check_rows(torch.where(weights > 0, 0.0, NEG_INF))
            raise ValueError("no token can be sampled: the distribution is not finite (nan logits?)")
        u = torch.rand(total.shape, generator=self.generator(cdf.device), dtype=torch.float64,
                       device=cdf.device)
        # v < total strictly, so the first cdf entry > v has a non-zero weight
        v = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        pos = torch.searchsorted(cdf, v, right=True).squeeze(1)
        return pos, total.squeeze(1)

    @torch.no_grad()
    def probs(self, logits: torch.Tensor, history: Any = None) -> torch.Tensor:
        """The final distribution ``[B, V]`` that `sample` would draw from (one-hot when greedy;
        with mirostat, for the current mu). Does not touch the RNG or the mirostat state."""
        x2 = self._as_2d(logits)
        b, v = x2.shape
        x, idx, mode = self._final(x2, history)
        self._check_rows(x)
        if mode == "greedy":
            p = torch.zeros_like(x)
            p.scatter_(1, x.argmax(-1, keepdim=True), 1.0)
        else:
            p = torch.softmax(x, -1)
        if idx is None:
            return p
        full = torch.zeros(b, v, dtype=p.dtype, device=p.device)
        if idx.dim() == 1:
            idx = idx.expand(b, -1)
        return full.scatter_(1, idx, p)

    def __repr__(self) -> str:
        return f"Sampler(seed={self.seed}, settings={self._settings!r})"
