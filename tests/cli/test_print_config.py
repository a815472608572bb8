"""`loralab train --print-config`: the merged config as YAML, nothing loaded or written."""

from __future__ import annotations

import yaml

from loralab.cli import main


def test_prints_the_merged_config_and_writes_nothing(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text("lora:\n  r: 4\ntrain:\n  lr: 1.0e-3\n  epochs: 2\n")
    out = tmp_path / "runs"
    argv = ["train", "--config", str(base), "--model", "no-such-hub/model", "--task", "rte",
            "--output-dir", str(out), "--max-train-examples", "50", "lora.r=16", "train.seed=7",
            "--print-config"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    cfg = yaml.safe_load(text)
    # defaults < --config < flags < overrides
    assert cfg["lora"]["r"] == 16 and cfg["lora"]["alpha"] == 16.0
    assert cfg["train"]["lr"] == 1e-3 and cfg["train"]["epochs"] == 2.0
    assert cfg["train"]["seed"] == 7 and cfg["train"]["method"] == "lora"
    assert cfg["data"]["task"] == "rte" and cfg["data"]["max_train_examples"] == 50
    assert cfg["model"]["name"] == "no-such-hub/model"  # not looked up: nothing is loaded
    assert not out.exists()
    # What it prints is a config file: read back, it prints the same.
    again = tmp_path / "again.yaml"
    again.write_text(text)
    assert main(["train", "--config", str(again), "--print-config"]) == 0
    assert capsys.readouterr().out == text


def test_a_bad_value_is_still_refused(tmp_path, capsys):
    assert main(["train", "--model", "tiny-llama", "lora.dropout=1.5", "--print-config"]) == 2
    assert "lora.dropout" in capsys.readouterr().err


def test_with_resume_it_points_at_the_runs_own_config(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert main(["train", "--resume", str(run), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "config.yaml" in err and "--print-config" in err
