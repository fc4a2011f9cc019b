"""Bit packing of unsigned n-bit codes into int32 words, the GPTQ checkpoint layout.

The layout is one rule for every width: along the packed dimension, consecutive codes are
laid end to end in a little-endian bit stream, code ``i`` at stream bits
``[i*bits, (i+1)*bits)``, and stream bit ``b`` is bit ``b % 32`` of word ``b // 32``.
For 2/4/8 bits a word holds ``32/bits`` whole codes. For 3 bits, 32 codes fill 3 words and
codes 10 and 21 straddle a word boundary (their low bits end one word, their high bits
start the next). This is the layout GPTQModel / AutoGPTQ / vLLM use (see docs/FORMAT.md).

========  =============  ==============  =========================================
bits      codes / chunk  words / chunk   packed dim must be a multiple of
========  =============  ==============  =========================================
2         16             1               16
3         32             3               32
4         8              1               8
8         4              1               4
========  =============  ==============  =========================================

Words are int32 tensors holding unsigned bit patterns: a word with bit 31 set reads as
negative (``0xF0000000`` is ``-268435456``).

Worked example (4 bits, codes 0..7 down one column)::

    >>> pack_rows(torch.arange(8).reshape(8, 1), 4)
    tensor([[1985229328]], dtype=torch.int32)          # 0x76543210

``pack_rows``  ``[K, N]`` -> ``[K*bits/32, N]``   (``qweight``: packed along the input dim)
``pack_cols``  ``[G, N]`` -> ``[G, N*bits/32]``   (``qzeros``: packed along the output dim)
"""
from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
_MASK32 = 0xFFFFFFFF


def chunk_shape(bits: int) -> tuple[int, int]:
    """``(codes, words)`` of the smallest whole chunk: ``(16, 1)`` for 2 bits, ``(32, 3)`` for 3."""
    _check_bits(bits)
    words = bits // math.gcd(bits, 32)
    return 32 * words // bits, words


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 tensor of values in ``[0, 2^32)`` -> int32 with the same bit pattern."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _to_uint(words: torch.Tensor) -> torch.Tensor:
    """int32 words -> int64 tensor of their unsigned values in ``[0, 2^32)``."""
    return words.to(torch.int64) & _MASK32


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``[K, N]`` along ``K`` into int32 words ``[K*bits/32, N]``.

    ``q`` must be an integer tensor with values in ``[0, 2^bits - 1]``; ``K`` must be a multiple
    of ``chunk_shape(bits)[0]`` (32 for 3 bits, ``32/bits`` otherwise).
    """
    _check_bits(bits)
    if q.dim() != 2:
        raise ValueError(f"pack_rows expects a 2-D [K, N] tensor, got shape {tuple(q.shape)}")
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise ValueError(f"pack_rows expects integer codes, got dtype {q.dtype}")
    codes, words = chunk_shape(bits)
    K, N = q.shape
    if K % codes:
        raise ValueError(
            f"cannot pack {K} values at {bits} bits: the packed dimension must be a multiple of "
            f"{codes} (got {K})"
        )
    q64 = q.to(torch.int64)
    if q64.numel() and (int(q64.min()) < 0 or int(q64.max()) > 2**bits - 1):
        raise ValueError(
            f"codes out of range for {bits} bits: min {int(q64.min())}, max {int(q64.max())}, "
            f"allowed [0, {2**bits - 1}]"
        )
    chunks = q64.reshape(K // codes, codes, N)                 # [C, codes, N]
    out = torch.zeros(K // codes, words, N, dtype=torch.int64, device=q.device)  # [C, words, N]
    for i in range(codes):
        w, s = divmod(i * bits, 32)
        v = chunks[:, i, :]                                     # [C, N]
        out[:, w, :] |= (v << s) & _MASK32
        if s + bits > 32:                                       # straddles into the next word
            out[:, w + 1, :] |= v >> (32 - s)
    return _to_int32(out.reshape(K // codes * words, N))


def unpack_rows(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 words ``[K*bits/32, N]`` -> codes ``[K, N]`` int32."""
    _check_bits(bits)
    if packed.dim() != 2:
        raise ValueError(f"unpack_rows expects a 2-D tensor, got shape {tuple(packed.shape)}")
    codes, words = chunk_shape(bits)
    if K % codes:
        raise ValueError(
            f"cannot unpack {K} values at {bits} bits: the packed dimension must be a multiple of "
            f"{codes} (got {K})"
        )
    R, N = packed.shape
    if R != K // codes * words:
        raise ValueError(
            f"packed tensor has {R} rows but {K} values at {bits} bits need {K // codes * words}"
        )
    u = _to_uint(packed).reshape(K // codes, words, N)          # [C, words, N]
    mask = 2**bits - 1
    out = torch.empty(K // codes, codes, N, dtype=torch.int64, device=packed.device)  # [C, codes, N]
    for i in range(codes):
        w, s = divmod(i * bits, 32)
        v = u[:, w, :] >> s
        if s + bits > 32:
            v = v | (u[:, w + 1, :] << (32 - s))
        out[:, i, :] = v & mask
    return out.reshape(K, N).to(torch.int32)


def pack_cols(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``[G, N]`` along ``N`` into int32 words ``[G, N*bits/32]`` (the qzeros layout)."""
    if q.dim() != 2:
        raise ValueError(f"pack_cols expects a 2-D [G, N] tensor, got shape {tuple(q.shape)}")
    return pack_rows(q.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, N: int) -> torch.Tensor:
    """Inverse of :func:`pack_cols`: int32 words ``[G, N*bits/32]`` -> codes ``[G, N]`` int32."""
    if packed.dim() != 2:
        raise ValueError(f"unpack_cols expects a 2-D tensor, got shape {tuple(packed.shape)}")
    return unpack_rows(packed.t(), bits, N).t().contiguous()
