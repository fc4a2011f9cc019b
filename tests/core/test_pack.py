"""pack.py: exact inverse pairs, golden words from the documented layout, and a slow reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmquant.core.pack import chunk_shape, pack_cols, pack_rows, unpack_cols, unpack_rows

BITS = (2, 3, 4, 8)


def s32(u: int) -> int:
    """Unsigned 32-bit pattern -> the int32 value that holds it."""
    assert 0 <= u < 2**32
    return u - 2**32 if u >= 2**31 else u


# ---------------------------------------------------------------- independent python-int reference

def ref_pack_column(codes: list[int], bits: int) -> list[int]:
    """Layout description, literally: one big little-endian integer, code i at bit i*bits."""
    stream = 0
    for i, c in enumerate(codes):
        stream |= c << (i * bits)
    n_words = len(codes) * bits // 32
    return [s32((stream >> (32 * w)) & 0xFFFFFFFF) for w in range(n_words)]


def ref_pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    K, N = q.shape
    cols = [ref_pack_column([int(v) for v in q[:, n]], bits) for n in range(N)]
    return torch.tensor(cols, dtype=torch.int32).reshape(N, K * bits // 32).t()


def ref_pack_3bit_wordwise(codes: list[int]) -> list[int]:
    """The 3-bit recipe as GPTQ implementations describe it, word by word, per 32 codes:
    word0 = codes 0..9 at 3*j, then the low 2 bits of code 10 at bit 30;
    word1 = the high bit of code 10 at bit 0, codes 11..20 at 3*j+1, low bit of code 21 at bit 31;
    word2 = the high 2 bits of code 21 at bit 0, codes 22..31 at 3*j+2."""
    out = []
    for base in range(0, len(codes), 32):
        c = codes[base:base + 32]
        w0 = sum(c[j] << (3 * j) for j in range(10)) | ((c[10] & 0b11) << 30)
        w1 = (c[10] >> 2) | sum(c[11 + j] << (3 * j + 1) for j in range(10)) | ((c[21] & 1) << 31)
        w2 = (c[21] >> 1) | sum(c[22 + j] << (3 * j + 2) for j in range(10))
        out += [s32(w0), s32(w1), s32(w2)]
    return out


# ---------------------------------------------------------------- golden words, by hand

def test_golden_4bit():
    q = torch.arange(8).reshape(8, 1)
    assert pack_rows(q, 4).tolist() == [[0x76543210]]
    q = torch.tensor([[15]] * 8)
    assert pack_rows(q, 4).tolist() == [[-1]]                       # 0xFFFFFFFF
    q = torch.tensor([0, 0, 0, 0, 0, 0, 0, 8]).reshape(8, 1)
    assert pack_rows(q, 4).tolist() == [[s32(0x80000000)]]


def test_golden_2bit():
    q = torch.tensor([0, 1, 2, 3] * 4).reshape(16, 1)                  # byte 0b11100100 = 0xE4
    assert pack_rows(q, 2).tolist() == [[s32(0xE4E4E4E4)]]
    q = torch.zeros(16, 1, dtype=torch.int32)
    q[15] = 1                                                          # bits 30..31 = 01
    assert pack_rows(q, 2).tolist() == [[0x40000000]]


def test_golden_8bit():
    q = torch.tensor([1, 2, 3, 255, 0x10, 0x20, 0x30, 0x7F]).reshape(8, 1)
    assert pack_rows(q, 8).tolist() == [[s32(0xFF030201)], [0x7F302010]]


def test_golden_3bit_straddling():
    codes = [0] * 32
    codes[0] = 1        # stream bit 0                  -> word0 bit 0
    codes[10] = 7       # stream bits 30,31 | 32        -> word0 bits 30,31 ; word1 bit 0
    codes[11] = 3       # stream bits 33,34             -> word1 bits 1,2
    codes[21] = 5       # 0b101 at stream bits 63..65   -> word1 bit 31 ; word2 bit 1
    codes[31] = 7       # stream bits 93..95            -> word2 bits 29..31
    q = torch.tensor(codes).reshape(32, 1)
    assert pack_rows(q, 3).tolist() == [[s32(0xC0000001)], [s32(0x80000007)], [s32(0xE0000002)]]
    assert unpack_rows(pack_rows(q, 3), 3, 32)[:, 0].tolist() == codes


def test_golden_cols_qzeros_layout():
    # qzeros: one group row, 8 output columns with zero points 1..8 at 4 bits, packed along N
    z = torch.arange(1, 9).reshape(1, 8)
    assert pack_cols(z, 4).tolist() == [[s32(0x87654321)]]
    # 3-bit along columns: same stream rule across N
    z = torch.zeros(2, 32, dtype=torch.int32)
    z[1, 10] = 7
    assert pack_cols(z, 3).tolist() == [[0, 0, 0], [s32(0xC0000000), 1, 0]]


# ---------------------------------------------------------------- reference cross-checks

@pytest.mark.parametrize("bits", BITS)
def test_matches_python_int_reference(bits):
    g = torch.Generator().manual_seed(bits)
    codes, _ = chunk_shape(bits)
    q = torch.randint(0, 2**bits, (codes * 3, 5), generator=g, dtype=torch.int32)
    assert torch.equal(pack_rows(q, bits), ref_pack_rows(q, bits))
    assert torch.equal(pack_cols(q.t().contiguous(), bits), ref_pack_rows(q, bits).t())


def test_3bit_matches_wordwise_recipe():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 8, (96, 4), generator=g, dtype=torch.int32)
    for n in range(4):
        assert pack_rows(q, 3)[:, n].tolist() == ref_pack_3bit_wordwise(q[:, n].tolist())


# ---------------------------------------------------------------- inverse pairs (property tests)

@st.composite
def codes_and_bits(draw):
    bits = draw(st.sampled_from(BITS))
    per, _ = chunk_shape(bits)
    K = per * draw(st.integers(1, 4))
    N = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    extreme = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (K, N), generator=g, dtype=torch.int32)
    if extreme:                                         # all-ones patterns set the sign bit
        q[::2] = 2**bits - 1
    return bits, q


@settings(max_examples=150, deadline=None)
@given(codes_and_bits())
def test_unpack_pack_roundtrip(bq):
    bits, q = bq
    K, N = q.shape
    p = pack_rows(q, bits)
    assert p.dtype == torch.int32 and p.shape == (K * bits // 32, N)
    assert torch.equal(unpack_rows(p, bits, K), q)
    pc = pack_cols(q.t(), bits)
    assert pc.dtype == torch.int32 and pc.shape == (N, K * bits // 32)
    assert torch.equal(unpack_cols(pc, bits, K), q.t())


@st.composite
def words_and_bits(draw):
    bits = draw(st.sampled_from(BITS))
    per, words = chunk_shape(bits)
    chunks = draw(st.integers(1, 4))
    N = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(-(2**31), 2**31, (chunks * words, N), generator=g, dtype=torch.int64)
    return bits, p.to(torch.int32), chunks * per


@settings(max_examples=150, deadline=None)
@given(words_and_bits())
def test_pack_unpack_roundtrip(bpk):
    bits, p, K = bpk
    assert torch.equal(pack_rows(unpack_rows(p, bits, K), bits), p)
    assert torch.equal(pack_cols(unpack_cols(p.t(), bits, K), bits), p.t())


def test_accepts_other_int_dtypes():
    q = torch.arange(8, dtype=torch.uint8).reshape(8, 1)
    assert pack_rows(q, 4).tolist() == [[0x76543210]]
    assert pack_rows(q.to(torch.int64), 4).tolist() == [[0x76543210]]


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("bits,K", [(4, 12), (2, 8), (8, 6), (3, 16), (3, 48)])
def test_bad_packed_dim(bits, K):
    with pytest.raises(ValueError, match="multiple of"):
        pack_rows(torch.zeros(K, 2, dtype=torch.int32), bits)
    with pytest.raises(ValueError, match="multiple of"):
        pack_cols(torch.zeros(2, K, dtype=torch.int32), bits)


def test_bad_inputs():
    with pytest.raises(ValueError, match="bits"):
        pack_rows(torch.zeros(8, 1, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="out of range"):
        pack_rows(torch.full((8, 1), 16), 4)
    with pytest.raises(ValueError, match="out of range"):
        pack_rows(torch.full((8, 1), -1), 4)
    with pytest.raises(ValueError, match="integer"):
        pack_rows(torch.zeros(8, 1), 4)
    with pytest.raises(ValueError, match="rows"):
        unpack_rows(torch.zeros(3, 1, dtype=torch.int32), 4, 32)
    with pytest.raises(ValueError, match="2-D"):
        pack_rows(torch.zeros(8, dtype=torch.int32), 4)
