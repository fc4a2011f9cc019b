"""W8A8 checkpoints: ``save_w8a8`` writes a directory, ``apply_w8a8`` rebuilds the layers on load.

Directory (written atomically: a temp dir in the same parent, then renamed)::

    config.json            the model config + quantization_config {quant_method: "llmquant_w8a8", ...}
    model.safetensors      dense tensors of the model, and per quantized linear <name>:
                             <name>.qweight       [N, K] int8
                             <name>.weight_scale  [N]    float32
                             <name>.input_scale   []     float32   (static only)
                             <name>.bias          [N]              (if the layer has one)
                             <name>.rotation      [m, m] float32   (layers in quantization_config
                                                                    "rotated": input rotation factor;
                                                                    checkpoints without it load as before)
    tokenizer files, generation_config.json, quant_report.json

The runtime loader (:mod:`llmquant.runtime.loader`, registry key ``llmquant_w8a8``) builds the model
skeleton from ``config.json``, calls :func:`apply_w8a8` and loads the remaining tensors.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from llmquant.errors import CheckpointError, InputError
from llmquant.ptq.linear import W8A8Linear

QUANT_METHOD = "llmquant_w8a8"
WEIGHTS_NAME = "model.safetensors"
REPORT_FILE = "quant_report.json"


def _tied_duplicates(model, state: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensor shares storage with an earlier key (tied embeddings)."""
    seen, dup = {}, []
    for k, v in state.items():
        key = (v.data_ptr(), v.shape, v.dtype) if v.numel() else None
        if key is not None and key in seen:
            dup.append(k)
        elif key is not None:
            seen[key] = k
    return dup


def save_w8a8(model, out_dir: str | os.PathLike, *, tokenizer=None, report: dict | None = None,
              overwrite: bool = False) -> Path:
    """Write a W8A8 model (its decoder linears already :class:`W8A8Linear`) to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser().absolute()
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise InputError(f"output {out} exists; pass --overwrite to replace it")
    qc = getattr(model.config, "quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise InputError("the model has no llmquant_w8a8 quantization_config; quantize it with quantize_w8a8 first")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for k in _tied_duplicates(model, state):
        del state[k]
    tensors = {k: v.contiguous() for k, v in sorted(state.items())}
    config = model.config.to_dict()
    config["quantization_config"] = qc
    config["use_cache"] = True
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
        if out.exists() or out.is_symlink():
            aside = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, aside)
            os.rename(tmp, out)
            shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink()
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _features(module) -> tuple[int, int]:
    """``(in, out)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (works on the meta device)."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[0], module.weight.shape[1]
    raise CheckpointError(f"module {type(module).__name__} is not a linear layer; config.json modules list is wrong")


def apply_w8a8(model, tensors: dict[str, torch.Tensor], quant_config: dict):
    """Replace the layers named in ``quant_config["modules"]`` with :class:`W8A8Linear` filled from
    ``tensors``; the tensors used are removed from ``tensors``. Returns the model."""
    modules = quant_config.get("modules")
    mode = quant_config.get("mode", "dynamic")
    if not isinstance(modules, list) or not modules:
        raise CheckpointError("quantization_config has no 'modules' list; the llmquant_w8a8 checkpoint is incomplete")
    if mode not in ("dynamic", "static"):
        raise CheckpointError(f"quantization_config mode {mode!r} is unknown; expected dynamic or static")
    static = mode == "static"
    rotated = quant_config.get("rotated", [])
    if not isinstance(rotated, list) or any(n not in modules for n in rotated):
        raise CheckpointError("quantization_config 'rotated' must list layers of 'modules'; config.json was edited")
    rotated = set(rotated)
    named = dict(model.named_modules())
    for name in modules:
        if name not in named:
            raise CheckpointError(f"layer {name} of quantization_config is not in the model; config.json was edited")
        K, N = _features(named[name])
        rot = name in rotated
        need = ["qweight", "weight_scale"] + (["input_scale"] if static else []) + (["rotation"] if rot else [])
        for part in need:
            if f"{name}.{part}" not in tensors:
                raise CheckpointError(f"tensor {name}.{part} is missing; the checkpoint is incomplete, re-export it")
        qw, ws = tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.weight_scale")
        if tuple(qw.shape) != (N, K) or qw.dtype != torch.int8 or tuple(ws.shape) != (N,):
            raise CheckpointError(f"layer {name}: qweight {tuple(qw.shape)} {qw.dtype} / weight_scale {tuple(ws.shape)} "
                                  f"do not match the layer ({N}, {K}); the checkpoint does not match config.json")
        bias = tensors.pop(f"{name}.bias", None)
        m = W8A8Linear(K, N, bias=bias is not None, static=static,
                       dtype=bias.dtype if bias is not None else torch.float32, rotated=rot)
        if rot:
            R = tensors.pop(f"{name}.rotation").float()
            if tuple(R.shape) != tuple(m.rotation.shape):
                raise CheckpointError(f"layer {name}: rotation {tuple(R.shape)} does not fit the input width {K} "
                                      f"(expected {tuple(m.rotation.shape)}); the checkpoint does not match config.json")
            m.rotation = R
        m.qweight = qw
        m.weight_scale = ws.float()
        if static:
            m.input_scale = tensors.pop(f"{name}.input_scale").float().reshape(())
        if bias is not None:
            m.bias = torch.nn.Parameter(bias, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, m)
    return model
