"""Layer-by-layer sequential quantization: the plumbing around the math in ``core/``.

1. Capture what the first decoder layer receives (hidden states and every keyword argument: masks,
   position ids / embeddings), for every calibration batch, by stopping the model's forward there.
2. For each decoder layer (only that layer on the compute device):
   for each group of linear layers sharing an input, in execution order (true sequential):
   run the layer until that input exists, accumulate its Hessian, stop; quantize the group.
   Then run the whole layer with quantized weights: its outputs are the next layer's inputs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from llmquant.core.gptq import GPTQ, GPTQResult, QuantArgs, rtn
from llmquant.core.qtensor import QuantizedWeight
from llmquant.errors import InputError, NumericalError
from llmquant.model.discovery import (StopForward, find_decoder_layers, find_linears, set_weight_matrix,
                                      trace_groups, weight_matrix)


@dataclass
class GPTQSettings:
    args: QuantArgs
    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    compute_dtype: torch.dtype | None = None   # autocast dtype for the forward passes (None: model dtype)
    hessian_dtype: torch.dtype = torch.float32  # dtype of each batch's x^T x; H always sums in float32
    cache_budget_bytes: int = 4 << 30          # outputs of finished sub-modules kept to skip recomputation


@dataclass
class ModuleRecord:
    name: str
    shape: tuple[int, int]
    loss: float
    damp: float | None
    fallback: str | None
    tokens: int
    seconds: float
    dead_columns: int = 0

    def as_dict(self) -> dict:
        return {"name": self.name, "out_features": self.shape[0], "in_features": self.shape[1],
                "loss": self.loss, "damp": self.damp, "fallback": self.fallback, "tokens": self.tokens,
                "seconds": round(self.seconds, 4), "dead_columns": self.dead_columns}


@dataclass
class QuantizeResult:
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    records: list[ModuleRecord] = field(default_factory=list)
    layer_seconds: list[float] = field(default_factory=list)


def check_packable(model: nn.Module, bits: int) -> None:
    """The packed format needs whole int32 words: refuse early, naming the layer."""
    prefix, layers = find_decoder_layers(model)
    unit = 32 if bits == 3 else 32 // bits
    for i, layer in enumerate(layers):
        for name, m in find_linears(layer).items():
            N, K = weight_matrix(m).shape
            if K % unit or N % unit:
                raise InputError(f"layer {prefix}.{i}.{name} is {N}x{K}: {bits}-bit packing needs in and out features "
                                 f"that are multiples of {unit}; choose another --bits")


class _Capture(Exception):
    pass


def _clean_kwargs(kwargs: dict) -> dict:
    kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    for k in ("past_key_value", "past_key_values", "layer_past", "cache"):
        kw.pop(k, None)
    kw["use_cache"] = False
    return kw


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, batches: list[torch.Tensor], device: str,
                         autocast: torch.dtype | None) -> tuple[list[torch.Tensor], list[dict[int, dict]]]:
    """Hidden states ``[b, seq, d]`` entering decoder layer 0 for every batch, and the keyword arguments
    (masks, position ids / embeddings) each layer receives, per batch size.

    Keyword arguments may differ between layers (sliding-window layers get their own mask and rotary
    tables), so they are recorded for every layer, once per distinct batch size, from a forward in which
    layer 0 runs and every later layer passes its input through in layer 0's output structure (the
    model builds each layer's arguments before calling it; nothing after the last layer runs).
    """
    _, layers = find_decoder_layers(model)
    inps: list[torch.Tensor] = []
    layer_kws: list[dict[int, dict]] = [dict() for _ in layers]

    def stop_at_first(mod, args, kwargs):
        inps.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _Capture

    def record(i, bs):
        def fn(mod, args, kwargs):
            layer_kws[i][bs] = _clean_kwargs(kwargs)
            if i == len(layers) - 1:
                raise _Capture
        return fn

    first_out = []

    def passthrough(*args, **kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        out = first_out[0]
        return hs if isinstance(out, torch.Tensor) else (hs, *out[1:])

    moved = _move_non_layer_modules(model, layers, device)
    try:
        for ids in batches:
            bs = ids.shape[0]
            if bs not in layer_kws[0]:
                first_out.clear()
                hs = [layer.register_forward_pre_hook(record(i, bs), with_kwargs=True) for i, layer in enumerate(layers)]
                hs.append(layers[0].register_forward_hook(lambda m, a, o: first_out.append(o)))
                for layer in layers[1:]:
                    layer.forward = passthrough
                try:
                    with _autocast(device, autocast):
                        if device == "cpu":
                            model(input_ids=ids.to(device), use_cache=False)
                        else:
                            _forward_streaming(model, layers[:1], ids.to(device), device)
                except _Capture:
                    pass
                finally:
                    for h in hs:
                        h.remove()
                    for layer in layers[1:]:
                        del layer.forward
            h = layers[0].register_forward_pre_hook(stop_at_first, with_kwargs=True)
            try:
                with _autocast(device, autocast):
                    model(input_ids=ids.to(device), use_cache=False)
            except _Capture:
                pass
            finally:
                h.remove()
    finally:
        if device != "cpu":
            for m in moved:
                m.to("cpu")
    return inps, layer_kws


def _forward_streaming(model, layers, ids, device):
    """A full forward with each of ``layers`` moved to ``device`` only while it runs."""
    def arrive(m, args):            # hooks return None: a returned value would replace inputs/outputs
        m.to(device)

    def leave(m, args, out):
        m.to("cpu")

    hooks = [layer.register_forward_pre_hook(arrive) for layer in layers]
    hooks += [layer.register_forward_hook(leave) for layer in layers]
    try:
        return model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()


def _move_non_layer_modules(model, layers, device) -> list[nn.Module]:
    if device == "cpu":
        return []
    moved = []
    layer_ids = {id(layer) for layer in layers}
    for name, mod in model.named_modules():
        if id(mod) in layer_ids or mod is model:
            continue
        if any(p.device.type != torch.device(device).type for p in mod.parameters(recurse=False)) or \
                any(b.device.type != torch.device(device).type for b in mod.buffers(recurse=False)):
            mod.to(device)
            moved.append(mod)
    return moved


def _autocast(device: str, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device_type=torch.device(device).type, enabled=False)
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_finite(t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise NumericalError(f"NaN/Inf activations at {where}; load the model in float32 (--dtype float32) "
                             "or check the model's weights")


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    calib: torch.Tensor | None,
    settings: GPTQSettings,
    method: str = "gptq",
    device: str = "cpu",
    batch_size: int = 8,
    on_step: Callable[[str, int, int], None] | None = None,
) -> QuantizeResult:
    """Quantize every linear layer of every decoder layer of ``model`` in place (weights become their
    dequantized values) and return the packed-ready results. ``calib [n, seq]`` token ids (GPTQ only)."""
    prefix, layers = find_decoder_layers(model)
    check_packable(model, settings.args.bits)
    result = QuantizeResult()
    n_layers = len(layers)

    if method == "rtn":
        for i, layer in enumerate(layers):
            t0 = time.perf_counter()
            for name, m in find_linears(layer).items():
                t1 = time.perf_counter()
                W = weight_matrix(m).detach().to(device).float()
                qw, Q = rtn(W, settings.args)
                set_weight_matrix(m, Q.to(m.weight.device))
                qw = _to_cpu(qw, m)
                full = f"{prefix}.{i}.{name}"
                result.quantized[full] = qw
                loss = float(((W - Q) ** 2).sum())
                result.records.append(ModuleRecord(full, tuple(W.shape), loss, None, None, 0, time.perf_counter() - t1))
            result.layer_seconds.append(time.perf_counter() - t0)
            if on_step:
                on_step(f"layer {i}", i + 1, n_layers)
        return result

    if calib is None:
        raise ValueError("GPTQ needs calibration token ids")
    batches = list(calib.split(batch_size))
    ntokens = calib.numel()
    inps, layer_kws = capture_layer_inputs(model, batches, device, settings.compute_dtype)
    for b, x in enumerate(inps):
        _check_finite(x, f"the input of {prefix}.0")

    traced: dict[tuple, list] = {}      # layers of one class with the same linears share one tracing
    for i, layer in enumerate(layers):
        t0 = time.perf_counter()
        layer.to(device)
        kws = [layer_kws[i][x.shape[0]] for x in inps]
        linears = find_linears(layer)
        key = (type(layer), tuple(linears))
        if key not in traced:
            traced[key] = (trace_groups(layer, (inps[0],), kws[0]),
                           StageRunner.probe(layer, linears, (inps[0],), kws[0]))
        groups, templates = traced[key]
        runner = StageRunner(layer, linears, settings.cache_budget_bytes, templates, [g.names for g in groups])
        for group in groups:
            first = linears[group.first]
            K = weight_matrix(first).shape[1]
            gp = GPTQ(K, device=device, gram_dtype=settings.hessian_dtype)

            def hook(mod, inp, gp=gp):
                gp.add_batch(inp[0])
                raise StopForward

            h = first.register_forward_pre_hook(hook)
            try:
                runner.run(inps, kws, lambda: _autocast(device, settings.compute_dtype))
            finally:
                h.remove()
            if not torch.isfinite(gp.H).all():
                raise NumericalError(f"NaN/Inf activations entering {prefix}.{i}.{group.first}; "
                                     "load the model in float32 (--dtype float32) or check its weights")
            _quantize_group(prefix, i, group.names, linears, gp, settings, result, ntokens, device)
            runner.mark_quantized(group.names)
            del gp
        outs = []
        for x, y in zip(inps, runner.run(inps, kws, lambda: _autocast(device, settings.compute_dtype))):
            y = _first(y)
            _check_finite(y, f"the output of {prefix}.{i}")
            outs.append(y.to(x.dtype) if y.dtype != x.dtype else y)
        del runner
        if device != "cpu":
            layer.to("cpu")
        inps = outs
        result.layer_seconds.append(time.perf_counter() - t0)
        if on_step:
            on_step(f"layer {i}", i + 1, n_layers)
    return result


class StageRunner:
    """Runs one decoder layer over every calibration batch, again for each true-sequential stage,
    without recomputing what earlier stages already settled.

    A *unit* is a linear layer or a direct child of the layer that holds linear layers (the attention
    block, the MLP). Once every linear layer inside a unit is quantized, the unit's output is final:
    the next pass that runs it whole records that output per batch, and later passes replace the
    unit's forward with the recorded value. So each linear layer and each attention computes about
    once per stage that needs it, instead of once per stage after it (q/k/v run once, not four times).

    A unit whose output is its last linear's output (``o_proj``, ``down_proj``; found by :meth:`probe`)
    need not run whole even once more: that linear's input is recorded in the pass that accumulates its
    Hessian, and the unit's output is then that linear applied to the recorded input (the attention
    scores are computed once per layer, not twice). Outputs are bitwise those the unit would compute
    again (same inputs, same weights). Units called other than once per forward, or beyond ``budget``
    bytes of cache, are simply recomputed.
    """

    def __init__(self, layer: nn.Module, linears: dict[str, nn.Module], budget: int,
                 templates: dict[str, tuple] | None = None, groups: list[list[str]] | None = None):
        self.layer = layer
        self.units: dict[str, nn.Module] = {**_block_units(layer, linears), **linears}
        self.inside = {n: {k for k in linears if k == n or k.startswith(n + ".")} for n in self.units}
        self.quantized: set[str] = set()
        self.cache: dict[str, list] = {}
        self.budget = budget
        self.cached_bytes = 0
        self.templates = templates or {}                # unit -> (terminal linear, extra outputs or None)
        self.term_inputs: dict[str, list] = {}          # unit -> its terminal linear's input per batch
        # linears executing before each linear, by true-sequential group order
        self.before: dict[str, set[str]] = {}
        done: set[str] = set()
        for g in groups or []:
            for n in g:
                self.before[n] = set(done)
            done.update(g)

    @staticmethod
    @torch.no_grad()
    def probe(layer: nn.Module, linears: dict[str, nn.Module], args: tuple, kwargs: dict) -> dict[str, tuple]:
        """Units whose output is (the first element of) one inner linear's output object, with any other
        output elements non-tensors: ``{unit: (linear name, other elements or None)}``."""
        units = _block_units(layer, linears)
        outs: dict[str, list] = {n: [] for n in [*units, *linears]}
        mods = {**units, **linears}
        hs = [mods[n].register_forward_hook(lambda m, a, o, n=n: outs[n].append(o)) for n in outs]
        try:
            layer(*args, **kwargs)
        except StopForward:
            return {}
        finally:
            for h in hs:
                h.remove()
        found = {}
        for n in units:
            if len(outs[n]) != 1:
                continue
            o = outs[n][0]
            head, rest = (o, None) if isinstance(o, torch.Tensor) else \
                (o[0], tuple(o[1:])) if isinstance(o, tuple) and o else (None, None)
            if rest is not None and any(isinstance(e, torch.Tensor) for e in rest):
                continue
            for k in linears:
                if k.startswith(n + ".") and len(outs[k]) == 1 and outs[k][0] is head:
                    found[n] = (k, rest)
        return found

    def mark_quantized(self, names) -> None:
        self.quantized.update(names)

    def _covered(self, name: str) -> bool:
        """Inside a unit that is already replaced by its recorded output (so it never runs)."""
        return any(name.startswith(c + ".") for c in self.cache)

    def _input_final(self, unit: str) -> bool:
        lin = self.templates[unit][0]
        return lin in self.before and self.before[lin] <= self.quantized

    def run(self, inps: list[torch.Tensor], kws: list[dict], ctx) -> list:
        ready = [n for n in self.units if n not in self.cache and self.inside[n] <= self.quantized
                 and not self._covered(n)]
        synth = [n for n in ready if n in self.term_inputs]
        want = [n for n in self.templates if n not in self.cache and n not in self.term_inputs
                and not self._covered(n) and self._input_final(n)]
        recorded: dict[str, list[list]] = {n: [[] for _ in inps] for n in ready}
        term: dict[str, list] = {n: [None] * len(inps) for n in want}
        outs = []
        for b, (x, kw) in enumerate(zip(inps, kws)):
            handles = []
            for n in ready:
                handles.append(self.units[n].register_forward_hook(
                    lambda mod, a, o, n=n, b=b: recorded[n][b].append(o)))
            for n in want:      # before any hook that stops the forward at this linear
                handles.append(self.units[self.templates[n][0]].register_forward_pre_hook(
                    lambda mod, a, n=n, b=b: term[n].__setitem__(b, a[0]), prepend=True))
            for n, values in self.cache.items():
                self.units[n].forward = (lambda *a, _v=values[b], **k: _v)
            for n in synth:
                lin, rest = self.templates[n]
                self.units[n].forward = (lambda *a, _m=self.units[lin], _x=self.term_inputs[n][b], _r=rest, **k:
                                         _m(_x) if _r is None else (_m(_x), *_r))
            try:
                with ctx():
                    outs.append(self.layer(x, **kw))
            except StopForward:
                outs.append(None)
            finally:
                for h in handles:
                    h.remove()
                for n in [*self.cache, *synth]:
                    self.units[n].__dict__.pop("forward", None)
        for n in want:
            size = sum(_nbytes(t) for t in term[n])
            if all(t is not None for t in term[n]) and self.cached_bytes + size <= self.budget:
                self.term_inputs[n] = term[n]
                self.cached_bytes += size
        for n in ready:
            calls = recorded[n]
            if all(len(c) == 1 for c in calls):
                size = sum(_nbytes(c[0]) for c in calls)
                if self.cached_bytes + size <= self.budget:
                    self.cache[n] = [c[0] for c in calls]
                    self.cached_bytes += size
        # a unit inside a replaced unit never runs again: drop its recording; so are replaced units' inputs
        for n in [n for n in self.cache if self._covered(n)]:
            self.cached_bytes -= sum(_nbytes(v) for v in self.cache.pop(n))
        for n in [n for n in self.term_inputs if n in self.cache]:
            self.cached_bytes -= sum(_nbytes(v) for v in self.term_inputs.pop(n))
        return outs


def _block_units(layer: nn.Module, linears: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Direct children of ``layer`` that hold linear layers (the attention block, the MLP)."""
    return {n: m for n, m in layer.named_children() if any(k.startswith(n + ".") for k in linears)}


