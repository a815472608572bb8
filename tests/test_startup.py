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
