"""loader.py: llmquant.load on our checkpoints, GPTQModel-layout fixtures and dense dirs; logits
equal the dense dequantization (built by the checkpoint writer's independent reader); bad input
is a one-line CheckpointError naming the file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmquant
from llmquant.errors import CheckpointError
from llmquant.runtime import registry
from llmquant.runtime.loader import load, quant_linears, quantized_weight_bytes, to_dense
from llmquant.runtime.qlinear import QuantLinear

from rt_helpers import dense_from_checkpoint, tiny_llama, write_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("bits,sym,act_order,fmt", [
    (4, False, False, "gptq"), (4, True, True, "gptq_v2"), (4, False, True, "gptq"),
    (3, False, True, "gptq_v2"), (2, True, False, "gptq"), (8, False, True, "gptq_v2")])
def test_load_our_checkpoint_matches_dense_dequantization(tmp_path, bits, sym, act_order, fmt):
    d = write_checkpoint(tmp_path / "ck", bits=bits, sym=sym, group_size=32, act_order=act_order, fmt=fmt)
    ref = logits(dense_from_checkpoint(d))
    for kernel in ("reference", "dequant", "auto"):
        m = load(d, device="cpu", dtype="float32", kernel=kernel)
        qls = quant_linears(m)
        assert len(qls) == 14
        # auto on CPU runs 4-bit layers through the bf16 int4 kernel: bf16 tolerance
        tol = 2e-2 if (kernel == "auto" and bits == 4) else 1e-5
        assert rel(logits(m), ref) < tol, kernel
    m = llmquant.load(d, device="cpu", dtype="bfloat16")          # package-level entry, bf16 kernels
    assert rel(logits(m), ref) < 5e-2


def test_gptqmodel_fixture_logits_equal_dense_dequantization():
    """Checkpoints laid out exactly as GPTQModel 7.7 writes them (scripts/make_gptqmodel_fixture.py):
    v1 zeros incl. a packed-word borrow, act-order g_idx, quantize_config.json + meta."""
    from transformers import AutoConfig, AutoModelForCausalLM
    for bits in (4, 3):
        d = FIXTURES / f"gptqmodel_tiny_llama_{bits}bit"
        ref_codes = load_file(str(FIXTURES / f"{d.name}.reference.safetensors"))
        tensors = load_file(str(d / "model.safetensors"))
        cfg = AutoConfig.from_pretrained(str(d))
        del cfg.quantization_config
        dense = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        state = {k: v.float() for k, v in tensors.items() if not k.endswith(("qweight", "qzeros", "scales", "g_idx"))}
        names = {k.rsplit(".", 1)[0] for k in ref_codes}
        for n in names:
            g = ref_codes[f"{n}.g_idx"].long()
            assert not torch.equal(g, torch.arange(g.numel()) // 32)          # act-order for real
            state[f"{n}.weight"] = ((ref_codes[f"{n}.codes"].float() - ref_codes[f"{n}.zeros"].float()[:, g])
                                    * ref_codes[f"{n}.scales"].float()[:, g])
        assert dense.load_state_dict(state, strict=False).missing_keys == []
        assert (ref_codes["model.layers.0.self_attn.q_proj.zeros"] == 0).any()  # the v1 borrow case
        ref = logits(dense)
        for kernel in ("reference", "dequant", "auto"):
            m = load(d, device="cpu", dtype="float32", kernel=kernel)
            assert len(quant_linears(m)) == 14
            tol = 2e-2 if (kernel == "auto" and bits == 4) else 1e-5
            assert rel(logits(m), ref) < tol, (bits, kernel)


def test_dense_dir_loads_as_is(tmp_path):
    model = tiny_llama(tie=False)
    model.save_pretrained(tmp_path / "dense")
    m = load(tmp_path / "dense", device="cpu", dtype="float32")
    assert not quant_linears(m)
    assert torch.allclose(logits(m), logits(model), atol=1e-6)


def test_sharded_and_untied_checkpoint(tmp_path):
    model = tiny_llama(tie=False, bias=True)
    d = write_checkpoint(tmp_path / "ck", model=model, max_shard_size=40_000)
    assert (d / "model.safetensors.index.json").is_file()
    m = load(d, device="cpu", dtype="float32", kernel="reference")
    assert m.model.layers[0].self_attn.q_proj.bias is not None
    assert rel(logits(m), logits(dense_from_checkpoint(d))) < 1e-5


def test_to_dense_and_resident_memory(tmp_path):
    # hidden 256, groups of 128: resident int4 weights well under 0.3x their fp16 size
    model = tiny_llama(hidden=256, inter=512)
    d = write_checkpoint(tmp_path / "ck", model=model, group_size=128)
    m = load(d, device="cpu", dtype="float32")
    q, fp16 = quantized_weight_bytes(m)
    assert all(ql.kernel == "int4" for ql in quant_linears(m).values())
    assert q / fp16 < 0.3
    ref = logits(m)
    dense = to_dense(m)
    assert not quant_linears(dense)
    assert rel(logits(dense), ref) < 2e-2


# ----------------------------------------------------------------------------- bad input

def _one_line_error(path, fragment, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        load(path, device="cpu", dtype="float32", **kw)
    msg = str(e.value)
    assert "\n" not in msg and fragment in msg, msg
    return msg


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(tmp_path / "empty", "config.json")
    _one_line_error(tmp_path / "missing", "no such file")


def test_truncated_and_corrupted_safetensors(tmp_path):
    d = write_checkpoint(tmp_path / "ck")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    _one_line_error(d, "model.safetensors")
    f.write_bytes(b"\xff" * 16 + data[16:])
    _one_line_error(d, "model.safetensors")


def test_config_disagrees_with_tensors(tmp_path):
    d = write_checkpoint(tmp_path / "ck", bits=4, group_size=32)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    msg = _one_line_error(d, "qweight has shape")
    assert "model.safetensors" in msg and "bits=8" in msg
    cfg["quantization_config"]["bits"] = 4
    cfg["quantization_config"]["group_size"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    _one_line_error(d, "scales has shape")
    cfg["quantization_config"]["group_size"] = 32
    cfg["hidden_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    _one_line_error(d, "model.safetensors")


def test_missing_and_unexpected_tensors(tmp_path):
    d = write_checkpoint(tmp_path / "ck")
    f = d / "model.safetensors"
    tensors = load_file(str(f))
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, str(f))
    _one_line_error(d, "model.norm.weight")
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.scales"}, str(f))
    _one_line_error(d, "no .scales")
    save_file({**tensors, "model.extra.weight": torch.zeros(3)}, str(f))
    _one_line_error(d, "unexpected tensor model.extra.weight")


def test_unsupported_method_and_format(tmp_path):
    d = write_checkpoint(tmp_path / "ck")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "marlin"
    (d / "config.json").write_text(json.dumps(cfg))
    _one_line_error(d, "marlin")
    cfg["quantization_config"]["quant_method"] = "awq"
    (d / "config.json").write_text(json.dumps(cfg))
    _one_line_error(d, "quant_method 'awq'")


def test_registry_dispatch(tmp_path):
    d = write_checkpoint(tmp_path / "ck")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "toy_method"
    (d / "config.json").write_text(json.dumps(cfg))
    seen = {}

    def toy(path, config, qc, **kw):
        seen.update(path=path, method=qc["quant_method"], kernel=kw["kernel"])
        return "model"
    registry.register_loader("toy_method", toy)
    try:
        assert load(d, device="cpu", kernel="dequant") == "model"
        assert seen == {"path": d, "method": "toy_method", "kernel": "dequant"}
    finally:
        registry._LOADERS.pop("toy_method")


def test_w8a8_without_ptq_module_is_a_clear_error(tmp_path, monkeypatch):
    import importlib
    d = write_checkpoint(tmp_path / "ck")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "llmquant_w8a8"}
    (d / "config.json").write_text(json.dumps(cfg))
    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "llmquant.ptq.checkpoint":
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(importlib, "import_module", fake)
    _one_line_error(d, "llmquant_w8a8")


def test_quantlinear_replaces_only_quantized_layers(tmp_path):
    d = write_checkpoint(tmp_path / "ck")
    m = load(d, device="cpu", dtype="float32")
    assert isinstance(m.model.layers[0].mlp.down_proj, QuantLinear)
    assert isinstance(m.lm_head, torch.nn.Linear)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()     # tied
    assert not any(p.is_meta for p in m.parameters())


def test_gpt2_conv1d_checkpoint(tmp_path):
    """GPT-2 keeps its linears as Conv1D ([in, out] weights): they are replaced all the same."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from llmquant.checkpoint import save_gptq_checkpoint
    from rt_helpers import rtn
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64,
                                       eos_token_id=0, bos_token_id=0)).eval()
    qd = {n: rtn(m.weight.detach().t(), 4, False, 32, bias=m.bias.detach().clone())
          for n, m in model.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc"))}
    d = tmp_path / "gpt2"
    save_gptq_checkpoint(model, qd, d, quant_config=dict(bits=4, group_size=32, sym=False, desc_act=False))
    ids = IDS[:, :20]
    ref = logits(dense_from_checkpoint(d), ids)
    m = load(d, device="cpu", dtype="float32", kernel="dequant")
    assert len(quant_linears(m)) == 8
    assert rel(logits(m, ids), ref) < 1e-5


def test_quantized_lm_head_unties(tmp_path):
    from llmquant.checkpoint import save_gptq_checkpoint
    from rt_helpers import quantize_linears, rtn
    model = tiny_llama(tie=True)
    qd = quantize_linears(model)
    qd["lm_head"] = rtn(model.lm_head.weight.detach(), 4, False, 32)
    d = tmp_path / "lm"
    save_gptq_checkpoint(model, qd, d, quant_config=dict(bits=4, group_size=32, sym=False, desc_act=False))
    m = load(d, device="cpu", dtype="float32", kernel="dequant")
    assert isinstance(m.lm_head, QuantLinear) and len(quant_linears(m)) == 15
    assert rel(logits(m), logits(dense_from_checkpoint(d))) < 1e-5
