"""Matmul kernels for GPTQ-quantized linear layers: ``y = x @ W^T`` with ``W`` kept packed.

Every kernel computes the same function of the layer's codes; only speed and memory differ.
The weight of output ``n`` and input ``k`` is ``W[n, k] = (q[k, n] - zero[g, n]) * scale[g, n]``
with ``g = g_idx[k]``.

============  ======================================  ==============================================
kernel        resident tensors                        forward
============  ======================================  ==============================================
reference     checkpoint ``qweight`` int32 packed,    unpack with ``llmquant.core.pack``, dequantize
              zeros ``[G, N]``, fp16 scales, g_idx     in float32, matmul in float32 (the yardstick)
dequant       the same                                 vectorised unpack + dequantize in float32, then
                                                       matmul in the input's dtype (any bits, any device)
int4 (CPU)    ``aten._convert_weight_to_int4pack_for  ``M <= max_m`` rows: ``_weight_int4pack_mm_for_cpu``;
              _cpu`` bytes ``[N, Kp/2]`` uint8 +       more rows (prefill): decode the packed bytes to
              scales/zeros ``[Gv, N, 2]``             scaled bf16 ``W^T`` (C decoder of ``native.py``, one
                                                       pass; else torch ops: byte transpose + 256-entry
                                                       pair table, see :func:`feed_order`, then scale),
                                                       one bf16 matmul
int4 (CUDA)   ``torch._convert_weight_to_int4pack``    ``torch._weight_int4pack_mm`` for every batch;
              bytes + bf16 scales/zeros                checked against dequantization at load, else
                                                       the layer falls back to ``dequant``
============  ======================================  ==============================================

``auto`` picks ``int4`` for 4-bit layers (CPU: ``N`` a multiple of 16) and ``dequant`` otherwise.
``M <= max_m`` (default :data:`DEFAULT_INT4_MAX_M`, env ``LLMQUANT_INT4_MAX_M``) selects the packed
CPU kernel; the activations/scales inside int4 kernels are bfloat16 (tests: relative error < 2e-2
against the float32 reference; the float32 CPU variant, used by tests, < 1e-5).

The torch int4 kernel computes ``W = (q - 8) * s + z`` per group, so our ``(q - zero) * scale``
becomes ``s = scale`` and ``z = (8 - zero) * scale``. It needs groups of 32/64/128/256 whole,
contiguous columns. The int4 kernel therefore reorders input columns once at load: columns are
sorted by group (act-order checkpoints have a non-trivial ``g_idx``), each group is cut into
"virtual groups" of ``kgs`` columns, and a short last piece is padded with a zero activation
column (SmolLM2: ``K = 576 = 4.5 x 128`` becomes ``Kp = 640``). At run time ``x`` gets the same
reorder/padding (``x[..., src_index]``, or a plain ``F.pad`` when no reorder is needed), so the
padded columns multiply zero activations and cannot change the result.

Worked example: ``K = 6``, ``group_size = 4``, ``g_idx = [1, 0, 0, 1, 0, 1]``, ``kgs = 4``:
group 0 = columns ``[1, 2, 4]``, group 1 = ``[0, 3, 5]``; ``src_index = [1, 2, 4, 6, 0, 3, 5, 6]``
(6 = the appended zero column), ``Kp = 8``, virtual group ``v`` takes scales of group ``v``.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from llmquant.core.pack import unpack_cols, unpack_rows
from llmquant.runtime.native import decode_int4pack_native, int4_decoder

KERNELS = ("auto", "reference", "dequant", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)

# Rows (tokens) up to which the CPU int4 kernel beats decode-to-bf16 + matmul, measured on
# SmolLM2-135M layer shapes at 1 thread (AVX512-BF16 CPU; ``scripts/bench_runtime.py --threshold``).
# With the C decoder the crossover is at 12-16 rows (576x1536: 0.34 vs 0.34 ms at 12 rows, 0.44
# vs 0.37 at 16); with the torch-ops decode at 32-64 (0.88 vs 1.63 ms at 32, 2.66 vs 2.46 at 64).
# Override with the environment variable LLMQUANT_INT4_MAX_M.
DEFAULT_INT4_MAX_M = 12
DEFAULT_INT4_MAX_M_TORCH_DECODE = 32


def int4_max_m() -> int:
    default = DEFAULT_INT4_MAX_M if int4_decoder() is not None else DEFAULT_INT4_MAX_M_TORCH_DECODE
    v = os.environ.get("LLMQUANT_INT4_MAX_M")
    if v:
        try:
            return int(v)
        except ValueError:
            warnings.warn(f"LLMQUANT_INT4_MAX_M={v!r} is not an integer; using {default}")
    return default


# ----------------------------------------------------------------------------- unpacking

def unpack_qweight(qweight: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """``qweight [K*bits/32, N]`` int32 -> codes ``[K, N]`` int32 (vectorised for 2/4/8 bits)."""
    if bits == 3:
        return unpack_rows(qweight, bits, K)
    per = 32 // bits
    R, N = qweight.shape
    if R * per != K:
        raise ValueError(f"qweight has {R} rows; {K} inputs at {bits} bits need {K // per}")
    shifts = torch.arange(0, 32, bits, device=qweight.device, dtype=torch.int32)       # [per]
    q = (qweight.unsqueeze(1) >> shifts.view(1, per, 1)) & (2**bits - 1)               # [R, per, N]
    return q.reshape(K, N)


def unpack_qzeros(qzeros: torch.Tensor, bits: int, N: int, checkpoint_format: str) -> torch.Tensor:
    """``qzeros [G, N*bits/32]`` -> real zero points ``[G, N]`` int32.

    ``gptq_v2`` stores ``z``. ``gptq`` (v1) stores ``z - 1``; GPTQModel/AutoGPTQ write it by
    subtracting ``0x11111111`` (4 bits; ``0x55555555`` for 2, ``0x01010101`` for 8) from each packed
    word, so it is read by adding the same constant to the word (mod 2^32), which also undoes the
    borrow of a ``z = 0``; 3-bit zeros are corrected value by value (``(stored + 1) mod 8``).
    """
    if checkpoint_format == "gptq_v2":
        return unpack_cols(qzeros, bits, N)
    if bits == 3:
        return (unpack_cols(qzeros, bits, N) + 1) & 7
    per = 32 // bits
    one = sum(1 << (bits * i) for i in range(per))                     # 0x11111111 for 4 bits
    words = (qzeros.to(torch.int64) + one) & 0xFFFFFFFF
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return unpack_cols(words, bits, N)


def dequantize_t(q_t: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor) -> torch.Tensor:
    """Codes ``[K, N]``, zeros/scales ``[G, N]``, ``g_idx [K]`` -> float32 ``W^T [K, N]``."""
    g = g_idx.long()
    return (q_t.float() - zeros.float()[g]) * scales.float()[g]


# ----------------------------------------------------------------------------- reference / dequant

class ReferenceKernel(torch.nn.Module):
    """Dequantize with ``llmquant.core.pack.unpack_rows`` and multiply in float32."""

    name = "reference"

    def __init__(self, qweight, zeros, scales, g_idx, bits: int):
        super().__init__()
        self.bits = bits
        self.register_buffer("qweight", qweight, persistent=False)       # [K*bits/32, N] int32
        self.register_buffer("zeros", zeros.to(torch.uint8), persistent=False)   # [G, N]
        self.register_buffer("scales", scales.to(torch.float16), persistent=False)  # [G, N]
        self.register_buffer("g_idx", g_idx.to(torch.int32), persistent=False)      # [K]

    def weight_t(self) -> torch.Tensor:
        """float32 ``W^T [K, N]``."""
        q = unpack_rows(self.qweight.cpu(), self.bits, self.g_idx.numel()).to(self.qweight.device)
        return dequantize_t(q, self.zeros, self.scales, self.g_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:               # [..., K] -> [..., N]
        return (x.float() @ self.weight_t()).to(x.dtype)


class DequantKernel(ReferenceKernel):
    """Unpack (vectorised), dequantize in float32, matmul in ``x.dtype``. Any bits, any device."""

    name = "dequant"

    def weight_t(self) -> torch.Tensor:
        q = unpack_qweight(self.qweight, self.bits, self.g_idx.numel())
        return dequantize_t(q, self.zeros, self.scales, self.g_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight_t().to(x.dtype)


# ----------------------------------------------------------------------------- CPU int4

def int4_group(group_size: int, K: int) -> int:
    """Kernel group size ``kgs`` for a checkpoint group size (-1 = one group over all K)."""
    if group_size in INT4_GROUP_SIZES:
        return group_size
    if group_size <= 0 or group_size >= K or group_size > max(INT4_GROUP_SIZES):
        return 128
    return min(s for s in INT4_GROUP_SIZES if s >= group_size)


def int4_layout(g_idx: torch.Tensor, G: int, kgs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(src_index [Kp], vgroup [Gv])``: column ``j`` of the kernel's input is input column
    ``src_index[j]`` (``K`` = the zero column), and virtual group ``v`` uses group ``vgroup[v]``."""
    K = g_idx.numel()
    g = g_idx.long()
    order = torch.sort(g, stable=True).indices                         # columns sorted by group
    counts = torch.bincount(g, minlength=G).tolist()
    src, vgroup, start = [], [], 0
    for grp, c in enumerate(counts):
        cols = order[start:start + c]
        start += c
        for i in range(0, c, kgs):
            chunk = cols[i:i + kgs]
            src.append(chunk)
            if chunk.numel() < kgs:
                src.append(torch.full((kgs - chunk.numel(),), K, dtype=torch.long))
            vgroup.append(grp)
    return torch.cat(src), torch.tensor(vgroup, dtype=torch.long)


