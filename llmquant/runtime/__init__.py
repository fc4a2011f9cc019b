"""Run quantized checkpoints: ``load``, ``QuantLinear`` and its kernels, evaluation helpers."""
from __future__ import annotations


def load(*args, **kwargs):
    """See :func:`llmquant.runtime.loader.load`."""
    from llmquant.runtime.loader import load as _load
    return _load(*args, **kwargs)
