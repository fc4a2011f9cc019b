"""SmoothQuant folding found generically: exact output preservation (float64) on tiny random models
of several architectures, the producers it finds, and GQA head sharing."""
import pytest
import torch

from llmquant.ptq.smooth import smooth_model, smoothing_report
from tests.tiny import tiny_config


def tiny(arch, seed=0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    # outlier channels in the inputs, so that smoothing actually moves something
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1 and "norm" in n.lower():
                p.mul_(1 + 5 * torch.rand_like(p))
    return m


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "opt", "gpt2", "phi3"])
def test_smoothing_preserves_outputs_float64(arch):
    m = tiny(arch).double()
    x = torch.randint(3, 256, (2, 24))
    ref = m(x).logits
    plan = smooth_model(m, x, alpha=0.5)
    out = m(x).logits
    # Gemma's RMSNorm computes in float32 even in a float64 model: float32 round-off there
    tol = 1e-6 if arch == "gemma" else 1e-10
    assert (out - ref).abs().max() <= tol * ref.abs().max(), (out - ref).abs().max()
    assert sum(g.producer is not None for g in plan) > 0


def test_llama_producers_and_gqa_map():
    m = tiny("llama").double()
    x = torch.randint(0, 256, (1, 32))
    plan = smooth_model(m, x, alpha=0.5)
    by = {tuple(n.split(".")[-1] for n in g.names): g for g in plan if g.names[0].startswith("model.layers.0.")}
    assert by[("q_proj", "k_proj", "v_proj")].producer.endswith("input_layernorm")
    assert by[("gate_proj", "up_proj")].producer.endswith("post_attention_layernorm")
    assert by[("down_proj",)].producer.endswith("mlp.up_proj")
    o = by[("o_proj",)]
    assert o.producer.endswith("v_proj") and o.kind == "linear"
    # 4 heads of 16 dims read 2 kv heads: head h uses kv head h // 2
    c = torch.arange(64)
    assert torch.equal(o.index, (c // 16) // 2 * 16 + c % 16)
    rep = smoothing_report(plan)
    assert rep["smoothed"] == 8 and rep["not_smoothed"] == []


def test_smoothing_reduces_outlier_channel_range():
    m = tiny("llama")
    x = torch.randint(0, 256, (2, 32))
    plan = smooth_model(m, x, alpha=0.5)
    for g in plan:
        if g.producer is not None:
            assert g.act_amax_after <= g.act_amax_before * 1.0001


def test_gemma_norm_is_one_plus_weight():
    m = tiny("gemma").double()
    plan = smooth_model(m, torch.randint(0, 256, (1, 16)), alpha=0.5)
    kinds = {g.kind for g in plan if g.producer and "norm" in g.producer}
    assert kinds == {"norm1p"}


def test_w8a8_error_matches_the_real_layers():
    from llmquant.ptq.linear import W8A8Linear
    from llmquant.ptq.smooth import w8a8_error
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 32, generator=g)
    X[:, 3] *= 40                                                     # an outlier channel
    W = torch.randn(16, 32, generator=g)
    s = torch.rand(32, generator=g) + 0.5
    amax = X.abs().amax(0)
    ref = X @ W.t()
    for mode in ("dynamic", "static"):
        step = float((amax / s).max()) / 127 if mode == "static" else None
        lin = W8A8Linear.from_dense(W * s, None, step, backend="float")
        out = lin(X / s)
        want = float((out - ref).norm() / ref.norm())
        assert abs(w8a8_error(X, [W], s, amax, mode) - want) < 1e-4 * want


def test_alpha_search_picks_per_group_alphas_and_preserves_outputs():
    m = tiny("llama").double()
    x = torch.randint(0, 256, (2, 32))
    ref = m(x).logits
    plan = smooth_model(m, x, alpha="search", mode="static", sample_rows=16)
    assert torch.allclose(m(x).logits, ref, rtol=1e-9, atol=1e-9)
    for g in plan:
        if g.producer is not None:
            assert g.search_error[str(g.alpha)] == min(g.search_error.values())


@pytest.mark.slow
def test_smollm2_every_group_smoothed_and_outputs_kept(smollm2_path):
    """On the real model every one of the 120 groups finds its producer (norms, up_proj, v_proj under
    GQA) and the float32 logits stay the same up to round-off."""
    from llmquant.model.load import load_causal_lm, resolve_source
    torch.manual_seed(0)
    m = load_causal_lm(resolve_source(str(smollm2_path)), torch.float32)
    x = torch.randint(0, 49152, (1, 48))
    with torch.no_grad():
        ref = m(x).logits
        plan = smooth_model(m, x, alpha=0.5)
        out = m(x).logits
    assert len(plan) == 120 and all(g.producer is not None for g in plan), [g.reason for g in plan if not g.producer]
    assert {g.producer.rsplit(".", 1)[-1] for g in plan} == {"input_layernorm", "v_proj", "post_attention_layernorm", "up_proj"}
    assert float((out - ref).norm() / ref.norm()) < 1e-4
