"""The CUDA path on SmolLM2-135M, one run: ``llmquant gptq --device cuda`` (time, peak GPU memory),
perplexity of the result and of the dense model on the GPU, and batch-1 runtime speed of the
4-bit checkpoint (int4 kernel, dequant kernel) against the dense bfloat16 / float16 model.

    HF_HUB_OFFLINE=1 python scripts/bench_cuda.py --model SmolLM2.gguf --data ../shared/data \
        --workdir /tmp/bench_cuda --json-out bench_cuda.json [--bits 4,3] [--windows 40]

Every figure is measured here, in this run; nothing is read from earlier runs. Needs a GPU.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))                     # runs from a bare checkout (the GPU machine) too
console = Console(stderr=True)


DEVICE = "cuda"


def empty_cache():
    if DEVICE.startswith("cuda"):
        torch.cuda.empty_cache()


def sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


SEQLEN = 512


def run_gptq(model: str, calib: Path, out: Path, bits: int) -> dict:
    """The real CLI in a subprocess, so its wall time includes start-up, load and save."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "llmquant", "gptq", "--model", model, "--out", str(out), "--bits", str(bits),
           "--group-size", "128", "--dataset", str(calib), "--seed", "0", "--device", DEVICE, "--overwrite", "--seqlen", str(SEQLEN)]
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"gptq failed ({r.returncode}):\n{r.stderr[-4000:]}")
    rep = json.loads((out / "quant_report.json").read_text())
    return {"bits": bits, "wall_s": round(wall, 2), **{k: rep["totals"].get(k) for k in
            ("load_s", "calibration_data_s", "quantize_s", "save_s", "total_s", "peak_cuda_memory_gb", "loss")}}


@torch.inference_mode()
def speed(model, tok, prefill: int, new_tokens: int) -> dict:
    from llmquant.runtime.generate import generate_ids
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size - 1, (1, prefill), generator=g).to(DEVICE)
    model(ids[:, :16], use_cache=False)
    generate_ids(model, ids[:, :8], 8)                                    # warm-up: kernels, allocator
    best = float("inf")
    for _ in range(5):
        sync()
        t = time.perf_counter()
        model(ids, use_cache=False)
        sync()
        best = min(best, time.perf_counter() - t)
    r = generate_ids(model, ids[:, :16], new_tokens)
    return {"prefill_ms": round(best * 1e3, 2), "decode_tok_s": round(r["decode_tok_s"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the SmolLM2-135M .gguf (or any causal LM dir)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--workdir", default="/tmp/bench_cuda")
    ap.add_argument("--bits", default="4", help="comma-separated widths to quantize, e.g. 4,3")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json-out", default="bench_cuda.json")
    ap.add_argument("--device", default="cuda", help="cpu only to check this script on a tiny model")
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    args = ap.parse_args()
    global DEVICE, SEQLEN
    DEVICE, SEQLEN = args.device, args.calib_seqlen
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False

    import transformers
    from llmquant.model.load import load_causal_lm, load_tokenizer, resolve_source
    from llmquant.runtime.evaluate import evaluate_checkpoint, evaluate_model
    from llmquant.runtime.loader import load, quant_linears, quantized_weight_bytes

    data = Path(args.data)
    wiki, calib = str(data / "wikitext2-test.raw"), data / "c4-train-1000.jsonl"
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"gpu": torch.cuda.get_device_name() if DEVICE != "cpu" else "cpu", "torch": torch.__version__,
                 "transformers": transformers.__version__, "windows": args.windows, "gptq": [], "ppl": [],
                 "runtime": []}
    console.print(res["gpu"], res["torch"], res["transformers"])

    ckpts = {}
    for bits in [int(b) for b in args.bits.split(",")]:
        out = work / f"w{bits}g128"
        row = run_gptq(args.model, calib, out, bits)
        console.print("gptq", row)
        res["gptq"].append(row)
        ckpts[bits] = out

    src = resolve_source(args.model)
    tok = load_tokenizer(src)
    dense = load_causal_lm(src, torch.float32).to(DEVICE)
    t = time.perf_counter()
    r = evaluate_model(dense, tok, wiki, args.eval_seqlen, args.windows, DEVICE)
    res["ppl"].append({"model": "dense", "dtype": "float32", "kernel": "-", "ppl": round(r["ppl"], 3),
                       "seconds": round(time.perf_counter() - t, 2)})
    console.print(res["ppl"][-1])
    for bits, path in ckpts.items():
        for kernel, dtype in (("auto", "bfloat16"), ("dequant", "float32")):
            r = evaluate_checkpoint(str(path), wiki, args.eval_seqlen, args.windows, DEVICE, kernel=kernel, dtype=dtype)
            res["ppl"].append({"model": f"w{bits}g128", "dtype": dtype, "kernel": r["kernel"],
                               "ppl": round(r["ppl"], 3), "seconds": round(r["seconds"], 2)})
            console.print(res["ppl"][-1])
            gc.collect()
            empty_cache()

    for dtype in (torch.bfloat16, torch.float16):
        m = dense.to(dtype)
        m.config.use_cache = True
        res["runtime"].append({"model": "dense", "dtype": str(dtype)[6:], "kernel": "-",
                               **speed(m, tok, args.prefill, args.new_tokens)})
        console.print(res["runtime"][-1])
    del dense, m
    gc.collect()
    empty_cache()
    if 4 in ckpts:
        for kernel in ("auto", "dequant"):
            m = load(str(ckpts[4]), device=DEVICE, dtype="bfloat16", kernel=kernel)
            m.config.use_cache = True
            qb, fb = quantized_weight_bytes(m)
            kinds = sorted({q.kernel for q in quant_linears(m).values()})
            res["runtime"].append({"model": "w4g128", "dtype": "bfloat16", "kernel": ",".join(kinds),
                                   "weights_vs_fp16": round(qb / fb, 3),
                                   **speed(m, tok, args.prefill, args.new_tokens)})
            console.print(res["runtime"][-1])
            del m
            gc.collect()
            empty_cache()

    for title, rows in (("llmquant gptq --device cuda", res["gptq"]), (f"perplexity, WikiText-2, "
                        f"{args.windows} x {args.eval_seqlen}", res["ppl"]), ("runtime, batch 1", res["runtime"])):
        t = Table(title=title)
        for k in rows[0]:
            t.add_column(k)
        for row in rows:
            t.add_row(*[str(row.get(k)) for k in rows[0]])
        Console().print(t)
    Path(args.json_out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
