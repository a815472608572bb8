"""What the precision and attention probes share: interleaved timing and a per-machine JSON cache."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .cache import cache_dir


def best_of_interleaved(time_a: Callable[[], float], time_b: Callable[[], float], bursts=3):
    """(best a, best b) over alternating bursts: a load that comes and goes hits both alike."""
    times = [(time_a(), time_b()) for _ in range(bursts)]
    return min(t[0] for t in times), min(t[1] for t in times)


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