_LUT_CACHE: dict[torch.dtype, torch.Tensor] = {}
_PAIR_INT = {torch.bfloat16: torch.int32, torch.float16: torch.int32, torch.float32: torch.int64}


def _pair_lut(dtype: torch.dtype) -> torch.Tensor:
    """``[256]`` integers, each holding two ``dtype`` values (low nibble - 8, high nibble - 8) of a
    byte, so a single ``index_select`` decodes a byte into two adjacent weights."""
    if dtype not in _LUT_CACHE:
        b = torch.arange(256)
        pairs = torch.stack([(b & 15) - 8, (b >> 4) - 8], -1).to(dtype).contiguous()     # [256, 2]
        _LUT_CACHE[dtype] = pairs.view(_PAIR_INT[dtype]).reshape(256)
    return _LUT_CACHE[dtype]


def feed_order(N: int) -> torch.Tensor:
    """Row order in which codes are handed to ``_convert_weight_to_int4pack_for_cpu``.

    Its AVX512 layout stores outputs in blocks of 64, byte ``b`` of a k-row holding outputs ``b``
    (low nibble) and ``b + 32`` (high nibble); a last block of ``t < 64`` outputs pairs ``2j`` and
    ``2j + 1``. Feeding rows in this order (fed row ``b`` = output ``2b``, fed row ``b + 32`` =
    output ``2b + 1``) makes every byte hold two *adjacent* outputs, so decoding is one byte
    transpose plus one table lookup. The packed kernel's outputs then come in this order and are
    put back with the inverse permutation (cheap for the few rows it serves).
    """
    NB = N // 64
    b = torch.arange(32)
    blk = torch.cat([2 * b, 2 * b + 1])                                 # [64]
    order = (torch.arange(NB).view(NB, 1) * 64 + blk.view(1, 64)).reshape(-1)
    return torch.cat([order, torch.arange(NB * 64, N)])


