"""Number formats as bit layouts: every figure is derived from (sign, exponent, fraction) bits.

A binary floating-point format with ``E`` exponent bits, ``F`` fraction bits and bias
``b = 2^(E-1) - 1`` stores a normal value as::

    V = (-1)^s * 2^(e - b) * (1 + f / 2^F)        e in [1, emax_field],  f in [0, 2^F - 1]

and a subnormal one (``e = 0``) as ``(-1)^s * 2^(1 - b) * (f / 2^F)``.

==================  =====  =====  =====  ======  ==========================================
format              s      E      F      bias    special values
==================  =====  =====  =====  ======  ==========================================
float32             1      8      23     127     IEEE: e = 2^E-1 holds inf / NaN
float16             1      5      10     15      IEEE
bfloat16            1      8      7      127     IEEE
float8 e5m2         1      5      2      15      IEEE
float8 e4m3 (fn)    1      4      3      7       no inf; only e = 1111, f = 111 is NaN
==================  =====  =====  =====  ======  ==========================================

Derived figures (worked for e4m3fn): largest finite ``2^(15-7) * (1 + 6/8) = 448``; smallest
normal ``2^(1-7) = 2^-6``; smallest subnormal ``2^(1-7-3) = 2^-9``; gap after 1 (machine epsilon)
``2^-3``. ``torch.finfo`` gives the same numbers; the tests check every format against it.

Integers (``int8``, ``int4``) are two's complement: ``[-2^(n-1), 2^(n-1) - 1]``, step 1.
``NF4`` (QLoRA's 4-bit NormalFloat) is a 16-entry code book of normal quantiles scaled to
``[-1, 1]``; a block of weights stores ``absmax * NF4[q]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


# ----------------------------------------------------------------------------- floats

@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point layout. ``finite_only``: the e4m3fn convention (no infinities;
    the all-ones exponent holds normal numbers except the all-ones fraction, which is NaN)."""

    name: str
    exp_bits: int
    frac_bits: int
    finite_only: bool = False
    torch_dtype: torch.dtype | None = None

    sign_bits = 1

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.frac_bits

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def emax_field(self) -> int:
        """Largest exponent field holding finite normal numbers."""
        return 2**self.exp_bits - 1 if self.finite_only else 2**self.exp_bits - 2

    @property
    def max_frac_field(self) -> int:
        """Largest fraction field at ``emax_field`` (all-ones is NaN in the finite-only layout)."""
        return 2**self.frac_bits - 2 if self.finite_only else 2**self.frac_bits - 1

    @property
    def max(self) -> float:
        """Largest finite value: ``2^(emax - b) * (1 + fmax / 2^F)``."""
        return math.ldexp(1 + self.max_frac_field / 2**self.frac_bits, self.emax_field - self.bias)

    @property
    def smallest_normal(self) -> float:
        return math.ldexp(1.0, 1 - self.bias)

    @property
    def smallest_subnormal(self) -> float:
        return math.ldexp(1.0, 1 - self.bias - self.frac_bits)

    @property
    def eps(self) -> float:
        """Gap between 1 and the next representable value: ``2^-F``."""
        return math.ldexp(1.0, -self.frac_bits)

    @property
    def decimal_digits(self) -> float:
        """Significant decimal digits: ``(F + 1) * log10(2)``."""
        return (self.frac_bits + 1) * math.log10(2)

    @property
    def formula(self) -> str:
        return f"(-1)^s * 2^(e - {self.bias}) * (1 + f / 2^{self.frac_bits})"

    def decode(self, sign: int, exp_field: int, frac_field: int) -> float:
        """The value of a bit pattern (``inf`` / ``nan`` where the layout says so)."""
        s = -1.0 if sign else 1.0
        top = 2**self.exp_bits - 1
        if exp_field == top:
            if self.finite_only:
                if frac_field == 2**self.frac_bits - 1:
                    return math.nan
            else:
                return s * math.inf if frac_field == 0 else math.nan
        if exp_field == 0:
            return s * math.ldexp(frac_field / 2**self.frac_bits, 1 - self.bias)
        return s * math.ldexp(1 + frac_field / 2**self.frac_bits, exp_field - self.bias)

    def round(self, x: float, saturate: bool = False) -> float:
        """Nearest representable value (round half to even), as a hardware cast does.

        Overflow gives ``inf`` (IEEE layouts) or ``nan`` (finite-only), or the largest finite
        value with ``saturate=True``.
        """
        if math.isnan(x) or math.isinf(x):
            if math.isinf(x) and self.finite_only:
                return math.copysign(self.max, x) if saturate else math.nan
            return x
        if x == 0:
            return x
        a = abs(x)
        e = math.frexp(a)[1] - 1                       # a = 1.m * 2^e
        e = max(e, 1 - self.bias)                      # subnormals share the smallest exponent
        quantum = math.ldexp(1.0, e - self.frac_bits)  # spacing of representable values around a
        v = round(a / quantum) * quantum               # Python's round: half to even, exact here
        if v > self.max:
            v = self.max if saturate else (math.nan if self.finite_only else math.inf)
        return math.copysign(v, x)

    def fields(self, x: float) -> tuple[int, int, int]:
        """``(sign, exponent field, fraction field)`` of ``round(x)``."""
        v = self.round(x)
        sign = 1 if math.copysign(1.0, v) < 0 else 0
        top = 2**self.exp_bits - 1
        if math.isnan(v):
            return sign, top, 2**self.frac_bits - 1
        if math.isinf(v):
            return sign, top, 0
        a = abs(v)
        if a < self.smallest_normal:
            return sign, 0, int(round(a / self.smallest_subnormal))
        e = math.frexp(a)[1] - 1
        frac = int(round((a / math.ldexp(1.0, e) - 1) * 2**self.frac_bits))
        return sign, e + self.bias, frac


