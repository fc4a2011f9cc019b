"""QAT: STE fake quantization against the quantizer trio, training lowers the distillation loss on a
tiny model, and the export is a GPTQ checkpoint the runtime loads with the trained weights."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmquant import qat as Q
from llmquant.core.quant import fake_quantize, per_group, quantize_blocks, expand
from llmquant.errors import InputError


def tiny_model(seed=0):
    # initializer_range 0.1: peaked outputs, so 3-bit weights visibly change them
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True, initializer_range=0.1)
    return LlamaForCausalLM(cfg).eval()


def test_fake_quant_ste_forward_and_gradient():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 32, generator=g, requires_grad=True)
    s = torch.full((4, 1), 0.2)
    z = torch.full((4, 1), 8.0)
    out = Q.fake_quant_ste(w, s, z, 0, 15)
    assert torch.equal(out, fake_quantize(w.detach(), s, z, 0, 15))
    out.sum().backward()
    inside = ((w.detach() / s + z).round() >= 0) & ((w.detach() / s + z).round() <= 15)
    # straight-through inside the grid, zero where the clamp saturates
    assert torch.equal(w.grad, inside.float())


def test_rtn_init_matches_trio():
    W = torch.randn(16, 96, generator=torch.Generator().manual_seed(1))
    scale, zero, g_idx = Q.rtn_init(W, 3, 32, False, mse=False)
    q, s_ref, z_ref = quantize_blocks(W, 3, False, per_group(32))
    assert torch.equal(scale, s_ref) and torch.equal(zero, z_ref)
    assert g_idx.tolist() == [k // 32 for k in range(96)]
    s_mse, _, _ = Q.rtn_init(W, 3, 32, False, mse=True)
    assert (s_mse <= scale + 1e-9).all()


def test_export_matches_fake_quant_weight():
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    scale, zero, g_idx = Q.rtn_init(W, 4, 16, True, mse=False)
    scale = scale.half().float()
    m = Q.FakeQuantLinear(W, None, scale, zero, g_idx, 4, 16, True)
    qw = m.export()
    assert qw.q.dtype == torch.int32 and int(qw.q.min()) >= 0 and int(qw.q.max()) <= 15
    assert torch.equal(qw.dequantize(), m.quantized_weight().detach())
    assert (qw.zero == 8).all()      # symmetric 4-bit: the middle code


def _windows(n=16, T=32, seed=3):
    return torch.randint(0, 256, (n, T), generator=torch.Generator().manual_seed(seed))


def test_training_lowers_kd_loss_and_exports(tmp_path):
    from llmquant.checkpoint import save_gptq_checkpoint
    from llmquant.runtime.loader import load
    model = tiny_model()
    cfg = Q.QATConfig(bits=3, group_size=32, steps=30, lr=1e-3, scale_lr=5e-4, batch_size=4, seqlen=32,
                      nsamples=16, warmup=2, bf16=False)
    teacher = Q.make_teacher(model, bf16=False)
    Q.prepare_qat(model, cfg)
    win = _windows()
    with torch.no_grad():
        before = Q.kd_loss(model(win).logits, teacher(win).logits).item()
    hist = Q.train_qat(model, teacher, win, cfg)
    assert len(hist["history"]) == 30
    quantized = Q.convert(model)
    assert len(quantized) == 14
    with torch.no_grad():
        after = Q.kd_loss(model(win).logits, teacher(win).logits).item()
    assert after < 0.6 * before
    res = save_gptq_checkpoint(model, quantized, tmp_path / "qat", quant_config=Q.quant_config(cfg))
    loaded = load(res.path, device="cpu", dtype="float32", kernel="reference")
    x = win[:2]
    with torch.no_grad():
        a, b = model(x).logits, loaded(x).logits
    # the checkpoint stores the dense rest (embeddings, norms) in float16
    assert (a - b).abs().max() < 2e-2 * a.abs().max()


def test_init_from_gptq_checkpoint(tmp_path):
    from llmquant.checkpoint import load_quantized_weights, save_gptq_checkpoint
    model = tiny_model()
    cfg = Q.QATConfig(bits=4, group_size=32, steps=0, init="rtn", mse_init=False)
    Q.prepare_qat(model, cfg)
    quantized = Q.convert(model)
    res = save_gptq_checkpoint(model, quantized, tmp_path / "g", quant_config=Q.quant_config(cfg))
    fresh = tiny_model()
    init = load_quantized_weights(res.path)
    layers = Q.prepare_qat(fresh, Q.QATConfig(bits=4, group_size=32, init="gptq"), init_weights=init)
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(layers[name].quantized_weight().detach(), quantized[name].dequantize())
    with pytest.raises(InputError, match="init-from"):
        Q.prepare_qat(tiny_model(), Q.QATConfig(init="gptq"))
    with pytest.raises(InputError, match="does not match"):
        Q.prepare_qat(tiny_model(), Q.QATConfig(bits=3, group_size=32, init="gptq"), init_weights=init)


def test_activation_fake_quant_and_validation():
    x = torch.tensor([[1.0, -0.5, 0.25]], requires_grad=True)
    y = Q.fake_quant_act(x, 8)
    assert torch.allclose(y, torch.round(x / (1 / 127)) * (1 / 127))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    for kw in [dict(bits=5), dict(group_size=0), dict(init="awq"), dict(kd_weight=2.0), dict(act_bits=2)]:
        with pytest.raises(InputError):
            Q.QATConfig(**kw)


@pytest.mark.parametrize("K,gs,perm", [(96, 32, False), (80, 32, False), (64, 16, True)])
def test_fused_fake_quant_matches_autograd_reference(K, gs, perm):
    g = torch.Generator().manual_seed(5)
    W = torch.randn(6, K, generator=g)
    scale, zero, g_idx = Q.rtn_init(W, 3, gs, False, mse=False)
    if perm:                       # act-order style: groups follow a permutation of the columns
        g_idx = g_idx[torch.randperm(K, generator=g)]
    scale = scale * 0.7            # force some codes into the clamp
    m = Q.FakeQuantLinear(W, None, scale, zero, g_idx, 3, gs, False)
    out = m.quantized_weight()
    up = torch.randn(out.shape, generator=g)
    (out * up).sum().backward()
    w = W.clone().requires_grad_(True)
    s = scale.clone().requires_grad_(True)
    ref = Q.fake_quant_ste(w, s[:, g_idx], zero[:, g_idx], 0, 7)
    (ref * up).sum().backward()
    assert torch.allclose(out, ref)
    assert torch.allclose(m.weight.grad, w.grad)
    assert torch.allclose(m.scale.grad, s.grad, atol=1e-5)
