"""Conversation logic: settings, prompts in two formats, the context window and turn order.

No I/O and no locking here: functions take a `Session` (from sessions/), the active path and an
`Engine`-like object (`count`, `encode_prompt`, `max_seq_len`, `chat_template`, `choose`), and return
plain values. The handlers call them under the session's lock.

Prompt formats (docs/protocol.md §9):
- raw: the fixed prompt, the bots' personas, then `Author: text` lines and `Speaker:` (ExLlama's
  web UI format; works with any model and with several bots);
- chat: the model's chat template (system = fixed prompt + persona, user/assistant turns), used only
  with exactly one bot and a model that has a template.
Context window: prompt + max reply tokens must fit `max_seq_len`; the oldest messages of the active
path drop out whole (the fixed prompt first when `keep_fixed_prompt` is off).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from sessions import DEFAULT_SETTINGS

from .protocol import SETTING_SPECS, ProtocolError

SETTINGS_DEFAULTS = {**{k: v for k, v in DEFAULT_SETTINGS.items() if k in SETTING_SPECS}, "seed": None}
for _k in SETTING_SPECS:  # every known key has a default
    SETTINGS_DEFAULTS.setdefault(_k, None)
SETTINGS_DEFAULTS.setdefault("chunk_size", 128)


# ---- settings ------------------------------------------------------------------------------------

def _valid(key, value) -> bool:
    try:
        SETTING_SPECS[key](value, key)
        return True
    except ProtocolError:
        return False


def merged_settings(session, bot=None) -> dict:
    """Defaults <- session settings <- the bot's overrides. Values that fail validation (an edited or
    old file) are ignored, so generation always gets sane numbers."""
    out = dict(SETTINGS_DEFAULTS)
    for source in (session.settings, bot.settings if bot is not None else {}):
        for k, v in source.items():
            if k not in SETTING_SPECS:
                continue
            if k == "seed" and v is None:
                out[k] = None
            elif v is not None and _valid(k, v):
                out[k] = v
    return out


def sampler_kwargs(s: dict) -> dict:
    """Our settings keys -> model.sampler.SamplerSettings fields (0 = off for top_p / typical)."""
    return {"temperature": float(s["temperature"]), "top_k": int(s["top_k"]),
            "top_p": float(s["top_p"]) if 0 < s["top_p"] < 1 else 1.0,
            "min_p": float(s["min_p"]),
            "typical": float(s["typical"]) if 0 < s["typical"] < 1 else 1.0,
            "repetition_penalty": float(s["token_repetition_penalty_max"]),
            "repetition_penalty_sustain": int(s["token_repetition_penalty_sustain"]),
            "repetition_penalty_decay": int(s["token_repetition_penalty_decay"]),
            "seed": s["seed"]}


def stop_strings(session) -> list[str]:
    """`\\nName:` for every participant, so a bot never writes someone else's line."""
    return [f"\n{p.name}:" for p in session.participants]


def generation_settings(engine, session, bot):
    s = merged_settings(session, bot)
    return engine.generation_settings(sampler=sampler_kwargs(s), max_new_tokens=int(s["max_response_tokens"]),
                                      stop_strings=stop_strings(session),
                                      break_on_newline=bool(s["break_on_newline"]), lora=bot.lora)


# ---- prompts -------------------------------------------------------------------------------------

@dataclass
class Prompt:
    text: str                      # the prompt text (what the generator gets, after encoding)
    ids: list[int] | None          # the exact token ids (None when the engine has no tokenizer)
    format: str                    # "raw" | "chat"
    dropped: list[str] = field(default_factory=list)   # active-path message ids left out (oldest)
    fixed_in: bool = True          # the fixed prompt and personas are in
    tokens_used: int = 0
    tokens_total: int = 0
    reserved: int = 0


def prompt_format(session, engine) -> str:
    if (session.template == "chat" and len(session.bots()) == 1 and engine is not None
            and engine.has_chat_template):
        return "chat"
    return "raw"


def header_text(session) -> str:
    parts = [session.fixed_prompt.strip()] if session.fixed_prompt.strip() else []
    parts += [b.persona.strip() for b in session.bots() if b.persona.strip()]
    return "\n".join(parts)


def raw_line(m) -> str:
    return f"{m.author}: {m.text}\n" if m.author else f"{m.text}\n"


def _chat_role(m) -> str:
    return {"user": "user", "bot": "assistant"}.get(m.role, "system")


def _render(session, engine, fmt, header, messages, tail_author, partial, fixed_in) -> str:
    """The prompt text for `messages` (already trimmed). `partial`: a bot message being continued
    (its text ends the prompt). `tail_author` None: a transcript ending in a newline (speaker choice)."""
    if fmt == "chat":
        chat = [{"role": "system", "content": engine.defang(header)}] if fixed_in and header else []
        chat += [{"role": _chat_role(m), "content": engine.defang(m.text)} for m in messages]
        return engine.chat_template(chat, add_generation_prompt=True) + (partial.text if partial else "")
    text = (header + "\n") if fixed_in and header else ""
    text += "".join(raw_line(m) for m in messages)
    if partial is not None:
        text += f"{partial.author}: {partial.text}" if partial.author else partial.text
    elif tail_author is not None:
        text += f"{tail_author}:"
    return text


