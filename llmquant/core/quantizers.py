"""Textbook quantizers on top of the trio in :mod:`llmquant.core.quant`.

Two named quantizers, both thin wrappers around ``choose_qparams`` / ``quantize`` / ``dequantize``
(``scale`` there is the grid step; the "multiplier" of textbooks is ``1 / scale``):

* symmetric absmax, signed restricted range ``[-(2^(n-1)-1), 2^(n-1)-1]``::

      multiplier = (2^(n-1) - 1) / max|x|      q = round(multiplier * x)      x' = q / multiplier

* asymmetric zero point, ``[a, b] -> [-2^(n-1), 2^(n-1) - 1]``::

      multiplier = (2^n - 1) / (b - a)        zero = round(-multiplier * a) - 2^(n-1)
      q = clamp(round(multiplier * x) + zero)  x' = (q - zero) / multiplier

  Worked example: int8, ``[-700, 1000]`` -> multiplier ``255/1700 = 0.15``, zero ``105 - 128 = -23``;
  ``-700 -> -128`` and ``1000 -> 127``.

Granularity (``QuantSpec.granularity``) selects a block of :mod:`llmquant.core.quant`:

===============  ======================  =============================
granularity      x ``[R, K]``            scale / zero shape
===============  ======================  =============================
``tensor``       any 2-D                 ``[1, 1]``
``channel``      rows = output channels  ``[R, 1]``
``group``        groups of G columns     ``[R, ceil(K / G)]``
``token``        activations ``[T, K]``  ``[T, 1]`` (same block as channel)
===============  ======================  =============================

Clipping shrinks the range before choosing the parameters: ``none``, a fixed ``ratio``, a
``percentile`` of ``|x|`` per block, or ``mse`` (search the ratio minimizing the squared error).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmquant.core.quant import (
    Block, PER_CHANNEL, PER_TENSOR, block_minmax, choose_qparams, dequantize, expand, mse_clip_search,
    per_group, qrange, quantize,
)

GRANULARITIES = ("tensor", "channel", "group", "token")
CLIP_METHODS = ("none", "ratio", "percentile", "mse")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor. Validated on construction."""

    bits: int = 8
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int = 128
    clip: str = "none"
    clip_value: float = 1.0          # ratio in (0, 1] for "ratio", percentile in (0, 100] for "percentile"

    def __post_init__(self):
        if not 2 <= self.bits <= 16:
            raise ValueError(f"bits must be in 2..16, got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "group" and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1 for per-group quantization, got {self.group_size}")
        if self.clip not in CLIP_METHODS:
            raise ValueError(f"clip must be one of {CLIP_METHODS}, got {self.clip!r}")
        if self.clip == "ratio" and not 0 < self.clip_value <= 1:
            raise ValueError(f"clip ratio must be in (0, 1], got {self.clip_value}")
        if self.clip == "percentile" and not 0 < self.clip_value <= 100:
            raise ValueError(f"clip percentile must be in (0, 100], got {self.clip_value}")

    @property
    def block(self) -> Block:
        if self.granularity == "tensor":
            return PER_TENSOR
        if self.granularity == "group":
            return per_group(self.group_size)
        return PER_CHANNEL

    @property
    def qrange(self) -> tuple[int, int]:
        """Signed codes; restricted (``-127..127``) when symmetric."""
        return qrange(self.bits, signed=True, restricted=self.symmetric)


