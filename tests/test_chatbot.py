"""chatbot.py: prompt building and streaming output (no model), and one scripted run of the real thing."""
import io
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from chatbot import Conversation, ReplyPrinter, build_parser, sampler_from_args  # noqa: E402


class FakeTok:
    chat_template = "x"

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt else "")


def test_raw_conversation_prompt_and_trimming():
    c = Conversation(FakeTok(), "raw", "A chat between {username} and {bot_name}.\n", "Ann", "Bot")
    c.turns += [("user", "hi"), ("bot", "hello"), ("user", "how are you?")]
    assert c.prompt() == "A chat between Ann and Bot.\nAnn: hi\nBot: hello\nAnn: how are you?\nBot:"
    assert c.stop_strings() == ["Ann:", "\nBot:"]
    c.fit(lambda s: s.split(), budget=12)  # "tokens" = words
    assert c.turns == [("user", "how are you?")]
    assert c.prompt().startswith("A chat between Ann and Bot.\n")  # the persona stays


def test_chat_conversation_uses_the_template():
    c = Conversation(FakeTok(), "chat", "You are {bot_name}.", "Ann", "Bot")
    c.turns += [("user", "hi"), ("bot", "hello"), ("user", "bye")]
    assert c.prompt() == "<system>You are Bot.<user>hi<assistant>hello<user>bye<assistant>"
    assert c.stop_strings() == []
    assert Conversation(FakeTok(), "chat", None, "A", "B").persona is None


def test_reply_printer_one_line():
    out = io.StringIO()
    p = ReplyPrinter(out, one_line=True)
    for t in [" ", "\n", "Hello", " ", "there", ".\n\n", "Second", " line.", "\n"]:
        p.write(t)
    p.end()
    assert out.getvalue() == "Hello there.  Second line.\n"


def test_sampler_flags():
    args = build_parser().parse_args(["-temp", "0", "-topk", "5", "-typical", "0", "-repp", "1.2",
                                      "-repps", "100", "-seed", "7", "-topp", "0"])
    s = sampler_from_args(args)
    assert s.is_greedy and s.top_k == 5 and s.typical == 1.0 and s.top_p == 1.0 and s.seed == 7
    assert s.repetition_penalty == 1.2 and s.repetition_penalty_sustain == 100 and s.repetition_penalty_decay == 50
    args = build_parser().parse_args(["-repd", "10", "-minp", "0.1", "-beams", "3", "-beamlen", "5", "-maxr", "9",
                                      "-nnl", "-botfirst", "-un", "Me", "-bn", "It", "--template", "raw"])
    s = sampler_from_args(args)
    assert s.repetition_penalty_decay == 10 and s.min_p == 0.1
    assert (args.beams, args.beam_length, args.max_response_tokens) == (3, 5, 9)
    assert args.no_newline and args.botfirst and (args.username, args.botname, args.template) == ("Me", "It", "raw")


def test_piped_chat_answers_paris():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a small model on a busy 2-core box
    r = subprocess.run([sys.executable, "chatbot.py", "-temp", "0", "-maxr", "40"], cwd=ROOT, env=env,
                       input="What is the capital of France? Answer in one sentence.\n",
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout  # one reply, on its own line, nothing else on stdout
    assert "Paris" in lines[0]