def _nbytes(o) -> int:
    if isinstance(o, torch.Tensor):
        return o.numel() * o.element_size()
    if isinstance(o, (tuple, list)):
        return sum(_nbytes(v) for v in o)
    return 0


def _to_cpu(qw: QuantizedWeight, m: nn.Module) -> QuantizedWeight:
    bias = getattr(m, "bias", None)
    return QuantizedWeight(qw.q.cpu(), qw.scale.cpu(), qw.zero.cpu(), qw.g_idx.cpu(), qw.bits,
                           qw.group_size, qw.sym, None if bias is None else bias.detach().cpu())


def _quantize_group(prefix, i, names, linears, gp: GPTQ, settings: GPTQSettings, result: QuantizeResult,
                    ntokens: int, device) -> None:
    """Quantize the layers that share one Hessian as one stacked matrix ``[sum N, K]``."""
    t1 = time.perf_counter()
    Ws = [weight_matrix(linears[n]).detach().to(device).float() for n in names]
    rows = [w.shape[0] for w in Ws]
    res: GPTQResult = gp.quantize(torch.cat(Ws, 0), settings.args, blocksize=settings.blocksize,
                                  percdamp=settings.percdamp, act_order=settings.act_order,
                                  static_groups=settings.static_groups)
    seconds = (time.perf_counter() - t1) / len(names)
    r0 = 0
    for n, nrows in zip(names, rows):
        sl = slice(r0, r0 + nrows)
        qw = res.qweight
        part = QuantizedWeight(qw.q[sl], qw.scale[sl], qw.zero[sl], qw.g_idx, qw.bits, qw.group_size, qw.sym)
        m = linears[n]
        set_weight_matrix(m, res.Q[sl].to(m.weight.device))
        full = f"{prefix}.{i}.{n}"
        result.quantized[full] = _to_cpu(part, m)
        result.records.append(ModuleRecord(full, (nrows, Ws[0].shape[1]), float(res.loss[sl].sum()), res.damp,
                                           res.fallback, ntokens, seconds, res.dead))
        r0 += nrows
