"""What machine this is, for benchmark notes and logged run metadata."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from lmcore.core.errors import StageError

log = logging.getLogger(__name__)

TCMALLOC = ("tcmalloc_minimal", "tcmalloc")
"""Library names of tcmalloc (gperftools), the minimal one first."""


def cache_dir() -> Path:
    """Where lmcore keeps what it measured about this machine (peak FLOP/s, kernel choices):
    ``$LMCORE_CACHE``, default ``~/.cache/lmcore``."""
    return Path(os.environ.get("LMCORE_CACHE", Path.home() / ".cache" / "lmcore"))


def read_cache(path: Path, what: str) -> dict:
    """The JSON object of the cache file ``path`` (``what`` it holds names it in a warning); empty
    when the file is missing, unreadable or not an object: a cache is measured again, never fatal."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # ValueError: bad JSON, and bytes that are not UTF-8
        log.warning("ignoring unreadable %s cache %s (%s)", what, path, e)
        return {}
    return data if isinstance(data, dict) else {}


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


MATMUL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
"""The CPU flags that decide which precision multiplies matrices fast (recorded with every number)."""


def cpu_flags() -> str:
    """Which of :data:`MATMUL_FLAGS` this CPU has (from /proc/cpuinfo), space-separated, or a
    sentence saying it has none of them or that the CPU could not be read."""
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    return " ".join(f for f in MATMUL_FLAGS if f in words) or "none of " + "/".join(MATMUL_FLAGS)


def git_commit(root: str | Path) -> str:
    """The short commit of the git checkout at ``root``, with `` + uncommitted`` when tracked files
    have changed since; ``unknown`` outside a checkout or without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + (" + uncommitted" if dirty else "")


def cxx_compiler() -> str | None:
    """The C++ compiler ``torch.compile`` builds its CPU kernels with, found as inductor finds it
    (``$CXX`` as torch read it on import, else ``g++``, each asked for ``--version``), or None where
    none runs."""
    try:
        from torch._inductor import cpp_builder, exc  # lazy: inductor loads only for a compiled run
    except ImportError:  # a torch without inductor's builder: what the shell finds
        return shutil.which(os.environ.get("CXX", "g++"))
    try:
        return cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return None


def require_cxx_compiler(setting: str, device: Any) -> None:
    """Refuse ``setting`` (what asked for ``torch.compile``, e.g. ``pretrain.compile = true``) with
    a :class:`StageError` when ``device`` (a ``torch.device``) is a CPU and no C++ compiler runs:
    inductor builds CPU kernels in C++ and would otherwise fail at the first compiled call with a
    long traceback (``InvalidCxxCompiler``), after the model and data were loaded."""
    if device.type == "cpu" and cxx_compiler() is None:
        raise StageError(f"{setting}: torch.compile builds its CPU kernels with a C++ compiler and none runs here "
                         f"(it looks for $CXX, else g++): install one (Debian, Ubuntu: apt-get install g++; "
                         f"or set CXX to its path) or turn compiling off")


def find_tcmalloc() -> str | None:
    """The soname of a tcmalloc library this machine's dynamic loader finds (``ldconfig``), e.g.
    ``libtcmalloc_minimal.so.4``; None where there is none, or off Linux (no ``LD_PRELOAD``)."""
    if not sys.platform.startswith("linux"):
        return None
    for name in TCMALLOC:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def allocator() -> str:
    """The malloc this process runs with: ``tcmalloc``, ``jemalloc`` or ``mimalloc`` when one is
    mapped into it (preloaded), else ``system``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if f"lib{name}" in maps:
            return name
    return "system"


MALLOC_KEEP_BYTES = 1 << 30
"""glibc malloc settings of :func:`tune_malloc`: blocks up to 1 GiB come from the heap and up to
1 GiB of freed heap is kept for the next allocation."""


def tune_malloc() -> str:
    """Make glibc's malloc keep and reuse large freed blocks in this process, as tcmalloc does;
    return what the process allocates with now (``tcmalloc``/``jemalloc``/``mimalloc`` when one is
    preloaded, which is left alone; ``glibc (tuned)``; or ``system`` off glibc).

    By default glibc serves each block over its mmap threshold (dynamic, at most 32 MiB) with a
    fresh ``mmap`` and returns it on free, so a training step's large activations (the 2048 x 4096
    float32 logits of a batch of 8 x 256 tokens: 32 MiB) are page-faulted in again at every step.
    Measured on a 2-core Zen 4: one multiply writing such a buffer, 13.0 ms with the defaults against
    2.1 ms after this; the training step 12-18 % faster (``benchmarks/RESULTS.md``). The cost is
    that freed memory stays with the process (its peak, not more) until it ends."""
    name = allocator()
    if name != "system":
        return name
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return "system"
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    ok = mallopt(m_mmap_threshold, ctypes.c_int(MALLOC_KEEP_BYTES)) and mallopt(m_trim_threshold,
                                                                                 ctypes.c_int(MALLOC_KEEP_BYTES))
    return "glibc (tuned)" if ok else "system"