# ----------------------------------------------------------------------------- integers

@dataclass(frozen=True)
class IntFormat:
    """Two's complement integer of ``bits`` bits (``signed``) or unsigned."""

    name: str
    bits: int
    signed: bool = True
    torch_dtype: torch.dtype | None = None

    @property
    def min(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def max(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def formula(self) -> str:
        return f"-b{self.bits - 1}*2^{self.bits - 1} + sum b_i*2^i" if self.signed else "sum b_i*2^i"

    def round(self, x: float) -> float:
        """Round half to even, then saturate to ``[min, max]``."""
        if math.isnan(x):
            return 0.0
        return float(min(max(round(x), self.min), self.max)) if math.isfinite(x) else float(
            self.max if x > 0 else self.min)

    def bit_string(self, x: float) -> str:
        q = int(self.round(x))
        return format(q & (2**self.bits - 1), f"0{self.bits}b")


# ----------------------------------------------------------------------------- NF4

def normal_float_levels(bits: int = 4, offset: float = 0.9677083) -> torch.Tensor:
    """QLoRA's NormalFloat code book: ``2^(bits-1)`` positive and ``2^(bits-1) - 1`` negative
    quantiles of N(0, 1) plus an exact zero, divided by the largest so it spans ``[-1, 1]``.

    ``offset`` is the outermost probability (QLoRA uses ``(1 - 1/(2*15) + 1 - 1/(2*16)) / 2``).
    Returns ``[2^bits]`` float64, sorted.
    """
    half = 2 ** (bits - 1)
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return v / v.max()


@dataclass(frozen=True)
class CodebookFormat:
    name: str
    levels: tuple[float, ...]

    @property
    def bits(self) -> int:
        return int(math.log2(len(self.levels)))

    @property
    def max(self) -> float:
        return max(self.levels)

    @property
    def min(self) -> float:
        return min(self.levels)

    @property
    def smallest_positive(self) -> float:
        return min(v for v in self.levels if v > 0)

    @property
    def gap_below_one(self) -> float:
        return 1.0 - sorted(self.levels)[-2]

    formula = "absmax * NF4[q],  q in 0..15"

    def index(self, x: float) -> int:
        """Code of the nearest level (``x`` already divided by the block's absmax)."""
        return min(range(len(self.levels)), key=lambda i: abs(self.levels[i] - x))

    def round(self, x: float) -> float:
        return self.levels[self.index(max(-1.0, min(1.0, x)))]


# ----------------------------------------------------------------------------- the catalogue

FLOAT32 = FloatFormat("float32", 8, 23, torch_dtype=torch.float32)
FLOAT16 = FloatFormat("float16", 5, 10, torch_dtype=torch.float16)
BFLOAT16 = FloatFormat("bfloat16", 8, 7, torch_dtype=torch.bfloat16)
FP8_E4M3 = FloatFormat("float8_e4m3", 4, 3, finite_only=True, torch_dtype=getattr(torch, "float8_e4m3fn", None))
FP8_E5M2 = FloatFormat("float8_e5m2", 5, 2, torch_dtype=getattr(torch, "float8_e5m2", None))
INT8 = IntFormat("int8", 8, torch_dtype=torch.int8)
INT4 = IntFormat("int4", 4)
NF4 = CodebookFormat("nf4", tuple(normal_float_levels(4).tolist()))

FORMATS: dict[str, FloatFormat | IntFormat | CodebookFormat] = {
    f.name: f for f in (FLOAT32, FLOAT16, BFLOAT16, FP8_E4M3, FP8_E5M2, INT8, INT4, NF4)
}


def describe(fmt) -> dict:
    """One row of the ``llmquant dtypes`` table (plain numbers, JSON-ready)."""
    if isinstance(fmt, FloatFormat):
        return {"name": fmt.name, "bits": fmt.bits, "sign": 1, "exponent": fmt.exp_bits,
                "fraction": fmt.frac_bits, "bias": fmt.bias, "min": -fmt.max, "max": fmt.max,
                "smallest_normal": fmt.smallest_normal, "smallest_subnormal": fmt.smallest_subnormal,
                "eps": fmt.eps, "decimal_digits": round(fmt.decimal_digits, 2),
                "formula": fmt.formula, "inf": not fmt.finite_only}
    if isinstance(fmt, IntFormat):
        return {"name": fmt.name, "bits": fmt.bits, "sign": int(fmt.signed), "exponent": 0,
                "fraction": fmt.bits - int(fmt.signed), "bias": None, "min": fmt.min, "max": fmt.max,
                "smallest_normal": 1, "smallest_subnormal": None, "eps": 1,
                "decimal_digits": round(fmt.bits * math.log10(2), 2), "formula": fmt.formula, "inf": False}
    return {"name": fmt.name, "bits": fmt.bits, "sign": None, "exponent": None, "fraction": None,
            "bias": None, "min": fmt.min, "max": fmt.max, "smallest_normal": fmt.smallest_positive,
            "smallest_subnormal": None, "eps": fmt.gap_below_one, "decimal_digits": None,
            "formula": fmt.formula, "inf": False}


def store(fmt, x: float) -> dict:
    """How ``x`` is stored in ``fmt``: the stored value, its bits and the rounding error.

    Integers store ``x`` with scale 1 (round, saturate); NF4 stores ``x`` in ``[-1, 1]`` units of
    the block's absmax (values outside are clipped).
    """
    if isinstance(fmt, FloatFormat):
        v = fmt.round(x)
        s, e, f = fmt.fields(x)
        bits = f"{s} {e:0{fmt.exp_bits}b} {f:0{fmt.frac_bits}b}"
        if math.isfinite(v) and e != 0:
            how = f"(-1)^{s} * 2^({e} - {fmt.bias}) * (1 + {f}/2^{fmt.frac_bits})"
        elif math.isfinite(v):
            how = f"(-1)^{s} * 2^{1 - fmt.bias} * ({f}/2^{fmt.frac_bits})  (subnormal)"
        else:
            how = "overflow"
    elif isinstance(fmt, IntFormat):
        v = fmt.round(x)
        bits = fmt.bit_string(x)
        how = f"round(x) = {int(v)}" + (" (saturated)" if v != round(x) else "")
    else:
        idx = fmt.index(max(-1.0, min(1.0, x)))
        v = fmt.levels[idx]
        bits = format(idx, "04b")
        how = f"NF4[{idx}]" + (" (clipped to [-1, 1])" if abs(x) > 1 else "")
    err = v - x if math.isfinite(v) else math.inf
    rel = abs(err) / abs(x) if x != 0 and math.isfinite(err) else (0.0 if err == 0 else math.inf)
    return {"name": fmt.name, "input": x, "stored": v, "bits": bits, "how": how, "abs_error": err, "rel_error": rel}
