"""evaluate.py / generate.py / inspect.py on tiny checkpoints."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llmquant.data import load_corpus, tokenize_stream
from llmquant.evaluation import perplexity
from llmquant.runtime.evaluate import evaluate_checkpoint
from llmquant.runtime.generate import generate_ids, generate_stream
from llmquant.runtime.inspect import inspect_checkpoint, plot_layer_errors
from llmquant.runtime.loader import load

from rt_helpers import byte_tokenizer, dense_from_checkpoint, tiny_llama, write_checkpoint


@pytest.mark.parametrize("kernel,dtype", [("reference", "float32"), ("auto", "float32"), ("auto", "bfloat16")])
def test_eval_ppl_equals_dense_dequantization(tmp_path, text_file, kernel, dtype):
    d = write_checkpoint(tmp_path / "ck", bits=4, group_size=32, act_order=True)
    r = evaluate_checkpoint(d, dataset=str(text_file), seqlen=128, max_windows=4, device="cpu",
                            kernel=kernel, dtype=dtype)
    ids = tokenize_stream(byte_tokenizer(), load_corpus(str(text_file)))
    ref = perplexity(dense_from_checkpoint(d), ids, seqlen=128, max_windows=4)
    assert r["windows"] == ref["windows"] == 4 and r["tokens"] == ref["tokens"] == 4 * 127
    assert abs(r["ppl"] / ref["ppl"] - 1) < 0.005, (r["ppl"], ref["ppl"])
    assert math.isfinite(r["ppl"]) and r["ppl"] > 1


def test_generate_matches_hf_greedy(tmp_path):
    model = tiny_llama()
    ids = torch.tensor([[5, 17, 33, 2, 99]])
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)
    r = generate_ids(model, ids, 12)
    assert r["ids"] == hf[0, 5:].tolist()
    assert r["prompt_tokens"] == 5 and r["new_tokens"] == 12
    assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0


def test_generate_stream_text_on_quantized(tmp_path):
    d = write_checkpoint(tmp_path / "ck")
    m = load(d, device="cpu", dtype="float32")
    pieces = []
    r = generate_stream(m, byte_tokenizer(), "the cat", max_new_tokens=8, on_text=pieces.append)
    assert "".join(pieces) == r["text"] and r["new_tokens"] == 8


def test_inspect_sizes_report_and_plot(tmp_path):
    model = tiny_llama()
    report = {"modules": [{"name": "model.layers.0.self_attn.q_proj", "loss": 0.25, "damp": 0.01,
                           "fallback": None, "seconds": 0.1},
                          {"name": "model.layers.0.mlp.down_proj", "loss": 1.5},          # keys missing
                          {"name": "model.layers.1.mlp.up_proj", "loss": "n/a", "fallback": "rtn"}]}
    d = write_checkpoint(tmp_path / "ck", model=model, bits=4, group_size=32, report=report)
    info = inspect_checkpoint(d)
    assert (info["bits"], info["group_size"], info["format"], info["n_quantized"]) == (4, 32, "gptq_v2", 14)
    lin = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith("proj"))
    dense = sum(p.numel() for p in model.parameters())       # tied: embeddings counted once
    assert info["quantized_linear_fp16_bytes"] == lin * 2
    assert info["dense_fp16_bytes"] == dense * 2
    # 4-bit codes + fp16 scales + packed zeros + int32 g_idx, computed independently
    G = {n: -(-m.in_features // 32) for n, m in model.named_modules() if n.endswith("proj")}
    expect = sum(m.in_features * m.out_features // 2 + G[n] * m.out_features * 2 + G[n] * m.out_features // 2
                 + m.in_features * 4 for n, m in model.named_modules() if n.endswith("proj"))
    assert info["quantized_linear_bytes"] == expect
    assert [m["loss"] for m in info["modules"]] == [0.25, 1.5, None]
    png = plot_layer_errors(info["modules"], tmp_path / "err.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_layer_errors([{"name": "x", "loss": None}], tmp_path / "none.png") is None
