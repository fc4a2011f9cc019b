"""W8A8 layers, dynamic/static quantization of a tiny model, and the checkpoint round trip through
the runtime loader."""
import json
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmquant.errors import CheckpointError, InputError
from llmquant.ptq import (
    PTQConfig, W8A8Linear, apply_w8a8, int8_matmul, int_mm_available, quantize_w8a8, save_w8a8, target_linears,
)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_int8_matmul_backends_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (40, 96), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (96, 24), dtype=torch.int8, generator=g)
    ref = a.long() @ b.long()
    assert torch.equal(int8_matmul(a, b, "float").long(), ref)
    if int_mm_available():
        out = int8_matmul(a, b, "int_mm")
        assert out.dtype == torch.int32 and torch.equal(out.long(), ref)


def test_dynamic_linear_matches_explicit_formula_and_torch_reference():
    g = torch.Generator().manual_seed(1)
    W, b = torch.randn(24, 96, generator=g), torch.randn(24, generator=g)
    x = torch.randn(3, 5, 96, generator=g)
    m = W8A8Linear.from_dense(W, b)
    # explicit per-channel / per-token symmetric int8 via torch's own quantize_per_channel
    warnings.simplefilter("ignore", UserWarning)
    sw = W.abs().amax(1) / 127
    qw = torch.quantize_per_channel(W, sw.double(), torch.zeros(24, dtype=torch.long), 0, torch.qint8).int_repr()
    assert torch.equal(m.qweight, qw)
    x2 = x.reshape(-1, 96)
    sx = x2.abs().amax(1, keepdim=True) / 127
    qx = torch.clamp(torch.round(x2 / sx), -127, 127)
    ref = (qx.double() @ qw.double().t()) * sx.double() * sw.double() + b.double()
    out = m(x)
    assert out.shape == (3, 5, 24)
    assert torch.allclose(out.reshape(-1, 24).double(), ref, rtol=1e-5, atol=1e-5)
    # and it is close to the dense layer
    dense = x @ W.t() + b
    assert (out - dense).norm() / dense.norm() < 0.02


def test_static_linear_uses_fixed_scale():
    W = torch.randn(8, 16)
    m = W8A8Linear.from_dense(W, None, input_scale=0.01)
    x = torch.full((1, 16), 5.0)   # far above 127 * 0.01: saturates at 1.27
    y = m(x)
    ref = (torch.full((1, 16), 127.0) @ m.qweight.float().t()) * 0.01 * m.weight_scale
    assert torch.allclose(y, ref, rtol=1e-6)


def test_target_linears_skip_lm_head_and_embeddings():
    names = list(target_linears(tiny_model()))
    assert len(names) == 14 and not any("lm_head" in n or "embed" in n for n in names)
    assert names[0] == "model.layers.0.self_attn.q_proj"


def test_gpt2_conv1d_is_found():
    from transformers import GPT2Config, GPT2LMHeadModel
    m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)).eval()
    x = torch.randint(0, 100, (1, 16))
    ref = m(x).logits
    rep = quantize_w8a8(m, PTQConfig(mode="dynamic"), x)
    assert rep["n_layers"] == 8 and rep["smoothing"]["smoothed"] > 0
    assert (m(x).logits - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("mode,observer", [("dynamic", "minmax"), ("static", "minmax"), ("static", "kl"),
                                           ("static", "mse"), ("static", "percentile")])
def test_quantized_model_close_to_dense_and_round_trips(tmp_path, mode, observer):
    model = tiny_model()
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x).logits
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    rep = quantize_w8a8(model, PTQConfig(mode=mode, observer=observer, nsamples=4, seqlen=32), windows)
    assert rep["n_layers"] == 14
    assert sum(isinstance(m, W8A8Linear) for m in model.modules()) == 14
    with torch.no_grad():
        out = model(x).logits
    rel = (out - ref).norm() / ref.norm()
    assert rel < (0.02 if mode == "dynamic" else 0.1)
    if mode == "static":
        # layers reading one tensor share one activation scale
        row = {r["name"]: r for r in rep["layers"]}
        assert row["model.layers.0.self_attn.q_proj"]["act_scale"] == row["model.layers.0.self_attn.v_proj"]["act_scale"]
    out_dir = save_w8a8(model, tmp_path / "ckpt", report=rep)
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "llmquant_w8a8"
    assert cfg["quantization_config"]["mode"] == mode
    from llmquant.runtime.loader import load
    loaded = load(out_dir, device="cpu", dtype="float32")
    with torch.no_grad():
        out2 = loaded(x).logits
    assert torch.equal(out2, out)
    with pytest.raises(InputError):
        save_w8a8(model, out_dir)
    save_w8a8(model, out_dir, overwrite=True)


