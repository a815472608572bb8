"""Once per training process, after its libraries are imported: take them out of the collector.

torch, transformers, PEFT and datasets leave ~460,000 objects behind when imported (modules,
classes, functions), all alive until the process ends. Python's cyclic collector walks every
one of them on each full collection: 0.25 s a time on a 2-core Xeon. The Trainer runs one full
collection as training starts (accelerate's `free_memory`), and the interpreter runs others on
its own as objects pile up. `gc.freeze()` moves what exists now to a generation the collector
never walks, so those collections see only what the run itself creates.

The collector is also paused while they are imported. The imports build those objects in
cycles (classes, module globals) and the interpreter starts a collection every 700 new ones:
~1,100 collections, seven of them full, ~1 s of a ~6 s import on that Xeon, which find almost
nothing to free. What the imports did leave unreachable (~300,000 objects, ~9 MB) is frozen with
the rest instead of collected: a full collection of it costs 0.5 s, and this process exits soon.
Python's documentation gives the same order (disable early, freeze) for processes that fork.

Only for a process that trains once and exits (`loralab train`, a study's point): in a notebook
or a test session an earlier run's reference cycles (a model, a Trainer) would be frozen with
the rest and never freed.
"""

from __future__ import annotations

import gc


def freeze_imports() -> int:
    """Import the training stack with the collector paused, then freeze every object alive;
    returns how many were frozen."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        from . import train  # noqa: F401 - torch, transformers, PEFT, datasets: imported once anyway
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
    return gc.get_freeze_count()
