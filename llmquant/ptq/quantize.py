"""W8A8 post-training quantization of every linear layer in the decoder stack.

* dynamic: int8 weights per output channel; activations quantized per token at run time.
* static: the same weights; one activation step per linear input, fixed from calibration text
  by an observer (``minmax`` / ``percentile`` / ``mse`` / ``kl``, :mod:`llmquant.core.observers`).

Before either, SmoothQuant (``smooth_alpha``, on by default; :mod:`llmquant.ptq.smooth`) moves
activation outliers into the weights using the same calibration text; the float model's outputs
are unchanged by it. ``keep_dense`` (regular expressions on layer names) leaves chosen layers in
float; they are listed in the report and in ``config.json``. ``rotate`` (regular expressions on layer
names) gives the chosen layers an online Hadamard rotation of their input
(:mod:`llmquant.ptq.rotation`): the static step is then calibrated on ``R x`` and the weight is
``W R^T``; it spreads the massive first-token activations of ``down_proj`` inputs over all channels.

Only linear layers inside the decoder blocks are replaced (found generically by
:mod:`llmquant.model.discovery`); embeddings and ``lm_head`` stay dense.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from llmquant.core.observers import OBSERVERS, make_observer
from llmquant.core.quantizers import error_report
from llmquant.errors import InputError, NumericalError
from llmquant.model.discovery import find_decoder_layers, find_linears, weight_matrix
from llmquant.ptq.linear import BACKENDS, W8A8Linear
from llmquant.ptq.rotation import rotate, rotation_factor

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PTQConfig:
    """Settings of a W8A8 run; validated on construction."""

    mode: str = "dynamic"               # dynamic | static
    observer: str = "minmax"            # static only
    percentile: float = 99.99
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    backend: str = "auto"
    smooth_alpha: float | str | None = 0.5   # SmoothQuant strength in [0, 1], "search" (per group); None: off
    keep_dense: tuple[str, ...] = ()    # regexes (re.search) of layer names left in float
    rotate: tuple[str, ...] = ()        # regexes of layer names whose input is rotated (llmquant.ptq.rotation)
    smooth_rotated: bool = True         # also SmoothQuant the groups of rotated layers (before rotating)

    def __post_init__(self):
        if self.mode not in ("dynamic", "static"):
            raise InputError(f"mode {self.mode!r}: use dynamic or static")
        if self.observer not in OBSERVERS:
            raise InputError(f"--observer {self.observer}: unknown; use one of {', '.join(OBSERVERS)}")
        if not 0 < self.percentile <= 100:
            raise InputError(f"--percentile {self.percentile}: must be in (0, 100]")
        if self.nsamples < 1 or self.seqlen < 2:
            raise InputError(f"--nsamples {self.nsamples} / --seqlen {self.seqlen}: need nsamples >= 1, seqlen >= 2")
        if self.backend not in BACKENDS:
            raise InputError(f"--backend {self.backend}: unknown; use one of {', '.join(BACKENDS)}")
        a = self.smooth_alpha
        if a is not None and a != "search" and not (isinstance(a, (int, float)) and 0 <= a <= 1):
            raise InputError(f"--smooth-alpha {a}: must be a number in [0, 1] or 'search'")
        for field in ("keep_dense", "rotate"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
            for pat in getattr(self, field):
                try:
                    re.compile(pat)
                except re.error as e:
                    flag = "--" + field.replace("_", "-")
                    raise InputError(f"{flag} {pat!r}: not a regular expression ({e})") from None

    @property
    def needs_calibration(self) -> bool:
        return self.mode == "static" or self.smooth_alpha is not None

    def kept_dense(self, names: list[str]) -> list[str]:
        """The names matching a ``keep_dense`` pattern."""
        return [n for n in names if any(re.search(p, n) for p in self.keep_dense)]

    def rotated(self, names: list[str]) -> list[str]:
        """The names matching a ``rotate`` pattern."""
        return [n for n in names if any(re.search(p, n) for p in self.rotate)]

    def quantization_config(self, modules: list[str], kept: list[str] = (), rotated: list[str] = ()) -> dict:
        """The ``quantization_config`` block of ``config.json``."""
        qc = {"quant_method": "llmquant_w8a8", "bits": 8, "weight": "int8 symmetric per output channel",
              "activation": "int8 symmetric per token (dynamic)" if self.mode == "dynamic"
              else "int8 symmetric per tensor (static)",
              "mode": self.mode, "modules": modules, "smooth_alpha": self.smooth_alpha,
              "kept_dense": list(kept)}
        if rotated:
            qc["rotated"] = list(rotated)
            qc["smooth_rotated"] = self.smooth_rotated
            qc["rotation"] = ("input x -> R x, R = M (x) H_P (normalized Walsh-Hadamard P = largest power of 2 "
                              "dividing K, M [K/P, K/P] orthogonal, stored as <name>.rotation); weight = W R^T")
        if self.needs_calibration:
            qc.update(nsamples=self.nsamples, seqlen=self.seqlen, seed=self.seed)
        if self.mode == "static":
            qc.update(observer=self.observer)
            if self.observer == "percentile":
                qc["percentile"] = self.percentile
        return qc


def target_linears(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified name: module}`` of the linear layers inside the decoder blocks."""
    prefix, layers = find_decoder_layers(model)
    out = {}
    for i, layer in enumerate(layers):
        for n, m in find_linears(layer).items():
            out[f"{prefix}.{i}.{n}"] = m
    if not out:
        raise InputError(f"{type(model).__name__}: no linear layers found in the decoder blocks")
    return out


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def calibrate(model: nn.Module, windows: torch.Tensor, cfg: PTQConfig, names: list[str],
              progress: Progress | None = None, observers: tuple[str, ...] | None = None,
              rotations: dict[str, torch.Tensor] | None = None) -> dict:
    """Run ``windows [n, seqlen]`` through the model and observe each target linear's input.

    Linear layers reading the same tensor (q/k/v, gate/up) share one observer. A layer named in
    ``rotations`` (``{name: M}``) observes its rotated input ``R x`` instead, with its own observer.
    Returns ``{name: {"scale", "threshold", "amax"}}`` for ``cfg.observer``; with ``observers``
    (several names, one calibration pass for all) ``{observer: {name: {...}}}``.
    """
    kinds = tuple(observers) if observers else (cfg.observer,)
    for k in kinds:
        if k not in OBSERVERS:
            raise InputError(f"observer {k}: unknown; use one of {', '.join(OBSERVERS)}")

    def new():
        return {k: make_observer(k, bits=8, **({"percentile": cfg.percentile} if k == "percentile" else {}))
                for k in kinds}

    rotations = rotations or {}
    obs_of: dict[str, dict] = {}
    last: list = [None, None]            # (input tensor, observers) of the previous hook call

    def hook(name):
        M = rotations.get(name)

        def fn(mod, inp):
            x = inp[0]
            if M is None and last[0] is x:
                obs_of[name] = last[1]
                return
            obs = obs_of.get(name)
            if obs is None:
                obs = obs_of[name] = new()
            x2 = x.detach().reshape(-1, x.shape[-1])                        # [T, K]
            if M is not None:
                x2 = rotate(x2.float(), M)                                  # R x
            for o in obs.values():
                o.update(x2)
            if M is None:
                last[0], last[1] = x, obs
        return fn

    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for i in range(windows.shape[0]):
            model(windows[i:i + 1], use_cache=False)
            last[0] = last[1] = None
            if progress:
                progress(i + 1, windows.shape[0])
    finally:
        for h in handles:
            h.remove()
    result: dict[str, dict] = {k: {} for k in kinds}
    done: dict[int, dict] = {}
    for n in names:
        if n not in obs_of:
            raise InputError(f"layer {n} never ran during calibration; it cannot get a static activation scale")
        for k, obs in obs_of[n].items():
            if id(obs) not in done:
                lo, hi = obs.range()
                scale, _ = obs.qparams()
                amax = getattr(obs, "amax", None)
                amax = float(amax) if amax is not None else float(torch.maximum(lo.abs(), hi.abs()))
                done[id(obs)] = {"scale": float(scale), "threshold": float(hi), "amax": amax}
            result[k][n] = done[id(obs)]
    return result if observers else result[cfg.observer]


