"""Small C kernels built on first use with the system C compiler and called through ctypes.

Only the CPU int4 prefill path uses one (``csrc/int4_decode.c``: packed int4 bytes -> scaled
bfloat16 rows in one pass, ~4x faster than the same decode in torch ops). The shared object is
compiled once per source, compiler and CPU into ``$LLMQUANT_CACHE`` (default
``~/.cache/llmquant/native``; a per-user temp folder if that is not writable), written to a temp name and renamed, so concurrent first uses cannot
load a half-written file. Everything is optional: no compiler, a failed build or
``LLMQUANT_NATIVE=0`` leaves :func:`int4_decoder` returning ``None`` and the kernels use their
torch-ops path, which gives the same bits (tested).

Nothing here loads code it did not compile from the package's own source.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SRC_DIR = Path(__file__).with_name("csrc")


def cache_dir() -> Path:
    base = os.environ.get("LLMQUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "llmquant")
    return Path(base) / "native"


def _cpu_key() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform
    return platform.machine() + platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _private(p: Path) -> bool:
    """Owned by this user and writable by nobody else (what we load must be what we built)."""
    try:
        st = p.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def build(name: str) -> Path | None:
    """Compile ``csrc/<name>.c`` (cached); the ``.so`` path, or ``None`` when it cannot be built."""
    cc = _compiler()
    if cc is None:
        return None
    src = (SRC_DIR / f"{name}.c").read_bytes()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256(src + version.encode() + _cpu_key().encode()).hexdigest()[:16]
    for d in (cache_dir(), Path(tempfile.gettempdir()) / f"llmquant-native-{os.getuid()}"):
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            continue
        if not (_private(d) and os.access(d, os.W_OK)):
            continue                                         # someone else's or shared: never load from it
        out = d / f"{name}-{key}.so"
        if out.is_file():
            if _private(out):
                return out
            continue
        break
    else:
        return None                                          # nowhere safe to write the build
    base = [cc, "-O3", "-march=native", "-shared", "-fPIC", "-std=c11", str(SRC_DIR / f"{name}.c")]
    for flags in (["-fopenmp"], []):                       # OpenMP if the compiler has it
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=d)
        os.close(fd)
        try:
            r = subprocess.run(base + flags + ["-o", tmp], capture_output=True, text=True, timeout=300)
            if r.returncode == 0:
                os.replace(tmp, out)
                return out
        except (OSError, subprocess.SubprocessError):
            pass
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return None


@functools.lru_cache(maxsize=None)
def int4_decoder():
    """The C ``llmq_int4_decode`` function, or ``None`` (disabled, no compiler, build failed)."""
    if os.environ.get("LLMQUANT_NATIVE", "1") == "0":
        return None
    path = build("int4_decode")
    if path is None:
        return None
    try:
        fn = ctypes.CDLL(str(path)).llmq_int4_decode
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def decode_int4pack_native(packed: torch.Tensor, scales_zeros: torch.Tensor, N: int, Kp: int, kgs: int,
                           rows: int, threads: int | None = None) -> torch.Tensor | None:
    """``W^T`` rows ``[rows, N]`` bfloat16 from the CPU int4 packing (see ``csrc/int4_decode.c``),
    or ``None`` when the native decoder is unavailable.

    ``packed``: ``_convert_weight_to_int4pack_for_cpu`` bytes of codes fed in ``feed_order(N)``;
    ``scales_zeros [Kp/kgs, N, 2]`` bfloat16 in fed order; ``rows <= Kp``.
    """
    fn = int4_decoder()
    if fn is None:
        return None
    if not (packed.is_contiguous() and scales_zeros.is_contiguous() and packed.dtype == torch.uint8
            and scales_zeros.dtype == torch.bfloat16 and packed.device.type == "cpu" and 0 < rows <= Kp):
        raise ValueError("decode_int4pack_native: contiguous CPU uint8 bytes and bfloat16 scales_zeros expected")
    out = torch.empty(rows, N, dtype=torch.bfloat16)
    if fn(packed.data_ptr(), scales_zeros.data_ptr(), out.data_ptr(), Kp, N, kgs, rows,
          threads or torch.get_num_threads()) != 0:
        raise MemoryError("decode_int4pack_native: out of memory")
    return out
