"""native.py: the C int4 decoder gives the torch-ops decode bit for bit (full 64-output blocks,
a short tail block, act-order reorder, short last group, any thread split), and is optional."""
from __future__ import annotations

import shutil

import pytest
import torch

from llmquant.runtime import kernels as K_
from llmquant.runtime import native

from rt_helpers import rtn


def _kernel(N, K, gs, act_order, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g) * 3   # varied row scales
    perm = torch.randperm(K, generator=g) if act_order else None
    qw = rtn(w, 4, False, gs, perm)
    q_t = qw.q.t().contiguous()
    return K_.Int4CpuKernel(q_t, qw.zero.t().contiguous(), qw.scale.t().half().float(), qw.g_idx, qw.group_size)


needs_native = pytest.mark.skipif(native.int4_decoder() is None,
                                  reason="no C compiler here: the torch-ops decode is used")


def test_native_builds_where_a_compiler_exists():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    assert native.int4_decoder() is not None


@needs_native
@pytest.mark.parametrize("N,K,gs,act_order", [
    (1536, 576, 128, False),     # SmolLM2 gate/up: Kp 640, the last group padded
    (576, 1536, 128, True),      # down_proj shape, act-order reorder
    (80, 96, 32, False),         # one full block of 64 outputs + a tail of 16
    (16, 64, 32, True),          # tail only
    (192, 256, -1, False),       # per-channel: one group of all K columns
])
def test_native_decode_equals_torch_decode_bit_for_bit(N, K, gs, act_order):
    k = _kernel(N, K, gs, act_order, seed=N + K)
    if not k.can_decode:
        pytest.skip("this CPU packs int4 in another layout")
    ref = k.weight_t_torch()                                          # [Kp, N] bf16
    for threads in (1, 2, 3):
        got = native.decode_int4pack_native(k.packed, k.scales_zeros, N, k.Kp, k.kgs, k.Kp, threads)
        assert torch.equal(got, ref), threads
    part = native.decode_int4pack_native(k.packed, k.scales_zeros, N, k.Kp, k.kgs, K, 2)
    assert torch.equal(part, ref[:K])
    assert torch.equal(k.weight_t(), ref) and torch.equal(k.weight_t(K), ref[:K])


@needs_native
def test_prefill_path_uses_native_and_matches_reference():
    k = _kernel(1536, 576, 128, False, seed=1)
    x = torch.randn(40, 576, generator=torch.Generator().manual_seed(2), dtype=torch.float32)
    k.max_m = 0                                                       # force decode + matmul
    y = k(x.bfloat16()).float()
    ref = x.bfloat16().float() @ k.weight_t_torch()[:576].float()
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-2


def test_disabled_native_falls_back_to_the_same_bits(monkeypatch):
    k = _kernel(80, 96, 32, False, seed=3)
    ref = k.weight_t()
    monkeypatch.setenv("LLMQUANT_NATIVE", "0")
    native.int4_decoder.cache_clear()
    try:
        assert native.int4_decoder() is None
        assert native.decode_int4pack_native(k.packed, k.scales_zeros, 80, k.Kp, k.kgs, k.Kp) is None
        assert torch.equal(k.weight_t(), ref)
    finally:
        monkeypatch.delenv("LLMQUANT_NATIVE")
        native.int4_decoder.cache_clear()


def test_bad_arguments_are_rejected():
    if native.int4_decoder() is None:
        pytest.skip("no native decoder")
    k = _kernel(80, 96, 32, False, seed=4)
    with pytest.raises(ValueError):
        native.decode_int4pack_native(k.packed, k.scales_zeros.float(), 80, k.Kp, k.kgs, k.Kp)
    with pytest.raises(ValueError):
        native.decode_int4pack_native(k.packed, k.scales_zeros, 80, k.Kp, k.kgs, k.Kp + 1)


def test_unwritable_cache_falls_back_to_a_temp_dir(tmp_path, monkeypatch):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LLMQUANT_CACHE", str(blocker / "sub"))       # cannot be created
    path = native.build("int4_decode")
    assert path is not None and path.is_file() and not str(path).startswith(str(blocker))


def test_a_shared_or_foreign_cache_folder_is_not_used(tmp_path, monkeypatch):
    """A group/world-writable cache folder could hold a planted library: build elsewhere."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("LLMQUANT_CACHE", str(shared))
    (shared / "native").mkdir()
    (shared / "native").chmod(0o777)
    path = native.build("int4_decode")
    assert path is not None and not str(path).startswith(str(shared))
