"""The result of quantizing one linear layer, in the layer's own ``[out, in]`` orientation.

==========  ============  =========  ===================================================
field       shape         dtype      meaning
==========  ============  =========  ===================================================
``q``       ``[N, K]``    int32      unsigned codes in ``[0, 2^bits - 1]``
``scale``   ``[N, G]``    float32    step of group ``g`` for output row ``n``
``zero``    ``[N, G]``    int32      zero point (the code of 0.0), ``[0, 2^bits - 1]``
``g_idx``   ``[K]``       int32      group of each input column (``k // group_size`` unless act-order
                                     with static groups off, then groups follow the permutation)
``bias``    ``[N]``       any        the layer's bias, or ``None``
==========  ============  =========  ===================================================

``N`` = out features, ``K`` = in features, ``G`` = number of groups (1 for per channel).
Dequantized weight: ``W[n, k] = (q[n, k] - zero[n, g_idx[k]]) * scale[n, g_idx[k]]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int          # -1: one group per row
    sym: bool
    bias: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[N, K]`` dense weight."""
        g = self.g_idx.long()
        scale = self.scale.float()[:, g]                 # [N, K]
        zero = self.zero.float()[:, g]                   # [N, K]
        return ((self.q.float() - zero) * scale).to(dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)
