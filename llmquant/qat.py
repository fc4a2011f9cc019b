"""Quantization-aware training: fake-quantized linear layers trained with a straight-through estimator,
then exported to the same packed GPTQ checkpoint as ``llmquant gptq``.

Each decoder linear becomes a :class:`FakeQuantLinear`::

    v      = W / s[:, g_idx]                          # [N, K]   s: [N, G] step per group
    q      = clamp(v + (round(v) - v).detach() + z, 0, 2^bits - 1)   # STE: d round(v) / dv = 1
    W_fq   = (q - z) * s                             # what the quantized model computes with
    y      = x_fq @ W_fq.T + b                       # x_fq: optional per-token fake-quant of x

``W`` (float32 master copy) and optionally ``s`` (LSQ-style, its gradient flows through the clamp)
are trained; ``z`` and ``g_idx`` stay fixed. Initialisation:

* ``rtn``: round-to-nearest with MSE-searched clipping per group (the asymmetric/symmetric grid of
  :func:`llmquant.core.quant.quantize_blocks`, unsigned codes as GPTQ stores them);
* ``gptq``: codes, steps and zeros of an existing GPTQ checkpoint (``W`` starts at its dequantized
  value).

The loss is the KL divergence from the dense teacher's next-token distribution (knowledge distillation),
optionally mixed with next-token cross entropy, on windows of calibration text.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmquant.core.qtensor import QuantizedWeight
from llmquant.core.quant import block_minmax, choose_qparams, per_group, qrange
from llmquant.core.quantizers import group_clip_search
from llmquant.errors import InputError, NumericalError
from llmquant.model.discovery import find_decoder_layers, find_linears, weight_matrix

INITS = ("rtn", "gptq")


@dataclass(frozen=True)
class QATConfig:
    """Settings of a QAT run; validated on construction."""

    bits: int = 3
    group_size: int = 128
    sym: bool = False
    steps: int = 60                  # measured: whole `llmquant qat` 620 s on ONE thread (~10 s/step, bf16),
                                     # SmolLM2 3-bit g128 PPL 42.9 (40 windows; RTN 114); scripts/bench_foundations.py
    lr: float = 1e-4                 # weights
    scale_lr: float = 5e-5           # steps (0: scales frozen)
    weight_decay: float = 0.0
    warmup: int = 5
    batch_size: int = 4
    seqlen: int = 256
    nsamples: int = 400              # calibration windows drawn (cycled when steps * batch exceeds them)
    kd_weight: float = 1.0           # loss = kd_weight * KL(teacher || student) + (1 - kd_weight) * CE
    act_bits: int = 0                # 0: no activation fake-quant; else per-token symmetric
    init: str = "rtn"
    mse_init: bool = False           # MSE-clipped init looked worse at 3 bits in a short check
    bf16: bool = True                # bfloat16 autocast for forward/backward
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise InputError(f"--bits {self.bits}: the GPTQ checkpoint format stores 2, 3, 4 or 8 bits")
        if self.group_size != -1 and self.group_size < 1:
            raise InputError(f"--group-size {self.group_size}: use -1 (per channel) or a positive group size")
        if self.steps < 0 or self.batch_size < 1 or self.seqlen < 8 or self.nsamples < 1:
            raise InputError("--steps must be >= 0, --batch-size and --nsamples >= 1, --seqlen >= 8")
        if self.lr < 0 or self.scale_lr < 0:
            raise InputError("--lr and --scale-lr must be >= 0")
        if not 0 <= self.kd_weight <= 1:
            raise InputError(f"--kd-weight {self.kd_weight}: must be in [0, 1]")
        if self.act_bits not in (0,) and not 4 <= self.act_bits <= 16:
            raise InputError(f"--act-bits {self.act_bits}: use 0 (off) or 4..16")
        if self.init not in INITS:
            raise InputError(f"--init {self.init}: use rtn or gptq")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def fake_quant_ste(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``(clamp(round_ste(w / scale) + zero, qmin, qmax) - zero) * scale`` (all broadcast)."""
    q = torch.clamp(round_ste(w / scale) + zero, qmin, qmax)
    return (q - zero) * scale


class _FakeQuantLSQ(torch.autograd.Function):
    """``fake_quant_ste`` as one autograd node: the same values and gradients in a few passes.

    Backward (STE on round, LSQ for the step): ``dW = g * inside``,
    ``ds = g * ((q - z) - inside * w / s)`` where ``inside`` marks codes not clamped.
    """

    @staticmethod
    def forward(ctx, w, scale, zero, qmin, qmax):
        v = w / scale                                       # [N, K]
        r = torch.round(v).add_(zero)
        inside = (r >= qmin) & (r <= qmax)
        q = r.clamp_(qmin, qmax).sub_(zero)                 # q - z
        ctx.save_for_backward(v, q, inside)
        return q * scale

    @staticmethod
    def backward(ctx, g):
        v, q, inside = ctx.saved_tensors
        gw = g * inside
        gs = None
        if ctx.needs_input_grad[1]:
            gs = g * torch.where(inside, q - v, q)
        return gw, gs, None, None, None


