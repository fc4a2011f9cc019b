"""SmoothQuant: move activation outliers into the weights by a per-input-channel scale.

For a linear layer ``y = x @ W.T`` with input channels ``j = 0..K-1``::

    s_j  = max|X_j|^alpha / max|W_{:, j}|^(1 - alpha)        # [K]
    x'   = x / s          (folded into whatever produced x: a norm's weight, a linear's rows)
    W'   = W * s          (W'[:, j] = W[:, j] * s_j)
    x' @ W'.T == x @ W.T  (exactly in real arithmetic)

``alpha = 0`` leaves activations as they are (``s = 1 / max|W_j|`` only equalizes weights),
``alpha = 1`` moves all of the range into the weights. Layers reading the same tensor (q/k/v,
gate/up) share one ``s``; their weight maxima are taken over all of them.

When the producer has fewer channels than the consumer reads (grouped-query attention: ``v_proj``
gives ``K'`` channels, each read by several heads of ``o_proj``), channel ``c`` of the consumer
comes from producer channel ``map[c]``; ``s`` must then be equal on channels sharing a producer
channel, so the maxima are pooled per producer channel first (:func:`pool_by_map`).

Worked example (alpha = 0.5)::

    act_amax = [100, 1],  w_amax = [0.01, 1]  ->  s = [sqrt(100 / 0.01), sqrt(1 / 1)] = [100, 1]
    x' max = [1, 1],  W' max = [1, 1]
"""
from __future__ import annotations

import torch

EPS = 1e-5


def smoothing_factors(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s [K] = act_amax^alpha / weight_amax^(1 - alpha)`` (float64); channels never active get ``s = 1``.

    ``act_amax [K]``: max |x_j| over calibration tokens; ``weight_amax [K]``: max |W[:, j]| over
    the output rows of every layer reading ``x``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if act_amax.shape != weight_amax.shape or act_amax.dim() != 1:
        raise ValueError(f"act_amax {tuple(act_amax.shape)} and weight_amax {tuple(weight_amax.shape)} must be equal 1-D")
    a = act_amax.double().clamp(min=EPS)
    w = weight_amax.double().clamp(min=EPS)
    s = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=EPS)
    return torch.where(act_amax > 0, s, torch.ones_like(s))      # float64


def weight_column_amax(weights: list[torch.Tensor]) -> torch.Tensor:
    """``max |W[:, j]|`` over the rows of every ``W [N_i, K]`` in ``weights`` -> ``[K]``."""
    return torch.stack([w.detach().abs().amax(0).double() for w in weights]).amax(0)


def pool_by_map(v: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """``out[j] = max(v[c] for c with index[c] == j)`` -> ``[size]`` (0 where no ``c`` maps to ``j``).

    ``v [K]`` non-negative, ``index [K]`` long in ``[0, size)``.
    """
    out = torch.zeros(size, dtype=v.dtype)
    return out.scatter_reduce(0, index, v, reduce="amax", include_self=True)


def smooth_weight(W: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Consumer side: ``W [N, K] * s [K]`` (column ``j`` times ``s_j``)."""
    return W * s[None, :].to(W.dtype)


def unsmooth_rows(W: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Producer side when it is a linear layer: ``W [K', in] / t [K']`` (row ``j`` over ``t_j``)."""
    return W / t[:, None].to(W.dtype)
