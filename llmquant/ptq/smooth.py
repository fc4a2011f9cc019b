"""SmoothQuant on a whole model, found generically: no per-architecture tables.

For every decoder layer the linear groups (layers reading one tensor: q/k/v, o, gate/up, down)
come from :func:`llmquant.model.discovery.trace_groups`. The *producer* of a group's input is found
by probing, on a short sample, the candidates in turn:

1. the sub-module whose output *is* the input tensor when it has a 1-D ``weight`` (a norm), scaled
   as ``w * t`` (RMSNorm / LayerNorm, bias too) or ``(1 + w) * t - 1`` (Gemma's RMSNorm);
2. linear layers of the same block called before the group, nearest first, whose output width
   divides the input width (``up_proj`` for ``down_proj``, ``v_proj`` for ``o_proj`` under
   grouped-query attention, where one ``v_proj`` channel feeds several heads).

A probe multiplies producer channel ``j`` by a distinct factor ``t_j`` in ``[1, 2)``; the ratio of
the new to the old group input identifies which producer channel feeds each input channel
(``index [K]``), and the block's output, with the group's weight columns divided back, must be
unchanged (relative error < 1e-4). A group without a producer that passes stays unsmoothed and is
reported. The smoothing itself is :mod:`llmquant.core.smooth`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from llmquant.core.quantizers import quantize_per_token
from llmquant.core.smooth import pool_by_map, smoothing_factors, weight_column_amax
from llmquant.errors import InputError
from llmquant.ptq.rotation import rotate
from llmquant.model.discovery import (
    LINEAR_TYPES, find_decoder_layers, find_linears, set_weight_matrix, trace_groups, weight_matrix,
)

Progress = Callable[[int, int], None]
PROBE_TOL = 1e-4


@dataclass
class SmoothGroup:
    """Linear layers reading one tensor, and how to rescale the tensor at its source."""

    names: list[str]                  # qualified names of the consumers
    producer: str | None = None       # qualified name of the producer module
    kind: str | None = None           # norm | norm1p | linear
    index: torch.Tensor | None = None  # [K] producer channel of each input channel
    size: int = 0                     # producer channels K'
    reason: str = ""                  # why it is not smoothed
    alpha: float | None = None
    scale_max: float | None = None    # diagnostics after smoothing
    act_amax_before: float | None = None
    act_amax_after: float | None = None
    search_error: dict | None = None  # alpha -> relative W8A8 output error on the sample rows

    def row(self) -> dict:
        return {"layers": self.names, "producer": self.producer, "kind": self.kind, "alpha": self.alpha,
                "scale_max": self.scale_max, "act_amax_before": self.act_amax_before,
                "act_amax_after": self.act_amax_after, "reason": self.reason or None,
                "search_error": self.search_error}


# ----------------------------------------------------------------------------- producer scaling

def _norm_weight(m: nn.Module):
    w = getattr(m, "weight", None)
    return w if isinstance(w, torch.Tensor) and w.dim() == 1 else None


@torch.no_grad()
def scale_producer(m: nn.Module, kind: str, t: torch.Tensor) -> None:
    """Multiply the producer's output channel ``j`` by ``t [K']`` in place."""
    if kind == "linear":
        W = weight_matrix(m)
        set_weight_matrix(m, W * t[:, None].to(W.dtype))           # t float64 for float64 models
        if getattr(m, "bias", None) is not None:
            m.bias.mul_(t.to(m.bias.dtype))
        return
    w = _norm_weight(m)
    if kind == "norm":
        w.mul_(t.to(w.dtype))
    elif kind == "norm1p":
        w.copy_((1 + w.double()) * t.double() - 1)
    else:
        raise ValueError(f"unknown producer kind {kind!r}")
    b = getattr(m, "bias", None)
    if isinstance(b, torch.Tensor) and b.shape == w.shape:
        b.mul_(t.to(b.dtype))


@torch.no_grad()
def scale_consumers(mods: list[nn.Module], s: torch.Tensor) -> None:
    """Multiply input column ``c`` of every consumer weight by ``s [K]``."""
    for m in mods:
        W = weight_matrix(m)
        set_weight_matrix(m, W * s[None, :].to(W.dtype))


# ----------------------------------------------------------------------------- tracing

def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


@torch.no_grad()
def _run(layer: nn.Module, args, kwargs, watch: dict[str, nn.Module], record_outputs: bool):
    """Run ``layer``; return (block output, {linear name: input}, [(module name, output)], call order)."""
    inputs, outputs, order, handles = {}, [], [], []
    for n, m in watch.items():
        def pre(mod, inp, n=n):
            inputs.setdefault(n, inp[0])
            order.append(n)
        handles.append(m.register_forward_pre_hook(pre))
    if record_outputs:
        for n, m in layer.named_modules():
            if n:
                def post(mod, inp, out, n=n):
                    if isinstance(out, torch.Tensor):
                        outputs.append((n, out))
                handles.append(m.register_forward_hook(post))
    try:
        y = _first_tensor(layer(*args, **kwargs))
    finally:
        for h in handles:
            h.remove()
    return y, inputs, outputs, order


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@torch.no_grad()
def _probe(layer, args, kwargs, linears, group, cand, kind, y0, x0) -> torch.Tensor | None:
    """Channel map ``[K]`` when scaling ``cand`` the way ``kind`` says is exactly undone by the group."""
    m = dict(layer.named_modules())[cand]
    K = x0.shape[-1]
    Kp = weight_matrix(m).shape[0] if kind == "linear" else _norm_weight(m).numel()
    t = 1 + torch.arange(Kp, dtype=torch.float64) / Kp                          # distinct, in [1, 2)
    saved = {n: p.detach().clone() for n, p in m.named_parameters(recurse=False)}
    saved_c = {n: weight_matrix(linears[n]).detach().clone() for n in group}
    try:
        scale_producer(m, kind, t.float())
        _, xin, _, _ = _run(layer, args, kwargs, {group[0]: linears[group[0]]}, False)
        x1 = xin[group[0]].reshape(-1, K).double()
        x = x0.reshape(-1, K).double()
        tok = x.abs().argmax(0)                                                  # [K] best token per channel
        ref = x[tok, torch.arange(K)]
        if (ref.abs() == 0).any():
            return None
        r = x1[tok, torch.arange(K)] / ref                                       # [K] observed factor
        idx = torch.round((r - 1) * Kp).long()
        if idx.min() < 0 or idx.max() >= Kp or (t[idx] - r).abs().max() > 0.25 / Kp:   # factors are 1/Kp apart
            return None
        if not torch.equal(torch.bincount(idx, minlength=Kp), torch.full((Kp,), K // Kp)):
            return None                   # each producer channel must feed the same number of inputs
        scale_consumers([linears[n] for n in group], (1 / t[idx]).float())
        y1, _, _, _ = _run(layer, args, kwargs, {}, False)
        if y1 is None or _rel(y1, y0) > PROBE_TOL:
            return None
        return idx
    finally:
        for n, p in m.named_parameters(recurse=False):
            p.copy_(saved[n])
        for n in group:
            set_weight_matrix(linears[n], saved_c[n])


@torch.no_grad()
def find_smooth_groups(layer: nn.Module, args: tuple, kwargs: dict) -> list[SmoothGroup]:
    """The smoothable groups of one decoder block (names relative to the block)."""
    linears = find_linears(layer)
    groups = [g.names for g in trace_groups(layer, args, kwargs)]
    y0, xin, outs, order = _run(layer, args, kwargs, linears, True)
    mods = dict(layer.named_modules())
    first_call = {}
    for i, n in enumerate(order):
        first_call.setdefault(n, i)
    result = []
    for names in groups:
        g = SmoothGroup(names=list(names))
        result.append(g)
        x0 = xin.get(names[0])
        if x0 is None:
            g.reason = "not called in the traced forward"
            continue
        K = x0.shape[-1]
        cands = []
        for n, o in outs:
            w = _norm_weight(mods[n])
            if o is x0 and n not in linears and w is not None and w.numel() == K:
                cands += [(n, "norm"), (n, "norm1p")]
        before = sorted((n for n in linears if n not in names and n in first_call
                         and first_call[n] < first_call[names[0]]), key=lambda n: -first_call[n])
        for n in before:
            Kp = weight_matrix(linears[n]).shape[0]
            if K % Kp == 0:
                cands.append((n, "linear"))
        for cand, kind in cands:
            idx = _probe(layer, args, kwargs, linears, names, cand, kind, y0, x0)
            if idx is not None:
                g.producer, g.kind, g.index = cand, kind, idx
                m = mods[cand]
                g.size = weight_matrix(m).shape[0] if kind == "linear" else _norm_weight(m).numel()
                break
        else:
            g.reason = "no producer whose scaling the layers can undo exactly" if cands else "no candidate producer"
    return result


# ----------------------------------------------------------------------------- calibration

@torch.no_grad()
def capture_block_inputs(model: nn.Module, sample: torch.Tensor) -> list[tuple[tuple, dict]]:
    """``(args, kwargs)`` of every decoder block for ``sample [1, T]``."""
    _, layers = find_decoder_layers(model)
    caught: list = [None] * len(layers)
    handles = []
    for i, layer in enumerate(layers):
        def pre(mod, args, kwargs, i=i):
            caught[i] = (args, dict(kwargs))
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        model(sample, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return caught


@torch.no_grad()
def channel_amax(model: nn.Module, windows: torch.Tensor, names: list[str],
                 progress: Progress | None = None, keep_rows: int = 0,
                 samples: dict[str, list] | None = None) -> dict[str, torch.Tensor]:
    """``{name: max |x_c| [K]}`` of each named linear's input over ``windows [n, T]``.

    With ``keep_rows`` and a ``samples`` dict, also keeps per window and layer ``keep_rows`` token
    rows of the input: the quarter with the largest ``max |x|`` (outlier tokens) and a fixed-seed
    random draw of the rest, appended to ``samples[name]``."""
    mods = dict(model.named_modules())
    amax: dict[str, torch.Tensor] = {}
    handles = []
    gen = torch.Generator().manual_seed(0)
    for n in names:
        def pre(mod, inp, n=n):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1])                   # [T, K]
            a = x.abs().amax(0).float()
            amax[n] = a if n not in amax else torch.maximum(amax[n], a)
            if keep_rows and samples is not None:
                top = x.abs().amax(1).topk(min(keep_rows // 4, x.shape[0])).indices
                rnd = torch.randperm(x.shape[0], generator=gen)[: keep_rows - top.numel()]
                samples.setdefault(n, []).append(x[torch.cat([top, rnd]).unique()].float().clone())
        handles.append(mods[n].register_forward_pre_hook(pre))
    try:
        for i in range(windows.shape[0]):
            model(windows[i:i + 1], use_cache=False)
            if progress:
                progress(i + 1, windows.shape[0])
    finally:
        for h in handles:
            h.remove()
    return amax


# ----------------------------------------------------------------------------- the whole model

ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(4, 20))      # 0.2 .. 0.95


def _fq_rows(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 fake quantization, one step per row of ``x [R, C]``: the quantizer W8A8 layers
    use for weights and dynamic activations."""
    q, step = quantize_per_token(x, bits=8)
    return q.float() * step


