"""What the precision and attention probes share: interleaved timing and a per-machine JSON cache."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

from .cache import cache_dir


def best_of_interleaved(time_a: Callable[[], float], time_b: Callable[[], float], bursts=3):
    """(best a, best b) over alternating bursts: a load that comes and goes hits both alike."""
    times = [(time_a(), time_b()) for _ in range(bursts)]
    return min(t[0] for t in times), min(t[1] for t in times)


# The vector and matrix extensions that decide which kernels run (and so which dtype or
# attention kernel is faster); a model name alone can cover several CPU generations.
_ISA = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo; empty where there is none (not Linux)."""
    return set(_cpuinfo("flags").split())


def _cpuinfo(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo, "" where there is none (not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    """The CPU's vendor id (GenuineIntel, AuthenticAMD), "" where unknown."""
    return _cpuinfo("vendor_id")


def _cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def machine() -> str:
    """This CPU for a cache key: its model name and its kernel-deciding extensions.

    A name such as "AMD EPYC" covers generations with AVX2 only and with AVX-512 BF16, and a
    cache in a home folder shared by several machines must keep their probes apart.
    """
    flags = cpu_flags()
    return f"{_cpu_name()}[{','.join(f for f in _ISA if f in flags)}]"


def _path(name: str) -> Path:

    return cache_dir() / name


def read(name: str) -> dict:
    """The stored probes in $LORALAB_CACHE/NAME, {} when absent or unreadable."""
    try:
        return json.loads(_path(name).read_text())
    except (OSError, ValueError):
        return {}


def store(name: str, key: str, value: dict) -> None:
    """Add one probe to $LORALAB_CACHE/NAME; a read-only cache only costs a re-probe."""
    path = _path(name)
    stored = {**read(name), key: value}
    with contextlib.suppress(OSError):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(stored, indent=1))
        os.replace(tmp, path)
