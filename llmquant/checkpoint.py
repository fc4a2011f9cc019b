"""Write (and read back) a GPTQ checkpoint directory that GPTQModel / transformers / vLLM load.

The on-disk contract is in ``docs/FORMAT.md``. Per quantized linear ``<name>``:

==================  ===================  =========  ==========================================
tensor              shape                dtype      content
==================  ===================  =========  ==========================================
``<name>.qweight``  ``[K*bits/32, N]``   int32      codes packed along K (``pack_rows``)
``<name>.qzeros``   ``[G, N*bits/32]``   int32      zero points packed along N (``pack_cols``);
                                                    ``gptq``: ``z - 1``, ``gptq_v2``: ``z``
``<name>.scales``   ``[G, N]``           float16    group steps
``<name>.g_idx``    ``[K]``              int32      group of each input column
``<name>.bias``     ``[N]``              saved      only if the layer has a bias
==================  ===================  =========  ==========================================

``K`` = in features, ``N`` = out features, ``G = ceil(K / group_size)`` (1 when ``group_size`` is -1).
Everything else of the state dict is stored in the saved dtype (float16, or bfloat16 when the
model's config says bfloat16, or ``dtype``). Linears of the quantized blocks that are not in
``quantized`` stay dense and are listed in ``quantization_config["dynamic"]`` as ``"-:^name$"``
(GPTQModel / vLLM: do not quantize). The directory is written atomically: a temp dir in
the same parent, fsynced, then renamed onto ``out_dir``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmquant import __version__
from llmquant.core.pack import SUPPORTED_BITS, pack_cols, pack_rows, unpack_cols, unpack_rows
from llmquant.core.qtensor import QuantizedWeight
from llmquant.errors import CheckpointError, InputError, NumericalError

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
QUANT_CONFIG_FILE = "quantize_config.json"
REPORT_FILE = "quant_report.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
META_URI = "https://github.com/llmquant/llmquant"
FP16_MAX = 65504.0


@dataclass
class SaveResult:
    """What :func:`save_gptq_checkpoint` wrote."""

    path: Path
    files: list[str]
    total_bytes: int                  # all files in the directory
    weight_bytes: int                 # safetensors files only
    n_quantized: int
    n_tensors: int
    shards: int
    dtype: str
    quantization_config: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- tensors of one layer

def gptq_layer_tensors(name: str, qw: QuantizedWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """The four GPTQ tensors of one layer (bias excluded) from a :class:`QuantizedWeight`.

    ``qw`` is in ``[out, in]`` orientation: ``q [N, K]``, ``scale``/``zero`` ``[N, G]``.
    Raises :class:`InputError` naming the layer when the shapes cannot be packed, and when a
    ``gptq`` (v1) save meets a zero point of 0 (v1 stores ``z - 1``; use ``gptq_v2``).
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise InputError(f"checkpoint format {checkpoint_format!r} is unknown; use one of {', '.join(CHECKPOINT_FORMATS)}")
    bits = qw.bits
    if bits not in SUPPORTED_BITS:
        raise InputError(f"layer {name}: {bits}-bit weights cannot be stored as GPTQ; use one of {SUPPORTED_BITS} bits")
    if qw.q.dim() != 2:
        raise InputError(f"layer {name}: q must be 2-D [out, in], got shape {tuple(qw.q.shape)}")
    N, K = qw.q.shape
    G = qw.scale.shape[1] if qw.scale.dim() == 2 else -1
    if qw.scale.shape != (N, G) or qw.zero.shape != (N, G):
        raise InputError(f"layer {name}: scale {tuple(qw.scale.shape)} and zero {tuple(qw.zero.shape)} "
                         f"must both be [out={N}, groups]")
    expected_g = 1 if qw.group_size in (-1, 0) or qw.group_size >= K else math.ceil(K / qw.group_size)
    if G != expected_g:
        raise InputError(f"layer {name}: {G} groups but group_size {qw.group_size} over {K} inputs needs {expected_g}")
    g_idx = qw.g_idx.to(torch.int64).reshape(-1)
    if g_idx.numel() != K:
        raise InputError(f"layer {name}: g_idx has {g_idx.numel()} entries, expected one per input column ({K})")
    if K and (int(g_idx.min()) < 0 or int(g_idx.max()) >= G):
        raise InputError(f"layer {name}: g_idx values must lie in [0, {G - 1}]")
    maxq = 2**bits - 1
    q = qw.q.to(torch.int64)
    zero = qw.zero
    if zero.dtype.is_floating_point:
        if not torch.equal(zero, zero.round()):
            raise InputError(f"layer {name}: zero points must be integers for a GPTQ checkpoint")
    zero = zero.to(torch.int64)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > maxq):
        raise InputError(f"layer {name}: codes must lie in [0, {maxq}] for {bits} bits "
                         f"(got [{int(q.min())}, {int(q.max())}])")
    if zero.numel() and (int(zero.min()) < 0 or int(zero.max()) > maxq):
        raise InputError(f"layer {name}: zero points must lie in [0, {maxq}] for {bits} bits "
                         f"(got [{int(zero.min())}, {int(zero.max())}])")
    scale = qw.scale.float()
    if not torch.isfinite(scale).all():
        raise NumericalError(f"layer {name}: non-finite scales; the quantizer diverged, check the layer's weights")
    if scale.numel() and float(scale.abs().max()) > FP16_MAX:
        raise NumericalError(f"layer {name}: a scale of {float(scale.abs().max()):.4g} overflows float16 scales; "
                             "this layer cannot be stored as GPTQ")

    stored_zero = zero.t()                                            # [G, N]
    if checkpoint_format == "gptq":
        if zero.numel() and int(zero.min()) == 0:
            n0 = int((zero == 0).sum())
            raise InputError(f"layer {name}: {n0} zero point(s) equal 0, which the gptq (v1) format cannot store "
                             "(it stores zero - 1); save with checkpoint format gptq_v2")
        stored_zero = stored_zero - 1
    try:
        qweight = pack_rows(q.t(), bits)                              # [K*bits/32, N]
        qzeros = pack_cols(stored_zero, bits)                         # [G, N*bits/32]
    except ValueError as e:
        raise InputError(f"layer {name} [out={N}, in={K}]: {e}; quantize this layer with other bits "
                         "or leave it unquantized") from None
    return {
        f"{name}.qweight": qweight,
        f"{name}.qzeros": qzeros,
        f"{name}.scales": scale.t().contiguous().to(torch.float16),  # [G, N]
        f"{name}.g_idx": g_idx.to(torch.int32).contiguous(),         # [K]
    }


