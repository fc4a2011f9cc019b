"""``load(path)``: a runnable transformers model from a dense model, a .gguf or a quantized checkpoint.

==========================================  =================================================
``path``                                    result
==========================================  =================================================
``.gguf`` file, HF dir without quant config  the dense model (``llmquant.model.load``)
dir with ``quant_method: gptq``             skeleton from config + :class:`QuantLinear` for every
  (ours, GPTQModel, AutoGPTQ; v1/v2)          ``<prefix>.qweight`` in the safetensors
dir with another ``quant_method``           the loader registered for it
                                              (:mod:`llmquant.runtime.registry`)
==========================================  =================================================

The skeleton is built with parameters on the meta device (no dense weight is ever allocated for a
quantized layer); every tensor of the checkpoint is then checked against the skeleton (missing,
unexpected, shapes vs ``bits`` / ``group_size`` / in and out features) and any disagreement is a
one-line :class:`~llmquant.errors.CheckpointError` naming the file and the fix.
"""
from __future__ import annotations

import importlib
import json
import math
import os
from pathlib import Path

import torch

from llmquant.errors import CheckpointError, InputError
from llmquant.runtime import registry
from llmquant.runtime.kernels import KERNELS
from llmquant.runtime.qlinear import QuantLinear

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
QUANT_CONFIG_FILE = "quantize_config.json"
GPTQ_FORMATS = ("gptq", "gptq_v2")
GPTQ_BITS = (2, 3, 4, 8)
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")   # old HF buffers


# ----------------------------------------------------------------------------- config

def read_config(path: Path) -> dict:
    cfg = path / "config.json"
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e}); the checkpoint is corrupted, re-export it") from None


def quant_config_of(path: Path, config: dict) -> dict | None:
    """``quantization_config`` from ``config.json``, else AutoGPTQ's ``quantize_config.json``, else None."""
    qc = config.get("quantization_config")
    if qc:
        return dict(qc)
    qfile = path / QUANT_CONFIG_FILE
    if qfile.is_file():
        try:
            qc = json.loads(qfile.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{qfile}: not valid JSON ({e}); the checkpoint is corrupted, re-export it") from None
        qc = dict(qc)
        qc.setdefault("quant_method", "gptq")
        return qc
    return None


def resolve_load_dtype(dtype, device: str) -> torch.dtype:
    from llmquant.model.load import resolve_dtype
    if isinstance(dtype, torch.dtype):
        return dtype
    return resolve_dtype(dtype, device)


# ----------------------------------------------------------------------------- tensors

def weight_files(path: Path) -> list[Path]:
    index = path / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({type(e).__name__}: {e}); "
                                  "the checkpoint is corrupted, re-export it") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {WEIGHTS_INDEX_NAME} is missing; copy the complete checkpoint")
        return files
    single = path / WEIGHTS_NAME
    if single.is_file():
        return [single]
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        return [path / f for f in others]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise CheckpointError(f"{path}: weights are pickled (.bin/.pt), which llmquant does not load; "
                              "convert them to safetensors")
    raise CheckpointError(f"{path}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}; pass a complete checkpoint directory")


