"""The heap allocator of training processes: tcmalloc or jemalloc where the system has one.

glibc's malloc keeps freed blocks resident and fragments when batches change length: a LoRA run
of SmolLM2-135M on RTE (batch 8, 25–256 tokens, 1 thread, AMD EPYC) grew its peak RSS by ~0.5 GB
each time a long batch followed short ones, 3.16 → 4.19 GB over 100 steps. With the same steps,
tcmalloc peaked at 3.24 GB and jemalloc at 3.07 GB; over 40 steps with nothing else running,
glibc 3,340 MB in 114.7 s, tcmalloc 2,603 MB in 110.3 s, jemalloc 2,488 MB in 116.7 s (its
returning pages to the system costs it 8× glibc's system time). So `auto` takes tcmalloc, then
jemalloc, then the system's malloc. The results are the same bit for bit: only where tensors
live changes, not what is computed.

A process's allocator is fixed when it starts, so the command line starts itself again with the
library in `LD_PRELOAD` (Linux only); every process it starts (study workers, their training
processes) inherits it. `LORALAB_ALLOCATOR`: auto (default), system, tcmalloc, jemalloc, or a
library's path. Debian/Ubuntu: `apt install libtcmalloc-minimal4` (or `libjemalloc2`); conda:
`conda install gperftools` (or `jemalloc`).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from .errors import LoralabError

ENV = "LORALAB_ALLOCATOR"
LIBRARIES = {  # name -> file names, best first
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so"),
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
}
AUTO_ORDER = ("tcmalloc", "jemalloc")
LOADED = "LORALAB_ALLOCATOR_LOADED"  # set on the restarted process: the library it was given


def search_dirs() -> list[Path]:
    """Where shared libraries are looked for: this environment's (conda), then the system's."""
    dirs = [Path(sys.prefix) / "lib"]
    dirs += [Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    for root in ("/usr/lib", "/lib", "/usr/local/lib"):
        dirs += [Path(root) / f"{platform.machine()}-linux-gnu", Path(root)]
    return dirs + [Path("/usr/lib64"), Path("/lib64")]


def find(name: str, dirs: list[Path] | None = None) -> Path | None:
    """The first library file of allocator `name` in `dirs` (default: `search_dirs()`)."""
    for d in search_dirs() if dirs is None else dirs:
        for file in LIBRARIES[name]:
            if (d / file).is_file():
                return d / file
    return None


def choose(setting: str | None = None, dirs: list[Path] | None = None) -> tuple[str, Path | None]:
    """(allocator name, library to preload or None for the system's) for a `LORALAB_ALLOCATOR`
    value (default: the environment's, else auto)."""
    raw = (os.environ.get(ENV, "") if setting is None else setting).strip() or "auto"
    dirs = search_dirs() if dirs is None else dirs
    if raw == "system":
        return "system", None
    if raw == "auto":
        for name in AUTO_ORDER:
            lib = find(name, dirs)
            if lib is not None:
                return name, lib
        return "system", None
    if raw in LIBRARIES:
        lib = find(raw, dirs)
        if lib is None:
            raise LoralabError(
                f"{ENV}={raw}: no {raw} library found (looked for {', '.join(LIBRARIES[raw])} "
                f"in {', '.join(str(d) for d in dirs)}). "
                f"Install it (Debian/Ubuntu: apt install "
                f"{'libtcmalloc-minimal4' if raw == 'tcmalloc' else 'libjemalloc2'}), give the "
                f"library's path, or set {ENV}=auto to use whichever is there."
            )
        return raw, lib
    path = Path(raw)
    if not path.is_file():
        raise LoralabError(
            f"{ENV}={raw!r} is neither auto, system, tcmalloc, jemalloc nor a library file: "
            "set one of those words, or the path of a malloc library (e.g. "
            "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4)."
        )
    # Another library (mimalloc, a custom build) is named by its file: 'system' would read as
    # glibc's, both in the records and in `restart_command`'s "already running under it".
    kind = kind_of(str(path))
    return (kind if kind != "system" else path.name), path


def kind_of(text: str) -> str:
    """'tcmalloc', 'jemalloc' or 'system' for a library path or a process's memory map."""
    return next((name for name in LIBRARIES if name in text), "system")


def _maps() -> str | None:
    try:
        return Path("/proc/self/maps").read_text()
    except OSError:
        return None


def current(maps: str | None = None, env: dict | None = None) -> str:
    """The allocator this process runs with (read from /proc/self/maps; 'system' elsewhere): a
    known one by name, a library given by path (`LOADED`) by its file name."""
    maps = _maps() if maps is None else maps
    if maps is None:
        return "system"
    kind = kind_of(maps)
    given = (os.environ if env is None else env).get(LOADED)
    if kind == "system" and given and (given in maps or str(Path(given).resolve()) in maps):
        return Path(given).name
    return kind


def preload_env(env: dict, lib: Path) -> dict:
    """`env` with `lib` first in LD_PRELOAD (and tcmalloc's >1 GB allocation notices off)."""
    preload = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p != str(lib)]
    out = {**env, "LD_PRELOAD": " ".join([str(lib), *preload])}
    # tcmalloc prints a stack trace for every allocation over 1 GB (long-sequence activations).
    out.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    return out


def restart_command(argv0: str, argv: list[str], env: dict | None = None):
    """(command, environment) that start this command line again under the chosen allocator,
    or None: it already runs under it, the system's is chosen, not Linux, or the process is not
    the `loralab` command itself (`argv0`: sys.argv[0]; a script that calls `main()` is not
    started again)."""
    env = dict(os.environ if env is None else env)
    if not sys.platform.startswith("linux"):
        return None
    if argv0.endswith(os.path.join("loralab", "cli", "__main__.py")):
        cmd = [sys.executable, "-m", "loralab.cli", *argv]
    elif Path(argv0).name == "loralab":
        cmd = [sys.executable, argv0, *argv]  # the summary keeps recording `loralab ...`
    else:
        return None
    name, lib = choose(env.get(ENV, ""))
    # LOADED: a library that loads but does not show under its name in the map: no loop.
    if lib is None or current(env=env) == name or env.get(LOADED) == str(lib):
        return None
    return cmd, {**preload_env(env, lib), LOADED: str(lib)}
