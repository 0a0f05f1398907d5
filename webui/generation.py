"""A generation round: wait for the engine (telling the client its place in the line), then one bot
turn after another (speaker by turn order), each streamed and saved.

`round_messages(...)` is a generator of outgoing messages; the caller (a handler) has already marked
the session as generating (`Hub.begin`) and must run `Hub.end` in a `finally`, so that a client that
goes away, an engine error or a closed iterator never leaves a session stuck "generating". A stopped
(cancelled) message is saved with the text it has; one stopped before any text is removed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from sessions import Participant

from . import conversation
from .engine import QueueFull
from .protocol import ProtocolError

log = logging.getLogger("webui")

FALLBACK_NOTICE = "turn order \"model\" needs constrained choice, which this engine lacks: round robin was used"


@dataclass
class Plan:
    kind: str = "new"            # "new" | "regenerate" | "continue"
    max_turns: int = 1
    first: str | None = None     # forced first speaker
    target: str | None = None    # message id for regenerate / continue


def _bot(session, name: str) -> Participant:
    return session.participant(name) or Participant(name=name, kind="bot")


def round_messages(hub, live, gen, plan: Plan):
    """Yields queue / stream.* / state messages (published to the session's other watchers too) and
    returns (turns, stopped). Raises ProtocolError on queue_full / generation_failed."""
    engine = hub.engine
    sid = live.session.id
    conn = gen.conn
    turns: list[dict] = []
    try:
        ticket = engine.join()
    except QueueFull as e:
        raise ProtocolError("queue_full", str(e), session=sid) from None
    try:
        last = None
        while True:
            if gen.cancel.is_set():
                return turns, True
            pos = engine.position(ticket, wait=0.0 if last is None else 0.25)
            if pos != last:
                yield hub.publish(live, {"type": "queue", "session": sid, "position": pos}, conn)
                last = pos
            if pos == 0:
                break
        with live.lock:
            gen.queued = False
        spoken: list[str] = []
        for turn in range(plan.max_turns):
            if gen.cancel.is_set():
                break
            step = _start_turn(hub, live, gen, plan, turn, spoken)
            if step is None:
                break
            mid, speaker, parent, prompt, settings, base, cont = step
            yield hub.publish(live, {"type": "stream.start", "session": sid, "message_id": mid, "author": speaker,
                                     "parent": parent, "continue": cont}, conn)
            strip = conversation.LeadStrip(active=not cont)
            text, final, failure = "", None, None
            try:
                for d in engine.generate(prompt.ids if prompt.ids is not None else prompt.text, settings, gen.cancel):
                    final = d
                    piece = strip(d.text)
                    if piece:
                        text += piece
                        with live.lock:
                            live.session.update_message_text(mid, base + text)
                        yield hub.publish(live, {"type": "stream.delta", "session": sid, "message_id": mid,
                                                 "text": piece}, conn)
            except Exception as e:  # noqa: BLE001 - reported to the client, partial text kept
                log.exception("generation failed in session %s", sid)
                failure = e
            reason = "error" if failure is not None else (final.finish_reason if final else "cancelled") or "length"
            n_tokens = final.n_tokens if final is not None else 0
            tps = round(final.tokens_per_s, 2) if final is not None and final.tokens_per_s else None
            with live.lock:
                s = live.session
                discarded = False
                if not text and not cont and reason in ("cancelled", "error"):
                    s.delete_message(mid)
                    discarded = True
                else:
                    old = s.message(mid)
                    full = base + text if cont else text.rstrip()
                    tokens = (old.tokens or 0) + n_tokens if cont else n_tokens
                    s.update_message_text(mid, full, tokens=tokens, tokens_per_s=tps)
                gen.message_id = gen.author = None
                hub.save(live)
                rev = s.revision
            yield hub.publish(live, {"type": "stream.end", "session": sid, "message_id": mid, "tokens": n_tokens,
                                     "tokens_per_s": tps, "finish_reason": reason, "discarded": discarded,
                                     "revision": rev}, conn)
            yield hub.state(live, conn)
            turns.append({"message_id": None if discarded else mid, "author": speaker, "finish_reason": reason,
                          "tokens": n_tokens, "tokens_per_s": tps})
            if not cont and plan.kind == "new" and not (turn == 0 and plan.first) \
                    and conversation.model_order_fallback(live.session, engine):
                turns[-1]["notice"] = FALLBACK_NOTICE
            spoken.append(speaker)
            if failure is not None:
                raise ProtocolError("generation_failed", f"the engine failed: {type(failure).__name__}: "
                                    f"{str(failure)[:300]}", session=sid)
            if reason == "cancelled":
                break
        return turns, gen.cancel.is_set()
    finally:
        engine.leave(ticket)


def _start_turn(hub, live, gen, plan: Plan, turn: int, spoken: list[str]):
    """Under the session lock: pick the speaker, add (or pick) the message, build the prompt."""
    engine = hub.engine
    with live.lock:
        s = live.session
        partial, base, cont = None, "", False
        if turn == 0 and plan.kind == "continue":
            partial = s.message(plan.target)
            speaker, mid, parent, base, cont = partial.author, partial.id, partial.parent, partial.text, True
        elif turn == 0 and plan.kind == "regenerate":
            speaker = s.message(plan.target).author
            parent = s.regenerate(plan.target)
            mid = s.add_message(parent, "bot", speaker, "")
        else:
            path = s.active_path()
            speaker = plan.first if turn == 0 and plan.first else \
                conversation.next_speaker(s, path, engine, spoken, first_turn=(turn == 0))
            if speaker is None:
                return None
            parent = s.active_leaf
            mid = s.append("bot", speaker, "")
        bot = _bot(s, speaker)
        settings = conversation.generation_settings(engine, s, bot)
        path = s.active_path()
        prompt_path = path if cont else path[:-1]
        prompt = conversation.build_prompt(s, prompt_path, engine, speaker, settings.max_new_tokens,
                                           partial=partial)
        gen.message_id, gen.author = mid, speaker
        return mid, speaker, parent, prompt, settings, base, cont


def finish_partial(hub, live, gen) -> None:
    """After an abnormal end (closed iterator, exception): keep what was streamed, saved."""
    with live.lock:
        mid = gen.message_id
        gen.message_id = gen.author = None
        if mid is None or mid not in live.session.messages:
            return
        m = live.session.messages[mid]
        try:
            if not m.text and m.role == "bot":
                live.session.delete_message(mid)
            hub.save(live)
        except Exception:  # noqa: BLE001 - nothing more we can do; the file keeps the last good save
            log.exception("could not save the partial reply in session %s", live.session.id)
