"""Input rotation for static W8A8: the rotation itself against dense references, the rotated layer
against the float layer, and rotated checkpoints through save/load."""
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmquant.errors import CheckpointError, InputError
from llmquant.ptq import PTQConfig, W8A8Linear, apply_w8a8, calibrate, quantize_w8a8, save_w8a8, target_linears
from llmquant.ptq.rotation import fwht, orthogonal_factor, rotate, rotation_factor, rotation_matrix, split_pow2


def sylvester(P: int) -> torch.Tensor:
    """Dense Walsh-Hadamard by the Sylvester recursion H_2n = [[H, H], [H, -H]] (unnormalized)."""
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < P:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def tiny_model(seed=0, intermediate=96):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("K,m,P", [(1, 1, 1), (64, 1, 64), (96, 3, 32), (1536, 3, 512), (7, 7, 1), (576, 9, 64)])
def test_split_pow2(K, m, P):
    assert split_pow2(K) == (m, P)


@pytest.mark.parametrize("K", [2, 8, 64, 96, 1536, 576, 7, 10])
def test_rotation_is_orthogonal(K):
    R = rotation_matrix(K).double()
    assert torch.allclose(R @ R.t(), torch.eye(K, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(R.t() @ R, torch.eye(K, dtype=torch.float64), atol=1e-5)


def test_fwht_equals_sylvester_hadamard_and_rotation_is_kronecker():
    x = torch.randn(5, 32, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ sylvester(32) / math.sqrt(32), atol=1e-12)
    M = orthogonal_factor(3, seed=4)
    R = torch.kron(M.double(), sylvester(32) / math.sqrt(32))           # independent dense reference
    x = torch.randn(6, 96)
    assert torch.allclose(rotate(x, M).double(), x.double() @ R.t(), atol=1e-5)
    assert torch.allclose(rotation_matrix(96, M).double(), R, atol=1e-6)
    assert torch.allclose(rotate(torch.tensor([3.0, 1.0]), torch.ones(1, 1)), torch.tensor([4.0, 2.0]) / math.sqrt(2))


def test_rotation_spreads_a_channel_outlier():
    x = torch.randn(4, 1536) * 0.1
    x[:, 17] = 1000.0
    y = rotate(x, rotation_factor(1536))
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-5)        # orthogonal: norms kept
    assert y.abs().max() < 0.1 * x.abs().max()                            # the peak is spread out


def test_rotate_rejects_a_factor_that_does_not_fit():
    with pytest.raises(ValueError):
        rotate(torch.randn(2, 96), torch.eye(5))
    with pytest.raises(ValueError):
        fwht(torch.randn(2, 6))


def test_rotated_layer_equals_float_layer_and_explicit_formula():
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(24, 96, generator=g), torch.randn(24, generator=g)
    x = torch.randn(3, 7, 96, generator=g)
    x[:, 0, 5] = 300.0                                                     # an outlier channel on one token
    M = rotation_factor(96)
    R = rotation_matrix(96, M).double()
    xr = x.reshape(-1, 96).double() @ R.t()                                # R x per row
    step = float(xr.abs().max()) / 127
    m = W8A8Linear.from_dense(W, b, input_scale=step, rotation=M)
    # explicit reference: int8 of W R^T per output channel, int8 of R x with the fixed step
    WR = W.double() @ R.t()
    sw = WR.abs().amax(1) / 127
    qw = torch.clamp(torch.round(WR / sw[:, None]), -127, 127)
    assert torch.equal(m.qweight.double(), qw)
    qx = torch.clamp(torch.round(xr / step), -127, 127)
    ref = (qx @ qw.t()) * step * sw + b.double()
    out = m(x)
    assert torch.allclose(out.reshape(-1, 24).double(), ref, rtol=1e-4, atol=1e-3)
    dense = x @ W.t() + b
    assert (out - dense).norm() / dense.norm() < 0.02
    # dynamic (per-token) rotated layer is close to the float layer too
    d = W8A8Linear.from_dense(W, b, rotation=M)
    assert (d(x) - dense).norm() / dense.norm() < 0.01


def test_rotation_cuts_static_error_with_a_massive_token():
    """One token with a massive channel (an attention sink): per-tensor static int8 of the raw input
    rounds every other token to ~0; rotating first keeps much more of them."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(32, 128, generator=g) / 10
    x = torch.randn(64, 128, generator=g)
    x[0, 3] = 2000.0
    dense = x @ W.t()
    errs = {}
    for rot in (None, rotation_factor(128)):
        xin = x if rot is None else rotate(x, rot)
        m = W8A8Linear.from_dense(W, None, input_scale=float(xin.abs().max()) / 127, rotation=rot)
        errs[rot is not None] = float((m(x)[1:] - dense[1:]).norm() / dense[1:].norm())
    assert errs[True] < 0.5 * errs[False], errs


def test_calibrate_observes_the_rotated_input():
    model = tiny_model()
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    names = list(target_linears(model))
    down = "model.layers.0.mlp.down_proj"
    M = rotation_factor(96)
    seen = []
    h = model.get_submodule(down).register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].reshape(-1, 96)))
    cfg = PTQConfig(mode="static", nsamples=2, seqlen=16)
    res = calibrate(model, windows, cfg, names, rotations={down: M})
    h.remove()
    X = torch.cat(seen)
    want = float(rotate(X, M).abs().max())
    assert res[down]["amax"] == pytest.approx(want, rel=1e-5)
    assert res[down]["amax"] != pytest.approx(float(X.abs().max()), rel=1e-3)


@pytest.mark.parametrize("smooth", [None, "search"])
def test_rotated_static_model_round_trips(tmp_path, smooth):
    model = tiny_model()
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x).logits
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    cfg = PTQConfig(mode="static", smooth_alpha=smooth, rotate=(r"mlp\.down_proj$",), nsamples=4, seqlen=32)
    rep = quantize_w8a8(model, cfg, windows)
    assert rep["rotated"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert model.model.layers[1].mlp.down_proj.rotation is not None
    assert model.model.layers[1].mlp.up_proj.rotation is None
    with torch.no_grad():
        out = model(x).logits
    assert (out - ref).norm() / ref.norm() < 0.1
    out_dir = save_w8a8(model, tmp_path / "ckpt", report=rep)
    qc = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert qc["rotated"] == rep["rotated"]
    from llmquant.runtime.loader import load
    loaded = load(out_dir, device="cpu", dtype="float32")
    assert loaded.model.layers[0].mlp.down_proj.rotation is not None
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, out)


def test_unrotated_checkpoint_config_still_loads_and_missing_rotation_is_an_error():
    model = tiny_model()
    quantize_w8a8(model, PTQConfig(smooth_alpha=None, rotate=(r"down_proj$",)))
    qc = dict(model.config.quantization_config)
    state = dict(model.state_dict())
    broken = {k: v for k, v in state.items() if not k.endswith("layers.0.mlp.down_proj.rotation")}
    with pytest.raises(CheckpointError, match="rotation is missing"):
        apply_w8a8(tiny_model(), broken, qc)
    # an old checkpoint (no 'rotated' key, no rotation tensors) loads with plain layers
    old = tiny_model()
    quantize_w8a8(old, PTQConfig(smooth_alpha=None))
    qc_old = dict(old.config.quantization_config)
    assert "rotated" not in qc_old
    fresh = apply_w8a8(tiny_model(), dict(old.state_dict()), qc_old)
    assert fresh.model.layers[0].mlp.down_proj.rotation is None
    with pytest.raises(CheckpointError, match="rotated"):
        apply_w8a8(tiny_model(), dict(state), {**qc, "rotated": ["model.layers.0.nope"]})


def test_rotate_pattern_is_validated():
    with pytest.raises(InputError, match="--rotate"):
        PTQConfig(rotate=("(",))
