"""A training command's process takes its imported libraries out of the collector's walks; a
library call in a long-lived process (a notebook, this test session) does not."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

from loralab.cli import main


def _train_args(data, out) -> list[str]:
    return ["train", "--task", "sst2", "--model", "tiny-llama", "--data-dir", str(data),
            "--output-dir", str(out), "--quiet", "train.max_steps=2", "train.batch_size=4"]  # fmt: skip


def test_the_command_freezes_its_imports(tmp_path, sst2_dir):
    # The command line as the installed script runs it (main() without arguments), then how
    # many objects the collector no longer walks.
    code = (
        "import gc, sys; from loralab.cli import main; "
        f"sys.argv = ['loralab', *{_train_args(sst2_dir, tmp_path / 'runs')!r}]; "
        "rc = main(); print('frozen', gc.get_freeze_count(), rc)"
    )
    env = {**os.environ, "LORALAB_ALLOCATOR": "system", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    _, frozen, rc = r.stdout.strip().splitlines()[-1].split()
    assert rc == "0"
    assert int(frozen) > 100_000  # torch, transformers, PEFT, datasets: ~460k objects


def test_a_call_from_python_freezes_nothing(tmp_path, sst2_dir):
    before = gc.get_freeze_count()
    assert main(_train_args(sst2_dir, tmp_path / "runs")) == 0
    assert gc.get_freeze_count() == before


def test_the_imports_run_without_the_collector():
    # In a fresh interpreter: the training stack's import starts no automatic collection (it
    # started ~1,100, seven of them full, before), and the collector is back on afterwards.
    code = (
        "import gc; from loralab.startup import freeze_imports; "
        "before = [s['collections'] for s in gc.get_stats()]; frozen = freeze_imports(); "
        "after = [s['collections'] for s in gc.get_stats()]; "
        "print(after[2] - before[2], after[1] - before[1], gc.isenabled(), frozen)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    full, middle, enabled, frozen = r.stdout.strip().splitlines()[-1].split()
    assert (full, middle, enabled) == ("0", "0", "True")
    assert int(frozen) > 100_000
