"""The cpu backend's C kernels (``csrc/``), built on first use and loaded through ctypes.

``load()`` compiles ``csrc/paged_decode.c`` (paged decode attention, NeoX rotary),
``csrc/norm.c`` (residual add + RMSNorm), ``csrc/decode_step.c`` (rotary, cache write and
decode attention in one call) and ``csrc/silu_mul.c`` (SiLU-and-mul) into one library with the system C compiler (``$CC``, else ``cc``,
``gcc``, ``clang``; ``-O3 -march=native -fopenmp``) into ``<cache_dir>/cpu_native/``, keyed by
the source, the compiler's version, the flags and the host CPU, so a machine compiles it once
(~0.5 s; several processes compiling at once each write a temporary file and rename it into
place). The library links ``libgomp.so.1``, the soname of the OpenMP runtime torch ships and
has already loaded, so the process keeps one OpenMP thread pool; ``load()`` checks that and
refuses the library otherwise (two runtimes spinning on the same cores would stall each other).

Anything that stops it (``TESSELLM_CPU_NATIVE=0``, no compiler, a failed build, torch without
GNU OpenMP) makes ``load()`` return None after one log line saying why; the callers then keep
their plain-torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

from tessellm import envs

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("paged_decode.c", "norm.c", "decode_step.c",
                                                                 "silu_mul.c")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library or None, once tried; "why": the reason for None


def load() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or None (see the module docstring); tried once per process."""
    with _lock:
        if "lib" not in _state:
            lib, why = _try_load()
            _state["lib"], _state["why"] = lib, why
            if lib is None:
                logger.info("cpu backend: native kernels off (%s); using the torch path.", why)
        return _state["lib"]


def unavailable_reason() -> Optional[str]:
    """Why ``load()`` returned None, or None if it did not (or was not called yet)."""
    return _state.get("why")


def _try_load() -> tuple[Optional[ctypes.CDLL], Optional[str]]:
    if not envs.cpu_native():
        return None, "TESSELLM_CPU_NATIVE=0"
    if platform.system() != "Linux":
        return None, f"not built on {platform.system()}"
    omp_before = _openmp_libs()
    if not any("gomp" in Path(p).name for p in omp_before):
        return None, "torch does not use GNU OpenMP (libgomp) in this process"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc)"
    try:
        path = _build(compiler)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"building {', '.join(s.name for s in SOURCES)} failed: {str(e).strip()[-300:]}"
    if _openmp_libs() != omp_before:
        return None, "the built library loaded a second OpenMP runtime"
    _declare(lib)
    return lib, None


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.tl_paged_decode.restype = i32
    lib.tl_paged_decode.argtypes = [p, i64, p, p, i32, p, i64, p, i32, i32, i32, i32, i32, i32,
                                    ctypes.c_float, ctypes.c_float, p, p, i32]
    lib.tl_rotary_neox.restype = i32
    lib.tl_rotary_neox.argtypes = [p, i64, i32, p, i64, i32, p, p, i64, i32, i32, i32, i32]
    lib.tl_decode_step.restype = i32
    lib.tl_decode_step.argtypes = [p, i64, p, i64, p, i64, p, p, i64, p, p, p, i32, p, i64, p, i32,
                                   i32, i32, i32, i32, i32, ctypes.c_float, ctypes.c_float, p, p,
                                   i32]
    lib.tl_add_rms_norm.restype = i32
    lib.tl_add_rms_norm.argtypes = [p, p, p, p, p, i64, i64, ctypes.c_float, i32]
    lib.tl_silu_and_mul.restype = i32
    lib.tl_silu_and_mul.argtypes = [p, p, i64, i64, i32]


def _compiler() -> Optional[list[str]]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name.split()[0]):
            return name.split()
    return None


def _build(compiler: list[str]) -> Path:
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    key = hashlib.sha256()
    for part in (*(s.read_bytes() for s in SOURCES), version.encode(), " ".join(FLAGS).encode(), _cpu_id().encode(),
                 torch.__version__.encode()):
        key.update(part)
        key.update(b"\0")
    out_dir = Path(envs.cache_dir()) / "cpu_native"
    path = out_dir / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([*compiler, *FLAGS, "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode:
            raise OSError(proc.stderr or f"{compiler[0]} exited with {proc.returncode}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)  # atomic: another process sees the old name or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _openmp_libs() -> set[str]:
    """The OpenMP runtimes mapped into this process (GNU, LLVM or Intel)."""
    try:
        with open("/proc/self/maps") as maps:
            names = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return set()
    return {n for n in names if any(k in Path(n).name for k in ("libgomp", "libiomp", "libomp"))}