# ----------------------------------------------------------------------------- quantization_config

def build_quant_config(quant_config: dict, *, checkpoint_format: str, lm_head: bool) -> dict:
    """The ``quantization_config`` dict written to ``config.json`` and ``quantize_config.json``.

    ``quant_config`` needs ``bits``, ``group_size``, ``sym``, ``desc_act``; ``static_groups``
    (False), ``true_sequential`` (True) and ``damp_percent`` (0.01) have defaults; other keys pass
    through; ``meta`` is merged with llmquant's tool fingerprint.
    """
    missing = [k for k in ("bits", "group_size", "sym", "desc_act") if k not in quant_config]
    if missing:
        raise InputError(f"quant_config lacks {', '.join(missing)}; pass bits, group_size, sym and desc_act")
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise InputError(f"checkpoint format {checkpoint_format!r} is unknown; use one of {', '.join(CHECKPOINT_FORMATS)}")
    bits = int(quant_config["bits"])
    if bits not in SUPPORTED_BITS:
        raise InputError(f"bits={bits} cannot be stored as GPTQ; use one of {SUPPORTED_BITS}")
    group_size = int(quant_config["group_size"])
    if group_size != -1 and group_size <= 0:
        raise InputError(f"group_size={group_size}: use a positive size or -1 (one group per row)")
    extra = {k: v for k, v in quant_config.items() if k != "meta"}
    user_meta = dict(quant_config.get("meta") or {})
    out: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": bool(quant_config["desc_act"]),
        "sym": bool(quant_config["sym"]),
        "static_groups": bool(extra.pop("static_groups", False)),
        "true_sequential": bool(extra.pop("true_sequential", True)),
        "damp_percent": float(extra.pop("damp_percent", 0.01)),
        "lm_head": bool(lm_head),
        "format": checkpoint_format,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
    }
    for k in ("bits", "group_size", "desc_act", "sym", "quant_method", "lm_head", "format",
              "checkpoint_format", "pack_dtype"):
        extra.pop(k, None)
    out.update(extra)
    quantizers = [f"llmquant:{__version__}"]
    for q in user_meta.pop("quantizer", []) or []:
        if q not in quantizers:
            quantizers.append(q)
    out["meta"] = {
        "quantizer": quantizers,
        "uri": META_URI,
        "damp_percent": out["damp_percent"],
        "static_groups": out["static_groups"],
        "true_sequential": out["true_sequential"],
        **user_meta,
    }
    return out


