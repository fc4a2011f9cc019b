"""Loaders by ``quantization_config.quant_method``: other packages plug theirs in here.

A loader is ``fn(path: Path, config: dict, quant_config: dict, *, device: str, dtype, kernel: str)
-> torch.nn.Module`` returning the model in eval mode. ``llmquant.runtime.loader.load`` looks the
method up here; ``gptq`` is registered by the loader itself, ``llmquant_w8a8`` lazily from
``llmquant.ptq.checkpoint`` (see :func:`llmquant.runtime.loader.load`).
"""
from __future__ import annotations

from typing import Callable

_LOADERS: dict[str, Callable] = {}


def register_loader(quant_method: str, fn: Callable) -> None:
    """Make :func:`llmquant.load` use ``fn`` for checkpoints whose quant_method is ``quant_method``."""
    _LOADERS[quant_method.lower()] = fn


def get_loader(quant_method: str) -> Callable | None:
    return _LOADERS.get(quant_method.lower())


def registered() -> list[str]:
    return sorted(_LOADERS)
