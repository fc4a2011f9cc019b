"""dtypes: figures from the bit layout agree with torch.finfo / iinfo and hand derivations; rounding
agrees with torch's own casts."""
import math

import pytest
import torch

from llmquant.core import dtypes as D

FLOATS = [D.FLOAT32, D.FLOAT16, D.BFLOAT16, D.FP8_E4M3, D.FP8_E5M2]


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_float_figures_match_finfo(fmt):
    fi = torch.finfo(fmt.torch_dtype)
    assert fmt.bits == fi.bits
    assert fmt.max == float(fi.max)
    assert fmt.smallest_normal == float(fi.smallest_normal)
    assert fmt.eps == float(fi.eps)
    assert fmt.smallest_subnormal == torch.tensor(fmt.smallest_subnormal, dtype=fmt.torch_dtype).item() > 0


def test_hand_derived_layouts():
    # e4m3fn: bias 7, top exponent 1111 holds normals, 1111.111 is NaN -> max = 2^8 * 1.75
    assert (D.FP8_E4M3.bias, D.FP8_E4M3.max, D.FP8_E4M3.smallest_normal) == (7, 448.0, 2.0**-6)
    assert D.FP8_E4M3.smallest_subnormal == 2.0**-9
    # e5m2: IEEE, bias 15, max = 2^15 * 1.75
    assert (D.FP8_E5M2.bias, D.FP8_E5M2.max, D.FP8_E5M2.eps) == (15, 57344.0, 0.25)
    assert D.FLOAT16.max == 65504.0 and D.FLOAT16.smallest_subnormal == 2.0**-24
    assert D.BFLOAT16.eps == 2.0**-7 and D.BFLOAT16.bias == 127
    assert D.FLOAT32.formula == "(-1)^s * 2^(e - 127) * (1 + f / 2^23)"


def test_int_ranges_match_iinfo():
    ii = torch.iinfo(torch.int8)
    assert (D.INT8.min, D.INT8.max) == (ii.min, ii.max)
    assert (D.INT4.min, D.INT4.max) == (-8, 7)
    assert D.INT8.bit_string(-1) == "11111111" and D.INT4.bit_string(5) == "0101"
    assert D.INT8.round(300.7) == 127 and D.INT8.round(2.5) == 2


def test_nf4_levels_match_qlora_table():
    # The code book printed in the QLoRA paper (appendix E), to 4 decimals.
    paper = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
             0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]
    assert torch.allclose(torch.tensor(D.NF4.levels, dtype=torch.float64), torch.tensor(paper, dtype=torch.float64), atol=1e-4)
    assert D.NF4.round(0.52) == pytest.approx(0.5626, abs=1e-4)


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_rounding_matches_torch_cast(fmt):
    g = torch.Generator().manual_seed(0)
    # magnitudes spread over the whole range, including subnormals
    lo, hi = math.log2(fmt.smallest_subnormal) - 1, math.log2(fmt.max)
    e = torch.empty(3000, dtype=torch.float64).uniform_(lo, hi, generator=g)
    x = (torch.randn(3000, generator=g, dtype=torch.float64).sign() * 2**e)
    x = x.float() if fmt is not D.FLOAT32 else x
    ref = x.to(fmt.torch_dtype).double()
    mine = torch.tensor([fmt.round(v) for v in x.double().tolist()], dtype=torch.float64)
    if fmt is D.FLOAT32:   # torch rounds float64 -> float32 the same way
        ref = x.to(torch.float32).double()
    assert torch.equal(mine, ref)


def test_overflow_and_ties():
    assert math.isnan(D.FP8_E4M3.round(500.0))            # no inf in e4m3fn
    assert D.FP8_E4M3.round(464.0) == 448.0                # tie to the even fraction 110
    assert D.FP8_E4M3.round(500.0, saturate=True) == 448.0
    assert math.isinf(D.FP8_E5M2.round(61440.0))           # midpoint above max: rounds to inf
    assert D.FLOAT16.round(1 + 2**-11) == 1.0              # exact tie -> even
    assert D.FLOAT16.round(1 + 3 * 2**-11) == 1 + 2**-9


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_fields_decode_round_trip(fmt):
    for x in [1.0, -2.5, 0.1, fmt.max, fmt.smallest_normal, fmt.smallest_subnormal * 3, -0.0]:
        s, e, f = fmt.fields(x)
        assert fmt.decode(s, e, f) == fmt.round(x)


def test_store_reports_error():
    r = D.store(D.BFLOAT16, 0.1)
    assert r["stored"] == torch.tensor(0.1).to(torch.bfloat16).item()
    assert r["abs_error"] == pytest.approx(r["stored"] - 0.1)
    assert r["bits"].split() == ["0", "01111011", "1001101"]
    assert D.store(D.INT8, 1000.0)["stored"] == 127.0
    assert D.store(D.NF4, 2.0)["how"].endswith("(clipped to [-1, 1])")
    assert len(D.FORMATS) == 8 and all(D.describe(f)["name"] == n for n, f in D.FORMATS.items())