def decode_int4pack_cpu(packed: torch.Tensor, N: int, Kp: int, dtype=torch.bfloat16) -> torch.Tensor:
    """Bytes of ``_convert_weight_to_int4pack_for_cpu(codes[feed_order(N)])`` -> ``(q - 8)^T
    [Kp, N]`` in ``dtype``, outputs in natural order. :func:`int4pack_layout_ok` checks the CPU's
    layout before this is used. (A 65536-entry table decoding two bytes per lookup was no faster
    inside the model: the table competes for cache with the weights.)"""
    lut = _pair_lut(dtype)
    flat = packed.reshape(-1)
    NB, t = divmod(N, 64)
    parts = []
    if NB:
        full = flat[: NB * Kp * 32].view(NB, Kp, 32).transpose(0, 1).to(torch.int32)   # [Kp, NB, 32]
        parts.append(torch.index_select(lut, 0, full.reshape(-1)).view(dtype).view(Kp, NB * 64))
    if t:
        tail = flat[NB * Kp * 32:].to(torch.int32)                      # [Kp * t/2]
        parts.append(torch.index_select(lut, 0, tail).view(dtype).view(Kp, t))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


_LAYOUT_OK: dict[int, bool] = {}


def int4pack_layout_ok(N: int) -> bool:
    """Does :func:`decode_int4pack_cpu` invert this CPU's packing for ``N`` outputs? (cached)"""
    if N not in _LAYOUT_OK:
        g = torch.Generator().manual_seed(N)
        q = torch.randint(0, 16, (N, 64), generator=g, dtype=torch.int32)
        try:
            p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[feed_order(N)].contiguous(), 1)
            back = decode_int4pack_cpu(p, N, 64, torch.float32) + 8
            _LAYOUT_OK[N] = bool(torch.equal(back.t().to(torch.int32), q))
        except (RuntimeError, ValueError):
            _LAYOUT_OK[N] = False
    return _LAYOUT_OK[N]


