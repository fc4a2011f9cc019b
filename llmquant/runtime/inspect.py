"""What a checkpoint directory holds: quantization settings, sizes, per-layer error from its report.

``inspect_checkpoint(dir)`` reads only headers and JSON (no weights):
``{"path", "quant_method", "bits", "group_size", "format", "desc_act", "sym", "n_quantized",
"n_tensors", "file_bytes", "weight_bytes", "dense_fp16_bytes", "quantized_linear_bytes",
"quantized_linear_fp16_bytes", "modules": [{"name", "loss", "damp", "fallback", "seconds"}, ...]}``.
``plot_layer_errors(modules, png)`` draws one bar per module (log scale), Agg backend.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from llmquant.errors import CheckpointError

REPORT_FILE = "quant_report.json"


def _header_shapes(files: list[Path]) -> dict[str, tuple[list[int], str]]:
    from safetensors import safe_open
    out: dict[str, tuple[list[int], str]] = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    s = h.get_slice(k)
                    out[k] = (list(s.get_shape()), s.get_dtype())
        except Exception as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise CheckpointError(f"{f}: cannot read the safetensors file ({msg}); it is truncated or corrupted, "
                                  "copy or re-export it") from None
    return out


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_report(path: Path) -> tuple[list[dict], dict]:
    """``(modules, whole report)`` from ``quant_report.json``; tolerant of missing keys."""
    f = path / REPORT_FILE
    if not f.is_file():
        return [], {}
    try:
        rep = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e}); delete or regenerate the report") from None
    mods = rep.get("modules") if isinstance(rep, dict) else None
    out = []
    for i, m in enumerate(mods or []):
        if not isinstance(m, dict):
            continue
        loss = m.get("loss")
        out.append({"name": str(m.get("name", f"module{i}")),
                    "loss": float(loss) if isinstance(loss, (int, float)) else None,
                    "damp": m.get("damp"), "fallback": m.get("fallback"), "seconds": m.get("seconds")})
    return out, rep if isinstance(rep, dict) else {}


def inspect_checkpoint(path) -> dict:
    from llmquant.runtime.loader import gptq_settings, quant_config_of, read_config, weight_files
    p = Path(path).expanduser()
    if not p.is_dir() or not (p / "config.json").is_file():
        raise CheckpointError(f"{p}: not a checkpoint directory (no config.json); pass a directory written by "
                              "llmquant, save_pretrained or GPTQModel")
    config = read_config(p)
    qc = quant_config_of(p, config) or {}
    files = weight_files(p)
    shapes = _header_shapes(files)
    info: dict = {"path": str(p), "model_type": config.get("model_type"),
                  "quant_method": str(qc.get("quant_method") or ("gptq" if qc else "none"))}
    bits = None
    if qc and info["quant_method"] == "gptq":
        bits, gs, fmt = gptq_settings(qc, p / "config.json")
        info.update(bits=bits, group_size=gs, format=fmt, desc_act=bool(qc.get("desc_act", False)),
                    sym=bool(qc.get("sym", True)))
    elif qc:
        info.update(bits=qc.get("bits"), group_size=qc.get("group_size"), format=qc.get("checkpoint_format") or
                    qc.get("format"), desc_act=qc.get("desc_act"), sym=qc.get("sym"))
    prefixes = sorted(k[: -len(".qweight")] for k in shapes if k.endswith(".qweight"))
    qparts = {f"{n}.{s}" for n in prefixes for s in ("qweight", "qzeros", "scales", "g_idx")}
    dense_fp16 = qlin = qlin_fp16 = 0
    for k, (shape, dt) in shapes.items():
        n = math.prod(shape)
        if k in qparts:
            qlin += n * _DTYPE_BYTES.get(dt, 4)
            if k.endswith(".qweight") and bits:
                K, N = shape[0] * 32 // bits, shape[1]
                dense_fp16 += K * N * 2
                qlin_fp16 += K * N * 2
        else:
            dense_fp16 += n * 2
    modules, report = read_report(p)
    info.update(n_quantized=len(prefixes), n_tensors=len(shapes),
                file_bytes=sum(f.stat().st_size for f in p.iterdir() if f.is_file()),
                weight_bytes=sum(f.stat().st_size for f in files),
                dense_fp16_bytes=dense_fp16, quantized_linear_bytes=qlin, quantized_linear_fp16_bytes=qlin_fp16,
                modules=modules, report_keys=sorted(report))
    for key in ("ppl", "eval", "seconds"):
        if key in report:
            info[f"report_{key}"] = report[key]
    return info


def plot_layer_errors(modules: list[dict], out_png, title: str = "GPTQ error per layer") -> Path | None:
    """Bar chart of ``loss`` per module (log scale when positive); returns the path or None."""
    pts = [(m["name"], m["loss"]) for m in modules if m.get("loss") is not None and math.isfinite(m["loss"])]
    if not pts:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names, losses = zip(*pts)
    fig, ax = plt.subplots(figsize=(max(8, len(pts) * 0.06 + 4), 4.5))
    colors = ["tab:red" if m.get("fallback") else "tab:blue" for m in modules
              if m.get("loss") is not None and math.isfinite(m["loss"])]
    ax.bar(range(len(pts)), losses, color=colors, width=0.85)
    if all(v > 0 for v in losses):
        ax.set_yscale("log")
    ax.set_xlabel("module (in quantization order; red = fallback)")
    ax.set_ylabel("loss")
    ax.set_title(title)
    step = max(1, len(pts) // 30)
    ax.set_xticks(range(0, len(pts), step))
    ax.set_xticklabels([names[i] for i in range(0, len(pts), step)], rotation=90, fontsize=6)
    fig.tight_layout()
    out = Path(out_png)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
