"""The ``gptq`` / ``rtn`` job: load, calibrate, quantize layer by layer, write the checkpoint and report."""
from __future__ import annotations

import json
import os
import resource
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from llmquant.config import QuantizeConfig
from llmquant.core.gptq import QuantArgs
from llmquant.errors import InputError
from llmquant.model.discovery import find_decoder_layers, find_linears, weight_matrix
from llmquant.model.load import (load_causal_lm, load_tokenizer, resolve_device, resolve_dtype, resolve_source)
from llmquant.pipeline import GPTQSettings, quantize_model

Step = Callable[[str, int, int], None]     # (stage description, done, total)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_output(out: str, overwrite: bool) -> Path:
    p = Path(out).expanduser()
    if p.exists() and not overwrite:
        raise InputError(f"--out {out} already exists; pass --overwrite to replace it or choose another directory")
    if p.exists() and not p.is_dir():
        raise InputError(f"--out {out} exists and is not a directory; choose another path")
    return p


def _compute_dtype(cfg: QuantizeConfig, device: str, model_dtype: torch.dtype) -> torch.dtype | None:
    """Autocast dtype of the calibration forwards; ``None`` runs them in the model's dtype."""
    want = resolve_dtype(cfg.calib_dtype, device)
    return None if want == model_dtype or want == torch.float32 else want


def _hessian_dtype(cfg: QuantizeConfig, device: str) -> torch.dtype:
    """``auto`` is float32 (what the issue and the reference code use). bfloat16 products are 2x faster on
    this CPU but round each batch's sum to 2^-9 of its entries; measured on SmolLM2 W4 g128 asym (128 x 512
    C4): 4 of 210 Hessians then need more damping (layers.11.mlp.down_proj loss 113 -> 342), the summed
    GPTQ loss rises 11%, and WikiText-2 PPL is unchanged (24.43 vs 24.44 with float32)."""
    if cfg.hessian_dtype == "auto":
        return torch.float32
    return resolve_dtype(cfg.hessian_dtype, device)


def _load_dtype(cfg: QuantizeConfig) -> torch.dtype:
    """``auto`` keeps the weights exact: float32 master weights (GPTQ updates them in float32);
    half-precision loads halve memory for models that do not fit otherwise."""
    if cfg.dtype == "auto":
        return torch.float32
    return resolve_dtype(cfg.dtype, "cpu")


def ragged_group_warning(model, group_size: int) -> str | None:
    if group_size <= 0:
        return None
    _, layers = find_decoder_layers(model)
    widths = sorted({weight_matrix(m).shape[1] for m in find_linears(layers[0]).values()
                     if weight_matrix(m).shape[1] % group_size})
    if widths:
        return (f"input widths {widths} are not multiples of --group-size {group_size}: the last group of those "
                "layers is shorter; some serving kernels need whole groups")
    return None


def preflight(cfg: QuantizeConfig, method: str):
    """Every check that needs no model load: bad flags fail in milliseconds, before any output."""
    cfg.validate(method)
    out = check_output(cfg.out, cfg.overwrite)
    device = resolve_device(cfg.device)
    source = resolve_source(cfg.model)
    return out, device, source


