"""Perplexity with the GPTQ paper's protocol.

The whole text is tokenized once and cut into non-overlapping windows of ``seqlen`` tokens; the loss is
the mean float32 negative log-likelihood over every predicted token (``seqlen - 1`` per window).
"""
from __future__ import annotations

import math
from typing import Callable

import torch


@torch.no_grad()
def perplexity(
    model, ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
    device: str | torch.device = "cpu", progress: Callable[[int, int], None] | None = None,
) -> dict:
    """``ids [1, N]`` -> ``{"ppl", "windows", "tokens", "nll"}``."""
    n_windows = ids.shape[1] // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"text has {ids.shape[1]} tokens, fewer than one window of {seqlen}")
    nll, count = 0.0, 0
    for w in range(n_windows):
        x = ids[:, w * seqlen:(w + 1) * seqlen].to(device)              # [1, seqlen]
        logits = model(x, use_cache=False).logits[0, :-1].float()        # [seqlen-1, vocab]
        loss = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
        nll += loss.item()
        count += seqlen - 1
        if progress is not None:
            progress(w + 1, n_windows)
    return {"ppl": math.exp(nll / count), "windows": n_windows, "tokens": count, "nll": nll / count}