def read_quant_config(path: str | os.PathLike) -> dict:
    """``quantization_config`` of a checkpoint dir (``config.json``, else ``quantize_config.json``)."""
    p = Path(path)
    cfg = p / "config.json"
    if cfg.is_file():
        try:
            qc = json.loads(cfg.read_text()).get("quantization_config")
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg}: not valid JSON ({e}); the checkpoint is corrupted, re-run the quantization") from None
        if qc:
            return qc
    qfile = p / QUANT_CONFIG_FILE
    if qfile.is_file():
        try:
            return json.loads(qfile.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{qfile}: not valid JSON ({e}); the checkpoint is corrupted, re-run the quantization") from None
    raise CheckpointError(f"{p}: no quantization_config in config.json and no {QUANT_CONFIG_FILE}; "
                          "pass a directory written by llmquant quantize (or another GPTQ tool)")


# ----------------------------------------------------------------------------- the writer

def _saved_dtype(model, dtype: torch.dtype | str | None) -> torch.dtype:
    names = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype is not None:
        if isinstance(dtype, str):
            if dtype not in names:
                raise InputError(f"dtype {dtype!r}: use float16 or bfloat16 for a GPTQ checkpoint")
            return names[dtype]
        if dtype not in (torch.float16, torch.bfloat16):
            raise InputError(f"dtype {dtype}: use torch.float16 or torch.bfloat16 for a GPTQ checkpoint")
        return dtype
    cfg_dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if cfg_dtype in (torch.bfloat16, "bfloat16"):
        return torch.bfloat16
    return torch.float16


def _tied_targets(model) -> list[str]:
    """Patterns of parameter names declared tied (their source is kept, they are dropped)."""
    pats: list[str] = []
    for mname, sub in model.named_modules():
        tied = getattr(sub, "_tied_weights_keys", None) or {}
        for k in (tied.keys() if isinstance(tied, dict) else tied):
            pats.append(f"{mname}.{k}" if mname else k)
    return pats


def _dedupe_tied(state: dict[str, torch.Tensor], model) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keep one name per shared tensor (as save_pretrained does); returns (state, dropped names)."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for k, t in state.items():
        if t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        groups[key].append(k)
    pats = _tied_targets(model)
    dropped: list[str] = []
    for names in groups.values():
        if len(names) < 2:
            continue
        keep = next((n for n in names if not any(re.search(p, n) for p in pats)), names[0])
        for n in names:
            if n != keep:
                dropped.append(n)
                del state[n]
    # tensors that still share memory (partial overlaps) are cloned so safetensors accepts them
    seen: set[int] = set()
    for k, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            state[k] = t.clone()
        seen.add(ptr)
    return state, dropped


def _module_name(model, module) -> str | None:
    for n, m in model.named_modules():
        if m is module:
            return n
    return None


def unquantized_block_linears(model, quantized) -> list[str]:
    """Linear / Conv1D modules inside the quantized blocks that stay dense.

    A block list is the part of a quantized name before its first numeric component
    (``model.layers.``); every linear under ``<list>.<i>.`` that is not in ``quantized`` is listed.
    GPTQ loaders quantize every linear of every block unless ``dynamic`` excludes it.
    """
    lists = set()
    for name in quantized:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                lists.add(".".join(parts[:i]) + ".")
                break
    out = []
    for name, mod in model.named_modules():
        if name in quantized or not (isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"):
            continue
        for p in lists:
            if name.startswith(p) and name[len(p):].split(".")[0].isdigit():
                out.append(name)
                break
    return out


def _check_module(model, name: str, qw: QuantizedWeight) -> None:
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise InputError(f"layer {name}: no such module in the model; quantized names must be module paths "
                         "like model.layers.0.self_attn.q_proj") from None
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        N, K = qw.q.shape
        expect = (K, N) if type(mod).__name__ == "Conv1D" else (N, K)
        if tuple(w.shape) != expect:
            raise InputError(f"layer {name}: quantized weight is [out={N}, in={K}] but the module's weight is "
                             f"{tuple(w.shape)}; the QuantizedWeight belongs to another layer")


def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _config_dict(model, qc: dict, dtype: torch.dtype, untie: bool) -> dict:
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    d = cfg.to_diff_dict()                          # what save_pretrained writes
    d.pop("quantization_config", None)
    d.pop("torch_dtype", None)                      # transformers >= 4.56 reads "dtype"
    d["dtype"] = str(dtype).split(".")[-1]
    d["architectures"] = [type(model).__name__]
    if "use_cache" in d:
        d["use_cache"] = True                       # llmquant's loader turns it off for calibration
    if untie:
        d["tie_word_embeddings"] = False
    d["quantization_config"] = qc
    return d


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def save_gptq_checkpoint(
    model,
    quantized: dict[str, QuantizedWeight],
    out_dir: str | os.PathLike,
    *,
    quant_config: dict,
    tokenizer=None,
    checkpoint_format: str = "gptq",
    report: dict | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
    dtype: torch.dtype | str | None = None,
) -> SaveResult:
    """Write ``model`` with the layers of ``quantized`` as a GPTQ checkpoint directory.

    ``quantized`` maps module paths (``"model.layers.0.self_attn.q_proj"``) to their
    :class:`QuantizedWeight`; those modules' dense weights are not written. See ``docs/FORMAT.md``.
    Raises :class:`InputError` if ``out_dir`` exists and ``overwrite`` is False.
    """
    from safetensors.torch import save_file
    from huggingface_hub import split_torch_state_dict_into_shards

    out = Path(out_dir).expanduser().absolute()
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise InputError(f"output {out} exists; pass --overwrite to replace it")
    if not quantized:
        raise InputError("no quantized layers to save; the quantizer produced nothing")
    save_dtype = _saved_dtype(model, dtype)

    # ---- validate and build the quantized tensors before touching the disk
    bits = int(quant_config.get("bits", -1))
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lm_head_name = _module_name(model, out_emb) if out_emb is not None else None
    qc = build_quant_config(quant_config, checkpoint_format=checkpoint_format,
                            lm_head=lm_head_name is not None and lm_head_name in quantized)
    dense = unquantized_block_linears(model, quantized)
    if dense:                       # GPTQModel / vLLM "dynamic": "-:<regex>" = leave this module dense
        dynamic = dict(qc.get("dynamic") or {})
        dynamic.update({f"-:^{re.escape(n)}$": {} for n in dense})
        qc["dynamic"] = dynamic
    qtensors: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    for name, qw in quantized.items():
        if qw.bits != bits:
            raise InputError(f"layer {name}: quantized with {qw.bits} bits but the checkpoint says {bits}; "
                             "a GPTQ checkpoint has one bit width")
        if qw.group_size != qc["group_size"] and not (qw.group_size in (-1, 0) and qc["group_size"] == -1):
            raise InputError(f"layer {name}: group_size {qw.group_size} differs from the checkpoint's "
                             f"{qc['group_size']}; a GPTQ checkpoint has one group size")
        _check_module(model, name, qw)
        qtensors.update(gptq_layer_tensors(name, qw, checkpoint_format))
        if qw.bias is not None:
            biases[f"{name}.bias"] = qw.bias.detach()

    # ---- the dense rest of the state dict
    state = {k: v.detach() for k, v in model.state_dict().items()}
    untie = False
    if qc["lm_head"] and out_emb is not None:
        in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        untie = in_emb is not None and getattr(in_emb, "weight", None) is getattr(out_emb, "weight", None)
    prefixes = tuple(f"{n}." for n in quantized)
    for k in list(state):
        if k.startswith(prefixes) and not (k.endswith(".bias") and k[: -len(".bias")] in quantized):
            del state[k]                                   # dense weight (and any wrapper buffers)
    state, _ = _dedupe_tied(state, model)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        tensors[k] = (v.to(save_dtype) if v.is_floating_point() else v).contiguous()
    for k, v in biases.items():
        tensors[k] = v.to(save_dtype).contiguous()
    for k, v in qtensors.items():
        if k in tensors:
            raise InputError(f"tensor {k} is both a model tensor and a quantized one; rename the module")
        tensors[k] = v
    tensors = {k: tensors[k] for k in sorted(tensors)}

    # ---- write into a temp dir next to out, then rename
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        split = split_torch_state_dict_into_shards(tensors, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=max_shard_size)
        for fname, names in split.filename_to_tensors.items():
            save_file({n: tensors[n] for n in names}, str(tmp / fname), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": int(split.metadata.get("total_size", 0))},
                     "weight_map": dict(sorted(split.tensor_to_filename.items()))}
            _write_json(tmp / WEIGHTS_INDEX_NAME, index)
        _write_json(tmp / "config.json", _config_dict(model, qc, save_dtype, untie))
        _write_json(tmp / QUANT_CONFIG_FILE, qc)
        gen = getattr(model, "generation_config", None)
        can_gen = getattr(model, "can_generate", lambda: False)
        if gen is not None and can_gen():
            gen.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if report is not None:
            _write_json(tmp / REPORT_FILE, report)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        for f in files:
            _fsync_path(tmp / f)
        _fsync_path(tmp)
        total = sum((tmp / f).stat().st_size for f in files)
        wbytes = sum((tmp / f).stat().st_size for f in files if f.endswith(".safetensors"))

        if out.exists() or out.is_symlink():
            aside = parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, aside)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(aside, out)
                raise
            if aside.is_dir() and not aside.is_symlink():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                aside.unlink()
        else:
            os.rename(tmp, out)
        _fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SaveResult(path=out, files=files, total_bytes=total, weight_bytes=wbytes,
                      n_quantized=len(quantized), n_tensors=len(tensors),
                      shards=len(split.filename_to_tensors), dtype=str(save_dtype).split(".")[-1],
                      quantization_config=qc)


# ----------------------------------------------------------------------------- reading back

def read_safetensors_dir(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint dir (single file or sharded with an index)."""
    from safetensors.torch import load_file

    p = Path(path)
    index = p / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e}); the checkpoint is corrupted") from None
        files = sorted(set(weight_map.values()))
    elif (p / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise CheckpointError(f"{p}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}; pass a checkpoint directory")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        fp = p / f
        if not fp.is_file():
            raise CheckpointError(f"{fp}: shard listed in the index is missing; the checkpoint is incomplete")
        try:
            out.update(load_file(str(fp)))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{fp}: cannot read ({str(e).splitlines()[0][:200]}); the file is truncated or corrupted") from None
    return out


def load_quantized_weights(path: str | os.PathLike,
                           tensors: dict[str, torch.Tensor] | None = None) -> dict[str, QuantizedWeight]:
    """Decode every GPTQ layer of a checkpoint dir back to :class:`QuantizedWeight` (``[out, in]``).

    ``gptq`` (v1) zeros are read as ``(stored + 1) mod 2^bits`` (see docs/FORMAT.md).
    """
    qc = read_quant_config(path)
    bits = int(qc["bits"])
    group_size = int(qc.get("group_size", -1))
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    sym = bool(qc.get("sym", True))
    if tensors is None:
        tensors = read_safetensors_dir(path)
    out: dict[str, QuantizedWeight] = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        try:
            qweight, qzeros = tensors[key], tensors[f"{name}.qzeros"]
            scales, g_idx = tensors[f"{name}.scales"], tensors[f"{name}.g_idx"]
        except KeyError as e:
            raise CheckpointError(f"layer {name}: missing tensor {e}; the checkpoint is incomplete") from None
        G, N = scales.shape
        K = g_idx.numel()
        try:
            q = unpack_rows(qweight, bits, K).t().contiguous()           # [N, K]
            z = unpack_cols(qzeros, bits, N)                             # [G, N]
        except ValueError as e:
            raise CheckpointError(f"layer {name}: {e}; the checkpoint does not match its quantization_config") from None
        if fmt == "gptq":
            z = (z + 1) & (2**bits - 1)
        out[name] = QuantizedWeight(
            q=q, scale=scales.float().t().contiguous(), zero=z.t().contiguous().to(torch.int32),
            g_idx=g_idx.to(torch.int32), bits=bits, group_size=group_size, sym=sym,
            bias=tensors.get(f"{name}.bias"))
    return out
