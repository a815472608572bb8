"""Where loralab keeps what it builds once: models, features, probe results."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$LORALAB_CACHE if set, else ~/.cache/loralab; created on demand."""
    path = Path(os.environ.get("LORALAB_CACHE") or "~/.cache/loralab").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