def test_apply_w8a8_rejects_bad_checkpoints():
    model = tiny_model()
    quantize_w8a8(model, PTQConfig(smooth_alpha=None))
    qc = model.config.quantization_config
    state = dict(model.state_dict())
    fresh = tiny_model()
    broken = {k: v for k, v in state.items() if not k.endswith("q_proj.qweight")}
    with pytest.raises(CheckpointError, match="missing"):
        apply_w8a8(fresh, broken, qc)
    bad = dict(state)
    bad["model.layers.0.self_attn.q_proj.qweight"] = bad["model.layers.0.self_attn.q_proj.qweight"][:, :8]
    with pytest.raises(CheckpointError, match="do not match"):
        apply_w8a8(tiny_model(), bad, qc)
    with pytest.raises(CheckpointError, match="modules"):
        apply_w8a8(tiny_model(), dict(state), {"quant_method": "llmquant_w8a8"})


def test_config_validation():
    with pytest.raises(InputError):
        PTQConfig(observer="entropy")
    with pytest.raises(InputError):
        PTQConfig(mode="weird")
    with pytest.raises(InputError):
        quantize_w8a8(tiny_model(), PTQConfig(mode="static"))
    with pytest.raises(InputError, match="no-smooth"):
        quantize_w8a8(tiny_model(), PTQConfig(mode="dynamic"))
    with pytest.raises(InputError, match="smooth-alpha"):
        PTQConfig(smooth_alpha=1.5)
    with pytest.raises(InputError, match="keep-dense"):
        PTQConfig(keep_dense=("(",))
    with pytest.raises(InputError, match="every linear"):
        quantize_w8a8(tiny_model(), PTQConfig(smooth_alpha=None, keep_dense=(".",)))


def test_keep_dense_layers_stay_float_and_are_reported(tmp_path):
    model = tiny_model()
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        ref = model(x).logits
    cfg = PTQConfig(mode="dynamic", smooth_alpha=None, keep_dense=(r"layers\.0\.mlp\.down_proj$",))
    rep = quantize_w8a8(model, cfg)
    assert rep["kept_dense"] == ["model.layers.0.mlp.down_proj"] and rep["n_layers"] == 13
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    qc = model.config.quantization_config
    assert qc["kept_dense"] == ["model.layers.0.mlp.down_proj"] and "model.layers.0.mlp.down_proj" not in qc["modules"]
    out_dir = save_w8a8(model, tmp_path / "ckpt", report=rep)
    from llmquant.runtime.loader import load
    loaded = load(out_dir, device="cpu", dtype="float32")
    assert type(loaded.model.layers[0].mlp.down_proj) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_smoothing_then_quantizing_beats_plain_on_outlier_channels():
    """Massive input channels (as in real LLMs): smoothing lowers the dynamic W8A8 output error."""
    def make():
        m = tiny_model()
        with torch.no_grad():
            for layer in m.model.layers:
                layer.input_layernorm.weight[:3] = 60.0
                layer.post_attention_layernorm.weight[5:7] = 80.0
        return m
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = make()(x).logits
    errs = {}
    for alpha in (None, 0.5):
        m = make()
        quantize_w8a8(m, PTQConfig(mode="static", smooth_alpha=alpha, nsamples=2, seqlen=32), x)
        with torch.no_grad():
            errs[alpha] = float((m(x).logits - ref).norm() / ref.norm())
    assert errs[0.5] < 0.7 * errs[None], errs


def test_one_calibration_pass_for_several_observers():
    model = tiny_model()
    windows = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(4))
    cfg = PTQConfig(mode="static", nsamples=3, seqlen=32)
    from llmquant.ptq import calibrate
    names = list(target_linears(model))
    many = calibrate(model, windows, cfg, names, observers=("minmax", "kl"))
    single = calibrate(model, windows, PTQConfig(mode="static", observer="kl"), names)
    assert many["kl"] == single
    assert all(many["kl"][n]["threshold"] <= many["minmax"][n]["threshold"] + 1e-6 for n in names)
    m2 = tiny_model()
    rep = quantize_w8a8(m2, PTQConfig(mode="static", observer="kl", smooth_alpha=None), act_scales=many["kl"])
    assert rep["layers"][0]["act_scale"] == single[names[0]]["scale"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("M", [1, 5, 16, 17, 40])
def test_int8_matmul_on_cuda_is_exact_for_any_row_count(M):
    """CUDA's ``_int_mm`` refuses 16 rows or fewer; decode (1 row) must still get the exact product."""
    g = torch.Generator().manual_seed(M)
    a = torch.randint(-127, 128, (M, 64), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (64, 48), dtype=torch.int8, generator=g)
    got = int8_matmul(a.cuda(), b.cuda()).cpu()
    assert torch.equal(got.long(), a.long() @ b.long())