def read_tensors(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors (memory-mapped where possible) and the file each came from."""
    from safetensors.torch import load_file
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except Exception as e:  # SafetensorError, OSError, ...: truncated or corrupted
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise CheckpointError(f"{f}: cannot read the safetensors file ({msg}); it is truncated or corrupted, "
                                  "copy or re-export it") from None
        for k, v in part.items():
            tensors[k] = v
            origin[k] = f
    return tensors, origin


def check_safetensors(path: Path) -> None:
    """Open every safetensors file of a dense dir (header + size) so damage is named, not a traceback."""
    if not any(path.glob("*.safetensors")) and not (path / WEIGHTS_INDEX_NAME).is_file():
        return                                   # e.g. a .bin-only dir: transformers decides
    from safetensors import safe_open
    for f in weight_files(path):
        try:
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    h.get_slice(k)
        except Exception as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise CheckpointError(f"{f}: cannot read the safetensors file ({msg}); it is truncated or corrupted, "
                                  "copy or re-export it") from None


# ----------------------------------------------------------------------------- skeleton

def build_skeleton(path: Path, dtype: torch.dtype, trust_remote_code: bool = False):
    """The model from ``config.json`` with parameters on the meta device (buffers are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{path / 'config.json'}: cannot build the model config ({msg}); fix config.json") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config      # transformers' own GPTQ integration would need gptqmodel
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model


def _linear_shape(module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    return None


def _set_module(model, name: str, new) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# ----------------------------------------------------------------------------- GPTQ

def gptq_settings(qc: dict, cfg_file: Path) -> tuple[int, int, str]:
    try:
        bits = int(qc["bits"])
        group_size = int(qc.get("group_size", -1))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{cfg_file}: quantization_config lacks an integer 'bits'; fix the config") from None
    if bits not in GPTQ_BITS:
        raise CheckpointError(f"{cfg_file}: bits={bits} is not a GPTQ width; llmquant runs {GPTQ_BITS}")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in GPTQ_FORMATS:
        raise CheckpointError(f"{cfg_file}: checkpoint_format '{fmt}' is not supported; llmquant runs gptq and "
                              "gptq_v2 (convert marlin/other layouts with GPTQModel first)")
    return bits, group_size, fmt


def _expect(cond: bool, where: Path, msg: str) -> None:
    if not cond:
        raise CheckpointError(f"{where}: {msg}; the tensors disagree with config.json, re-export the checkpoint "
                              "or fix its quantization_config")


def load_gptq(path: Path, config: dict, qc: dict, *, device: str, dtype: torch.dtype, kernel: str,
              trust_remote_code: bool = False, max_m: int | None = None):
    cfg_file = path / "config.json"
    bits, group_size, fmt = gptq_settings(qc, cfg_file)
    tensors, origin = read_tensors(weight_files(path))
    model = build_skeleton(path, dtype, trust_remote_code)
    prefixes = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if not prefixes:
        raise CheckpointError(f"{path}: quantization_config says gptq but no tensor ends in .qweight; "
                              "the checkpoint is not a GPTQ checkpoint or is incomplete")
    consumed: set[str] = set()
    for name in prefixes:
        f = origin[f"{name}.qweight"]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{f}: tensor {name}.qweight names a module the {config.get('model_type')} model "
                                  "does not have; the checkpoint belongs to another architecture") from None
        shape = _linear_shape(module)
        if shape is None:
            raise CheckpointError(f"{f}: {name} is a {type(module).__name__}, not a linear layer; "
                                  "the checkpoint belongs to another architecture")
        K, N = shape
        t = {}
        for part in ("qweight", "qzeros", "scales"):
            key = f"{name}.{part}"
            if key not in tensors:
                raise CheckpointError(f"{f}: {name} has .qweight but no .{part}; the checkpoint is incomplete, re-export it")
            t[part] = tensors[key]
            consumed.add(key)
        gs = group_size if 0 < group_size < K else K
        G = math.ceil(K / gs)
        words = K * bits / 32
        _expect(t["qweight"].dtype == torch.int32, f, f"{name}.qweight is {t['qweight'].dtype}, GPTQ packs int32")
        _expect(tuple(t["qweight"].shape) == (words, N), f,
                f"{name}.qweight has shape {tuple(t['qweight'].shape)} but bits={bits} with in_features={K}, "
                f"out_features={N} needs ({words:g}, {N})")
        _expect(tuple(t["scales"].shape) == (G, N), f,
                f"{name}.scales has shape {tuple(t['scales'].shape)} but group_size={group_size} over "
                f"in_features={K}, out_features={N} needs ({G}, {N})")
        _expect(tuple(t["qzeros"].shape) == (G, N * bits / 32) and t["qzeros"].dtype == torch.int32, f,
                f"{name}.qzeros has shape {tuple(t['qzeros'].shape)} but bits={bits}, {G} groups, "
                f"out_features={N} need int32 ({G}, {N * bits / 32:g})")
        g_idx = tensors.get(f"{name}.g_idx")
        if g_idx is not None:
            consumed.add(f"{name}.g_idx")
            _expect(tuple(g_idx.shape) == (K,), f, f"{name}.g_idx has shape {tuple(g_idx.shape)}, expected ({K},)")
            if K:
                lo, hi = int(g_idx.min()), int(g_idx.max())
                _expect(lo >= 0 and hi < G, f, f"{name}.g_idx values span [{lo}, {hi}] but there are {G} groups")
        bias = tensors.get(f"{name}.bias")
        if bias is not None:
            consumed.add(f"{name}.bias")
            _expect(tuple(bias.shape) == (N,), f, f"{name}.bias has shape {tuple(bias.shape)}, expected ({N},)")
            bias = bias.to(dtype)
        if not torch.isfinite(t["scales"]).all():
            raise CheckpointError(f"{f}: {name}.scales holds NaN/Inf; the checkpoint is corrupted, re-export it")
        ql = QuantLinear.from_gptq(t["qweight"], t["qzeros"], t["scales"], g_idx, bits=bits, group_size=group_size,
                                   in_features=K, checkpoint_format=fmt, bias=bias, kernel=kernel,
                                   device=device, max_m=max_m)
        _set_module(model, name, ql)
    _load_rest(model, path, {k: v for k, v in tensors.items() if k not in consumed}, origin, dtype)
    model.llmquant_quant_config = dict(qc, checkpoint_format=fmt)
    return _finish(model, device)


def _load_rest(model, path: Path, rest: dict[str, torch.Tensor], origin: dict[str, Path], dtype) -> None:
    """Load the dense tensors into the skeleton, checking names and shapes; tie embeddings."""
    expected = {k: v for k, v in model.state_dict().items()}
    unexpected = [k for k in rest if k not in expected and not k.endswith(_IGNORED_SUFFIXES)]
    if unexpected:
        f = origin[unexpected[0]]
        more = f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{f}: unexpected tensor {unexpected[0]}{more} that the model does not have; "
                              "the checkpoint belongs to another architecture or config.json was edited")
    for k, v in rest.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{origin[k]}: {k} has shape {tuple(v.shape)} but config.json implies "
                                  f"{tuple(expected[k].shape)}; the config disagrees with the tensors, fix config.json")
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in rest.items() if k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [n for n, b in model.named_buffers() if b.is_meta]
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: tensor {missing[0]}{more} is missing from the safetensors files; "
                              "the checkpoint is incomplete, copy or re-export it")


