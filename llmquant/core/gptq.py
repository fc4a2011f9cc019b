"""GPTQ (Frantar et al., 2022): OBS-style column-by-column quantization with lazy batch updates.

For a linear layer ``W [N, K]`` seeing inputs ``X [K, n]`` GPTQ minimizes ``||WX - QX||^2``.
The layer Hessian is ``H = 2/n * X X^T [K, K]``. Columns are quantized left to right; the
error of column ``i`` is spread over the columns not yet quantized with the ``i``-th row of the
upper Cholesky factor of ``H^-1``::

    err   = (w_i - q_i) / Hinv[i, i]
    W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]

Lazy batch updates: inside a block of ``B`` columns the update touches only the block (``W1``); the
accumulated errors ``Err1 [N, B]`` are applied to the columns right of the block in one matmul.

Names follow the paper and its reference code: ``W, H, Hinv, W1, Q1, Err1, Losses``.
Quantization parameters come from the shared trio in :mod:`llmquant.core.quant`, so RTN and GPTQ
use exactly the same quantizer.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from llmquant.core.qtensor import QuantizedWeight
from llmquant.core.quant import block_minmax, choose_qparams, fake_quantize, mse_clip_search, qrange, quantize

FP16_TINY = torch.finfo(torch.float16).tiny


@dataclass(frozen=True)
class QuantArgs:
    """How one weight matrix is quantized (shared by RTN and GPTQ)."""
    bits: int = 4
    group_size: int = 128           # -1: one group per output row
    sym: bool = False
    mse: bool = False               # search a clipping ratio per group (MSE, norm 2.4)
    mse_grid: int = 20
    mse_max_shrink: float = 0.2
    fp16_scales: bool = True        # round scales to float16 as they are stored on disk

    @property
    def qmin_qmax(self) -> tuple[int, int]:
        return qrange(self.bits)


def fit_qparams(w: torch.Tensor, args: QuantArgs, weight: torch.Tensor | None = None,
                group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(scale, zero)`` per row of ``w [N, k]`` -> two ``[N, 1]``; with ``group``, one per row
    and group of ``group`` columns -> two ``[N, ceil(k / group)]`` (each group fitted on its own).

    ``weight [k]`` (e.g. ``diag(H)``) weighs the MSE search per column.
    """
    qmin, qmax = args.qmin_qmax
    block = (1, group or -1)
    ratio = 1.0
    if args.mse:
        ratio = mse_clip_search(w, args.bits, args.sym, block, grid=args.mse_grid,
                                max_shrink=args.mse_max_shrink,
                                weight=None if weight is None else weight[None, :])
    lo, hi = block_minmax(w, block)
    scale, zero = choose_qparams(lo * ratio, hi * ratio, qmin, qmax, args.sym)
    if args.fp16_scales:
        scale = scale.clamp(min=FP16_TINY).half().float()
    return scale, zero


def rtn(W: torch.Tensor, args: QuantArgs, weight: torch.Tensor | None = None) -> tuple[QuantizedWeight, torch.Tensor]:
    """Round-to-nearest of ``W [N, K]`` with contiguous groups. Returns ``(QuantizedWeight, Q [N, K])``."""
    W = W.float()
    N, K = W.shape
    G = args.group_size if args.group_size > 0 else K
    qmin, qmax = args.qmin_qmax
    scales, zeros, qs = [], [], []
    for g0 in range(0, K, G):
        w = W[:, g0:g0 + G]
        s, z = fit_qparams(w, args, None if weight is None else weight[g0:g0 + G])
        scales.append(s)
        zeros.append(z)
        qs.append(quantize(w, s, z, qmin, qmax))
    q = torch.cat(qs, 1)
    g_idx = torch.arange(K, device=W.device) // G
    qw = QuantizedWeight(q.to(torch.int32), torch.cat(scales, 1), torch.cat(zeros, 1).to(torch.int32),
                         g_idx.to(torch.int32), args.bits, args.group_size, args.sym)
    return qw, qw.dequantize()


@dataclass
class GPTQResult:
    qweight: QuantizedWeight
    Q: torch.Tensor                 # [N, K] dequantized weight in original column order
    loss: torch.Tensor              # [N] per-row OBS loss  sum_i (w_i - q_i)^2 / Hinv[i,i]^2 / 2
    damp: float                     # damping actually added (relative to mean(diag H))
    fallback: str | None = None     # why RTN was used instead, if it was
    dead: int = 0                   # input columns never active in calibration
    info: dict = field(default_factory=dict)


