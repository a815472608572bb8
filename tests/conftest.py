"""Shared fixtures: an isolated cache, no network, small task files written by the tests."""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

# Before transformers/datasets are imported anywhere: never reach for the hub in tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["LORALAB_STUDY_WORKERS"] = "1"  # one study process unless a test asks for more
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # `-n N`: share the cores, don't oversubscribe
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("OMP_NUM_THREADS", _threads)
    os.environ.setdefault("MKL_NUM_THREADS", _threads)


PRECISION_ENV = "LORALAB_PRECISION"


def pytest_generate_tests(metafunc):
    """Tests marked `precision` run once with `auto` forced to bf16 and once to fp32, so one
    pytest command covers both kinds of CPU (AMX, where auto picks bf16; AVX2, fp32). A
    precision set from outside (LORALAB_PRECISION=...) runs everything in that one instead."""
    mark = metafunc.definition.get_closest_marker("precision")
    slow = metafunc.definition.get_closest_marker("slow")
    if mark and not slow and not os.environ.get(PRECISION_ENV):
        # `@pytest.mark.precision("bf16")`: only that one (the other is covered elsewhere).
        metafunc.parametrize(
            "_forced_precision", list(mark.args) or ["bf16", "fp32"], indirect=True
        )


@pytest.fixture(autouse=True)
def _forced_precision(request, monkeypatch):
    value = getattr(request, "param", None)
    if value:
        monkeypatch.setenv(PRECISION_ENV, value)  # subprocesses the test starts inherit it
    return value


