"""Calibration observers: watch tensors, then choose a quantization range.

==============  ===================================================  ============================
observer        range                                                state
==============  ===================================================  ============================
``minmax``      running min / max (per tensor or per channel)        ``min``, ``max``
``percentile``  ``p``-th percentile of ``|x|``                       histogram of ``|x|``
``mse``         threshold ``T`` minimizing the expected squared      histogram of ``|x|``
                error ``sum_b n_b * err_T(c_b)^2`` of the bin
                centres ``c_b`` (rounding inside, clipping outside)
``kl``          TensorRT entropy calibration: threshold minimizing   histogram of ``|x|``
                ``KL(P || Q)`` between the clipped histogram ``P``
                and its ``2^(bits-1)``-level quantization ``Q``
==============  ===================================================  ============================

The histogram observers are symmetric (range ``[-T, T]``), as TensorRT's calibrators are.
The histogram has ``bins`` bins of equal width starting at 0; when a larger value arrives, adjacent
bins are merged in pairs (the width doubles) until the range covers it, so accumulating is exact:
the result equals one ``torch.histc`` over all the data at the final width.

Typical use::

    obs = make_observer("kl", bits=8)
    for x in batches: obs.update(x)          # any shape
    scale, zero = obs.qparams()              # choose_qparams on obs.range()
"""
from __future__ import annotations

import math

import torch

from llmquant.core.quant import choose_qparams, qrange

OBSERVERS = ("minmax", "percentile", "mse", "kl")


class Observer:
    """Base: ``update(x)`` many times, then ``range() -> (lo, hi)`` and ``qparams()``."""

    symmetric_only = False

    def __init__(self, bits: int = 8, symmetric: bool = True):
        if not 2 <= bits <= 16:
            raise ValueError(f"bits must be in 2..16, got {bits}")
        if self.symmetric_only and not symmetric:
            raise ValueError(f"{type(self).__name__} is symmetric only")
        self.bits = bits
        self.symmetric = symmetric
        self.count = 0

    @property
    def qrange(self) -> tuple[int, int]:
        return qrange(self.bits, signed=True, restricted=self.symmetric)

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count == 0:
            raise RuntimeError(f"{type(self).__name__}: no data observed; run calibration first")
        lo, hi = self.range()
        qmin, qmax = self.qrange
        return choose_qparams(lo, hi, qmin, qmax, self.symmetric)


class MinMaxObserver(Observer):
    """Running min / max. ``axis=None``: per tensor (scalars); ``axis=k``: one value per index of
    dimension ``k`` (e.g. ``axis=0`` of a weight ``[N, K]`` gives per-output-channel ``[N]``)."""

    def __init__(self, bits: int = 8, symmetric: bool = True, axis: int | None = None):
        super().__init__(bits, symmetric)
        self.axis = axis
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.axis is None:
            lo, hi = x.min(), x.max()
        else:
            xt = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
            lo, hi = xt.amin(dim=1), xt.amax(dim=1)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        self.count += x.numel()

    def range(self):
        return self.min, self.max


class HistogramObserver(Observer):
    """Histogram of ``|x|`` over ``[0, bins * width)`` with exact pair-merging growth."""

    symmetric_only = True

    def __init__(self, bits: int = 8, symmetric: bool = True, bins: int = 2048):
        super().__init__(bits, symmetric)
        if bins < 16 or bins % 2:
            raise ValueError(f"bins must be an even number >= 16, got {bins}")
        self.bins = bins
        self.hist = torch.zeros(bins, dtype=torch.float64)
        self.width = 0.0
        self.amax = 0.0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        a = x.detach().abs().flatten().float()
        if a.numel() == 0:
            return
        m = a.max().item()
        if not math.isfinite(m):
            raise ValueError("observer got inf/NaN activations; the model output is not finite")
        self.count += a.numel()
        self.amax = max(self.amax, m)
        if self.width == 0.0:
            if m == 0.0:
                self.hist[0] += a.numel()
                return
            self.width = m / self.bins * (1 + 1e-6)    # keep the max inside the last bin
        while m >= self.width * self.bins:              # merge pairs: width doubles, exactly
            self.hist = torch.cat([self.hist.reshape(-1, 2).sum(1), torch.zeros(self.bins // 2, dtype=torch.float64)])
            self.width *= 2
        idx = torch.clamp((a / self.width).long(), max=self.bins - 1)
        self.hist += torch.bincount(idx, minlength=self.bins).double()

    @property
    def edges(self) -> torch.Tensor:
        """``[bins + 1]`` bin edges."""
        return torch.arange(self.bins + 1, dtype=torch.float64) * self.width

    def threshold(self) -> float:
        raise NotImplementedError

    def range(self):
        t = torch.tensor(min(self.threshold(), self.amax) if self.width else 0.0)
        return -t, t


class PercentileObserver(HistogramObserver):
    """``T`` = the ``percentile`` of ``|x|`` (linear inside the bin where the CDF crosses it)."""

    def __init__(self, bits: int = 8, symmetric: bool = True, bins: int = 2048, percentile: float = 99.99):
        super().__init__(bits, symmetric, bins)
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile

    def threshold(self) -> float:
        cdf = torch.cumsum(self.hist, 0)
        target = self.percentile / 100 * cdf[-1].item()
        i = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64)).item())
        i = min(i, self.bins - 1)
        below = cdf[i - 1].item() if i > 0 else 0.0
        frac = (target - below) / self.hist[i].item() if self.hist[i] > 0 else 1.0
        return (i + frac) * self.width