class GPTQ:
    """Accumulates the Hessian of one input and quantizes any weight that reads that input.

    Layers sharing an input (q/k/v, gate/up) share one ``GPTQ`` object: one Hessian, one
    factorisation, and their weights quantized together as one stacked matrix.
    """

    def __init__(self, columns: int, device: str | torch.device = "cpu", gram_dtype: torch.dtype = torch.float32):
        self.columns = columns
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)   # [K, K]
        self.nsamples = 0
        self.gram_dtype = gram_dtype    # dtype of each batch's x^T x products; H always sums in float32

    def add_batch(self, inp: torch.Tensor) -> None:
        """``inp [..., K]``: any leading dims are tokens. Keeps ``H = 2/n * sum x x^T`` (float32)."""
        x = inp.reshape(-1, inp.shape[-1])                         # [n, K]
        n = x.shape[0]
        if n == 0:
            return
        x = x.to(self.H.device)
        if x.dtype != torch.float32:
            x = x.float()
        self.H.mul_(self.nsamples / (self.nsamples + n))
        self.nsamples += n
        x = x * math.sqrt(2 / self.nsamples)
        add_gram_upper_(self.H, x if self.gram_dtype == torch.float32 else x.to(self.gram_dtype))

    @property
    def hessian(self) -> torch.Tensor:
        """The full symmetric ``H [K, K]`` (only block rows on and above the diagonal are accumulated)."""
        return symmetrize_upper(self.H)

    def quantize(
        self, W: torch.Tensor, args: QuantArgs, *, blocksize: int = 128, percdamp: float = 0.01,
        act_order: bool = False, static_groups: bool = False, max_damp_retries: int = 10,
    ) -> GPTQResult:
        return gptq_quantize(W, self.hessian, args, blocksize=blocksize, percdamp=percdamp, act_order=act_order,
                             static_groups=static_groups, max_damp_retries=max_damp_retries)


GRAM_BLOCKS = 4
GRAM_MIN_K = 256         # narrower: one matmul is faster than four (measured: K=576 -31%, K=1536 -35%)


def add_gram_upper_(H: torch.Tensor, x: torch.Tensor) -> None:
    """``H += x^T x`` for ``x [n, K]``, computing only the block rows on and above the diagonal.

    ``H`` is symmetric, so its lower blocks are never computed: with 4 block rows this is 62.5% of the
    multiply-adds of ``x^T x``. Entries below the diagonal blocks stay stale; read ``H`` through
    :func:`symmetrize_upper`.

    ``x`` in bfloat16/float16 multiplies at that precision (products exact, sums in float32 inside the
    matmul, each batch's result rounded once to ``x``'s dtype: ~2^-9 relative) and adds into float32 ``H``.
    """
    K = x.shape[1]
    if K < GRAM_MIN_K:
        _add_product_(H, x.t(), x)                                  # [K, n] @ [n, K]
        return
    bs = math.ceil(K / GRAM_BLOCKS)
    for i in range(0, K, bs):
        _add_product_(H[i:i + bs, i:], x[:, i:i + bs].t(), x[:, i:])   # [bs, n] @ [n, K - i]


def _add_product_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a @ b``; ``a, b`` in a narrower dtype than ``out`` multiply in theirs."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out.add_(a @ b)


def symmetrize_upper(H: torch.Tensor) -> torch.Tensor:
    """Full matrix from the block-upper part written by :func:`add_gram_upper_`."""
    K = H.shape[0]
    if K < GRAM_MIN_K:
        return H
    bs = math.ceil(K / GRAM_BLOCKS)
    blk = torch.arange(K, device=H.device) // bs
    upper = blk[:, None] <= blk[None, :]                            # block rows on/above the diagonal
    return torch.where(upper, H, H.t())


@contextlib.contextmanager
def single_thread():
    """Run tiny per-column ops on one thread: on CPU, intra-op parallelism for vectors of a few
    thousand elements costs more than it saves (measured: a rank-1 update of a [960, 123] block takes
    0.12 ms on one thread and up to 24 ms on two when the other core is busy)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float, max_retries: int = 10,
                            growth: float = 2.0) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``.

    A matrix that is not positive definite after damping gets ``growth`` x the damping, up to
    ``max_retries`` times (0.01 -> 10.24 by default): each step damps no more than needed, since every
    extra unit of damping pulls GPTQ towards RTN. Returns ``(Hinv or None, percdamp used)``.
    """
    K = H.shape[0]
    mean_diag = torch.mean(torch.diag(H)).item()
    diag = torch.arange(K, device=H.device)
    base = percdamp if percdamp > 0 else 1e-3
    d = percdamp
    for attempt in range(max_retries + 1):
        d = percdamp if attempt == 0 else base * growth ** attempt
        Hd = H.clone()
        Hd[diag, diag] += d * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                return U, d
    return None, d


