"""Opening finished runs: what counts as a LoRA run, and remote code from the command line only."""

from __future__ import annotations

import pytest

from loralab import runs
from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.tracking import create_run_dir


def _run_dir(tmp_path, *overrides):
    cfg = build_config(overrides=[f"run.output_dir={tmp_path}", "run.name=r", *overrides])
    return create_run_dir(cfg)


def test_a_full_fine_tuning_run_has_no_adapter_to_open(tmp_path):
    run = _run_dir(tmp_path, "train.method=full")
    with pytest.raises(LoralabError, match="full fine-tuning run .* no adapter to merge"):
        runs.open_lora_run(run, "merge")


def test_an_unfinished_lora_run_says_how_to_finish_it(tmp_path):
    run = _run_dir(tmp_path)
    with pytest.raises(LoralabError, match="no saved adapter .*loralab train --resume"):
        runs.open_lora_run(run, "analyze")


def test_a_diverged_run_is_not_sent_to_resume(tmp_path):
    run = _run_dir(tmp_path)
    (run / "summary.json").write_text('{"status": "diverged"}')
    with pytest.raises(LoralabError, match="status: diverged.*lower train.lr") as e:
        runs.open_lora_run(run, "merge")
    assert "--resume" not in str(e.value)


def test_a_damaged_adapter_file_is_named(tmp_path):
    run = _run_dir(tmp_path)
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00not json")
    with pytest.raises(LoralabError, match="adapter_model.safetensors' is not a readable"):
        runs.open_lora_run(run)


def test_remote_code_comes_from_the_command_line_and_the_config_is_not_changed(tmp_path, capsys):
    cfg = build_config(overrides=["model.trust_remote_code=true"])
    off = runs.command_line_trust(cfg, False, tmp_path / "config.yaml")
    assert off.model.trust_remote_code is False and cfg.model.trust_remote_code is True
    assert "remote code stays off" in capsys.readouterr().err
    on = runs.command_line_trust(off, True, tmp_path / "config.yaml")
    assert on.model.trust_remote_code is True and off.model.trust_remote_code is False
