"""``W8A8Linear``: int8 weights (one scale per output channel) x int8 activations -> int32 -> float.

==================  ==========  =========  ==============================================
buffer              shape       dtype      meaning
==================  ==========  =========  ==============================================
``qweight``         ``[N, K]``  int8       ``round(W / weight_scale)`` in ``[-127, 127]``
``weight_scale``    ``[N]``     float32    ``max_k |W[n, k]| / 127``
``input_scale``     ``[]``      float32    static only: the calibrated activation step
``bias``            ``[N]``     float      the layer's bias (optional)
``rotation``        ``[m, m]``  float32    optional: factor ``M`` of the input rotation
                                           ``R = M (x) H_P`` (:mod:`llmquant.ptq.rotation`);
                                           ``qweight`` then quantizes ``W R^T``
==================  ==========  =========  ==============================================

Forward for ``x [..., K]`` (``T`` = number of tokens)::

    x        = R x                               # only with a rotation
    q_x, s_x = quantize_per_token(x)             # dynamic: s_x [T, 1];  static: s_x = input_scale
    acc      = q_x @ qweight.T                   # [T, N] int32  (torch._int_mm, or the float path)
    y        = acc * s_x * weight_scale + bias   # [T, N] float
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from llmquant.core.quantizers import quantize_per_token
from llmquant.ptq.rotation import rotate, rotation_factor

BACKENDS = ("auto", "int_mm", "float")
QMAX = 127


@functools.lru_cache(maxsize=None)
def int_mm_available(device_type: str = "cpu") -> bool:
    """Whether ``torch._int_mm`` runs on this device type and gives the exact int32 product."""
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        a = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
        b = torch.randint(-127, 128, (64, 32), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
        ref = (a.long() @ b.long()).int()
        return bool(torch.equal(torch._int_mm(a.to(device_type), b.to(device_type)).cpu(), ref))
    except (RuntimeError, NotImplementedError):
        return False


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``a [T, K] int8 @ b_t [K, N] int8 -> [T, N]`` int32 (``int_mm``) or float32 (``float``).

    The float path is exact while every partial sum stays below ``2^24`` in magnitude.
    """
    if backend == "auto":
        backend = "int_mm" if int_mm_available(a.device.type) else "float"
    if backend == "int_mm":
        if a.device.type == "cuda" and a.shape[0] <= 16:      # CUDA's _int_mm wants more than 16 rows
            return torch._int_mm(F.pad(a, (0, 0, 0, 17 - a.shape[0])), b_t)[: a.shape[0]]
        return torch._int_mm(a, b_t)
    if backend == "float":
        return a.float() @ b_t.float()
    raise ValueError(f"unknown int8 matmul backend {backend!r}; use one of {BACKENDS}")


def quantize_weight(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: ``W [N, K]`` -> ``(q [N, K] int8, scale [N] float32)``."""
    q, s = quantize_per_token(W.detach().float(), bits=8)   # rows of W are output channels
    return q, s[:, 0]


class W8A8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, static: bool = False,
                 backend: str = "auto", dtype: torch.dtype = torch.float32, device=None, rotated: bool = False):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")
        self.in_features, self.out_features = in_features, out_features
        self.static = static
        self.backend = backend
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if static:
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        else:
            self.input_scale = None
        if rotated:
            self.register_buffer("rotation", rotation_factor(in_features).to(device))
        else:
            self.rotation = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._qweight_t: torch.Tensor | None = None

    @classmethod
    def from_dense(cls, W: torch.Tensor, bias: torch.Tensor | None, input_scale: float | torch.Tensor | None = None,
                   backend: str = "auto", rotation: torch.Tensor | None = None) -> "W8A8Linear":
        """From a dense weight ``W [N, K]`` (and a calibrated activation step for static; it must be
        the step of the *rotated* input when ``rotation`` is given).

        ``rotation``: the factor ``M`` of :func:`llmquant.ptq.rotation.rotate`; the layer then stores
        ``W R^T`` and rotates its input at run time."""
        N, K = W.shape
        m = cls(K, N, bias=bias is not None, static=input_scale is not None, backend=backend,
                dtype=bias.dtype if bias is not None else torch.float32, rotated=rotation is not None)
        if rotation is not None:
            m.rotation.copy_(rotation)
            W = rotate(W.detach().float(), rotation)                          # W R^T  [N, K]
        q, s = quantize_weight(W)
        m.qweight.copy_(q)
        m.weight_scale.copy_(s)
        if input_scale is not None:
            m.input_scale.copy_(torch.as_tensor(input_scale, dtype=torch.float32))
        if bias is not None:
            m.bias.data.copy_(bias.detach())
        return m

    def dequantized_weight(self) -> torch.Tensor:
        """``qweight * weight_scale`` ``[N, K]``: approximates ``W``, or ``W R^T`` for a rotated layer."""
        return self.qweight.float() * self.weight_scale[:, None]

    def _wt(self) -> torch.Tensor:
        # [K, N] copy made once; _int_mm wants the second operand column-major-friendly
        if self._qweight_t is None or self._qweight_t.device != self.qweight.device:
            self._qweight_t = self.qweight.t().contiguous()
        return self._qweight_t

    def _load_from_state_dict(self, *args, **kwargs):
        self._qweight_t = None
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)                                   # [T, K]
        if self.rotation is not None:
            x2 = rotate(x2.float(), self.rotation)                             # R x  [T, K]
        if self.static:
            s_x = self.input_scale.float()
            q = torch.clamp(torch.round(x2.float() / s_x), -QMAX, QMAX).to(torch.int8)
        else:
            q, s_x = quantize_per_token(x2)                                    # [T, K] int8, [T, 1]
        acc = int8_matmul(q, self._wt(), self.backend)                         # [T, N]
        y = acc.float() * (s_x * self.weight_scale[None, :])                   # [T, N]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kind = "static" if self.static else "dynamic"
        rot = ", rotated" if self.rotation is not None else ""
        return f"in={self.in_features}, out={self.out_features}, act={kind}, backend={self.backend}{rot}"
