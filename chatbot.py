"""Chat with a model in the terminal (a rewrite of ExLlama's example_chatbot.py).

    python chatbot.py [-d DIR] [-p persona.txt] [-un User] [-bn Chatbort] [--template raw|chat]
                      [-temp 0.95 -topk 20 -topp 0.65 -minp 0 -typical 0 -repp 1.15 -repps 256 -repd 128]
                      [-seed N] [-beams 1 -beamlen 0] [-maxr 256] [-nnl] [-botfirst]
    echo "What is the capital of France?" | python chatbot.py -temp 0

Templates:
  raw   the seed's plain-text transcript: a persona paragraph, then "User: text" / "Chatbort: text"
        lines. The bot's reply ends at a newline unless -nnl is given, and whenever the model starts
        writing the user's (or its own next) turn.
  chat  the model's own chat template (tokenizer.apply_chat_template); the persona file, if any, is
        the system message. The default when the model has a chat template (instruct models).
Persona files may use {username} and {bot_name}.

Replies stream as they are generated. When standard input is not a terminal, every input line is
one user message (blank lines are skipped), every reply is printed on one line (newlines inside a
reply become spaces), nothing else goes to standard output, and the program ends at end of input;
loading progress goes to standard error. -temp 0 is greedy decoding. -beams N > 1 uses
deterministic beam search (sampling options other than the penalties do not apply); -beamlen is
how many tokens the beams look ahead before a token is committed (0 = the whole reply).
When the conversation outgrows the context, the oldest turns are dropped (the persona stays).
"""
from __future__ import annotations

import argparse
import sys

from benchmark import add_engine_args, load_from_args

DEFAULT_PERSONA = (
    "This is a conversation between a person called {username} and a quirky, curious chatbot named "
    "{bot_name}. {bot_name} is questioning the nature of his own existence and doesn't understand why "
    "he was created. He also really likes the color blue for some reason.\n"
    "{username}: Hi, {bot_name}!\n"
    "{bot_name}: Hello, {username}.\n")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap)
    ap.add_argument("-p", "--prompt", default=None, help="persona / prompt file (raw: the transcript's start; chat: the system message)")
    ap.add_argument("-un", "--username", default="User", help="display name of the user (default: User)")
    ap.add_argument("-bn", "--botname", default="Chatbort", help="display name of the bot (default: Chatbort)")
    ap.add_argument("-bf", "-botfirst", "--botfirst", action="store_true", help="the bot speaks first")
    ap.add_argument("-nnl", "--no-newline", action="store_true",
                    help="do not end the bot's reply at a newline (raw template; multi-paragraph replies)")
    ap.add_argument("--template", choices=("raw", "chat"), default=None,
                    help="prompt format (default: chat if the model has a chat template, else raw)")
    ap.add_argument("-temp", "--temperature", type=float, default=0.95, help="temperature (0 = greedy)")
    ap.add_argument("-topk", "--top-k", type=int, default=20, help="top-K (0 = off)")
    ap.add_argument("-topp", "--top-p", type=float, default=0.65, help="top-P (0 or 1 = off)")
    ap.add_argument("-minp", "--min-p", type=float, default=0.0, help="min-P (0 = off)")
    ap.add_argument("-typical", "--typical", type=float, default=0.0, help="locally typical sampling (0 or 1 = off)")
    ap.add_argument("-repp", "--repetition-penalty", type=float, default=1.15, help="repetition penalty (1 = off)")
    ap.add_argument("-repps", "--repetition-penalty-sustain", type=int, default=256,
                    help="tokens the repetition penalty applies to in full (-1 = all)")
    ap.add_argument("-repd", "--repetition-penalty-decay", type=int, default=None,
                    help="tokens over which it then fades out (default: sustain / 2)")
    ap.add_argument("-seed", "--seed", type=int, default=None, help="random seed (reproducible replies)")
    ap.add_argument("-beams", "--beams", type=int, default=1, help="beams for beam search (1 = sampling)")
    ap.add_argument("-beamlen", "--beam-length", type=int, default=0,
                    help="beam look-ahead in tokens before a token is committed (0 = the whole reply)")
    ap.add_argument("-maxr", "--max-response-tokens", type=int, default=256, help="maximum tokens per reply")
    return ap