def int4_cpu_supported(bits: int, N: int) -> bool:
    return (bits == 4 and N % 16 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))


class Int4CpuKernel(torch.nn.Module):
    """PyTorch's packed int4 CPU matmul for few rows, decode-to-bf16 + matmul for many.

    ``compute_dtype`` is the dtype of activations, scales and zeros inside the kernel (bfloat16 by
    default: the float32 variant of the torch kernel is far slower); the output is cast back to
    the input's dtype.
    """

    name = "int4"

    def __init__(self, q_t: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                 group_size: int, compute_dtype: torch.dtype = torch.bfloat16, max_m: int | None = None):
        super().__init__()
        K, N = q_t.shape                                               # codes [K, N]
        G = scales.shape[0]
        self.in_features, self.out_features = K, N
        self.compute_dtype = compute_dtype
        self.max_m = int4_max_m() if max_m is None else max_m
        self.kgs = kgs = int4_group(group_size, K)
        src, vgroup = int4_layout(g_idx, G, kgs)                       # [Kp], [Gv]
        self.Kp = Kp = src.numel()
        identity = bool(torch.equal(src[:K], torch.arange(K))) and bool((src[K:] == K).all())
        self.pad = Kp - K if identity else None                        # F.pad is enough
        self.register_buffer("src_index", None if identity else src.to(torch.int32), persistent=False)
        q_pad = torch.cat([q_t.to(torch.int32), torch.full((1, N), 8, dtype=torch.int32)])  # [K+1, N]
        codes = q_pad[src].t().contiguous()                            # [N, Kp]
        s = scales.float()[vgroup]                                     # [Gv, N]
        z = (8 - zeros.float()[vgroup]) * s                            # [Gv, N]
        self.can_decode = int4pack_layout_ok(N)
        order = feed_order(N) if self.can_decode else torch.arange(N)  # rows as handed to the packer
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes[order].contiguous(), 1), persistent=False)          # [N, Kp/2] uint8
        self.register_buffer("scales_zeros", torch.stack([s, z], -1)[:, order].to(compute_dtype).contiguous(),
                             persistent=False)                         # [Gv, N, 2] in fed order
        identity_rows = bool(torch.equal(order, torch.arange(N)))
        self.register_buffer("out_index", None if identity_rows else torch.argsort(order).to(torch.int32),
                             persistent=False)                         # fed -> natural outputs

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:                # [M, K] -> [M, Kp]
        x = x.to(self.compute_dtype)
        if self.src_index is None:
            return F.pad(x, (0, self.pad)) if self.pad else x
        return torch.index_select(F.pad(x, (0, 1)), 1, self.src_index)

    def weight_t(self, rows: int | None = None) -> torch.Tensor:
        """``W^T [rows, N]`` in ``compute_dtype`` (rows in the kernel's column order, outputs natural;
        all ``Kp`` rows by default). bfloat16 uses the C decoder of :mod:`llmquant.runtime.native`
        where it builds: the same bits as the torch ops below, ~4x faster."""
        rows = self.Kp if rows is None else rows
        if self.compute_dtype == torch.bfloat16 and self.can_decode:
            w = decode_int4pack_native(self.packed, self.scales_zeros, self.out_features, self.Kp, self.kgs, rows)
            if w is not None:
                return w
        return self.weight_t_torch()[:rows]

    def weight_t_torch(self) -> torch.Tensor:
        """:meth:`weight_t` in torch ops (every dtype; the yardstick of the C decoder)."""
        v = decode_int4pack_cpu(self.packed, self.out_features, self.Kp, self.compute_dtype)
        v = v.view(-1, self.kgs, self.out_features)                    # [Gv, kgs, N]
        sz = self.scales_zeros if self.out_index is None else torch.index_select(self.scales_zeros, 1, self.out_index)
        s, z = sz[..., 0].contiguous(), sz[..., 1].contiguous()        # [Gv, N] each, contiguous: fast
        return torch.addcmul(z[:, None], v, s[:, None]).view(self.Kp, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                  # [M, K]
        if x2.shape[0] <= self.max_m or not self.can_decode:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(self._inputs(x2), self.packed, self.kgs,
                                                           self.scales_zeros)   # [M, N] fed order
            if self.out_index is not None:
                y = torch.index_select(y, 1, self.out_index)           # int32 index: no conversion
        elif self.src_index is None:                                   # no reorder: skip the padded rows
            y = x2.to(self.compute_dtype) @ self.weight_t(self.in_features)
        else:
            y = self._inputs(x2) @ self.weight_t()
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


class Int4CudaKernel(torch.nn.Module):
    """PyTorch's CUDA int4 matmul (``torch._weight_int4pack_mm``, tinygemm) for every batch size.

    Same math and column layout as :class:`Int4CpuKernel` (``W = (q - 8) * s + z`` per group,
    columns reordered/padded into whole groups). The packed format is whatever
    ``torch._convert_weight_to_int4pack`` makes of ``uint8 [N, Kp/2]`` (two codes per byte, even
    column in the high nibble); :meth:`self_check` compares with float32 dequantization on random
    inputs and :func:`make_int4_cuda` falls back to ``dequant`` if anything disagrees.
    """

    name = "int4"

    def __init__(self, q_t, zeros, scales, g_idx, group_size: int, device: str):
        super().__init__()
        K, N = q_t.shape
        G = scales.shape[0]
        self.in_features, self.out_features = K, N
        self.compute_dtype = torch.bfloat16
        self.kgs = kgs = int4_group(group_size, K)
        src, vgroup = int4_layout(g_idx, G, kgs)
        self.Kp = Kp = src.numel()
        identity = bool(torch.equal(src[:K], torch.arange(K))) and bool((src[K:] == K).all())
        self.pad = Kp - K if identity else None
        self.register_buffer("src_index", None if identity else src.to(torch.int32).to(device), persistent=False)
        q_pad = torch.cat([q_t.to(torch.int32), torch.full((1, N), 8, dtype=torch.int32)])
        codes = q_pad[src].t().contiguous()                            # [N, Kp]
        u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8).to(device)   # [N, Kp/2]
        inner = 8 if Kp % 128 == 0 else (4 if Kp % 64 == 0 else 2)
        self.register_buffer("packed", torch._convert_weight_to_int4pack(u8, inner), persistent=False)
        s = scales.float()[vgroup]
        z = (8 - zeros.float()[vgroup]) * s
        self.register_buffer("scales_zeros", torch.stack([s, z], -1).to(torch.bfloat16).contiguous().to(device),
                             persistent=False)

    def _inputs(self, x):
        x = x.to(torch.bfloat16)
        if self.src_index is None:
            return F.pad(x, (0, self.pad)) if self.pad else x
        return torch.index_select(F.pad(x, (0, 1)), 1, self.src_index)

    def forward(self, x):
        shape = x.shape
        y = torch._weight_int4pack_mm(self._inputs(x.reshape(-1, shape[-1])), self.packed, self.kgs,
                                      self.scales_zeros)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


