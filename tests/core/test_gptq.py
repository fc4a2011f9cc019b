import math

import pytest
import torch

from llmquant.core.gptq import GPTQ, QuantArgs, gptq_quantize, rtn
from llmquant.core.quant import qrange


def correlated_inputs(K, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(K, K, generator=g) / math.sqrt(K)
    A += torch.eye(K) * 0.3
    scales = torch.rand(K, generator=g) * 3 + 0.1
    return (torch.randn(n, K, generator=g) @ A) * scales            # [n, K]


def hessian(X):
    gp = GPTQ(X.shape[1])
    for chunk in X.split(97):
        gp.add_batch(chunk)
    return gp.H


def naive_obs(W, H, args, percdamp, act_order=False):
    """One column at a time, straight from the OBS/GPTQ paper: keep the full inverse Hessian of the
    remaining columns, update the rest by -err/[Hinv]_qq * Hinv[q, :], then eliminate q from Hinv.
    Group parameters are fitted on the (updated) weights when a group starts."""
    W = W.double().clone()
    H = H.double().clone()
    N, K = W.shape
    qmin, qmax = args.qmin_qmax
    G = args.group_size if args.group_size > 0 else K
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    H = H + torch.eye(K, dtype=H.dtype) * percdamp * torch.diag(H).mean()
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    scale = zero = None
    for t, q in enumerate(order.tolist()):
        if t % G == 0:
            cols = order[t:t + G]
            from llmquant.core.gptq import fit_qparams
            scale, zero = fit_qparams(W[:, cols].float(), args)
            scale, zero = scale.double()[:, 0], zero.double()[:, 0]
        w = W[:, q]
        Q[:, q] = (torch.clamp(torch.round(w / scale) + zero, qmin, qmax) - zero) * scale
        err = (w - Q[:, q]) / Hinv[q, q]
        rest = order[t + 1:]
        W[:, rest] -= err[:, None] * Hinv[q, rest][None, :]
        Hinv = Hinv - Hinv[:, q:q + 1] @ Hinv[q:q + 1, :] / Hinv[q, q]
    return Q


@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (3, False), (2, False), (8, True)])
def test_identity_hessian_equals_rtn(bits, sym):
    torch.manual_seed(0)
    W = torch.randn(48, 256)
    args = QuantArgs(bits=bits, group_size=64, sym=sym)
    res = gptq_quantize(W, torch.eye(256), args, blocksize=128)
    _, Qr = rtn(W, args)
    assert torch.equal(res.Q, Qr)
    assert torch.equal(res.qweight.dequantize(), Qr)


@pytest.mark.parametrize("group_size,act_order,blocksize", [(-1, False, 32), (32, False, 64), (32, True, 64), (24, False, 48)])
def test_blocked_equals_naive_paper_implementation(group_size, act_order, blocksize):
    torch.manual_seed(1)
    K = 96
    W = torch.randn(16, K)
    H = hessian(correlated_inputs(K, 2000))
    args = QuantArgs(bits=4, group_size=group_size, sym=False, fp16_scales=False)
    res = gptq_quantize(W, H, args, blocksize=blocksize, percdamp=0.01, act_order=act_order)
    ref = naive_obs(W, H, args, 0.01, act_order=act_order)
    # the two differ only by float rounding; a different rounding of one code shows as a large error
    mism = (res.Q.double() - ref).abs() > 1e-3
    assert mism.float().mean() < 0.002, f"{int(mism.sum())} of {mism.numel()} weights differ"


@pytest.mark.parametrize("bits,group_size,act_order,static", [(4, 32, False, False), (3, 32, True, False),
                                                              (4, 32, True, True), (2, -1, False, False)])
