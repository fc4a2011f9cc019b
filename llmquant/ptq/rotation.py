"""Online orthogonal rotation of a linear layer's input (QuaRot-style), for static W8A8.

A linear layer ``y = W x`` is unchanged by an orthogonal ``R`` (``R R^T = I``)::

    y = W x = (W R^T) (R x)

so the int8 weight stores ``W R^T`` (per output channel) and the layer applies ``R x`` at run
time before quantizing the activation. ``R`` mixes every input channel into every output
channel, so one channel's outlier is spread over all ``K`` channels.

``R`` is a Kronecker product ``M (x) H_P`` with ``K = m * P``, ``P = 2^n`` the largest power of two
dividing ``K`` and ``H_P`` the normalized Walsh-Hadamard matrix (entries ``+-1/sqrt(P)``), applied by
the fast butterfly in ``O(K log P)``; ``M [m, m]`` is a fixed orthogonal matrix (a seeded QR of a
Gaussian matrix, ``M = [[1]]`` when ``K`` is a power of two). ``M`` is the only state: it is stored
in the checkpoint so loading never depends on a random generator. When ``P == 1`` (``K`` odd) the
rotation is just the dense ``M [K, K]``.

==================  ===============  =====================================================
tensor              shape            meaning
==================  ===============  =====================================================
``x``               ``[..., K]``     input rows, viewed as ``[..., m, P]``
``M``               ``[m, m]``       the small orthogonal factor
``rotate(x, M)``    ``[..., K]``     ``R x`` per row: ``M @ X @ H_P`` with ``X = x.view(m, P)``
==================  ===============  =====================================================

Worked example, ``K = 2`` (``m = 1``, ``P = 2``): ``rotate([3, 1]) = [4, 2] / sqrt(2)``.

Since ``rotate`` acts on rows, ``rotate(W, M)`` of a weight ``W [N, K]`` is ``W R^T``.
"""
from __future__ import annotations

import math

import torch


def split_pow2(K: int) -> tuple[int, int]:
    """``K = m * P`` with ``P`` the largest power of two dividing ``K``: returns ``(m, P)``."""
    if K < 1:
        raise ValueError(f"rotation size must be >= 1, got {K}")
    P = K & -K
    return K // P, P


def orthogonal_factor(m: int, seed: int = 0) -> torch.Tensor:
    """A fixed orthogonal ``[m, m]`` float32 matrix: QR of a seeded Gaussian matrix (float64), with
    the signs of ``R``'s diagonal moved into ``Q`` so the result is unique for the seed."""
    if m == 1:
        return torch.ones(1, 1)
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, m, generator=g, dtype=torch.float64)
    Q, Rr = torch.linalg.qr(A)
    Q = Q * torch.sign(torch.diagonal(Rr))[None, :]
    return Q.float().contiguous()


def rotation_factor(K: int, seed: int = 0) -> torch.Tensor:
    """The small factor ``M [m, m]`` of the rotation of a ``K``-wide input."""
    m, _ = split_pow2(K)
    return orthogonal_factor(m, seed)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalized Walsh-Hadamard transform over the last dimension (a power of two): ``x @ H_P``."""
    P = x.shape[-1]
    if P & (P - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {P}")
    lead = x.shape[:-1]
    h = 1
    y = x
    while h < P:
        y = y.reshape(*lead, P // (2 * h), 2, h)               # pairs (a, b) h apart
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(*lead, P) / math.sqrt(P)


def rotate(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``R x`` for every row of ``x [..., K]`` with ``R = M (x) H_P`` (``K = m * P``); same dtype as ``x``."""
    K = x.shape[-1]
    m = M.shape[0]
    if M.shape != (m, m) or K % m or (K // m) & (K // m - 1):
        raise ValueError(f"rotation factor {tuple(M.shape)} does not fit an input of width {K}")
    P = K // m
    lead = x.shape[:-1]
    X = x.float().reshape(-1, m, P)                            # [T, m, P]
    if P > 1:
        X = fwht(X)                                            # X H_P
    if m > 1:
        X = torch.matmul(M.float().to(X.device), X)            # M X H_P   [T, m, P]
    return X.reshape(*lead, K).to(x.dtype)


def rotation_matrix(K: int, M: torch.Tensor | None = None) -> torch.Tensor:
    """The dense ``R [K, K]`` (for tests): ``rotate`` maps row ``e_j`` of ``I`` to ``R e_j``, column ``j``
    of ``R``, so ``R = rotate(I)^T``."""
    M = rotation_factor(K) if M is None else M
    return rotate(torch.eye(K), M).t().contiguous()