def _finish(model, device: str):
    if device != "cpu":
        model.to(device)
    model.eval()
    model.config.use_cache = True
    return model


# ----------------------------------------------------------------------------- other methods

def _load_w8a8(path: Path, config: dict, qc: dict, *, device: str, dtype: torch.dtype, kernel: str,
               trust_remote_code: bool = False, max_m: int | None = None):
    """``llmquant_w8a8``: ``llmquant.ptq.checkpoint.apply_w8a8(model, tensors, quant_config)`` replaces
    its layers in the meta skeleton and removes the tensors it used from ``tensors``; the rest loads here."""
    try:
        mod = importlib.import_module("llmquant.ptq.checkpoint")
        apply = mod.apply_w8a8
    except (ImportError, AttributeError):
        raise CheckpointError(f"{path}: quant_method llmquant_w8a8 needs llmquant.ptq.checkpoint.apply_w8a8, "
                              "which this installation lacks; update llmquant") from None
    tensors, origin = read_tensors(weight_files(path))
    model = build_skeleton(path, dtype, trust_remote_code)
    returned = apply(model, tensors, qc)
    if returned is not None:
        model = returned
    _load_rest(model, path, tensors, origin, dtype)
    model.llmquant_quant_config = dict(qc)
    return _finish(model, device)


registry.register_loader("gptq", load_gptq)
registry.register_loader("llmquant_w8a8", _load_w8a8)


# ----------------------------------------------------------------------------- entry point

def load(path: str | os.PathLike, device: str = "auto", dtype: str | torch.dtype = "auto",
         kernel: str = "auto", trust_remote_code: bool = False, max_m: int | None = None):
    """Load a dense model (HF dir, .gguf) or a quantized checkpoint dir, ready to run (eval mode).

    ``device``: ``auto`` | ``cpu`` | ``cuda[:i]``. ``dtype``: ``auto`` (bfloat16 where the device
    computes it fast, else float32) or a dtype/name for the non-quantized parts and activations.
    ``kernel``: one of ``auto``, ``reference``, ``dequant``, ``int4`` (see ``llmquant.runtime.kernels``).
    """
    from llmquant.model.load import load_causal_lm, resolve_device, resolve_source
    if kernel not in KERNELS:
        raise InputError(f"--kernel {kernel}: unknown; use one of {', '.join(KERNELS)}")
    device = resolve_device(device)
    torch_dtype = resolve_load_dtype(dtype, device)
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory; check the path")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise CheckpointError(f"{p}: not a model; pass a checkpoint directory or a .gguf file")
        return _finish(load_causal_lm(resolve_source(str(p)), torch_dtype, trust_remote_code), device)
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p}: no config.json, so this directory is not a model checkpoint; "
                              "pass a directory written by llmquant, save_pretrained or GPTQModel")
    config = read_config(p)
    qc = quant_config_of(p, config)
    if not qc:
        check_safetensors(p)
        return _finish(load_causal_lm(resolve_source(str(p)), torch_dtype, trust_remote_code), device)
    method = str(qc.get("quant_method") or "gptq").lower()
    fn = registry.get_loader(method)
    if fn is None:
        raise CheckpointError(f"{p / 'config.json'}: quant_method '{method}' is not supported; llmquant loads "
                              f"{', '.join(registry.registered())} checkpoints")
    return fn(p, config, qc, device=device, dtype=torch_dtype, kernel=kernel,
              trust_remote_code=trust_remote_code, max_m=max_m)


# ----------------------------------------------------------------------------- helpers

def quant_linears(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@torch.no_grad()
def to_dense(model, dtype: torch.dtype = torch.float32):
    """Replace every :class:`QuantLinear` by an ``nn.Linear`` holding its dequantized weight (in place)."""
    for name, ql in quant_linears(model).items():
        lin = torch.nn.Linear(ql.in_features, ql.out_features, bias=ql.bias is not None, dtype=dtype)
        lin.weight.copy_(ql.dequantize().to(dtype))
        if ql.bias is not None:
            lin.bias.copy_(ql.bias.to(dtype))
        _set_module(model, name, lin)
    return model


def quantized_weight_bytes(model) -> tuple[int, int]:
    """``(resident bytes of quantized weights, their float16 size)`` over all QuantLinear layers."""
    q = fp16 = 0
    for ql in quant_linears(model).values():
        q += ql.weight_bytes()
        fp16 += ql.in_features * ql.out_features * 2
    return q, fp16
