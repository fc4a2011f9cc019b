"""Fixtures for the runtime tests (helpers live in rt_helpers.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from rt_helpers import write_checkpoint

@pytest.fixture
def ckpt_factory(tmp_path):
    counter = {"n": 0}

    def make(**kw) -> Path:
        counter["n"] += 1
        return write_checkpoint(tmp_path / f"ckpt{counter['n']}", **kw)
    return make


@pytest.fixture
def text_file(tmp_path) -> Path:
    import random
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "quantized", "models", "run", "fast", "."]
    p = tmp_path / "text.txt"
    p.write_text(" ".join(rng.choice(words) for _ in range(1500)))
    return p
