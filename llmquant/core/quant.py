"""The quantizer trio: ``choose_qparams`` / ``quantize`` / ``dequantize``.

Every method in llmquant (RTN, GPTQ, PTQ, QAT) goes through these pure functions.
An affine quantizer maps a real ``x`` to an integer ``q`` in ``[qmin, qmax]``::

    q  = clamp(round(x / scale) + zero, qmin, qmax)
    x' = (q - zero) * scale

``scale`` is the step between two grid points (the inverse of the "multiplier" some texts
call scale: ``multiplier = 1 / scale``).

Granularity is data, not branches: a ``block`` ``(rows, cols)`` says how many elements of a
2-D tensor share one ``(scale, zero)`` pair; ``-1`` means "the whole dimension".
A block that does not divide the dimension is legal: the last block is shorter
(``n_blocks = ceil(dim / block)``).

==================  ===============  =======================  ==================
granularity         block            x ``[R, K]``             scale / zero shape
==================  ===============  =======================  ==================
per tensor          ``(-1, -1)``     ``[R, K]``               ``[1, 1]``
per channel (row)   ``(1, -1)``      ``[R, K]``               ``[R, 1]``
per group of G      ``(1, G)``       ``[R, K]``               ``[R, ceil(K/G)]``
per input column    ``(-1, 1)``      ``[T, K]`` activations   ``[1, K]``
==================  ===============  =======================  ==================

Worked example (asymmetric int8, range ``[-700, 1000]``)::

    >>> s, z = choose_qparams(torch.tensor(-700.), torch.tensor(1000.), -128, 127, symmetric=False)
    >>> 1 / s, z          # multiplier 0.15, zero point -23
    (tensor(0.1500), tensor(-23.))
    >>> quantize(torch.tensor([-700., 1000.]), s, z, -128, 127)
    tensor([-128.,  127.])
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

Block = tuple[int, int]

PER_TENSOR: Block = (-1, -1)
PER_CHANNEL: Block = (1, -1)


def per_group(group_size: int) -> Block:
    """Block for groups of ``group_size`` input columns per row (``-1``: per channel)."""
    return (1, group_size if group_size > 0 else -1)


def qrange(bits: int, signed: bool = False, restricted: bool = False) -> tuple[int, int]:
    """Integer range of an n-bit code.

    ``signed=False`` gives ``[0, 2^n - 1]`` (the GPTQ convention); ``signed=True`` gives
    ``[-2^(n-1), 2^(n-1) - 1]``; ``restricted`` drops the most negative code so the range is
    symmetric (``[-127, 127]`` for int8), as symmetric absmax quantizers use.
    """
    if bits < 1 or bits > 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    if not signed:
        return 0, 2**bits - 1
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return (qmin + 1 if restricted else qmin), qmax


def choose_qparams(
    xmin: torch.Tensor,
    xmax: torch.Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from observed ranges (any shape, elementwise).

    * symmetric: ``scale = max(|xmin|, |xmax|) / ((qmax - qmin) / 2)`` and the zero point is the
      grid's middle code ``(qmin + qmax + 1) // 2`` (8 for unsigned 4-bit, 0 for restricted int8,
      so int8 gives the textbook multiplier ``127 / max|x|``).
    * asymmetric: the range is widened to contain 0, ``scale = (xmax - xmin) / (qmax - qmin)``,
      ``zero = qmin - round(xmin / scale)`` (so ``xmin`` maps to ``qmin`` and 0 is exact).

    An all-zero range gets ``scale = 1`` so that it dequantizes to exact zeros.
    Returns ``(scale, zero)`` in the float dtype of ``xmin``; ``zero`` holds integer values.
    """
    xmin = xmin.float() if not xmin.is_floating_point() else xmin
    xmax = xmax.to(xmin.dtype)
    if symmetric:
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        scale = absmax / ((qmax - qmin) / 2)
        zero = torch.full_like(scale, float((qmin + qmax + 1) // 2))
    else:
        xmin = torch.clamp(xmin, max=0)
        xmax = torch.clamp(xmax, min=0)
        scale = (xmax - xmin) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not symmetric:
        zero = torch.clamp(qmin - torch.round(xmin / scale), qmin, qmax)
    return scale, zero


_MAGIC = {torch.float32: 12582912.0, torch.float64: 6755399441055744.0}   # 1.5 * 2^23, 1.5 * 2^52


def _round_for_clamp(x: torch.Tensor) -> torch.Tensor:
    """Round half to even, exact for ``|x| < 2^22`` (float32); larger values stay large.

    Adding and subtracting ``1.5 * 2^23`` rounds a float32 to an integer in two cheap ops.
    ``torch.round`` on CPU enters a parallel region even for tiny tensors and costs milliseconds
    when the cores are busy; GPTQ calls this ~100k times. Only for values that are clamped to an
    integer range afterwards (``quantize``), where the two are identical.
    """
    m = _MAGIC.get(x.dtype)
    return torch.round(x) if m is None else (x + m) - m


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``q = clamp(round(x / scale) + zero, qmin, qmax)``; scale/zero broadcast against x.

    Returns integer values in ``x``'s dtype unless ``out_dtype`` is given.
    """
    q = torch.clamp(_round_for_clamp(x / scale) + zero, qmin, qmax)
    return q if out_dtype is None else q.to(out_dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``x' = (q - zero) * scale`` in the dtype of ``scale``."""
    return (q.to(scale.dtype) - zero) * scale


def fake_quantize(x, scale, zero, qmin: int, qmax: int) -> torch.Tensor:
    """``dequantize(quantize(x))``: the value the quantized model will see."""
    return dequantize(quantize(x, scale, zero, qmin, qmax), scale, zero)


# ----------------------------------------------------------------------------- granularity

def _resolve(block: Sequence[int], shape: Sequence[int]) -> tuple[int, int]:
    r, c = block
    R, K = shape
    return (R if r == -1 else r), (K if c == -1 else c)


def block_minmax(x: torch.Tensor, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each ``block`` of a 2-D tensor ``x [R, K]`` -> two ``[ceil(R/r), ceil(K/c)]``.

    A short last block (``K % c != 0``) is padded with +inf / -inf so it reduces over its own
    elements only.
    """
    if x.dim() != 2:
        raise ValueError(f"block_minmax expects a 2-D tensor, got shape {tuple(x.shape)}")
    R, K = x.shape
    r, c = _resolve(block, x.shape)
    nr, nc = math.ceil(R / r), math.ceil(K / c)
    pad = (0, nc * c - K, 0, nr * r - R)
    lo = torch.nn.functional.pad(x, pad, value=float("inf")).reshape(nr, r, nc, c)
    hi = torch.nn.functional.pad(x, pad, value=float("-inf")).reshape(nr, r, nc, c)
    return lo.amin(dim=(1, 3)), hi.amax(dim=(1, 3))


def expand(p: torch.Tensor, block: Block, shape: Sequence[int]) -> torch.Tensor:
    """Broadcast per-block parameters ``[nr, nc]`` back to the full ``shape [R, K]``."""
    R, K = shape
    r, c = _resolve(block, shape)
    return p.repeat_interleave(r, dim=0)[:R].repeat_interleave(c, dim=1)[:, :K]


def quantize_blocks(
    x: torch.Tensor, bits: int, symmetric: bool, block: Block,
    signed: bool = False, clip_ratio: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of a 2-D tensor with one ``(scale, zero)`` per block.

    ``clip_ratio`` (scalar or per-block tensor) shrinks the observed range before choosing the
    parameters (outlier clipping). Returns ``(q [R, K], scale [nr, nc], zero [nr, nc])``.
    """
    qmin, qmax = qrange(bits, signed=signed, restricted=signed and symmetric)
    lo, hi = block_minmax(x, block)
    scale, zero = choose_qparams(lo * clip_ratio, hi * clip_ratio, qmin, qmax, symmetric)
    q = quantize(x, expand(scale, block, x.shape), expand(zero, block, x.shape), qmin, qmax)
    return q, scale, zero


def mse_clip_search(
    x: torch.Tensor, bits: int, symmetric: bool, block: Block, signed: bool = False,
    grid: int = 80, max_shrink: float = 0.8, norm: float = 2.4,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-block clip ratio in ``(1 - max_shrink, 1]`` minimizing ``sum w * |x - fq(x)|^norm``.

    Tries ``grid`` evenly spaced ratios ``1 - max_shrink * i / grid`` (the search GPTQ's reference
    quantizer does with ``mse=True``); ``weight`` (broadcastable to ``x``), e.g. the Hessian diagonal
    per column, weighs the error of each element. Returns ``ratio [nr, nc]``.

    Works on a ``[nr, r, nc, c]`` view of ``x`` (zero-padded: a zero quantizes exactly, so padding adds
    no error) with per-block parameters broadcast as ``[nr, 1, nc, 1]``.
    """
    qmin, qmax = qrange(bits, signed=signed, restricted=signed and symmetric)
    lo, hi = block_minmax(x, block)                                  # [nr, nc]
    R, K = x.shape
    r, c = _resolve(block, x.shape)
    nr, nc = lo.shape
    pad = (0, nc * c - K, 0, nr * r - R)
    xv = torch.nn.functional.pad(x, pad).reshape(nr, r, nc, c)      # [nr, r, nc, c]
    wv = None
    if weight is not None:
        wv = torch.nn.functional.pad(torch.broadcast_to(weight, x.shape), pad).reshape(nr, r, nc, c)
    lo4, hi4 = lo[:, None, :, None], hi[:, None, :, None]           # [nr, 1, nc, 1]
    best = torch.full_like(lo, float("inf"))
    ratio = torch.ones_like(lo)
    for i in range(grid):
        p = 1 - max_shrink * i / grid
        scale, zero = choose_qparams(lo4 * p, hi4 * p, qmin, qmax, symmetric)
        err = (fake_quantize(xv, scale, zero, qmin, qmax) - xv).abs_().pow_(norm)
        if wv is not None:
            err.mul_(wv)
        err = err.sum(dim=(1, 3))                                    # [nr, nc]
        better = err < best
        best = torch.where(better, err, best)
        ratio = torch.where(better, torch.full_like(ratio, p), ratio)
    return ratio