@torch.no_grad()
def quantize_w8a8(model: nn.Module, cfg: PTQConfig, windows: torch.Tensor | None = None,
                  progress_calib: Progress | None = None, progress_layers: Progress | None = None,
                  act_scales: dict | None = None, smoothed: bool | dict | None = None) -> dict:
    """Replace every decoder linear with a :class:`W8A8Linear` in place; return a JSON report.

    Smoothing (``cfg.smooth_alpha``) and static calibration use ``windows``; static mode takes
    ``act_scales`` (a :func:`calibrate` result for this model, smoothed as ``cfg`` says) instead of
    calibrating when given, and ``smoothed`` says the model was already smoothed by the caller."""
    from llmquant.ptq.smooth import smooth_model, smoothing_report
    t0 = time.time()
    smooth_now = cfg.smooth_alpha is not None and not smoothed
    if smooth_now and windows is None:
        raise InputError("SmoothQuant needs calibration windows; pass --dataset, or --no-smooth")
    # Smoothing rescales weights in place, so the target modules and rotations found here stay valid.
    all_targets = target_linears(model)
    kept = cfg.kept_dense(list(all_targets))
    targets = {n: m for n, m in all_targets.items() if n not in kept}
    if not targets:
        raise InputError("--keep-dense matches every linear layer; nothing is left to quantize")
    names = list(targets)
    rotations = {n: rotation_factor(weight_matrix(targets[n]).shape[1]) for n in cfg.rotated(names)}
    smooth_rep = None
    if smooth_now:
        skip = tuple(rotations) if not cfg.smooth_rotated else ()
        smooth_rep = smoothing_report(smooth_model(model, windows, cfg.smooth_alpha, progress_calib, cfg.mode,
                                                   rotations=rotations, skip=skip))
    elif smoothed is not None and smoothed is not True:
        smooth_rep = smoothed
    act = {}
    if cfg.mode == "static" and act_scales is not None:
        missing = [n for n in names if n not in act_scales]
        if missing:
            raise InputError(f"act_scales has no entry for layer {missing[0]}; calibrate this model")
        act = act_scales
    elif cfg.mode == "static":
        if windows is None:
            raise InputError("static W8A8 needs calibration windows; pass --dataset")
        act = calibrate(model, windows, cfg, names, progress_calib, rotations=rotations)
    t_cal = time.time() - t0
    layers = []
    for i, (name, m) in enumerate(targets.items()):
        W = weight_matrix(m).detach().float()                               # [N, K]
        if not torch.isfinite(W).all():
            raise NumericalError(f"layer {name}: the weight has inf/NaN; the model is corrupted")
        bias = m.bias if getattr(m, "bias", None) is not None else None
        M = rotations.get(name)
        q = W8A8Linear.from_dense(W, bias, act[name]["scale"] if act else None, backend=cfg.backend, rotation=M)
        err = error_report(rotate(W, M) if M is not None else W, q.dequantized_weight())
        row = {"name": name, "shape": list(W.shape), "rotated": M is not None,
               "weight_sqnr_db": round(err["sqnr_db"], 2),
               "weight_rel_error": err["rel_error"]}
        if act:
            row.update({"act_" + k: v for k, v in act[name].items()})
            row["act_clip_ratio"] = act[name]["threshold"] / act[name]["amax"] if act[name]["amax"] > 0 else 1.0
        layers.append(row)
        set_module(model, name, q.to(W.device))
        if progress_layers:
            progress_layers(i + 1, len(targets))
    model.config.quantization_config = cfg.quantization_config(names, kept, list(rotations))
    sq = [r["weight_sqnr_db"] for r in layers if math.isfinite(r["weight_sqnr_db"])]
    return {"method": f"w8a8-{cfg.mode}", "config": asdict(cfg), "n_layers": len(layers),
            "kept_dense": kept, "rotated": list(rotations), "smoothing": smooth_rep,
            "calibration_seconds": round(t_cal, 2), "seconds": round(time.time() - t0, 2),
            "mean_weight_sqnr_db": round(sum(sq) / len(sq), 2) if sq else None, "layers": layers}