@torch.no_grad()
def w8a8_error(X: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, act_amax: torch.Tensor,
               mode: str, rotation: torch.Tensor | None = None) -> float:
    """Relative output error of W8A8 on sample rows ``X [R, K]`` after smoothing by ``s [K]``.

    Weights per output channel; activations per token (``dynamic``) or with the per-tensor min-max
    step of the whole calibration set ``max(act_amax / s) / 127`` (``static``). With ``rotation``
    (factor ``M`` of :func:`llmquant.ptq.rotation.rotate`) the layer quantizes ``R x / s`` and
    ``(W s) R^T``; the static step is then the min-max of the rotated sample rows."""
    Xs = X / s
    if rotation is not None:
        Xs = rotate(Xs, rotation)                                                 # R (x / s)
    if mode == "static":
        amax = float(Xs.abs().max()) if rotation is not None else float((act_amax / s).max())
        step = amax / 127
        Xq = torch.clamp(torch.round(Xs / step), -127, 127) * step
    else:
        Xq = _fq_rows(Xs)
    num = den = 0.0
    for W in weights:
        ref = X @ W.t()
        Ws = W * s if rotation is None else rotate(W * s, rotation)
        out = Xq @ _fq_rows(Ws).t()
        num += float((out - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5


@torch.no_grad()
def smooth_model(model: nn.Module, windows: torch.Tensor, alpha: float | str,
                 progress: Progress | None = None, mode: str = "dynamic",
                 grid: tuple[float, ...] = ALPHA_GRID, sample_rows: int = 64,
                 rotations: dict[str, torch.Tensor] | None = None, skip: tuple[str, ...] = ()) -> list[SmoothGroup]:
    """SmoothQuant every smoothable linear group of the decoder in place (outputs unchanged in exact
    arithmetic); returns the groups with qualified names, smoothed or with the reason they are not.

    ``alpha="search"``: per group, the alpha of ``grid`` with the smallest W8A8 output error
    (:func:`w8a8_error` for ``mode``) on ``sample_rows`` kept token rows per calibration window.
    A group whose first layer is in ``rotations`` (``{name: M}``, its input rotated after smoothing)
    is searched with that rotation, and "no smoothing" is a candidate too. Groups with a layer named in
    ``skip`` are left unsmoothed."""
    rotations = rotations or {}
    search = alpha == "search"
    if not search and not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise InputError(f"--smooth-alpha {alpha}: must be in [0, 1] or 'search'")
    prefix, layers = find_decoder_layers(model)
    sample = windows[:1, : min(windows.shape[1], 64)]
    blocks = capture_block_inputs(model, sample)
    plan: list[SmoothGroup] = []
    for i, layer in enumerate(layers):
        if blocks[i] is None:
            raise InputError(f"decoder layer {i} never ran; cannot trace it for smoothing")
        for g in find_smooth_groups(layer, *blocks[i]):
            g.names = [f"{prefix}.{i}.{n}" for n in g.names]
            if g.producer is not None and any(n in skip for n in g.names):
                g.producer, g.reason = None, "skipped: rotated instead"
            if g.producer is not None:
                g.producer = f"{prefix}.{i}.{g.producer}"
            plan.append(g)
    del blocks
    firsts = [g.names[0] for g in plan if g.producer is not None]
    samples: dict[str, list] = {}
    amax = channel_amax(model, windows, firsts, progress, keep_rows=sample_rows if search else 0, samples=samples)
    mods = dict(model.named_modules())

    def factors(g, a, w, al):
        t = smoothing_factors(pool_by_map(a, g.index, g.size), pool_by_map(w, g.index, g.size), al)  # [K']
        return t, t[g.index]                                                       # [K'], [K]

    for g in plan:
        if g.producer is None:
            continue
        a = amax[g.names[0]].double()                                                  # [K]
        w = weight_column_amax([weight_matrix(mods[n]) for n in g.names])        # [K]
        if search:
            X = torch.cat(samples.pop(g.names[0]))                                 # [R, K]
            Ws = [weight_matrix(mods[n]).detach().float() for n in g.names]
            M = rotations.get(g.names[0])
            errs = {al: w8a8_error(X, Ws, factors(g, a, w, al)[1].float(), a.float(), mode, M) for al in grid}
            if M is not None:                                                  # rotated: smoothing is optional
                errs["none"] = w8a8_error(X, Ws, torch.ones_like(a).float(), a.float(), mode, M)
            al = min(errs, key=errs.get)
            g.search_error = {str(k): round(v, 6) for k, v in errs.items()}
            if al == "none":
                g.producer, g.reason = None, "alpha search: rotation alone is better than smoothing"
                continue
        else:
            al = float(alpha)
        t, s = factors(g, a, w, al)
        scale_producer(mods[g.producer], g.kind, 1 / t)
        scale_consumers([mods[n] for n in g.names], s)
        g.alpha, g.scale_max = al, float(s.max())
        g.act_amax_before, g.act_amax_after = float(a.max()), float((a / s).max())
    return plan


def smoothing_report(plan: list[SmoothGroup]) -> dict:
    done = [g for g in plan if g.producer is not None]
    return {"groups": len(plan), "smoothed": len(done),
            "not_smoothed": [{"layers": g.names, "reason": g.reason} for g in plan if g.producer is None],
            "detail": [g.row() for g in plan]}
