"""Real model (slow): SmolLM2-135M RTN 4-bit g128 checkpoint; `eval --ppl` through the runtime
equals the perplexity of its dense dequantization within 0.5%; resident int4 memory <= 0.3x fp16."""
from __future__ import annotations

import pytest
import torch

from llmquant.data import load_corpus, tokenize_stream
from llmquant.evaluation import perplexity
from llmquant.runtime.evaluate import evaluate_checkpoint
from llmquant.runtime.loader import load, quant_linears, quantized_weight_bytes

from rt_helpers import dense_from_checkpoint, rtn

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_ckpt(tmp_path_factory, smollm2_path):
    from llmquant.checkpoint import save_gptq_checkpoint
    from llmquant.model.load import load_causal_lm, load_tokenizer, resolve_source
    src = resolve_source(str(smollm2_path))
    model = load_causal_lm(src, torch.float32)
    tok = load_tokenizer(src)
    qd = {n: rtn(m.weight.detach(), 4, False, 128) for n, m in model.named_modules()
          if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))}
    out = tmp_path_factory.mktemp("smol") / "w4g128"
    save_gptq_checkpoint(model, qd, out, quant_config=dict(bits=4, group_size=128, sym=False, desc_act=False),
                         tokenizer=tok, checkpoint_format="gptq_v2")
    return out, tok


def test_eval_ppl_quantized_equals_dense_dequantization(smol_ckpt, shared_data):
    path, tok = smol_ckpt
    data = str(shared_data / "wikitext2-test.raw")
    r = evaluate_checkpoint(path, dataset=data, seqlen=256, max_windows=2, device="cpu", dtype="float32")
    assert r["kernel"] == "int4"
    ids = tokenize_stream(tok, load_corpus(data))
    ref = perplexity(dense_from_checkpoint(path), ids, seqlen=256, max_windows=2)
    assert r["tokens"] == ref["tokens"] == 2 * 255
    assert abs(r["ppl"] / ref["ppl"] - 1) < 0.005, (r["ppl"], ref["ppl"])


def test_resident_memory_of_quantized_linears(smol_ckpt):
    path, _ = smol_ckpt
    m = load(path, device="cpu", dtype="bfloat16")
    assert len(quant_linears(m)) == 30 * 7
    q, fp16 = quantized_weight_bytes(m)
    assert q / fp16 <= 0.3, q / fp16
