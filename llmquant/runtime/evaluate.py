"""Perplexity of a model path (dense or quantized) with the GPTQ paper's protocol.

``evaluate_checkpoint(path, "wikitext2", seqlen=2048, max_windows=40)`` ->
``{"ppl": 20.6, "windows": 40, "tokens": 81880, "seconds": ..., "dataset": ..., "kernel": ...}``
(``tokens`` = predicted tokens = ``windows * (seqlen - 1)``; see :mod:`llmquant.evaluation`).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch

from llmquant.errors import InputError

_SHARED_FILES = {"wikitext2": "wikitext2-test.raw", "c4": "c4-train-1000.jsonl"}


def _shared_data_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("LLMQUANT_DATA_DIR"):
        dirs.append(Path(os.environ["LLMQUANT_DATA_DIR"]))
    dirs.append(Path.cwd().parent / "shared" / "data")
    dirs.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    return dirs


def eval_corpus(spec: str):
    """``wikitext2`` (test split) | ``c4`` | a path. Named sets fall back to a local copy in
    ``$LLMQUANT_DATA_DIR`` or ``../shared/data`` when ``datasets`` cannot fetch them (offline)."""
    from llmquant.data import load_corpus
    if spec not in _SHARED_FILES:
        return load_corpus(spec)
    try:
        return load_corpus(spec, split="test" if spec == "wikitext2" else "train")
    except InputError as e:
        for d in _shared_data_dirs():
            f = d / _SHARED_FILES[spec]
            if f.is_file():
                return load_corpus(str(f))
        raise e


def load_tokenizer_for(path: str):
    from llmquant.model.load import load_tokenizer, resolve_source
    return load_tokenizer(resolve_source(str(path)))


def evaluate_model(model, tokenizer, dataset: str = "wikitext2", seqlen: int = 2048,
                   max_windows: int | None = None, device: str = "cpu",
                   progress: Callable[[int, int], None] | None = None) -> dict:
    from llmquant.evaluation import perplexity
    from llmquant.data import tokenize_stream
    if seqlen < 2:
        raise InputError(f"--seqlen {seqlen}: needs at least 2 tokens")
    if max_windows is not None and max_windows < 1:
        raise InputError(f"--max-windows {max_windows}: needs at least 1")
    ids = tokenize_stream(tokenizer, eval_corpus(dataset))               # [1, N]
    if ids.shape[1] < seqlen:
        raise InputError(f"--dataset {dataset}: {ids.shape[1]} tokens, fewer than one window of --seqlen {seqlen}; "
                         "lower --seqlen or give more text")
    t0 = time.perf_counter()
    r = perplexity(model, ids, seqlen=seqlen, max_windows=max_windows, device=device, progress=progress)
    r["seconds"] = time.perf_counter() - t0
    return r


def evaluate_checkpoint(path, dataset: str = "wikitext2", seqlen: int = 2048, max_windows: int | None = None,
                        device: str = "auto", kernel: str = "auto", dtype: str = "auto",
                        progress: Callable[[int, int], None] | None = None) -> dict:
    """Load ``path`` with :func:`llmquant.load` and measure its perplexity on ``dataset``."""
    from llmquant.model.load import resolve_device
    from llmquant.runtime.loader import load, quant_linears
    device = resolve_device(device)
    tok = load_tokenizer_for(path)
    model = load(path, device=device, dtype=dtype, kernel=kernel)
    with torch.inference_mode():
        r = evaluate_model(model, tok, dataset, seqlen, max_windows, device, progress)
    kernels = sorted({m.kernel for m in quant_linears(model).values()})
    r.update(dataset=dataset, seqlen=seqlen, kernel=",".join(kernels) or "dense",
             dtype=str(next(model.parameters()).dtype).replace("torch.", ""))
    return r
