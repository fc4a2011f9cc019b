"""``llmquant dtypes``, ``ptq-dynamic``, ``ptq-static``, ``qat``: parse, call the library, render."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from llmquant.cli_app import app, console, out, user_errors
from llmquant.errors import InputError

DEFAULT_DATASET = "c4"
DYNAMIC_ALPHA = "search"         # SmolLM2 dynamic, 4 windows: +1.4% (search) vs +1.6% (0.5) vs +3.3% (none)
STATIC_ROTATE = ("down_proj",)   # SmolLM2 all-int8 static minmax, 8 windows: +1.1% rotated vs +5.3% not (dense 19.26)
STATIC_ALPHA = "search"          # per-group search: SmolLM2 static minmax 28.6 vs 32.4 at 0.5 (4 windows)


def _rotate(values: list[str]) -> tuple[str, ...]:
    """``--rotate``: 'none' turns it off; 'down_proj' is short for the MLP down projections."""
    if any(v.lower() == "none" for v in values):
        return ()
    return tuple(r"mlp\.down_proj$" if v == "down_proj" else v for v in values)


def _alpha(v: str):
    if v == "search":
        return v
    try:
        return float(v)
    except ValueError:
        raise InputError(f"--smooth-alpha {v}: use a number in [0, 1] or 'search'") from None


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), console=console)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v == 0 or math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.5g}" if 1e-3 <= abs(v) < 1e6 else f"{v:.3e}"
    return str(v)


def _check_out(path: str, overwrite: bool) -> Path:
    p = Path(path).expanduser()
    if (p.exists() or p.is_symlink()) and not overwrite:
        raise InputError(f"output {p} exists; pass --overwrite to replace it")
    if p.exists() and not p.is_dir():
        raise InputError(f"output {p} is a file; pass a directory path")
    return p


def _load(model: str, trust_remote_code: bool):
    import torch
    from llmquant.model.load import load_causal_lm, load_tokenizer, resolve_source
    src = resolve_source(model)
    with console.status(f"loading {src.display}"):
        m = load_causal_lm(src, torch.float32, trust_remote_code)
        tok = load_tokenizer(src, trust_remote_code)
    return src, m, tok


def _windows(tok, dataset: str, nsamples: int, seqlen: int, seed: int):
    from llmquant.data import calibration_windows, load_corpus
    with console.status(f"reading calibration text {dataset}"):
        corpus = load_corpus(dataset)
        return calibration_windows(tok, corpus, nsamples, seqlen, seed)


# ----------------------------------------------------------------------------- dtypes

@app.command("dtypes")
@user_errors
def dtypes_cmd(
    value: Optional[float] = typer.Option(None, "--value", help="Show how this number is stored in each type."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON on stdout."),
) -> None:
    """Number formats: bit layout, range, smallest normal, epsilon; computed from the bits."""
    import torch
    from llmquant.core.dtypes import FORMATS, describe, store
    rows = [describe(f) for f in FORMATS.values()]
    stored = [store(f, value) for f in FORMATS.values()] if value is not None else None
    if as_json:
        out.print_json(json.dumps({"formats": rows, "value": stored}, default=str))
        return
    t = Table(title="number formats  (V = (-1)^s * 2^(e - bias) * (1 + f / 2^F) for floats)")
    for col in ("type", "bits", "s/e/f", "bias", "range (±)", "min normal", "min subnorm", "eps", "finfo"):
        t.add_column(col, justify="right" if col != "type" else "left")
    for f, r in zip(FORMATS.values(), rows):
        layout = f"{r['sign']}/{r['exponent']}/{r['fraction']}" if r["exponent"] is not None else "codebook"
        check = "-"
        td = getattr(f, "torch_dtype", None)
        if td is not None:
            info = torch.finfo(td) if td.is_floating_point else torch.iinfo(td)
            ok = float(info.max) == float(r["max"]) and (not td.is_floating_point or (
                float(info.eps) == r["eps"] and float(info.smallest_normal) == r["smallest_normal"]))
            check = "[green]=[/]" if ok else "[red]differs[/]"
        rng = _fmt(r["max"]) if r["min"] == -r["max"] else f"{_fmt(r['min'])}..{_fmt(r['max'])}"
        t.add_row(r["name"].replace("float8_", "fp8 "), str(r["bits"]), layout, _fmt(r["bias"]), rng,
                  _fmt(r["smallest_normal"]), _fmt(r["smallest_subnormal"]), _fmt(r["eps"]), check)
    console.print(t)
    console.print("eps: gap between 1 and the next value; finfo: '=' when torch.finfo/iinfo gives the same "
                  "figures.\nint: two's complement (scale 1); nf4: absmax * NF4\\[q], 16 normal quantiles in [-1, 1].",
                  highlight=False)
    if stored is not None:
        v = Table(title=f"how {value!r} is stored")
        for col in ("type", "stored", "bits (s exp frac)", "abs err", "rel err"):
            v.add_column(col, justify="left" if col in ("type", "bits (s exp frac)") else "right")
        for s in stored:
            v.add_row(s["name"].replace("float8_", "fp8 "), repr(s["stored"]), s["bits"], _fmt(s["abs_error"]),
                      _fmt(s["rel_error"]))
        console.print(v)
        for s in stored:
            console.print(f"  {s['name']:>12}: {s['how']}", highlight=False, markup=False)


# ----------------------------------------------------------------------------- PTQ

def _ptq(model: str, out_dir: str, cfg, dataset: Optional[str], overwrite: bool, trust_remote_code: bool) -> None:
    from llmquant.ptq import quantize_w8a8, save_w8a8
    from llmquant.ptq.linear import int_mm_available
    t0 = time.time()
    dest = _check_out(out_dir, overwrite)
    src, m, tok = _load(model, trust_remote_code)
    windows = _windows(tok, dataset, cfg.nsamples, cfg.seqlen, cfg.seed) if cfg.needs_calibration else None
    with _progress() as prog:
        cal = prog.add_task("calibration", total=cfg.nsamples if windows is not None else 0, info="", visible=windows is not None)
        lay = prog.add_task("quantize layers", total=None, info="")
        report = quantize_w8a8(
            m, cfg, windows,
            progress_calib=lambda d, n: prog.update(cal, completed=d, total=n),
            progress_layers=lambda d, n: prog.update(lay, completed=d, total=n))
    report.update(model=src.display, dataset=dataset if windows is not None else None,
                  int_mm=int_mm_available(), total_seconds=round(time.time() - t0, 2))
    with console.status(f"writing {dest}"):
        path = save_w8a8(m, dest, tokenizer=tok, report=report, overwrite=overwrite)
    report_path = path / "quant_report.json"
    _summary(f"W8A8 {cfg.mode}", report, path, report_path)


def _summary(title: str, report: dict, path: Path, report_path: Path) -> None:
    t = Table(title=title, show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    for k in ("method", "model", "n_layers", "mean_weight_sqnr_db", "calibration_seconds", "seconds", "total_seconds"):
        if k in report and report[k] is not None:
            t.add_row(k, _fmt(report[k]))
    cfg = report.get("config", {})
    sm = report.get("smoothing")
    if sm:
        t.add_row("SmoothQuant", f"alpha {cfg.get('smooth_alpha')}: {sm['smoothed']} of {sm['groups']} layer groups")
    else:
        t.add_row("SmoothQuant", "off")
    t.add_row("kept in float (--keep-dense)", ", ".join(report.get("kept_dense") or []) or "none")
    if report.get("rotated"):
        t.add_row("input rotated (--rotate)", f"{len(report['rotated'])} layers")
    if cfg.get("mode") == "static":
        t.add_row("observer", cfg["observer"])
        clips = [r["act_clip_ratio"] for r in report["layers"] if "act_clip_ratio" in r]
        if clips:
            t.add_row("activation clip ratio (mean, min)", f"{sum(clips) / len(clips):.3f}, {min(clips):.3f}")
    if "int_mm" in report:
        t.add_row("int8 matmul", "torch._int_mm" if report["int_mm"] else "float reference path")
    t.add_row("checkpoint", str(path))
    t.add_row("report", str(report_path))
    console.print(t)


@app.command("ptq-dynamic")
@user_errors
def ptq_dynamic_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Hub id, model directory or .gguf file."),
    out_dir: str = typer.Option(..., "--out", "-o", help="Output directory (written atomically)."),
    backend: str = typer.Option("auto", "--backend", help="int8 matmul: auto, int_mm (torch._int_mm) or float."),
    smooth: bool = typer.Option(True, "--smooth/--no-smooth", help="SmoothQuant before quantizing (uses --dataset)."),
    smooth_alpha: str = typer.Option(DYNAMIC_ALPHA, "--smooth-alpha", help="SmoothQuant strength in [0, 1], or 'search' (per layer group, least W8A8 output error)."),
    keep_dense: list[str] = typer.Option([], "--keep-dense", help="Regex of layer names left in float (repeatable; reported)."),
    dataset: str = typer.Option(DEFAULT_DATASET, "--dataset", help="Calibration text for smoothing: c4, wikitext2 or a file."),
    nsamples: int = typer.Option(32, "--nsamples", help="Calibration windows (smoothing)."),
    seqlen: int = typer.Option(512, "--seqlen", help="Tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="Seed of the window sampler."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code."),
) -> None:
    """W8A8 dynamic: int8 weights per output channel, activations quantized per token at run time."""
    from llmquant.ptq import PTQConfig
    cfg = PTQConfig(mode="dynamic", backend=backend, smooth_alpha=_alpha(smooth_alpha) if smooth else None,
                    keep_dense=tuple(keep_dense), nsamples=nsamples, seqlen=seqlen, seed=seed)
    _ptq(model, out_dir, cfg, dataset if smooth else None, overwrite, trust_remote_code)


@app.command("ptq-static")
@user_errors
def ptq_static_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Hub id, model directory or .gguf file."),
    out_dir: str = typer.Option(..., "--out", "-o", help="Output directory (written atomically)."),
    observer: str = typer.Option("minmax", "--observer", help="minmax, percentile, mse or kl."),
    percentile: float = typer.Option(99.99, "--percentile", help="Percentile of |x| for --observer percentile."),
    dataset: str = typer.Option(DEFAULT_DATASET, "--dataset", help="c4, wikitext2 or a .txt/.raw/.jsonl/.parquet file."),
    nsamples: int = typer.Option(32, "--nsamples", help="Calibration windows."),
    seqlen: int = typer.Option(512, "--seqlen", help="Tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="Seed of the window sampler."),
    backend: str = typer.Option("auto", "--backend", help="int8 matmul: auto, int_mm or float."),
    smooth: bool = typer.Option(True, "--smooth/--no-smooth", help="SmoothQuant before calibrating."),
    smooth_alpha: str = typer.Option(STATIC_ALPHA, "--smooth-alpha", help="SmoothQuant strength in [0, 1], or 'search' (per layer group, least W8A8 output error)."),
    keep_dense: list[str] = typer.Option([], "--keep-dense", help="Regex of layer names left in float (repeatable; reported)."),
    rotate: list[str] = typer.Option(list(STATIC_ROTATE), "--rotate", help="Regex of layer names whose input is Hadamard-rotated before quantizing (repeatable; 'down_proj' is short for the MLP down projections; 'none': off)."),
    smooth_rotated: bool = typer.Option(True, "--smooth-rotated/--no-smooth-rotated", help="Also SmoothQuant the rotated layers' groups (the alpha search then includes 'no smoothing')."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code."),
) -> None:
    """W8A8 static: one activation scale per linear input, fixed by an observer on calibration text."""
    from llmquant.ptq import PTQConfig
    cfg = PTQConfig(mode="static", observer=observer, percentile=percentile, nsamples=nsamples, seqlen=seqlen,
                    seed=seed, backend=backend, smooth_alpha=_alpha(smooth_alpha) if smooth else None,
                    keep_dense=tuple(keep_dense), rotate=_rotate(rotate), smooth_rotated=smooth_rotated)
    _ptq(model, out_dir, cfg, dataset, overwrite, trust_remote_code)


# ----------------------------------------------------------------------------- QAT

@app.command("qat")
@user_errors
def qat_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Hub id, model directory or .gguf file (the dense model)."),
    out_dir: str = typer.Option(..., "--out", "-o", help="Output directory: a GPTQ checkpoint."),
    bits: int = typer.Option(4, "--bits", help="Weight bits: 2, 3, 4 or 8."),
    group_size: int = typer.Option(128, "--group-size", help="Columns per group; -1 = per channel."),
    sym: bool = typer.Option(False, "--sym/--asym", help="Symmetric or asymmetric weight grid."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps. [default: QATConfig.steps]"),
    lr: Optional[float] = typer.Option(None, "--lr", help="AdamW learning rate of the weights."),
    scale_lr: Optional[float] = typer.Option(None, "--scale-lr", help="Learning rate of the group steps (0: frozen)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Windows per step."),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", help="Tokens per training window."),
    nsamples: Optional[int] = typer.Option(None, "--nsamples", help="Calibration windows drawn for training."),
    kd_weight: Optional[float] = typer.Option(None, "--kd-weight", help="Weight of the distillation loss (rest: next-token CE)."),
    act_bits: int = typer.Option(0, "--act-bits", help="Fake-quantize linear inputs per token to this many bits (0: off)."),
    init: str = typer.Option("rtn", "--init", help="rtn (MSE-clipped round to nearest) or gptq (from --init-from)."),
    init_from: Optional[str] = typer.Option(None, "--init-from", help="GPTQ checkpoint of this model, for --init gptq."),
    mse_init: bool = typer.Option(False, "--mse-init/--no-mse-init", help="Search MSE clip ratios for the RTN init (off: min-max RTN)."),
    bf16: bool = typer.Option(True, "--bf16/--fp32", help="Train under bfloat16 autocast (much faster on CPU)."),
    dataset: str = typer.Option(DEFAULT_DATASET, "--dataset", help="c4, wikitext2 or a .txt/.raw/.jsonl/.parquet file."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampler and of the data order."),
    checkpoint_format: Optional[str] = typer.Option(None, "--format", help="gptq (v1 zeros) or gptq_v2. [default: gptq for --sym, gptq_v2 for --asym]"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code."),
) -> None:
    """Quantization-aware training with STE fake quantization, exported as a GPTQ checkpoint."""
    from dataclasses import asdict
    from llmquant import qat as Q
    from llmquant.checkpoint import CHECKPOINT_FORMATS, load_quantized_weights, save_gptq_checkpoint

    t0 = time.time()
    defaults = Q.QATConfig()
    given = dict(steps=steps, lr=lr, scale_lr=scale_lr, batch_size=batch_size, seqlen=seqlen, nsamples=nsamples,
                 kd_weight=kd_weight)
    cfg = Q.QATConfig(bits=bits, group_size=group_size, sym=sym, act_bits=act_bits, init=init, mse_init=mse_init,
                      bf16=bf16, seed=seed, **{k: (v if v is not None else getattr(defaults, k)) for k, v in given.items()})
    if checkpoint_format is None:     # v1 stores zero - 1, so an asymmetric zero point of 0 needs v2
        checkpoint_format = "gptq" if sym else "gptq_v2"
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise InputError(f"--format {checkpoint_format}: use one of {', '.join(CHECKPOINT_FORMATS)}")
    if init == "gptq" and not init_from:
        raise InputError("--init gptq needs --init-from DIR, a GPTQ checkpoint of this model")
    if init_from and init != "gptq":
        raise InputError("--init-from is only used with --init gptq")
    dest = _check_out(out_dir, overwrite)
    init_weights = None
    if init_from:
        p = Path(init_from).expanduser()
        if not (p / "config.json").is_file():
            raise InputError(f"--init-from {p}: not a checkpoint directory (no config.json)")
        init_weights = load_quantized_weights(p)
    src, m, tok = _load(model, trust_remote_code)
    windows = _windows(tok, dataset, cfg.nsamples, cfg.seqlen, seed)
    teacher = Q.make_teacher(m, cfg.bf16) if cfg.kd_weight > 0 else None
    with _progress() as prog:
        ti = prog.add_task(f"init ({init})", total=None, info="")
        Q.prepare_qat(m, cfg, init_weights, progress=lambda d, n: prog.update(ti, completed=d, total=n))
        tt = prog.add_task("train", total=cfg.steps, info="")
        hist = Q.train_qat(m, teacher, windows, cfg,
                           progress=lambda d, n, r: prog.update(tt, completed=d, info=f"loss {r['loss']:.4f}"))
    del teacher
    quantized = Q.convert(m)
    hs = hist["history"]
    report = {"method": "qat", "model": src.display, "dataset": dataset, "config": asdict(cfg),
              "init_from": init_from, "train_seconds": hist["seconds"],
              "first_loss": hs[0]["loss"] if hs else None, "last_loss": hs[-1]["loss"] if hs else None,
              "history": hs}
    with console.status(f"writing {dest}"):
        report["total_seconds"] = round(time.time() - t0, 2)
        res = save_gptq_checkpoint(m, quantized, dest, quant_config=Q.quant_config(cfg), tokenizer=tok,
                                   checkpoint_format=checkpoint_format, report=report, overwrite=overwrite)
    t = Table(title=f"QAT {bits}-bit g{group_size}", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    for k, v in [("model", src.display), ("init", init), ("steps", cfg.steps),
                 ("tokens seen", cfg.steps * cfg.batch_size * cfg.seqlen),
                 ("loss first -> last", f"{_fmt(report['first_loss'])} -> {_fmt(report['last_loss'])}"),
                 ("train seconds", hist["seconds"]), ("total seconds", round(time.time() - t0, 1)),
                 ("layers", res.n_quantized), ("checkpoint", f"{res.path} ({res.weight_bytes / 2**20:.1f} MiB)"),
                 ("report", str(res.path / "quant_report.json"))]:
        t.add_row(k, _fmt(v))
    console.print(t)
