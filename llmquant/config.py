"""Typed, validated configuration for ``llmquant gptq`` / ``llmquant rtn``.

Field names are the CLI flag names (``group_size`` is ``--group-size``); YAML recipes in ``configs/``
use the same names, with dashes or underscores. Precedence: defaults < recipe file < explicit flags.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from llmquant.errors import InputError

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass
class QuantizeConfig:
    model: str = ""
    out: str = ""
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = True
    static_groups: bool = True
    mse: bool = True
    damp: float = 0.01
    block_size: int = 128
    dataset: str = "c4"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    calib_dtype: str = "auto"
    hessian_dtype: str = "auto"        # auto: float32
    format: str | None = None          # None: gptq for symmetric, gptq_v2 for asymmetric
    overwrite: bool = False
    trust_remote_code: bool = False
    eval: bool = False
    eval_dataset: str = "wikitext2"
    eval_seqlen: int = 2048
    eval_windows: int | None = 40

    @property
    def checkpoint_format(self) -> str:
        return self.format or ("gptq" if self.sym else "gptq_v2")

    def validate(self, method: str = "gptq") -> "QuantizeConfig":
        if not self.model:
            raise InputError("no model given; pass --model (a Hub id, a local directory or a .gguf file)")
        if not self.out:
            raise InputError("no output directory given; pass --out DIR")
        if self.bits not in SUPPORTED_BITS:
            raise InputError(f"--bits {self.bits} is not supported; use one of 2, 3, 4, 8")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size < 1):
            raise InputError(f"--group-size {self.group_size} is invalid; use -1 (per channel) or a positive integer")
        if self.format not in (None, "gptq", "gptq_v2"):
            raise InputError(f"--format {self.format} is unknown; use gptq or gptq_v2")
        if self.format == "gptq" and not self.sym:
            raise InputError("--format gptq (v1) stores zero points minus one and cannot hold zero point 0 of "
                             "asymmetric quantization; use --format gptq_v2 or --sym")
        if not (0 <= self.damp < 10):
            raise InputError(f"--damp {self.damp} is out of range; use a fraction of mean(diag H) such as 0.01")
        if self.block_size < 1:
            raise InputError(f"--block-size {self.block_size} must be a positive integer")
        if self.nsamples < 1:
            raise InputError(f"--nsamples {self.nsamples} must be at least 1")
        if self.seqlen < 2:
            raise InputError(f"--seqlen {self.seqlen} must be at least 2")
        if self.batch_size < 1:
            raise InputError(f"--batch-size {self.batch_size} must be at least 1")
        for flag, v in (("--dtype", self.dtype), ("--calib-dtype", self.calib_dtype),
                        ("--hessian-dtype", self.hessian_dtype)):
            if v not in ("auto", "float32", "bfloat16", "float16"):
                raise InputError(f"{flag} {v} is unknown; use auto, float32, bfloat16 or float16")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise InputError(f"--device {self.device} is unknown; use auto, cpu or cuda")
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe; keys must be flag names."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"--config {path}: expected a mapping of flag names to values")
    known = {f.name for f in fields(QuantizeConfig)}
    out = {}
    for k, v in data.items():
        key = str(k).replace("-", "_").lstrip("_")
        if key not in known:
            raise InputError(f"--config {path}: unknown key '{k}'; keys are the flag names, e.g. bits, group-size, act-order")
        out[key] = v
    return out


def build_config(recipe: str | None, flags: dict[str, Any]) -> QuantizeConfig:
    """Defaults, then the recipe, then the flags the user actually passed (``None`` = not passed)."""
    values: dict[str, Any] = {}
    if recipe:
        values.update(load_recipe(recipe))
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return QuantizeConfig(**values)
    except TypeError as e:
        raise InputError(f"invalid configuration: {e}") from None
