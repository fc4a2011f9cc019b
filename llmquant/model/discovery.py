"""Find decoder layers and linear layers generically (no per-architecture tables).

* decoder layers: the ``nn.ModuleList`` of identical blocks whose length is the config's layer count
  (``num_hidden_layers`` / ``n_layer`` / ...), else the longest homogeneous ``ModuleList``.
* linear layers: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2; weight stored ``[in, out]``).
* quantization order: found by running the layer once and watching which linear layers read which
  input tensor. Layers reading the same tensor (q/k/v, gate/up) form one group sharing one Hessian;
  groups come in execution order (attention inputs, attention output, MLP inputs, MLP output).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmquant.errors import InputError

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

LINEAR_TYPES = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(qualified name, ModuleList)`` of the decoder blocks."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    want = next((getattr(cfg, k) for k in _LAYER_COUNT_KEYS if cfg is not None and isinstance(getattr(cfg, k, None), int)), None)
    candidates = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            types = {type(m) for m in mod}
            if len(types) == 1 and any(isinstance(m, LINEAR_TYPES) for m in mod[0].modules()):
                candidates.append((name, mod))
    if not candidates:
        raise InputError(f"{type(model).__name__}: found no stack of decoder layers with linear layers; "
                         "llmquant supports transformer causal LMs")
    exact = [c for c in candidates if want is not None and len(c[1]) == want]
    pool = exact or candidates
    return max(pool, key=lambda c: (len(c[1]), sum(p.numel() for p in c[1].parameters())))


def find_linears(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, LINEAR_TYPES)}


def weight_matrix(m: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (Conv1D stores it transposed)."""
    return m.weight.t() if (Conv1D and isinstance(m, Conv1D)) else m.weight


def set_weight_matrix(m: nn.Module, W: torch.Tensor) -> None:
    """Write ``W [out, in]`` back into the module in its own layout and dtype."""
    W = W.to(m.weight.dtype)
    with torch.no_grad():
        m.weight.copy_(W.t() if (Conv1D and isinstance(m, Conv1D)) else W)


def in_out_features(m: nn.Module) -> tuple[int, int]:
    W = weight_matrix(m)
    return W.shape[1], W.shape[0]


@dataclass
class LinearGroup:
    """Linear layers reading one input tensor, in call order."""
    names: list[str]

    @property
    def first(self) -> str:
        return self.names[0]


class StopForward(Exception):
    """Raised from a hook to end a layer's forward early once its inputs are captured."""


def trace_groups(layer: nn.Module, args: tuple, kwargs: dict) -> list[LinearGroup]:
    """Run ``layer(*args, **kwargs)`` once; group its linear layers by the tensor they read."""
    linears = find_linears(layer)
    seen: list[tuple[torch.Tensor, list[str]]] = []     # keeps inputs alive so ids are not reused
    handles = []

    def hook(name):
        def fn(mod, inp):
            x = inp[0]
            for t, names in seen:
                if t is x:
                    names.append(name)
                    return
            seen.append((x, [name]))
        return fn

    for name, m in linears.items():
        handles.append(m.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            layer(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups = [LinearGroup(names) for _, names in seen]
    called = {n for g in groups for n in g.names}
    missing = [n for n in linears if n not in called]
    if missing:
        # never called in this forward (e.g. unused experts): quantize them last, each on its own
        groups += [LinearGroup([n]) for n in missing]
    return groups