@dataclass
class QuantResult:
    """Integer codes with their per-block parameters. ``q [R, K]`` int, ``scale``/``zero [nr, nc]``."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec

    @property
    def multiplier(self) -> torch.Tensor:
        return 1.0 / self.scale

    def dequantize(self) -> torch.Tensor:
        shape = self.q.shape
        return dequantize(self.q, expand(self.scale, self.spec.block, shape), expand(self.zero, self.spec.block, shape))


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return x
    if x.dim() == 1:
        return x.reshape(1, -1)
    return x.reshape(-1, x.shape[-1])


def percentile_ratio(x: torch.Tensor, block: Block, pct: float) -> torch.Tensor:
    """Per-block ratio ``percentile(|x|, pct) / max|x|`` (``[nr, nc]``; 1 for all-zero blocks)."""
    lo, hi = block_minmax(x, block)
    amax = torch.maximum(lo.abs(), hi.abs())
    R, K = x.shape
    r = R if block[0] == -1 else block[0]
    c = K if block[1] == -1 else block[1]
    nr, nc = lo.shape
    pad = (0, nc * c - K, 0, nr * r - R)
    a = torch.nn.functional.pad(x.abs().float(), pad, value=float("nan"))
    a = a.reshape(nr, r, nc, c).permute(0, 2, 1, 3).reshape(nr, nc, r * c)
    p = torch.nanquantile(a, pct / 100.0, dim=-1).to(amax.dtype)
    ratio = torch.where(amax > 0, p / amax, torch.ones_like(amax))
    return ratio.clamp(max=1.0)


def clip_ratio(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor | float:
    if spec.clip == "ratio":
        return spec.clip_value
    if spec.clip == "percentile":
        return percentile_ratio(x, spec.block, spec.clip_value)
    if spec.clip == "mse":
        return mse_clip_search(x, spec.bits, spec.symmetric, spec.block, signed=True, norm=2.0)
    return 1.0


def quantize_tensor(x: torch.Tensor, spec: QuantSpec) -> QuantResult:
    """Quantize ``x`` (2-D, or flattened to ``[-1, last dim]``) following ``spec``."""
    x2 = _as_2d(x).float()
    qmin, qmax = spec.qrange
    lo, hi = block_minmax(x2, spec.block)
    ratio = clip_ratio(x2, spec)
    scale, zero = choose_qparams(lo * ratio, hi * ratio, qmin, qmax, spec.symmetric)
    q = quantize(x2, expand(scale, spec.block, x2.shape), expand(zero, spec.block, x2.shape), qmin, qmax)
    return QuantResult(q, scale, zero, spec)


def absmax_quantize(x: torch.Tensor, bits: int = 8, granularity: str = "tensor", group_size: int = 128) -> QuantResult:
    """Symmetric absmax: ``multiplier = (2^(n-1)-1) / max|x|``, ``q = round(multiplier * x)``."""
    return quantize_tensor(x, QuantSpec(bits, True, granularity, group_size))


def zeropoint_quantize(x: torch.Tensor, bits: int = 8, granularity: str = "tensor", group_size: int = 128) -> QuantResult:
    """Asymmetric: ``[min, max] -> [-2^(n-1), 2^(n-1)-1]`` with an integer zero point."""
    return quantize_tensor(x, QuantSpec(bits, False, granularity, group_size))


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric activation quantization, one scale per row.

    ``x [T, K]`` float -> ``(q [T, K] int8, scale [T, 1] float32)`` with ``x ~= q * scale``.
    Written directly (no block helpers) because it runs on every forward pass.
    """
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().amax(dim=-1, keepdim=True).float()                      # [T, 1]
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.clamp(torch.round(x.float() / scale), -qmax, qmax).to(torch.int8)
    return q, scale


def error_report(x: torch.Tensor, x_hat: torch.Tensor) -> dict:
    """Quantization error of ``x_hat`` against ``x``: MSE, max |error|, relative Frobenius error and
    SQNR in dB (``10 log10(|x|^2 / |x - x_hat|^2)``)."""
    x = x.double()
    e = x_hat.double() - x
    mse = e.pow(2).mean().item()
    sig = x.pow(2).mean().item()
    return {
        "mse": mse,
        "max_abs_error": e.abs().max().item() if e.numel() else 0.0,
        "rel_error": math.sqrt(mse / sig) if sig > 0 else 0.0,
        "sqnr_db": 10 * math.log10(sig / mse) if mse > 0 and sig > 0 else math.inf,
    }


def group_clip_search(W: torch.Tensor, bits: int, symmetric: bool, group_size: int, grid: int = 20,
                      max_shrink: float = 0.5) -> torch.Tensor:
    """Per-group clip ratio minimizing the squared error of unsigned ``bits``-bit RTN (GPTQ codes):
    :func:`llmquant.core.quant.mse_clip_search` with ``norm=2`` on ``(1, group_size)`` blocks.
    ``W [N, K]`` -> ``ratio [N, ceil(K / group_size)]``.
    """
    K = W.shape[1]
    gs = K if group_size in (-1, 0) else min(group_size, K)
    return mse_clip_search(W.float(), bits, symmetric, (1, gs), grid=grid, max_shrink=max_shrink, norm=2.0)