def build_prompt(session, path, engine, speaker: str | None, max_new: int, *, partial=None,
                 fmt: str | None = None) -> Prompt:
    """The prompt for the next reply by `speaker` after `path` (the active path, root first).
    `partial`: continue that message (the last of `path`). `speaker` None (and no partial): the bare
    transcript ending in "\\n", for the speaker choice. Trims the oldest messages to fit."""
    fmt = fmt or prompt_format(session, engine)
    messages = [m for m in path if partial is None or m.id != partial.id]
    header = header_text(session)
    total = engine.max_seq_len
    budget = max(1, total - max_new)

    # estimate with per-piece counts, then confirm on the exact encoding
    overhead = 4 if fmt == "chat" else 0
    counts = [engine.count(raw_line(m) if fmt == "raw" else m.text) + overhead for m in messages]
    head_n = engine.count(header + "\n") + overhead if header else 0
    tail_n = engine.count(f"{partial.author}: {partial.text}" if partial else f"{speaker or ''}:") + 1
    fixed_in = True
    start = 0
    used = head_n + sum(counts) + tail_n
    if used > budget and not session.keep_fixed_prompt and header:
        fixed_in, used = False, used - head_n
    while used > budget and start < len(messages) - 1:
        used -= counts[start]
        start += 1
    while True:
        text = _render(session, engine, fmt, header, messages[start:], speaker, partial, fixed_in)
        ids = engine.encode_prompt(text, fmt)       # None: no tokenizer (remote engine), counted approximately
        n_ids = len(ids) if ids is not None else engine.count(text)
        if n_ids <= budget or start >= len(messages) - 1:
            break
        start += 1
    return Prompt(text=text, ids=ids, format=fmt, dropped=[m.id for m in messages[:start]], fixed_in=fixed_in,
                  tokens_used=n_ids, tokens_total=total, reserved=max_new)


# ---- turn order ----------------------------------------------------------------------------------

def _name_pattern(name: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(name) + r"(?!\w)", re.IGNORECASE)


def mentioned_bots(text: str, bots: list[str]) -> list[str]:
    """Bot names that occur in `text` as whole words (case-insensitive), earliest first."""
    hits = []
    for b in bots:
        m = _name_pattern(b).search(text)
        if m is not None:
            hits.append((m.start(), -len(b), b))
    return [b for _, _, b in sorted(hits)]


def round_robin(session, path) -> str | None:
    bots = [b.name for b in session.bots()]
    if not bots:
        return None
    for m in reversed(path):
        if m.role == "bot" and m.author in bots:
            return bots[(bots.index(m.author) + 1) % len(bots)]
    return bots[0]


def model_order_fallback(session, engine) -> bool:
    """Turn order "model" without an engine that can choose: round robin instead (say so)."""
    return session.turn_order == "model" and engine is not None and not getattr(engine, "constrained_choice", True)


def next_speaker(session, path, engine, spoken: list[str], first_turn: bool) -> str | None:
    """Who speaks next in this round (None: nobody, the round ends). `spoken`: bots that already
    spoke in this round. `engine` is only used by the "model" order (caller holds the engine)."""
    bots = [b.name for b in session.bots()]
    last = path[-1] if path else None
    last_author = last.author if last is not None else None
    order = session.turn_order
    if order == "manual" or not bots:
        return None
    if order == "round_robin":
        return round_robin(session, path)
    if order == "mentioned":
        for b in mentioned_bots(last.text if last is not None else "", bots):
            if b != last_author:
                return b
        return round_robin(session, path)
    if model_order_fallback(session, engine):
        # no constrained choice (a remote engine without it): round robin, each bot once per round
        nxt = round_robin(session, path)
        return nxt if first_turn or nxt not in spoken else None
    # "model": constrained choice among the bots that have not spoken this round, plus (after the
    # first turn) the users: picking a user ends the round. The first turn always gets a bot.
    bot_options = [b for b in bots if b not in spoken and b != last_author]
    if not bot_options and first_turn:
        bot_options = bots
    if not bot_options:
        return None
    users = [] if first_turn else [u.name for u in session.users()]
    options = bot_options + users
    if len(options) == 1:
        return options[0]
    prompt = build_prompt(session, path, engine, None, 8, fmt="raw")
    choice = engine.choose(prompt.ids if prompt.ids is not None else prompt.text, [f"{o}:" for o in options])
    name = choice[:-1]
    return name if name in bots else None


# ---- streamed text -------------------------------------------------------------------------------

class LeadStrip:
    """Drops the whitespace a raw-format reply starts with (`Speaker:` is followed by a space)."""

    def __init__(self, active: bool = True):
        self.active = active

    def __call__(self, text: str) -> str:
        if not self.active:
            return text
        out = text.lstrip()
        if out:
            self.active = False
        return out
