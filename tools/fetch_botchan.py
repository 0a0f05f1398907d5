"""Fetch the Botchan perplexity text from the sentencepiece source distribution.

The text is public domain and ships as test/botchan.txt inside sentencepiece's sdist.
We download that sdist through pip (a package registry is all we can reach), take the
file out and strip the Project Gutenberg header and footer.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

START = "*** START OF THIS PROJECT GUTENBERG EBOOK"
END = "*** END OF THIS PROJECT GUTENBERG EBOOK"


def strip_gutenberg(text: str) -> str:
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(START))
    end = next(i for i, l in enumerate(lines) if l.startswith(END))
    body = lines[start + 1:end]
    # The first line after the marker is the producer credit, not the book.
    if body and body[0].startswith("Produced by"):
        body = body[1:]
    while body and (not body[-1].strip() or body[-1].startswith("End of Project Gutenberg")):
        body.pop()
    return "\n".join(body).strip() + "\n"


def fetch(out: Path) -> Path:
    if out.exists() and out.stat().st_size > 100_000:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--no-binary", ":all:", "sentencepiece==0.2.3", "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("sentencepiece-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("test/botchan.txt"))
            raw = tar.extractfile(member).read().decode("utf-8-sig")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(strip_gutenberg(raw), encoding="utf-8")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-o", "--out", type=Path, default=Path("data/botchan.txt"))
    print(fetch(ap.parse_args().out))