def test_gptq_output_error_below_rtn(bits, group_size, act_order, static):
    torch.manual_seed(2)
    K = 128
    X = correlated_inputs(K, 4096, seed=3)
    W = torch.randn(64, K)
    args = QuantArgs(bits=bits, group_size=group_size, sym=False)
    res = gptq_quantize(W, hessian(X), args, act_order=act_order, static_groups=static)
    _, Qr = rtn(W, args)
    err_gptq = torch.linalg.norm(X @ (W - res.Q).T)
    err_rtn = torch.linalg.norm(X @ (W - Qr).T)
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_codes_and_gidx_consistent_with_act_order():
    torch.manual_seed(4)
    K = 64
    X = correlated_inputs(K, 1000)
    W = torch.randn(8, K)
    for static in (False, True):
        args = QuantArgs(bits=4, group_size=16, sym=True)
        res = gptq_quantize(W, hessian(X), args, act_order=True, static_groups=static)
        qw = res.qweight
        assert qw.q.min() >= 0 and qw.q.max() <= 15
        assert torch.equal(qw.dequantize(), res.Q)
        counts = torch.bincount(qw.g_idx.long(), minlength=4)
        assert counts.tolist() == [16, 16, 16, 16]
        if static:
            assert torch.equal(qw.g_idx, (torch.arange(K) // 16).int())
        else:
            assert not torch.equal(qw.g_idx, (torch.arange(K) // 16).int())


def test_ragged_last_group():
    torch.manual_seed(5)
    W = torch.randn(8, 80)
    res = gptq_quantize(W, hessian(correlated_inputs(80, 500)), QuantArgs(bits=4, group_size=32))
    assert res.qweight.scale.shape == (8, 3)
    assert torch.equal(res.qweight.g_idx, (torch.arange(80) // 32).int())


def test_dead_columns_and_not_pd_fallback():
    torch.manual_seed(6)
    X = correlated_inputs(32, 200)
    X[:, 5] = 0
    W = torch.randn(4, 32)
    res = gptq_quantize(W, hessian(X), QuantArgs(bits=4, group_size=-1))
    assert res.dead == 1 and res.fallback is None
    assert torch.all(res.Q[:, 5] == 0)  # dead column weights are zeroed before quantization
    # An indefinite "Hessian" cannot be fixed by damping: recorded fall-back to RTN, no crash.
    H = -torch.eye(32)
    H[0, 0] = 1.0
    res = gptq_quantize(W, H, QuantArgs(bits=4, group_size=-1), max_damp_retries=2)
    assert res.fallback is not None and "RTN" in res.fallback
    _, Qr = rtn(W, QuantArgs(bits=4, group_size=-1))
    assert torch.equal(res.Q, Qr)


def test_damping_retry_recovers_singular_hessian():
    # rank-deficient H with small damping: Cholesky of the inverse can fail; retries add damping.
    X = torch.randn(3, 16).double().float()
    H = X.T @ X
    res = gptq_quantize(torch.randn(4, 16), H, QuantArgs(bits=4, group_size=-1), percdamp=0.0)
    assert res.fallback is None and res.damp > 0


def test_fast_rounding_equals_torch_round_after_clamp():
    from llmquant.core.quant import quantize
    torch.manual_seed(7)
    x = torch.cat([torch.randn(10000) * 10, torch.arange(-40, 40) + 0.5, torch.tensor([1e9, -1e9, 2.0**22 + 0.5])])
    s, z = torch.tensor(0.7), torch.tensor(8.0)
    ref = torch.clamp(torch.round(x / s) + z, 0, 15)
    assert torch.equal(quantize(x, s, z, 0, 15), ref)
    assert torch.equal(quantize(x.double(), s.double(), z.double(), -128, 127),
                       torch.clamp(torch.round(x.double() / s) + z, -128, 127).double())


def test_blockwise_gram_equals_full_hessian():
    torch.manual_seed(8)
    X = torch.randn(3000, 1100)
    gp = GPTQ(1100)
    for chunk in X.split(700):
        gp.add_batch(chunk)
    ref = 2 / 3000 * X.double().T @ X.double()
    assert torch.allclose(gp.hessian.double(), ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(gp.hessian, gp.hessian.T)


@pytest.mark.parametrize("K", [200, 600])        # the plain and the block-upper paths
def test_bfloat16_gram_of_bfloat16_inputs(K):
    """Inputs already rounded to bfloat16 (as a bfloat16 forward feeds the linear layers): products are
    exact and each batch's sum is rounded once, so H stays within a few 2^-9 of the float64 Hessian of
    the same inputs, relative to its scale, and H is kept in float32."""
    torch.manual_seed(9)
    X = correlated_inputs(K, 2000, seed=3).bfloat16()
    gp = GPTQ(K, gram_dtype=torch.bfloat16)
    for chunk in X.split(500):
        gp.add_batch(chunk)
    ref = 2 / 2000 * X.double().T @ X.double()
    err = (gp.hessian.double() - ref).abs() / ref.diagonal().max()
    assert gp.H.dtype == torch.float32
    assert err.max() < 4 * 2 ** -9
    assert err.max() > 2 ** -16                  # really multiplied in bfloat16 (float32 errs ~2^-22)
    assert torch.equal(gp.hessian, gp.hessian.T)


def test_damping_grows_gently_until_positive_definite():
    """diag(1, ..., 1, -0.02): positive definite once damp * mean(diag) > 0.02, i.e. damp > 0.0229.
    Doubling from 0.01 stops at 0.04 (0.02 is not enough); a 10x schedule would jump to 0.1."""
    from llmquant.core.gptq import damped_inverse_cholesky
    H = torch.eye(8)
    H[0, 0] = -0.02
    U, d = damped_inverse_cholesky(H, 0.01)
    assert U is not None and d == pytest.approx(0.04)