class MSEObserver(HistogramObserver):
    """``T`` among the bin edges minimizing ``sum_b n_b (c_b - fq_T(c_b))^2`` over bin centres ``c_b``.

    ``fq_T`` is the symmetric fake quantizer with step ``T / qmax``: centres below ``T`` round to the
    grid, those above clip to ``T``.
    """

    def __init__(self, bits: int = 8, symmetric: bool = True, bins: int = 2048, start_bin: int = 16):
        super().__init__(bits, symmetric, bins)
        self.start_bin = start_bin

    def threshold(self) -> float:
        qmax = self.qrange[1]
        centres = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * self.width            # [B]
        last = int(torch.nonzero(self.hist).max().item()) + 1
        cand = torch.arange(min(self.start_bin, last), last + 1, dtype=torch.float64) * self.width  # [C]
        step = cand[:, None] / qmax                                                              # [C, 1]
        fq = torch.clamp(torch.round(centres[None, :] / step), max=qmax) * step                  # [C, B]
        err = ((centres[None, :] - fq) ** 2 * self.hist[None, :]).sum(1)                         # [C]
        return cand[int(err.argmin())].item()


class KLObserver(HistogramObserver):
    """TensorRT entropy calibration.

    For each candidate ``i`` (bins ``[0, i)`` kept, the outlier mass added to bin ``i - 1``) the
    reference ``P`` is merged into ``2^(bits-1)`` levels and expanded back uniformly over ``P``'s
    non-empty bins as ``Q``; the threshold is the edge ``i * width`` with the smallest ``KL(P || Q)``.
    """

    def __init__(self, bits: int = 8, symmetric: bool = True, bins: int = 2048, stride: int = 1):
        """``stride > 1``: candidates every ``stride`` bins, then every bin near the best one."""
        super().__init__(bits, symmetric, bins)
        self.levels = 2 ** (bits - 1)
        if bins < self.levels:
            raise ValueError(f"KL calibration needs bins >= {self.levels} for {bits} bits")
        self.stride = stride

    def threshold(self) -> float:
        hist = self.hist
        nz = torch.nonzero(hist)
        last = int(nz.max().item()) + 1 if nz.numel() else self.levels
        if last <= self.levels:
            return last * self.width
        if self.stride == 1:
            best_i = self._best(torch.arange(self.levels, last + 1), last)
        else:   # coarse search, then every bin around the coarse optimum
            best_i = self._best(torch.arange(self.levels, last + 1, self.stride), last)
            best_i = self._best(torch.arange(max(self.levels, best_i - self.stride),
                                             min(last, best_i + self.stride) + 1), last)
        return best_i * self.width

    def _best(self, cands: torch.Tensor, last: int) -> int:
        """The candidate ``i`` (number of kept bins) with the smallest ``KL(P || Q)``."""
        L = self.levels
        hist = self.hist[:last].float()
        suffix = torch.cat([torch.flip(torch.cumsum(torch.flip(self.hist, [0]), 0), [0]),
                            torch.zeros(1, dtype=torch.float64)]).float()          # [B+1] mass of bins >= b
        best_i, best_kl = int(cands[-1]), math.inf
        b = torch.arange(last)                                                      # [n] bins
        for rows in cands.split(256):                                               # C candidates at a time
            C = rows.numel()
            keep = b[None, :] < rows[:, None]                                       # [C, n]
            p = hist[None, :] * keep                                                # [C, n] P before outliers
            chunk = ((b[None, :] + 1) * L + rows[:, None] - 1) // rows[:, None] - 1 # [C, n] level of bin b
            chunk = torch.where(keep, chunk, L)                                     # bins past i -> dump slot
            flat = (chunk + torch.arange(C)[:, None] * (L + 1)).flatten()           # [C * n]
            chunk_sum = torch.zeros(C * (L + 1)).index_add_(0, flat, p.flatten())
            p[torch.arange(C), rows - 1] += suffix[rows]                            # outliers into bin i-1
            nonzero = (p > 0).float()
            chunk_nz = torch.zeros(C * (L + 1)).index_add_(0, flat, nonzero.flatten())
            q = nonzero * (chunk_sum[flat] / chunk_nz[flat].clamp(min=1)).view(C, -1)   # [C, n]
            p = p / p.sum(1, keepdim=True)
            q = q / q.sum(1, keepdim=True).clamp(min=1e-30)
            kl = (p * torch.log((p / q.clamp(min=1e-30)).clamp(min=1e-30))).sum(1)  # [C]; 0 where p = 0
            j = int(kl.argmin())
            if kl[j].item() < best_kl:
                best_i, best_kl = int(rows[j]), kl[j].item()
        return best_i


def make_observer(name: str, bits: int = 8, **kw) -> Observer:
    """``minmax`` / ``percentile`` / ``mse`` / ``kl`` (symmetric) by name."""
    cls = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver, "kl": KLObserver}
    if name not in cls:
        raise ValueError(f"unknown observer {name!r}; use one of {', '.join(OBSERVERS)}")
    return cls[name](bits=bits, **kw)
