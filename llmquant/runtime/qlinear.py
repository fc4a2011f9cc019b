"""``QuantLinear``: a drop-in ``nn.Linear`` whose weight stays GPTQ-packed in memory.

==============  ==================  =====================================================
input           shape               meaning
==============  ==================  =====================================================
``qweight``     ``[K*bits/32, N]``  int32, codes packed along K (``llmquant.core.pack``)
``qzeros``      ``[G, N*bits/32]``  int32, zero points packed along N (v1: ``z - 1``)
``scales``      ``[G, N]``          float16 steps
``g_idx``       ``[K]``             group of each input column (``None``: ``k // group_size``)
``bias``        ``[N]``             optional
==============  ==================  =====================================================

``forward(x [..., K]) -> [..., N]`` runs the chosen kernel (see :mod:`llmquant.runtime.kernels`),
casts back to ``x.dtype`` and adds the bias.
"""
from __future__ import annotations

import torch

from llmquant.core.pack import chunk_shape, pack_rows
from llmquant.runtime import kernels as K_


class QuantLinear(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 impl: torch.nn.Module, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.impl = impl
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @property
    def kernel(self) -> str:
        return self.impl.name

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_gptq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  g_idx: torch.Tensor | None, *, bits: int, group_size: int, in_features: int,
                  checkpoint_format: str = "gptq", bias: torch.Tensor | None = None,
                  kernel: str = "auto", device: str = "cpu", compute_dtype: torch.dtype | None = None,
                  max_m: int | None = None) -> "QuantLinear":
        """Build from checkpoint tensors (shapes already validated by the caller)."""
        K, N = in_features, scales.shape[1]
        if g_idx is None:
            gs = group_size if group_size > 0 else K
            g_idx = torch.arange(K, dtype=torch.int32) // gs
        zeros = K_.unpack_qzeros(qzeros, bits, N, checkpoint_format)    # [G, N]
        return cls._build(qweight, zeros, scales, g_idx, bits=bits, group_size=group_size, K=K,
                          bias=bias, kernel=kernel, device=device, compute_dtype=compute_dtype, max_m=max_m)

    @classmethod
    def from_quantized(cls, qw, *, kernel: str = "auto", device: str = "cpu",
                       compute_dtype: torch.dtype | None = None, max_m: int | None = None) -> "QuantLinear":
        """Build from a :class:`llmquant.core.qtensor.QuantizedWeight` (``q [N, K]``)."""
        N, K = qw.q.shape
        codes_per = chunk_shape(qw.bits)[0]
        if K % codes_per:
            raise ValueError(f"in_features {K} is not a multiple of {codes_per}, cannot pack {qw.bits}-bit codes")
        qweight = pack_rows(qw.q.t().to(torch.int32), qw.bits)               # [K*bits/32, N]
        return cls._build(qweight, qw.zero.t().to(torch.int32), qw.scale.t().to(torch.float16), qw.g_idx,
                          bits=qw.bits, group_size=qw.group_size, K=K, bias=qw.bias, kernel=kernel,
                          device=device, compute_dtype=compute_dtype, max_m=max_m)

    @classmethod
    def _build(cls, qweight, zeros, scales, g_idx, *, bits, group_size, K, bias, kernel, device,
               compute_dtype, max_m):
        N = scales.shape[1]
        choice = K_.resolve_kernel(kernel, bits, N, device)
        impl = None
        if choice == "int4" and str(device).startswith("cuda"):
            impl = K_.make_int4_cuda(qweight, zeros, scales, g_idx, bits, group_size, device)   # None: failed check
            choice = "int4" if impl is not None else "dequant"
        elif choice == "int4":
            q_t = K_.unpack_qweight(qweight, bits, K)                      # [K, N] transient
            impl = K_.Int4CpuKernel(q_t, zeros, scales.float(), g_idx, group_size,
                                    compute_dtype=compute_dtype or torch.bfloat16, max_m=max_m)
        if impl is None:
            kcls = K_.ReferenceKernel if choice == "reference" else K_.DequantKernel
            impl = kcls(qweight, zeros, scales, g_idx, bits).to(device)
        if bias is not None:
            bias = bias.to(device)
        return cls(K, N, bits, group_size, impl, bias)

    # ------------------------------------------------------------------ use
    def forward(self, x: torch.Tensor) -> torch.Tensor:               # [..., K] -> [..., N]
        y = self.impl.forward(x)                                     # no hooks on the inner kernel
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """float32 ``W [N, K]`` as the kernel sees it (identity input through the layer)."""
        if isinstance(self.impl, K_.ReferenceKernel):
            return self.impl.weight_t().t().contiguous()
        impl = self.impl
        eye = torch.eye(self.in_features, dtype=torch.float32, device=next(impl.buffers()).device)
        if isinstance(impl, K_.Int4CpuKernel):
            w_t = impl.weight_t().float()                               # [Kp, N] in kernel order
            out = torch.zeros(self.in_features + 1, self.out_features)
            src = (torch.arange(impl.Kp).clamp(max=self.in_features) if impl.src_index is None
                   else impl.src_index.long())
            out.index_add_(0, src, w_t)
            return out[: self.in_features].t().contiguous()
        return impl(eye).float().cpu().t().contiguous()

    def weight_bytes(self) -> int:
        """Bytes of the resident quantized weight (packed codes, scales, zeros, index; no bias)."""
        return sum(b.numel() * b.element_size() for b in self.impl.buffers())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, kernel={self.kernel}, bias={self.bias is not None}")