def run_quantize(cfg: QuantizeConfig, method: str = "gptq", step: Step | None = None,
                 log: Callable[[str], None] = lambda s: None) -> dict:
    """Run the whole job; returns the report (also written as ``quant_report.json`` in the output)."""
    from llmquant.checkpoint import save_gptq_checkpoint
    from llmquant.data import calibration_windows, load_corpus

    t_start = time.perf_counter()
    out, device, source = preflight(cfg, method)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    corpus = load_corpus(cfg.dataset) if method == "gptq" else None   # fail on bad data before the slow load
    model = load_causal_lm(source, _load_dtype(cfg), cfg.trust_remote_code)
    timings["load_s"] = time.perf_counter() - t

    warns = []
    w = ragged_group_warning(model, cfg.group_size)
    if w:
        warns.append(w)
        log(f"warning: {w}")

    calib = None
    if method == "gptq":
        t = time.perf_counter()
        calib = calibration_windows(tokenizer, corpus, cfg.nsamples, cfg.seqlen, cfg.seed)
        timings["calibration_data_s"] = time.perf_counter() - t

    args = QuantArgs(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, mse=cfg.mse)
    compute_dtype = _compute_dtype(cfg, device, next(model.parameters()).dtype)
    settings = GPTQSettings(args, blocksize=cfg.block_size, percdamp=cfg.damp, act_order=cfg.act_order,
                            static_groups=cfg.static_groups, compute_dtype=compute_dtype,
                            hessian_dtype=_hessian_dtype(cfg, device))
    t = time.perf_counter()
    result = quantize_model(model, calib, settings, method=method, device=device, batch_size=cfg.batch_size,
                            on_step=step)
    timings["quantize_s"] = time.perf_counter() - t

    fallbacks = [r.name for r in result.records if r.fallback]
    report = {
        "tool": "llmquant",
        "method": method,
        "model": source.display,
        "config": {**cfg.as_dict(), "format": cfg.checkpoint_format},
        "device": device,
        "compute_dtype": str(settings.compute_dtype or next(model.parameters()).dtype).replace("torch.", ""),
        "hessian_dtype": str(settings.hessian_dtype).replace("torch.", ""),
        "calibration": None if calib is None else {"dataset": cfg.dataset, "nsamples": cfg.nsamples,
                                                   "seqlen": cfg.seqlen, "seed": cfg.seed, "tokens": int(calib.numel())},
        "warnings": warns,
        "modules": [r.as_dict() for r in result.records],
        "layer_seconds": [round(s, 3) for s in result.layer_seconds],
        "totals": {
            "modules": len(result.records),
            "loss": float(sum(r.loss for r in result.records if r.loss == r.loss)),
            "fallbacks": fallbacks,
        },
    }
    if device.startswith("cuda"):
        report["totals"]["peak_cuda_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    qconf = {"bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym,
             "desc_act": bool(cfg.act_order and method == "gptq"),
             "static_groups": bool(cfg.static_groups and method == "gptq"),
             "damp_percent": cfg.damp, "true_sequential": True,
             "meta": {"method": method, "mse": cfg.mse}}
    t = time.perf_counter()
    saved = save_gptq_checkpoint(model, result.quantized, out, quant_config=qconf, tokenizer=tokenizer,
                                 checkpoint_format=cfg.checkpoint_format, report=report, overwrite=cfg.overwrite)
    timings["save_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    report["totals"].update({k: round(v, 3) for k, v in timings.items()})
    report["totals"]["peak_rss_mb"] = round(peak_rss_mb(), 1)
    report["totals"]["checkpoint_mb"] = round(saved.total_bytes / 1e6, 2)
    report["totals"]["weights_mb"] = round(saved.weight_bytes / 1e6, 2)
    report["output"] = str(saved.path)
    from llmquant.runtime.inspect import plot_layer_errors
    png = plot_layer_errors(report["modules"], saved.path / "layer_error.png",
                            title=f"{method} W{cfg.bits} g{cfg.group_size}: loss per module")
    report["plot"] = None if png is None else str(png)
    write_report(saved.path, report)

    if cfg.eval:
        del model
        from llmquant.runtime.evaluate import evaluate_checkpoint
        t = time.perf_counter()
        # float32 activations and logits: the GPTQ paper's protocol (../shared/data/README.md)
        ev = evaluate_checkpoint(str(saved.path), cfg.eval_dataset, cfg.eval_seqlen, cfg.eval_windows, device,
                                 dtype="float32")
        report["eval"] = {**{k: ev[k] for k in ("ppl", "windows", "tokens", "kernel", "dtype") if k in ev},
                          "dataset": cfg.eval_dataset, "seqlen": cfg.eval_seqlen, "seconds": round(time.perf_counter() - t, 2)}
        write_report(saved.path, report)
    return report


def write_report(directory: Path, report: dict) -> None:
    """``quant_report.json`` replaced atomically."""
    tmp = Path(directory) / ".quant_report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, Path(directory) / "quant_report.json")
