"""Quantizers: the worked example, torch.quantize_per_tensor / per_channel as references,
granularity shapes, clipping and error reports."""
import math
import warnings

import pytest
import torch

from llmquant.core.quantizers import (
    QuantSpec, absmax_quantize, error_report, quantize_per_token, quantize_tensor, zeropoint_quantize,
)


def test_worked_example_asymmetric_int8():
    r = zeropoint_quantize(torch.tensor([[-700.0, 0.0, 1000.0]]), bits=8)
    assert r.multiplier.item() == pytest.approx(0.15, abs=1e-7)
    assert r.zero.item() == -23
    assert r.q.tolist() == [[-128, -23, 127]]
    # textbook formulas, independently
    a, b, n = -700.0, 1000.0, 8
    mult = (2**n - 1) / (b - a)
    assert round(-mult * a) - 2 ** (n - 1) == -23


def test_absmax_formula():
    x = torch.tensor([[0.5, -1.27, 0.01, 0.3]])
    r = absmax_quantize(x, bits=8)
    mult = 127 / 1.27
    assert r.multiplier.item() == pytest.approx(mult)
    assert r.q.tolist() == [[round(mult * v) for v in x[0].tolist()]]
    assert r.zero.item() == 0
    assert torch.allclose(r.dequantize(), torch.round(mult * x) / mult)


def test_matches_torch_quantize_per_tensor():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g) * 3 + 0.7
    r = zeropoint_quantize(x, bits=8)
    warnings.simplefilter("ignore", UserWarning)
    ref = torch.quantize_per_tensor(x, r.scale.item(), int(r.zero.item()), torch.qint8)
    assert torch.equal(ref.int_repr().to(torch.float32), r.q)
    assert torch.allclose(ref.dequantize(), r.dequantize(), atol=1e-6)


def test_matches_torch_quantize_per_channel_symmetric():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 32, generator=g) * torch.linspace(0.1, 5, 8)[:, None]
    r = absmax_quantize(w, bits=8, granularity="channel")
    assert r.scale.shape == (8, 1)
    assert torch.allclose(r.scale[:, 0], w.abs().amax(1) / 127)
    ref = torch.quantize_per_channel(w, r.scale[:, 0].double(), torch.zeros(8, dtype=torch.long), 0, torch.qint8)
    assert torch.equal(ref.int_repr().float(), r.q)


def test_group_shapes_and_error_decreases_with_granularity():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 256, generator=g) * torch.rand(1, 256, generator=g) * 4
    errs = {}
    for gran in ("tensor", "channel", "group"):
        r = quantize_tensor(w, QuantSpec(bits=4, symmetric=False, granularity=gran, group_size=32))
        errs[gran] = error_report(w, r.dequantize())["mse"]
        assert r.q.min() >= -8 and r.q.max() <= 7
    assert r.scale.shape == (16, 8)
    assert errs["group"] < errs["channel"] < errs["tensor"]


def test_clipping_heavy_tail_lowers_error():
    torch.manual_seed(3)
    x = torch.distributions.StudentT(2.0).sample((64, 512))
    base = quantize_tensor(x, QuantSpec(bits=4, granularity="channel"))
    e0 = error_report(x, base.dequantize())["mse"]
    for clip, v in [("mse", 1.0), ("percentile", 99.0)]:
        r = quantize_tensor(x, QuantSpec(bits=4, granularity="channel", clip=clip, clip_value=v))
        assert (r.scale <= base.scale + 1e-9).all() and (r.scale < base.scale).any()
        if clip == "mse":   # a percentile clip is not MSE-optimal on an infinite-variance tail
            assert error_report(x, r.dequantize())["mse"] < e0


def test_percentile_matches_torch_quantile():
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(4))
    r = quantize_tensor(x, QuantSpec(bits=8, granularity="channel", clip="percentile", clip_value=99.0))
    ref = torch.quantile(x.abs(), 0.99, dim=1) / 127
    assert torch.allclose(r.scale[:, 0], ref, rtol=1e-5)


def test_per_token_and_reports():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [100.0, 3.0, -50.0]])
    q, s = quantize_per_token(x)
    assert q.dtype == torch.int8 and s.shape == (3, 1)
    assert q[0].tolist() == [64, -127, 32] and q[1].abs().sum() == 0 and q[2, 0] == 127
    assert torch.allclose(q.float() * s, x, atol=s.max().item() / 2 + 1e-6)
    rep = error_report(x, x)
    assert rep["mse"] == 0 and math.isinf(rep["sqnr_db"])
    rep = error_report(torch.ones(4), torch.full((4,), 1.1))
    assert rep["sqnr_db"] == pytest.approx(20.0) and rep["max_abs_error"] == pytest.approx(0.1)


@pytest.mark.parametrize("kw", [dict(bits=1), dict(granularity="row"), dict(clip="kl"),
                                dict(clip="ratio", clip_value=1.5), dict(granularity="group", group_size=0)])
def test_spec_validation(kw):
    with pytest.raises(ValueError):
        QuantSpec(**kw)


@pytest.mark.parametrize("K,gs,sym", [(96, 32, False), (80, 32, True), (64, -1, False)])
def test_group_clip_search_equals_trio_search(K, gs, sym):
    from llmquant.core.quant import mse_clip_search, per_group
    from llmquant.core.quantizers import group_clip_search
    W = torch.randn(12, K, generator=torch.Generator().manual_seed(9))
    ours = group_clip_search(W, 3, sym, gs, grid=15, max_shrink=0.5)
    ref = mse_clip_search(W, 3, sym, per_group(gs), grid=15, max_shrink=0.5, norm=2.0)
    assert torch.equal(ours, ref)
