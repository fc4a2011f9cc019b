"""SmoothQuant math: the worked example, exactness of the fold in float64, pooling for shared channels."""
import pytest
import torch

from llmquant.core.smooth import pool_by_map, smooth_weight, smoothing_factors, unsmooth_rows, weight_column_amax


def test_worked_example():
    s = smoothing_factors(torch.tensor([100.0, 1.0]), torch.tensor([0.01, 1.0]), 0.5)
    assert torch.allclose(s, torch.tensor([100.0, 1.0], dtype=torch.float64))
    assert s.dtype == torch.float64


def test_alpha_extremes_and_dead_channels():
    a, w = torch.tensor([4.0, 9.0, 0.0]), torch.tensor([2.0, 3.0, 5.0])
    assert torch.allclose(smoothing_factors(a, w, 1.0), torch.tensor([4.0, 9.0, 1.0], dtype=torch.float64))
    assert torch.allclose(smoothing_factors(a, w, 0.0), torch.tensor([0.5, 1 / 3, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        smoothing_factors(a, w, 1.5)


def test_fold_is_exact_in_float64_and_balances_ranges():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 16, generator=g, dtype=torch.float64)
    X[:, 2] *= 100
    W = torch.randn(8, 16, generator=g, dtype=torch.float64)
    s = smoothing_factors(X.abs().amax(0), weight_column_amax([W]), 0.5)
    assert torch.allclose((X / s) @ smooth_weight(W, s).t(), X @ W.t(), rtol=1e-12, atol=1e-12)
    # after alpha = 0.5 the activation and weight maxima of each channel are equal
    assert torch.allclose((X / s).abs().amax(0), smooth_weight(W, s).abs().amax(0), rtol=1e-12)
    # producer side: a linear's rows divided by s gives the smoothed input
    P, h = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    assert torch.allclose(h @ unsmooth_rows(P, s).t(), (h @ P.t()) / s, rtol=1e-12)


def test_pool_by_map_takes_the_max_of_shared_channels():
    v = torch.tensor([1.0, 5.0, 2.0, 3.0])
    idx = torch.tensor([0, 1, 0, 1])
    assert torch.equal(pool_by_map(v, idx, 2), torch.tensor([2.0, 5.0]))