def pytest_configure(config):
    # `-n auto` hands out tests one at a time (xdist's default sends each worker a quarter of
    # its share in one block, which would give one worker every `long` test).
    if getattr(config.option, "maxschedchunk", 0) is None:
        config.option.maxschedchunk = 1


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` once per test session, by whichever xdist worker asks first; the others
    wait for it and reuse the folder. For expensive reference runs that several tests compare
    against: a module-scoped fixture would be built again on every worker that gets one of
    its tests (`--dist loadgroup` would group them, but it does not group on pytest 9.2:
    pytest-xdist issue 1386)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by this session's workers (and only by them)
    folder = root / f"once-{name}"
    with FileLock(f"{folder}.lock"):
        if not (folder / ".built").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed half-way
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


FAULT_RUN_OPTS = ["--model", "tiny-llama", "--task", "sst2", "--quiet"]
FAULT_RUN_OVERRIDES = ["train.max_steps=4", "train.save_steps=2", "train.batch_size=8",
                       "train.logging_steps=2"]  # fmt: skip


@pytest.fixture
def pg_url() -> str:
    """The throwaway PostgreSQL server's URL (.ci/run starts one; by hand: `. .ci/postgres.sh
    && pg_start`). Without one the test skips, except under CI, where that is a failure: the
    PostgreSQL paths would otherwise go untested without anyone noticing."""
    url = os.environ.get("LORALAB_TEST_PG_URL")
    if not url and os.environ.get("CI"):
        pytest.fail("CI is set but LORALAB_TEST_PG_URL is not: .ci/run starts PostgreSQL for this")
    if not url:
        pytest.skip("LORALAB_TEST_PG_URL is not set: no PostgreSQL server (see .ci/postgres.sh)")
    return url


@pytest.fixture
def shared(tmp_path_factory):
    """A finished tiny LoRA run (with checkpoints) and its data, trained once per session; the
    fault tests copy it before they damage it (`Case.run`)."""
    from loralab.cli import main

    def build(root: Path) -> None:
        data = write_sst2(root / "sst2")
        args = ["train", *FAULT_RUN_OPTS, "--data-dir", str(data), "--output-dir", str(root),
                *FAULT_RUN_OVERRIDES, "run.name=r"]  # fmt: skip
        assert main(args) == 0

    root = built_once(tmp_path_factory, "fault-run", build)
    return root / "r", root / "sst2"


def pytest_collection_modifyitems(items):
    """The `long` tests first: handed out one at a time, they spread over the workers instead
    of leaving one of them running alone at the end (longest-first list scheduling)."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable


@pytest.fixture(autouse=True, scope="session")
def _cache(tmp_path_factory):
    """One loralab cache per test session (tiny models are materialised once)."""
    if os.environ.get("LORALAB_TEST_REAL_CACHE"):
        yield
        return
    path = tmp_path_factory.mktemp("loralab-cache")
    old = os.environ.get("LORALAB_CACHE")
    os.environ["LORALAB_CACHE"] = str(path)
    yield
    if old is None:
        os.environ.pop("LORALAB_CACHE", None)
    else:
        os.environ["LORALAB_CACHE"] = old


POS = ["good", "great", "fine", "lovely", "superb", "nice"]
NEG = ["bad", "awful", "poor", "dull", "boring", "weak"]


def _sentence(rng: random.Random, label: int) -> str:
    word = rng.choice(POS if label else NEG)
    filler = rng.choice(["the film was", "this movie is", "a story that felt", "acting is"])
    return f"{filler} {word}"


def write_sst2(folder: Path, n_train: int = 64, n_dev: int = 32, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2
            rows.append(f"{_sentence(rng, label)}\t{label}")
        (folder / name).write_text("\n".join(rows) + "\n")
    return folder


def write_mrpc(folder: Path, n: int = 16) -> Path:
    """MRPC as released: a UTF-8 byte-order mark before the header, quote characters in strings."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train.tsv", "dev.tsv"):
        rows = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        for i in range(n):
            rows.append(f'{i % 2}\t{i}\t{i + 100}\tHe said "yes {i}\tHe said " yes {i}')
        (folder / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def write_rte(folder: Path, n: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train.tsv", "dev.tsv"):
        rows = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            lab = "entailment" if i % 2 == 0 else "not_entailment"
            rows.append(f"{i}\tA man walks {i}.\tSomeone walks.\t{lab}")
        (folder / name).write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture
def sst2_dir(tmp_path) -> Path:
    return write_sst2(tmp_path / "sst2")


# ---------------------------------------------------------------------------------------------
# Fault tests (test_faults*.py): a case's folder, a copy of the shared run, damaged inputs


@dataclass
class Case:
    """The folder a case works in, with helpers to make damaged inputs inside it."""

    dir: Path
    shared_run: Path
    shared_data: Path

    def run(self, status: str | None = None) -> Path:
        """A private copy of the shared run; `status` rewrites its summary (e.g. killed)."""
        run = self.dir / "run"
        if not run.exists():
            shutil.copytree(self.shared_run, run)
        if status is not None:
            summary = json.loads((run / "summary.json").read_text())
            (run / "summary.json").write_text(json.dumps({**summary, "status": status}))
        return run

    def data(self) -> Path:
        return write_sst2(self.dir / "sst2")

    def file(self, name: str, content: bytes | str = "x") -> Path:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def out(self, name: str = "out") -> str:
        return str(self.dir / name)


# ---------------------------------------------------------------------------------------------
# Real processes and real kills (resume, sweep and study tests)

KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from transformers import TrainerCallback
    from loralab.config import build_config
    from loralab.train import train

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step >= int(os.environ["KILL_AT"]):
                os.kill(os.getpid(), signal.SIGKILL)  # a real, unclean kill

    cfg = build_config(overrides=sys.argv[1:])
    train(cfg, quiet=True, callbacks=[KillAfterSave()])
    """
)
"""A training script that SIGKILLs itself at the first checkpoint at or after step $KILL_AT."""


def start_cli(args, log: Path) -> subprocess.Popen:
    """`loralab ARGS` as a child process on one thread, its output in `log`."""
    return subprocess.Popen(
        [sys.executable, "-m", "loralab.cli", *args],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def run_status(run: Path) -> str | None:
    """A run folder's summary status; None before it has a summary."""
    s = run / "summary.json"
    return json.loads(s.read_text()).get("status") if s.is_file() else None


def lock_held(lock: Path) -> bool:
    """Whether a live process holds `lock` (a point's flock in RESULTS/locks)."""
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def process_gone(pid: int) -> bool:
    """Whether process `pid` has stopped running (exited, or a zombie awaiting its parent)."""
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
