"""Perplexity over non-overlapping windows of a text file."""
from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F


def windows(token_ids: list[int], length: int, count: int) -> list[torch.Tensor]:
    n = min(count, len(token_ids) // length)
    if n == 0:
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than one window of {length}")
    return [torch.tensor(token_ids[i * length:(i + 1) * length]) for i in range(n)]


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] under logits[:-1] (fp64 sum), and the count."""
    lp = F.log_softmax(logits[:-1].float(), dim=-1)
    nll = -lp.gather(-1, ids[1:].to(lp.device).unsqueeze(-1)).double().sum().item()
    return nll, ids.numel() - 1


def perplexity(model, token_ids: list[int], length: int = 512, count: int = 16,
               progress: bool = True, lora: str | None = None) -> float:
    """Every token after the first in each window is scored; windows start with an empty cache."""
    total, n = 0.0, 0
    t0 = time.time()
    wins = windows(token_ids, length, count)
    for i, ids in enumerate(wins):
        logits = model(ids.unsqueeze(0), last_only=False, lora=lora)[0]
        nll, c = window_nll(logits, ids)
        total, n = total + nll, n + c
        if progress:
            print(f"\rperplexity: window {i + 1}/{len(wins)}, running {math.exp(total / n):.4f}, "
                  f"{time.time() - t0:.1f} s", end="\n" if i + 1 == len(wins) else "",
                  file=sys.stderr, flush=True)
    return math.exp(total / n)
