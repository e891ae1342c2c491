"""What machine this is, for benchmark notes and logged run metadata."""

from __future__ import annotations

import ctypes.util
import platform
import subprocess
import sys
from pathlib import Path

TCMALLOC = ("tcmalloc_minimal", "tcmalloc")
"""Library names of tcmalloc (gperftools), the minimal one first."""


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
