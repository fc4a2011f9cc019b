"""Write a tiny GPTQ checkpoint exactly as GPTQModel 7.7 lays it out on disk (tests/fixtures).

GPTQModel itself cannot be installed here (it needs torch >= 2.14 and builds CUDA extensions), so
this script reproduces its writer from its source (gptqmodel-7.7.0 sdist):

* packing (``BaseQuantLinear.pack_original``): ``int_weight = round((W + zeros*scales)[g_idx] /
  scales[g_idx])`` per column, then for 2/4/8 bits ``qweight[row] |= int_weight[row*pf + j] <<
  (bits*j)`` in numpy uint32 and stored as int32; 3 bits with its 10/1/10/1/10 word scheme;
  ``qzeros[:, col] |= zeros[:, col*pf + j] << (bits*j)``;
* v2 -> v1 (``convert_gptq_v2_to_v1_format_module``): the packed zero words get
  ``0x11111111`` (4 bits) subtracted as int32, borrows and all;
* ``scales`` float16 ``[G, N]``, ``g_idx`` int32 ``[K]``, dense tensors in the model dtype, one
  ``model.safetensors`` with metadata ``{"format": "pt"}``;
* ``config.json`` gets ``quantization_config = QuantizeConfig.to_dict()`` (keys ``bits``,
  ``group_size``, ``desc_act``, ``lm_head``, ``method``, ``quant_method``, ``format``,
  ``checkpoint_format``, ``pack_dtype``, ``meta``, ``sym``; ``None``/``{}`` values dropped) and the
  same dict goes to ``quantize_config.json``.

The codes are independent of llmquant (no llmquant import): asymmetric min/max quantization with
act-order (a random permutation decides group membership, so ``g_idx`` is not ``k // group_size``)
and one group forced to zero point 0 to exercise the v1 borrow. The integer codes, zeros, scales
and g_idx are also saved to ``<name>.reference.safetensors`` next to the directory so a test can
build the dense dequantization without any packing code.

    python scripts/make_gptqmodel_fixture.py            # writes tests/fixtures/gptqmodel_tiny_llama_{4,3}bit
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_minmax(w: torch.Tensor, bits: int, group_size: int, perm: torch.Tensor, force_zero0: bool):
    """GPTQModel's asymmetric quantizer on ``w [N, K]`` with act-order groups -> (scales, zeros, g_idx)
    as ``[N, G]``, ``[N, G]``, ``[K]``."""
    N, K = w.shape
    maxq = 2**bits - 1
    G = math.ceil(K / group_size)
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[perm] = (torch.arange(K) // group_size).to(torch.int32)
    scales = torch.empty(N, G)
    zeros = torch.empty(N, G)
    for g in range(G):
        cols = (g_idx == g).nonzero().flatten()
        x = w[:, cols].float()
        xmin = torch.minimum(x.min(1).values, torch.zeros(N))
        xmax = torch.maximum(x.max(1).values, torch.zeros(N))
        scale = (xmax - xmin) / maxq
        scale[scale == 0] = 1.0
        scales[:, g] = scale
        zeros[:, g] = torch.round(-xmin / scale)
    if force_zero0:                       # row 0, group 0: all weights >= 0 -> zero point 0
        cols = (g_idx == 0).nonzero().flatten()
        w[0, cols] = w[0, cols].abs()
        xmax = w[0, cols].max()
        scales[0, 0] = xmax / maxq
        zeros[0, 0] = 0
    return scales, zeros, g_idx


def pack_original(W: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int):
    """GPTQModel's ``pack_original`` for an ``nn.Linear`` weight ``W [N, K]`` (v2 zeros)."""
    maxq = 2**bits - 1
    pf = 32 // bits
    scales_t = scales.t().contiguous()                   # [G, N]
    zeros_t = zeros.t().contiguous()
    scale_zeros = zeros_t * scales_t
    scales16 = scales_t.to(torch.float16)
    gi = g_idx.long()
    int_weight = torch.round((W + scale_zeros[gi].T) / scales_t[gi].T).clamp_(0, maxq).to(torch.int32)
    int_weight = int_weight.T.contiguous().numpy().astype(np.uint32)      # [K, N]
    K, N = int_weight.shape
    qweight = np.zeros((math.ceil(K * bits / 32), N), dtype=np.uint32)
    if bits in (2, 4, 8):
        for row in range(qweight.shape[0]):
            for j in range(min(pf, K - row * pf)):
                qweight[row] |= int_weight[row * pf + j] << (bits * j)
    else:                                                                 # 3 bits
        i = row = 0
        while row < qweight.shape[0]:
            for j in range(i, i + 10):
                qweight[row] |= int_weight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= int_weight[i] << 30
            row += 1
            qweight[row] |= (int_weight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= int_weight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= int_weight[i] << 31
            row += 1
            qweight[row] |= (int_weight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= int_weight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    z = zeros_t.numpy().astype(np.uint32)                                # [G, N]
    G = z.shape[0]
    qzeros = np.zeros((G, math.ceil(N * bits / 32)), dtype=np.uint32)
    if bits in (2, 4, 8):
        for col in range(qzeros.shape[1]):
            for j in range(min(pf, N - col * pf)):
                qzeros[:, col] |= z[:, col * pf + j] << (bits * j)
    else:
        i = col = 0
        while col < qzeros.shape[1]:
            for j in range(i, i + 10):
                qzeros[:, col] |= z[:, j] << (3 * (j - i))
            i += 10
            qzeros[:, col] |= z[:, i] << 30
            col += 1
            qzeros[:, col] |= (z[:, i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qzeros[:, col] |= z[:, j] << (3 * (j - i) + 1)
            i += 10
            qzeros[:, col] |= z[:, i] << 31
            col += 1
            qzeros[:, col] |= (z[:, i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qzeros[:, col] |= z[:, j] << (3 * (j - i) + 2)
            i += 10
            col += 1
    codes = torch.from_numpy(int_weight.astype(np.int32)).t().contiguous()            # [N, K]
    return (torch.from_numpy(qweight.astype(np.int32)), torch.from_numpy(qzeros.astype(np.int32)),
            scales16, codes)


def v2_to_v1(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """``convert_gptq_v2_to_v1_format_module`` for 2/4/8 bits (int32 wrap-around subtraction);
    3 bits: value by value ``(z - 1) mod 8`` (GPTQModel's int32 "logical correction")."""
    if bits == 3:
        raise ValueError("handled by the caller")
    const = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}[bits]
    w = qzeros.to(torch.int64) - const
    w = torch.where(w < -2**31, w + 2**32, w)
    return w.to(torch.int32)


def quantization_config(bits: int, group_size: int) -> dict:
    return {
        "bits": bits, "group_size": group_size, "desc_act": True, "lm_head": False,
        "method": "gptq", "quant_method": "gptq", "format": "gptq", "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "meta": {"quantizer": ["gptqmodel:7.7.0"], "uri": "https://github.com/modelcloud/gptqmodel",
                 "damp_percent": 0.05, "damp_auto_increment": 0.01, "static_groups": False,
                 "true_sequential": True, "mse": 0.0, "gptaq": None, "act_group_aware": False,
                 "fallback": None, "offload_to_disk": True, "pack_impl": "cpu", "gc_mode": "interval",
                 "mock_quantization": False},
        "sym": False,
    }


def make(out: Path, bits: int, group_size: int = 32, seed: int = 0) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False,
                      max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval().to(torch.float16)
    tensors: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(seed + 1)
    first = True
    for name, mod in model.named_modules():
        if not name.endswith(LINEARS):
            continue
        W = mod.weight.detach().float().clone()
        perm = torch.randperm(W.shape[1], generator=gen)
        scales, zeros, g_idx = quantize_minmax(W, bits, group_size, perm, force_zero0=first)
        first = False
        qweight, qzeros, scales16, codes = pack_original(W, scales, zeros, g_idx, bits)
        if bits == 3:
            z1 = (zeros.t().to(torch.int64) - 1) % 8
            _, qzeros, _, _ = pack_original(torch.zeros_like(W), scales, z1.t().float(), g_idx, bits)
        else:
            qzeros = v2_to_v1(qzeros, bits)
        tensors[f"{name}.qweight"] = qweight
        tensors[f"{name}.qzeros"] = qzeros
        tensors[f"{name}.scales"] = scales16
        tensors[f"{name}.g_idx"] = g_idx
        reference[f"{name}.codes"] = codes.to(torch.uint8)
        reference[f"{name}.zeros"] = zeros.to(torch.uint8)                # [N, G] v2 zero points
        reference[f"{name}.scales"] = scales16.t().contiguous()           # [N, G]
        reference[f"{name}.g_idx"] = g_idx
    quantized = {n for n, _ in model.named_modules() if n.endswith(LINEARS)}
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[0] not in quantized:
            tensors[k] = v.contiguous()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    qc = quantization_config(bits, group_size)
    conf = cfg.to_dict()
    conf["dtype"] = "float16"
    conf["architectures"] = ["LlamaForCausalLM"]
    conf["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    (out / "quantize_config.json").write_text(json.dumps(qc, indent=2))
    save_file(reference, str(out.parent / f"{out.name}.reference.safetensors"))
    print(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1024:.1f} KiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(ROOT / "tests" / "fixtures"))
    args = ap.parse_args()
    for bits in (4, 3):
        make(Path(args.out_dir) / f"gptqmodel_tiny_llama_{bits}bit", bits)


if __name__ == "__main__":
    main()
