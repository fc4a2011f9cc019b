import torch

from llmquant.core.quant import (block_minmax, choose_qparams, dequantize, expand, mse_clip_search, qrange,
                                 quantize, quantize_blocks)


def test_worked_example_int8_asymmetric():
    s, z = choose_qparams(torch.tensor(-700.0), torch.tensor(1000.0), -128, 127, symmetric=False)
    assert torch.isclose(1 / s, torch.tensor(0.15)) and z.item() == -23
    assert quantize(torch.tensor([-700.0, 1000.0]), s, z, -128, 127).tolist() == [-128, 127]


def test_symmetric_conventions():
    # int8 restricted: multiplier 127 / max|x|, zero 0; GPTQ unsigned 4-bit: zero 8, step 2*max/15
    s, z = choose_qparams(torch.tensor(-2.0), torch.tensor(1.0), *qrange(8, signed=True, restricted=True), True)
    assert torch.isclose(1 / s, torch.tensor(127 / 2.0)) and z.item() == 0
    s, z = choose_qparams(torch.tensor(-2.0), torch.tensor(1.0), *qrange(4), True)
    assert torch.isclose(s, torch.tensor(4 / 15)) and z.item() == 8


def test_block_granularity_with_ragged_last_block():
    x = torch.arange(2 * 10, dtype=torch.float32).reshape(2, 10)
    lo, hi = block_minmax(x, (1, 4))
    assert lo.tolist() == [[0, 4, 8], [10, 14, 18]] and hi.tolist() == [[3, 7, 9], [13, 17, 19]]
    assert expand(lo, (1, 4), x.shape).shape == x.shape
    q, s, z = quantize_blocks(x, 4, False, (1, 4))
    err = (dequantize(q, expand(s, (1, 4), x.shape), expand(z, (1, 4), x.shape)) - x).abs()
    assert torch.all(err <= expand(s, (1, 4), x.shape) / 2 + 1e-5)


def _brute_force_clip(x, bits, sym, G, grid, shrink, norm, w):
    qmin, qmax = qrange(bits)
    out = torch.ones(x.shape[0], (x.shape[1] + G - 1) // G)
    for r in range(x.shape[0]):
        for g in range(out.shape[1]):
            seg, ws = x[r, g * G:(g + 1) * G], w[g * G:(g + 1) * G]
            best = float("inf")
            for i in range(grid):
                p = 1 - shrink * i / grid
                s, z = choose_qparams(seg.min() * p, seg.max() * p, qmin, qmax, sym)
                e = float(((dequantize(quantize(seg, s, z, qmin, qmax), s, z) - seg).abs() ** norm * ws).sum())
                if e < best:
                    best, out[r, g] = e, p
    return out


def test_mse_clip_search_equals_brute_force_and_reduces_error():
    torch.manual_seed(0)
    x = torch.randn(6, 40)
    w = torch.rand(40) + 0.1
    for sym in (False, True):
        ratio = mse_clip_search(x, 3, sym, (1, 16), grid=25, max_shrink=0.5, norm=2.4, weight=w[None, :])
        assert torch.equal(ratio, _brute_force_clip(x, 3, sym, 16, 25, 0.5, 2.4, w))
    # heavy tails: clipping lowers the squared error of the whole tensor
    t = torch.distributions.StudentT(2.0).sample((8, 256))
    ratio = mse_clip_search(t, 4, False, (1, 128), grid=40, max_shrink=0.8, norm=2.0)
    assert (ratio < 1).any()

    def sq_err(clip):
        q, s, z = quantize_blocks(t, 4, False, (1, 128), clip_ratio=clip)
        return float(((dequantize(q, expand(s, (1, 128), t.shape), expand(z, (1, 128), t.shape)) - t) ** 2).sum())
    assert sq_err(ratio) < sq_err(1.0)
