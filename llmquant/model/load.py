"""Load a Hugging Face causal LM from a Hub id, a local directory or a .gguf file."""
from __future__ import annotations

import contextlib
import copy
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from llmquant.errors import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    kind: str            # "gguf" | "dir" | "hub"
    path: str            # the directory (gguf: its folder) or the Hub id
    gguf_file: str | None = None

    @property
    def display(self) -> str:
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else self.path


def resolve_source(model: str) -> ModelSource:
    """Classify ``--model``; a path that does not exist is an error, not a Hub lookup."""
    p = Path(model).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise InputError(f"--model {model}: a file must be a .gguf; pass a model directory, a .gguf file or a Hub id")
        return ModelSource("gguf", str(p.parent.resolve()), p.name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise InputError(f"--model {model}: directory has no config.json, so it is not a Hugging Face model; "
                             "pass a directory written by save_pretrained, a .gguf file or a Hub id")
        return ModelSource("dir", str(p.resolve()))
    looks_like_path = (model.startswith((".", "/", "~")) or model.lower().endswith(".gguf")
                       or model.count("/") > 1 or os.sep + os.sep in model)
    if looks_like_path:
        raise InputError(f"--model {model}: no such file or directory; check the path")
    return ModelSource("hub", model)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto``: bfloat16 where the device computes it fast (CUDA, CPUs with AVX512-BF16/AMX),
    float32 otherwise."""
    if dtype in DTYPES:
        return DTYPES[dtype]
    if dtype != "auto":
        raise InputError(f"--dtype {dtype}: unknown; use auto, float32, bfloat16 or float16")
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA was requested but no CUDA device is available; use --device cpu or auto")
        return device
    if device == "cpu":
        return device
    raise InputError(f"--device {device}: unknown; use auto, cpu or cuda")


_GGUF_META_CACHE: dict[tuple, dict] = {}
_GGUF_READERS: dict[tuple, object] = {}      # read-only memory-mapped readers, per (file, size, mtime)


def _file_key(path) -> tuple:
    """Cache key of a file: its real path, size and modification time."""
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


@contextlib.contextmanager
def gguf_parse_once():
    """Parse a .gguf file's metadata once per process instead of once per transformers call.

    transformers reads the whole GGUF metadata (tokenizer vocabulary included) separately for the
    config, the tokenizer config and the model, and rebuilds gguf's tensor-name table for every
    module it maps; on SmolLM2 that is most of the load time. Within this context both are memoized:
    metadata per (file, size, mtime), name tables per (architecture, block count), and the read-only
    ``gguf.GGUFReader`` (whose Python parse of the 49k-token vocabulary is most of a load) is built once
    per file. Results are the same objects transformers would compute; caches live for the process.
    """
    patches = []
    try:
        import gguf
        import transformers.modeling_gguf_pytorch_utils as mgu
    except ImportError:
        yield
        return
    orig_load = getattr(mgu, "load_gguf_checkpoint", None)
    orig_map = getattr(gguf, "get_tensor_name_map", None)
    orig_reader = getattr(gguf, "GGUFReader", None)
    if orig_load is not None:
        def load(path, return_tensors=False, *args, **kwargs):
            if return_tensors or args or kwargs:
                return orig_load(path, return_tensors, *args, **kwargs)
            key = _file_key(path)
            if key not in _GGUF_META_CACHE:
                _GGUF_META_CACHE[key] = orig_load(path, return_tensors=False)
            return copy.deepcopy(_GGUF_META_CACHE[key])
        mgu.load_gguf_checkpoint = load
        patches.append((mgu, "load_gguf_checkpoint", orig_load))
    if orig_map is not None:
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(orig_map)
        patches.append((gguf, "get_tensor_name_map", orig_map))
    if orig_reader is not None:
        def reader(path, mode="r"):
            if mode != "r":
                return orig_reader(path, mode)
            key = _file_key(path)
            if key not in _GGUF_READERS:
                _GGUF_READERS[key] = orig_reader(path, mode)
            return _GGUF_READERS[key]
        gguf.GGUFReader = reader
        patches.append((gguf, "GGUFReader", orig_reader))
    try:
        yield
    finally:
        for mod, name, orig in patches:
            setattr(mod, name, orig)


def _hub_kwargs(source: ModelSource, trust_remote_code: bool) -> dict:
    kw: dict = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kw["gguf_file"] = source.gguf_file
    if source.kind == "hub" and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        kw["local_files_only"] = True
    return kw


def load_config(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoConfig
    try:
        with gguf_parse_once():
            return AutoConfig.from_pretrained(source.path, **_hub_kwargs(source, trust_remote_code))
    except (OSError, ValueError) as e:
        if source.kind == "hub":
            raise InputError(f"--model {source.path}: not a local path and not found in the Hugging Face cache "
                             f"({_first_line(e)}); download it first or pass a local directory") from None
        raise InputError(f"--model {source.display}: cannot read its config ({_first_line(e)})") from None


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    try:
        with gguf_parse_once():
            return AutoTokenizer.from_pretrained(source.path, **_hub_kwargs(source, trust_remote_code))
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"--model {source.display}: cannot load its tokenizer ({_first_line(e)}); "
                         "the model directory needs tokenizer files") from None


def load_causal_lm(source: ModelSource, dtype: torch.dtype, trust_remote_code: bool = False):
    """The dense model on CPU in ``dtype``, eval mode, KV cache off. GGUF weights are dequantized."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = load_config(source, trust_remote_code)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise InputError(f"--model {source.display}: model type '{config.model_type}' is not a causal language model; "
                         "llmquant quantizes AutoModelForCausalLM models")
    try:
        with gguf_parse_once():
            model = AutoModelForCausalLM.from_pretrained(
                source.path, dtype=dtype, low_cpu_mem_usage=True, **_hub_kwargs(source, trust_remote_code))
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"--model {source.display}: cannot load the weights ({_first_line(e)})") from None
    if source.kind == "gguf":
        # The GGUF weights were dequantized: the model is dense now; forget the gguf marker.
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
    model.eval()
    model.config.use_cache = False
    return model


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__