def make_int4_cuda(qweight, zeros, scales, g_idx, bits, group_size, device):
    """:class:`Int4CudaKernel` if it runs and matches float32 dequantization here, else ``None``."""
    K = g_idx.numel()
    try:
        q_t = unpack_qweight(qweight, bits, K)
        k = Int4CudaKernel(q_t, zeros, scales, g_idx, group_size, device)
        x = torch.randn(3, K, generator=torch.Generator().manual_seed(0)).to(device)
        ref = x.float() @ dequantize_t(q_t, zeros, scales, g_idx).to(device)
        err = (k(x).float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
        return k if bool(err < 2e-2) else None
    except (RuntimeError, AttributeError, TypeError):
        return None


# ----------------------------------------------------------------------------- choice

def resolve_kernel(kernel: str, bits: int, out_features: int, device: str) -> str:
    """The kernel a layer uses. ``auto``: int4 for 4-bit layers (CPU: when ``N`` is a multiple of
    16; CUDA: when the layer passes :func:`make_int4_cuda`'s check), dequant otherwise. Forcing
    ``int4`` where it cannot run falls back to dequant."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; use one of {', '.join(KERNELS)}")
    if kernel in ("reference", "dequant"):
        return kernel
    if str(device).startswith("cuda"):
        return "int4" if bits == 4 and hasattr(torch, "_weight_int4pack_mm") else "dequant"
    if int4_cpu_supported(bits, out_features):
        return "int4"
    return "dequant"
