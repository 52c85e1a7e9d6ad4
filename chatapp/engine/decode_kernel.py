"""A decode step's attention over a bf16 cache, by a small C kernel built on this machine (issue 13).

On a 2-core AVX512-BF16 EPYC, torch's bf16 matrix products (cpu_attention._products) read a decode step's
cache at about 7.5-12.4 GB/s: oneDNN reorders the keys and values into its blocked layout on every call. The
kernel in decode_attention.c reads each of them once, straight from the cache, at about 18-29 GB/s
(bench/kernel_ab.py --alone). Its scores, softmax and sums stay in fp32 where the products round the scores
to bf16; both round the softmax's weights to bf16, as transformers' eager attention does.

torch has no such kernel and no library we could depend on does either, so the kernel is built with the C
compiler (`$CC`, else `cc`) when a bf16 model loads on a CPU with AVX512-BF16, once per source, and kept
in the data folder. Without a compiler, or on another CPU, decode attends by the products as before, and
the load's reasons say why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode_attention.c")
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-fopenmp")
#: What the kernel's instructions need, as /proc/cpuinfo names them.
CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma"})
#: The shapes the kernel takes: query rows (heads per key/value head) and head sizes.
MOST_ROWS = 16
HEAD_SIZES = range(32, 257, 32)

_function = None


def prepare(folder: Path, cpu_flags: frozenset[str] | None = None) -> str | None:
    """Build the kernel into `folder` unless a build of this source is there, and load it.

    None when it is ready; otherwise why not, in one line, and decode keeps torch's products.
    """
    global _function
    if _function is not None:
        return None
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    if missing := sorted(CPU_FLAGS - flags):
        return f"this CPU lacks {', '.join(missing)}"
    compiler = shlex.split(os.environ.get("CC") or "cc")
    found = shutil.which(compiler[0]) if compiler else None
    if not found:
        return f"no C compiler ('{compiler[0] if compiler else ''}' not found; set CC)"
    command = [*compiler, *FLAGS, "-shared", "-fPIC", str(SOURCE), "-lm"]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([found, *command[1:]]).encode())
    library = folder / f"decode_attention-{key.hexdigest()[:16]}.so"
    if not library.exists():
        if problem := _build(command, library):
            return problem
    try:
        function = ctypes.CDLL(str(library)).decode_attention
    except (OSError, AttributeError) as exc:
        return f"can't load {library.name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    function.argtypes += [ctypes.c_long, ctypes.c_float, ctypes.c_int]
    function.restype = ctypes.c_int
    _function = function
    return None


def ready() -> bool:
    return _function is not None


def attend(packed: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int, scale: float):
    """Attention of one token's query heads, packed as (batch, kv heads, rows, dim), over the first `length`
    tokens of the buffers (batch, kv heads, room, dim); None when the kernel isn't loaded or doesn't take
    these shapes."""
    batch, kv_heads, rows, dim = packed.shape
    if (
        _function is None
        or rows > MOST_ROWS
        or dim not in HEAD_SIZES
        or not all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in (packed, keys, values))
        or not (keys.is_contiguous() and values.is_contiguous())
        or keys.shape != values.shape
        or keys.shape[:2] != packed.shape[:2]
        or keys.shape[3] != dim
    ):
        return None
    packed = packed.contiguous()
    out = torch.empty_like(packed)
    status = _function(
        packed.data_ptr(),
        keys.data_ptr(),
        values.data_ptr(),
        out.data_ptr(),
        batch * kv_heads,
        rows,
        dim,
        keys.shape[2],
        length,
        scale,
        torch.get_num_threads(),
    )
    return out if status == 0 else None


def _build(command: list[str], library: Path) -> str | None:
    """Compile to a temporary name beside `library` and move it into place, so that a reader never finds
    half a file; None when it worked, else the compiler's first line."""
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=library.parent, suffix=".so.part")
        os.close(handle)
    except OSError as exc:
        return f"can't write to {library.parent}: {exc.strerror or exc}"
    try:
        done = subprocess.run([*command, "-o", temporary], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            first = next((line for line in done.stderr.splitlines() if "error" in line), None)
            return f"'{command[0]}' failed: {first or (done.stderr.strip().splitlines() or ['no output'])[0]}"
        os.replace(temporary, library)
        return None
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"'{command[0]}' failed: {exc}"
    finally:
        Path(temporary).unlink(missing_ok=True)


def _cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo; none where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()