def fake_quant_act(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token symmetric fake quantization of activations ``[..., K]`` with STE."""
    qmax = 2 ** (bits - 1) - 1
    s = (x.detach().abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-8)
    return torch.clamp(round_ste(x / s), -qmax, qmax) * s


class FakeQuantLinear(nn.Module):
    """A linear layer whose weight is seen through the quantizer. ``weight [N, K]``, ``scale [N, G]``."""

    def __init__(self, W: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor,
                 g_idx: torch.Tensor, bits: int, group_size: int, sym: bool, act_bits: int = 0,
                 learn_scale: bool = True):
        super().__init__()
        self.weight = nn.Parameter(W.detach().float().clone())
        self.scale = nn.Parameter(scale.detach().float().clone(), requires_grad=learn_scale)
        self.register_buffer("zero", zero.detach().float().clone())
        self.register_buffer("g_idx", g_idx.detach().long().clone())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.bits, self.group_size, self.sym, self.act_bits = bits, group_size, sym, act_bits
        self.qmin, self.qmax = qrange(bits)
        self.in_features, self.out_features = W.shape[1], W.shape[0]
        self._contiguous: bool | None = None

    def quantized_weight(self) -> torch.Tensor:
        s = self._expand(self.scale)                            # [N, K]
        z = self._expand(self.zero)                             # [N, K]
        return _FakeQuantLSQ.apply(self.weight, s, z, self.qmin, self.qmax)

    def _expand(self, p: torch.Tensor) -> torch.Tensor:
        """``p [N, G]`` -> ``[N, K]`` following ``g_idx`` (a broadcast when groups are contiguous)."""
        N, K = self.weight.shape
        G = p.shape[1]
        gs = K if self.group_size in (-1, 0) else self.group_size
        if self._contiguous is None:
            self._contiguous = G == -(-K // gs) and torch.equal(self.g_idx, torch.arange(K, device=self.g_idx.device) // gs)
        if self._contiguous:
            return p[:, :, None].expand(N, G, gs).reshape(N, G * gs)[:, :K]
        return p[:, self.g_idx]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits:
            x = fake_quant_act(x, self.act_bits)
        W = self.quantized_weight()
        return F.linear(x, W.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def export(self) -> QuantizedWeight:
        """Codes with the steps rounded to float16 (as the checkpoint stores them)."""
        s = self.scale.detach().clamp(min=1e-8).half().float()                  # [N, G]
        q = torch.clamp(torch.round(self.weight / s[:, self.g_idx]) + self.zero[:, self.g_idx], self.qmin, self.qmax)
        return QuantizedWeight(q=q.to(torch.int32), scale=s, zero=self.zero.to(torch.int32),
                               g_idx=self.g_idx.to(torch.int32), bits=self.bits, group_size=self.group_size,
                               sym=self.sym, bias=None if self.bias is None else self.bias.detach().clone())


def rtn_init(W: torch.Tensor, bits: int, group_size: int, sym: bool, mse: bool, grid: int = 10,
             max_shrink: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale [N, G], zero [N, G], g_idx [K])`` by round-to-nearest, optionally with the clip ratio
    in ``[1 - max_shrink, 1]`` (``grid`` candidates) minimizing each group's squared error."""
    block = per_group(group_size)
    qmin, qmax = qrange(bits)
    ratio = group_clip_search(W, bits, sym, group_size, grid=grid, max_shrink=max_shrink) if mse else 1.0
    lo, hi = block_minmax(W, block)
    scale, zero = choose_qparams(lo * ratio, hi * ratio, qmin, qmax, sym)
    K = W.shape[1]
    gs = K if group_size in (-1, 0) else group_size
    g_idx = torch.arange(K) // gs
    return scale, zero, g_idx


def qat_targets(model: nn.Module) -> dict[str, nn.Module]:
    prefix, layers = find_decoder_layers(model)
    return {f"{prefix}.{i}.{n}": m for i, layer in enumerate(layers) for n, m in find_linears(layer).items()}


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def prepare_qat(model: nn.Module, cfg: QATConfig, init_weights: dict[str, QuantizedWeight] | None = None,
                progress: Callable[[int, int], None] | None = None) -> dict[str, FakeQuantLinear]:
    """Swap every decoder linear for a :class:`FakeQuantLinear` (in place)."""
    targets = qat_targets(model)
    if cfg.init == "gptq":
        if not init_weights:
            raise InputError("--init gptq needs --init-from, a GPTQ checkpoint of this model")
        missing = [n for n in targets if n not in init_weights]
        if missing:
            raise InputError(f"--init-from checkpoint has no quantized layer {missing[0]}; it was made from another model")
    out = {}
    for i, (name, m) in enumerate(targets.items()):
        W = weight_matrix(m).detach().float()
        bias = m.bias if getattr(m, "bias", None) is not None else None
        if cfg.init == "gptq":
            qw = init_weights[name]
            if qw.bits != cfg.bits or tuple(qw.q.shape) != tuple(W.shape):
                raise InputError(f"--init-from layer {name}: {qw.bits}-bit {tuple(qw.q.shape)} does not match "
                                 f"--bits {cfg.bits} and the model's {tuple(W.shape)}")
            W, scale, zero, g_idx = qw.dequantize(torch.float32), qw.scale.float(), qw.zero.float(), qw.g_idx.long()
            gs, sym = qw.group_size, qw.sym
        else:
            scale, zero, g_idx = rtn_init(W, cfg.bits, cfg.group_size, cfg.sym, cfg.mse_init)
            gs, sym = cfg.group_size, cfg.sym
        fq = FakeQuantLinear(W, bias, scale, zero, g_idx, cfg.bits, gs, sym, cfg.act_bits, learn_scale=cfg.scale_lr > 0)
        _set(model, name, fq)
        out[name] = fq
        if progress:
            progress(i + 1, len(targets))
    return out


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``KL(p_teacher || p_student)``; logits ``[B, T, V]`` (computed in float32)."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def train_qat(model: nn.Module, teacher: nn.Module | None, windows: torch.Tensor, cfg: QATConfig,
              progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """Train the fake-quantized ``model`` on ``windows [n, seqlen]``; returns a history dict."""
    torch.manual_seed(cfg.seed)
    fq = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    if not fq:
        raise InputError("the model has no fake-quantized layers; call prepare_qat first")
    for p in model.parameters():
        p.requires_grad_(False)
    weights = [m.weight for m in fq]
    scales = [m.scale for m in fq]
    for w in weights:
        w.requires_grad_(True)
    groups = [{"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if cfg.scale_lr > 0:
        for s in scales:
            s.requires_grad_(True)
        groups.append({"params": scales, "lr": cfg.scale_lr, "weight_decay": 0.0})
    try:        # the fused CPU kernel: one pass over each parameter instead of ~10
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), foreach=True)
    base = [g["lr"] for g in opt.param_groups]

    def lr_at(step):        # linear warmup, cosine decay to 10 %
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    use_kd = cfg.kd_weight > 0 and teacher is not None
    n = windows.shape[0]
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n, generator=g)
    history, t0, pos = [], time.time(), 0
    model.train()
    for step in range(cfg.steps):
        idx = order[torch.arange(pos, pos + cfg.batch_size) % n]
        pos += cfg.batch_size
        x = windows[idx]                                                         # [B, T]
        for gi, group in enumerate(opt.param_groups):
            group["lr"] = base[gi] * lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            if use_kd:
                with torch.no_grad():
                    t_logits = teacher(x, use_cache=False).logits                # [B, T, V]
            logits = model(x, use_cache=False).logits                            # [B, T, V]
        loss = torch.zeros((), dtype=torch.float32)
        kd = ce = None
        if use_kd:
            kd = kd_loss(logits, t_logits)
            loss = loss + cfg.kd_weight * kd
        if cfg.kd_weight < 1 or not use_kd:
            ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            loss = loss + (1 - cfg.kd_weight if use_kd else 1.0) * ce
        if not torch.isfinite(loss):
            raise NumericalError(f"QAT step {step}: the loss is {loss.item()}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(weights + (scales if cfg.scale_lr > 0 else []), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            for m in fq:
                m.scale.clamp_(min=1e-8)
        rec = {"step": step + 1, "loss": round(loss.item(), 5), "seconds": round(time.time() - t0, 1)}
        if kd is not None:
            rec["kd"] = round(kd.item(), 5)
        if ce is not None:
            rec["ce"] = round(ce.item(), 5)
        history.append(rec)
        if progress:
            progress(step + 1, cfg.steps, rec)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {"history": history, "seconds": round(time.time() - t0, 1)}


@torch.no_grad()
def convert(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Replace each :class:`FakeQuantLinear` by an ``nn.Linear`` holding its exact dequantized weight
    (so the model computes what the checkpoint will) and return the quantized layers."""
    out = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, FakeQuantLinear):
            qw = m.export()
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = qw.dequantize(torch.float32)
            if m.bias is not None:
                lin.bias.data = m.bias.detach().clone()
            _set(model, name, lin)
            out[name] = qw
    return out


def make_teacher(model: nn.Module, bf16: bool) -> nn.Module:
    """A frozen copy of the dense model (bfloat16 when training in bfloat16: half the memory)."""
    t = copy.deepcopy(model)
    if bf16:
        t = t.to(torch.bfloat16)
    t.eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t


def quant_config(cfg: QATConfig) -> dict:
    """The ``quant_config`` passed to :func:`llmquant.checkpoint.save_gptq_checkpoint`."""
    return {"bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym, "desc_act": False,
            "method": "qat", "qat": asdict(cfg)}
