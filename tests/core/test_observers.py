"""Observers against torch.ao.quantization references and distributions with known optimum behaviour."""
import pytest
import torch
from torch.ao import quantization as tq

from llmquant.core.observers import (
    KLObserver, MinMaxObserver, MSEObserver, PercentileObserver, make_observer,
)
from llmquant.core.quant import fake_quantize


def _batches(seed=0, n=5, scale_growth=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 64, generator=g) * (1 + i if scale_growth else 1) + 0.3 for i in range(n)]


def test_minmax_matches_torch_affine():
    ours = MinMaxObserver(bits=8, symmetric=False)
    ref = tq.MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_affine)
    for x in _batches():
        ours.update(x)
        ref(x)
    s, z = ours.qparams()
    rs, rz = ref.calculate_qparams()
    assert s.item() == pytest.approx(rs.item(), rel=1e-6)
    assert z.item() == rz.item()


def test_minmax_symmetric_matches_torch_restricted_range():
    ours = MinMaxObserver(bits=8, symmetric=True)
    ref = tq.MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-127, quant_max=127)
    for x in _batches(1):
        ours.update(x)
        ref(x)
    assert ours.qparams()[0].item() == pytest.approx(ref.calculate_qparams()[0].item(), rel=1e-6)
    assert ours.qparams()[1].item() == 0


def test_per_channel_minmax_matches_torch():
    ours = MinMaxObserver(bits=8, symmetric=True, axis=0)
    ref = tq.PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                      quant_min=-127, quant_max=127)
    for x in _batches(2):
        ours.update(x)
        ref(x)
    s, _ = ours.qparams()
    assert torch.allclose(s, ref.calculate_qparams()[0].float(), rtol=1e-6)


def test_histogram_growth_is_exact():
    obs = PercentileObserver(bins=256)
    data = _batches(3, n=6)
    for x in data:
        obs.update(x)
    a = torch.cat([x.flatten() for x in data]).abs()
    assert obs.hist.sum().item() == a.numel()
    ref = torch.histc(a.double(), bins=256, min=0, max=obs.width * 256)
    assert torch.equal(obs.hist, ref)
    assert obs.amax == pytest.approx(a.max().item())


def test_percentile_close_to_torch_quantile():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200_000, generator=g)
    obs = PercentileObserver(percentile=99.0)
    obs.update(x)
    ref = torch.quantile(x.abs()[:100_000], 0.99).item()  # torch.quantile limits input size
    assert abs(obs.threshold() - ref) < 0.02
    assert obs.range()[1].item() == pytest.approx(obs.threshold())


def _fq_mse(x, t, bits=8):
    qmax = 2 ** (bits - 1) - 1
    s = torch.tensor(t / qmax)
    return (fake_quantize(x, s, torch.tensor(0.0), -qmax, qmax) - x).pow(2).mean().item()


@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("name", ["mse", "kl"])
def test_heavy_tail_clips_tighter_and_lowers_error(name, bits):
    torch.manual_seed(5)
    x = torch.distributions.StudentT(3.0).sample((200_000,))
    mm = make_observer("minmax", bits=bits)
    obs = make_observer(name, bits=bits)
    mm.update(x)
    obs.update(x)
    t_mm, t = mm.range()[1].item(), obs.range()[1].item()
    assert t < 0.5 * t_mm
    assert _fq_mse(x, t, bits) < 0.7 * _fq_mse(x, t_mm, bits)


def test_mse_observer_near_brute_force_optimum():
    torch.manual_seed(6)
    x = torch.distributions.Laplace(0.0, 1.0).sample((40_000,))
    obs = MSEObserver(bits=4)
    obs.update(x)
    grid = torch.linspace(0.5, x.abs().max().item(), 150).tolist()
    best = min(_fq_mse(x, t, bits=4) for t in grid)
    assert _fq_mse(x, obs.threshold(), bits=4) <= best * 1.03


def test_kl_coarse_search_close_to_full_search():
    torch.manual_seed(8)
    x = torch.distributions.StudentT(3.0).sample((100_000,))
    full, coarse = KLObserver(bits=4, stride=1), KLObserver(bits=4, stride=8)
    full.update(x)
    coarse.update(x)
    assert _fq_mse(x, coarse.threshold(), 4) <= 1.1 * _fq_mse(x, full.threshold(), 4)


def test_kl_keeps_uniform_range():
    # A uniform distribution has no outliers: entropy calibration keeps (almost) the full range.
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(7)) * 2 - 1
    obs = KLObserver()
    obs.update(x)
    assert obs.threshold() > 0.95


def test_qparams_before_data_and_bad_input():
    with pytest.raises(RuntimeError):
        MinMaxObserver().qparams()
    with pytest.raises(ValueError):
        make_observer("entropy")
    with pytest.raises(ValueError):
        KLObserver(symmetric=False)
    with pytest.raises(ValueError):
        PercentileObserver().update(torch.tensor([1.0, float("nan")]))


def test_zero_input():
    obs = KLObserver()
    obs.update(torch.zeros(10))
    s, z = obs.qparams()
    assert s.item() == 1.0 and z.item() == 0
