"""`loralab train --max-eval-examples N` evaluates on the first N dev examples."""

from __future__ import annotations

import json

from loralab.cli import main


def test_train_max_eval_examples_caps_the_dev_set(tmp_path, sst2_dir):
    args = ["train", "--model", "tiny-llama", "--task", "sst2", "--data-dir", str(sst2_dir),
            "--output-dir", str(tmp_path), "--quiet", "train.max_steps=2", "train.batch_size=8",
            "train.save_steps=100", "run.name=r"]  # fmt: skip
    assert main([*args, "--max-eval-examples", "8"]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["examples"]["eval"] == 8  # of the 32 dev examples
    assert summary["examples"]["train"] == 64