def gptq_quantize(
    W: torch.Tensor, H: torch.Tensor, args: QuantArgs, *, blocksize: int = 128, percdamp: float = 0.01,
    act_order: bool = False, static_groups: bool = False, max_damp_retries: int = 10,
) -> GPTQResult:
    """Quantize ``W [N, K]`` given its input Hessian ``H [K, K]``. Neither input is modified.

    The column loop runs on one intra-op thread: it is hundreds of small ops per block, which one core
    does faster than two share. (Row slices in two Python threads were measured slower still: the loop
    is bound by Python and the GIL, 129 vs 213 ms for a 960 x 576 q/k/v stack on a quiet machine.)
    """
    W = W.detach().float().clone()                                  # [N, K]
    H = H.detach().float().clone()                                  # [K, K]
    N, K = W.shape
    if not torch.isfinite(H).all():
        raise FloatingPointError("Hessian has NaN/Inf entries")
    qmin, qmax = args.qmin_qmax
    G = args.group_size if args.group_size > 0 else K

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    hdiag = torch.diag(H).clone()

    perm = invperm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        invperm = torch.argsort(perm)
        H = H[perm][:, perm]

    Hinv, damp = damped_inverse_cholesky(H, percdamp, max_damp_retries)
    if Hinv is None:
        qw, Q = rtn(W, args, hdiag)
        return GPTQResult(qw, Q, torch.full((N,), float("nan"), device=W.device), damp,
                          fallback=f"Hessian not positive definite after damping {damp:g}; used RTN", dead=int(dead.sum()))

    # Static groups: parameters fitted on the original column order before any update.
    static = static_groups or G == K
    # Column -> group, in the order columns are visited.
    col_group = torch.arange(K, device=W.device) // G                # [K] for the visit order
    if static and perm is not None:
        col_group = col_group[perm]                                  # group of the original column
    # Blocks never straddle a group fitted on the fly, so its parameters see every earlier update.
    if not static and blocksize % G:
        blocksize = G * max(1, blocksize // G) if G <= blocksize else G

    # Static groups are fitted here, every group in one call on all threads (the clip search is
    # large elementwise work); only the column loop below is kept on one thread.
    fitted = fit_qparams(W, args, hdiag, group=G) if static else None     # [N, n_groups] x 2
    with single_thread():
        Q, Losses, scales, zeros = _gptq_blocks(W, Hinv, args, G, fitted, perm, col_group, hdiag, blocksize)

    g_idx = col_group.clone()
    if perm is not None:
        Q = Q[:, invperm]
        g_idx = g_idx[invperm]
    # Integer codes from the dequantized values (exact: Q = (q - z) * s with s > 0).
    gs, gz = scales[:, g_idx], zeros[:, g_idx]                     # [N, K]
    q = quantize(Q, gs, gz, qmin, qmax)
    qw = QuantizedWeight(q.to(torch.int32), scales, zeros.to(torch.int32), g_idx.to(torch.int32),
                         args.bits, args.group_size, args.sym)
    return GPTQResult(qw, Q, Losses.sum(1), damp, dead=int(dead.sum()))


def _gptq_blocks(W, Hinv, args, G, fitted, perm, col_group, hdiag, blocksize):
    """The lazy-batch block loop over ``W [n, K]`` (original column order). ``fitted``: static group
    parameters ``(scales, zeros)``, or ``None`` to fit each group when the loop reaches it. Returns
    ``Q`` (visit order), ``Losses [n, K]``, ``scales``, ``zeros [n, n_groups]``."""
    N, K = W.shape
    n_groups = math.ceil(K / G)
    static = fitted is not None
    if static:
        scales, zeros = fitted                                      # only read below
    else:
        scales = torch.zeros(N, n_groups, device=W.device)
        zeros = torch.zeros(N, n_groups, device=W.device)
    if perm is not None:
        W, hdiag = W[:, perm], hdiag[perm]
    else:
        W = W.clone()

    Q = torch.zeros_like(W)
    Losses = torch.zeros_like(W)
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()                                    # [N, B]
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]                                  # [B, B]
        _quantize_block(W1, Q1, Err1, Losses1, Hinv1, i1, count, G, static, col_group, scales, zeros, args, hdiag)
        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q, Losses, scales, zeros


def _quantize_block(W1, Q1, Err1, Losses1, Hinv1, i1, count, G, static, col_group, scales, zeros, args, hdiag):
    """The column loop of one lazy-batch block (in place on ``W1 [N, B]``, ``Q1``, ``Err1``, ``Losses1``).

    Kept to few tensor ops per column (it runs ~3,000 times per decoder layer): static group parameters
    are gathered once per block and the OBS loss ``(w - q)^2 / d^2`` is ``Err1^2``, taken once after the
    loop (7-15% faster than per column; ``addr_`` on the strided block measured slower than the matmul).
    """
    qmin, qmax = args.qmin_qmax
    if static:
        gb = col_group[i1:i1 + count]
        S, Z = scales[:, gb], zeros[:, gb]                          # [N, B]
    for i in range(count):
        col = i1 + i
        w = W1[:, i]                                                # [N]
        if static:
            s, z = S[:, i], Z[:, i]
        else:
            g = col // G
            if col % G == 0:
                scales[:, g:g + 1], zeros[:, g:g + 1] = fit_qparams(W1[:, i:i + G], args, hdiag[col:col + G])
            s, z = scales[:, g], zeros[:, g]
        q = fake_quantize(w, s, z, qmin, qmax)
        Q1[:, i] = q
        err1 = (w - q).div_(Hinv1[i, i])
        Err1[:, i] = err1
        W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
    torch.square(Err1, out=Losses1)