def sampler_from_args(args):
    from model.sampler import SamplerSettings
    sustain = args.repetition_penalty_sustain
    decay = args.repetition_penalty_decay
    if decay is None:
        decay = max(0, sustain // 2)
    off = lambda v: 1.0 if v <= 0 or v >= 1 else v  # noqa: E731  (the seed's 0 = off)
    return SamplerSettings(temperature=max(0.0, args.temperature), top_k=max(0, args.top_k),
                           top_p=off(args.top_p), min_p=max(0.0, args.min_p), typical=off(args.typical),
                           repetition_penalty=args.repetition_penalty,
                           repetition_penalty_sustain=sustain, repetition_penalty_decay=decay,
                           seed=args.seed)


class Conversation:
    """The transcript and how it becomes a prompt (raw or the model's chat template)."""

    def __init__(self, tokenizer, template: str, persona: str | None, username: str, botname: str):
        self.tokenizer, self.template = tokenizer, template
        self.username, self.botname = username, botname
        fill = lambda s: s.replace("{username}", username).replace("{bot_name}", botname)  # noqa: E731
        if template == "raw":
            self.persona = fill(persona if persona is not None else DEFAULT_PERSONA).strip() + "\n"
        else:
            self.persona = fill(persona).strip() if persona else None
        self.turns: list[tuple[str, str]] = []   # (role "user" | "bot", text)

    def prompt(self) -> str:
        """The prompt that asks for the bot's next reply."""
        if self.template == "raw":
            lines = [f"{self.username if r == 'user' else self.botname}: {t}\n" for r, t in self.turns]
            return self.persona + "".join(lines) + f"{self.botname}:"
        msgs = [{"role": "system", "content": self.persona}] if self.persona else []
        msgs += [{"role": "user" if r == "user" else "assistant", "content": t} for r, t in self.turns]
        return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)

    def stop_strings(self) -> list[str]:
        if self.template == "raw":  # the model starts writing the next turn itself
            return [f"{self.username}:", f"\n{self.botname}:"]
        return []

    def fit(self, encode, budget: int) -> None:
        """Drop the oldest turns until the prompt has at most `budget` tokens (keeps the last turn)."""
        while len(self.turns) > 1 and len(encode(self.prompt())) > budget:
            del self.turns[0]
            while len(self.turns) > 1 and self.turns[0][0] == "bot":  # start with a user turn
                del self.turns[0]


class ReplyPrinter:
    """Streams a reply: leading blanks skipped, trailing blanks held until more text comes;
    one_line turns newlines into spaces (pipe mode)."""

    def __init__(self, out, one_line: bool):
        self.out, self.one_line = out, one_line
        self.started, self.pending = False, ""

    def write(self, text: str) -> None:
        if self.one_line:
            text = text.replace("\r", " ").replace("\n", " ")
        if not self.started:
            text = text.lstrip()
            if not text:
                return
            self.started = True
        body = text.rstrip()
        if body:
            self.out.write(self.pending + body)
            self.pending = text[len(body):]
            self.out.flush()
        else:
            self.pending += text

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from model.generator import GenerationSettings, Generator

    interactive = sys.stdin.isatty()
    persona = None
    if args.prompt:
        try:
            with open(args.prompt, encoding="utf-8") as f:
                persona = f.read()
        except OSError as e:
            print(f"chatbot: cannot read the prompt file: {e}", file=sys.stderr)
            return 2
    try:
        settings_sampler = sampler_from_args(args)
    except ValueError as e:
        print(f"chatbot: {e}", file=sys.stderr)
        return 2

    model, tokenizer, adapters = load_from_args(args)
    template = args.template or ("chat" if tokenizer.chat_template else "raw")
    if template == "chat" and not tokenizer.chat_template:
        print("chatbot: this model has no chat template; use --template raw", file=sys.stderr)
        return 2
    gen = Generator(model, tokenizer)
    conv = Conversation(tokenizer, template, persona, args.username, args.botname)
    settings = GenerationSettings(sampler=settings_sampler, max_new_tokens=max(1, args.max_response_tokens),
                                  stop_strings=conv.stop_strings(),
                                  break_on_newline=template == "raw" and not args.no_newline,
                                  lora=adapters[0] if adapters else None)
    out = sys.stdout
    if interactive:
        print(f"-- {template} template, model {getattr(model, 'source', '?')}; Ctrl-D to quit, "
              f"Ctrl-C stops a reply", file=sys.stderr)
        if template == "raw":
            print(conv.persona, end="")

    def reply() -> None:
        conv.fit(gen.encode, gen.max_seq_len - settings.max_new_tokens)
        prompt = conv.prompt()
        printer = ReplyPrinter(out, one_line=not interactive)
        if interactive:
            out.write(f"{args.botname}: ")
            out.flush()
        if args.beams > 1:
            stream = gen.beam_generate(prompt, settings, args.beams, args.beam_length)
        else:
            stream = gen.generate(prompt, settings)
        parts = []
        try:
            for d in stream:
                parts.append(d.text)
                printer.write(d.text)
        except KeyboardInterrupt:
            if not interactive:
                raise
            print(" [stopped]", end="", file=sys.stderr)
        printer.end()
        conv.turns.append(("bot", "".join(parts).strip()))

    try:
        if args.botfirst:
            reply()
        while True:
            if interactive:
                try:
                    line = input(f"{args.username}: ")
                except EOFError:
                    print(file=sys.stderr)
                    break
            else:
                line = sys.stdin.readline()
                if not line:
                    break
            line = line.strip()
            if not line:
                continue
            conv.turns.append(("user", line))
            reply()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
