"""A study never reuses a finished LoRA run that kept frozen a module loralab now trains (the
built-in MiniLM's never-trained pooler, frozen by LoRA runs from before that was fixed): the
command stops with exit 2 and the run's files stay as they were."""

from __future__ import annotations

import json
from dataclasses import replace

from conftest import write_sst2

from loralab import models
from loralab.cli import main


def _sweep(tmp_path) -> list[str]:
    data = write_sst2(tmp_path / "sst2", n_train=16, n_dev=8)
    return ["sweep", "--model", "tiny-bert", "--data-dir", str(data), "--output-dir",
            str(tmp_path / "res"), "--methods", "lora", "--lora-lr", "1e-3", "--seeds", "1",
            "train.max_steps=2", "train.batch_size=8", "train.eval_batch_size=32"]  # fmt: skip


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_lora_run_that_kept_an_untrained_module_frozen_is_not_reused(
    tmp_path, monkeypatch, capsys
):
    argv = [*_sweep(tmp_path), "--quiet"]  # each study below claims the run folder anew
    assert (
        main([*argv, "--study", "first"]) == 0
    )  # tiny-bert declares nothing untrained: pooler frozen
    (run,) = (tmp_path / "res" / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["new_modules"] == ["classifier"]
    assert "retrained" not in summary["identity"]["model"]
    capsys.readouterr()
    assert main([*argv, "--study", "second"]) == 0  # reused as it is
    assert "1 reused" in capsys.readouterr().out

    # Now tiny-bert's pooler is declared untrained, as MiniLM's is: that run is stale.
    bert = models.BUILTIN_MODELS["tiny-bert"]
    monkeypatch.setitem(models.BUILTIN_MODELS, "tiny-bert", replace(bert, untrained=("pooler",)))
    before = _files(run)
    assert main([*argv, "--study", "third"]) == 2
    err = capsys.readouterr().err
    assert str(run) in err and "kept it frozen" in err and "tiny-bert's pooler" in err
    assert _files(run) == before  # nothing of it touched

    # A run that trained the pooler (as runs now record it) is reused again.
    summary["identity"]["model"]["retrained"] = ["pooler"]
    (run / "summary.json").write_text(json.dumps(summary))
    assert main([*argv, "--study", "fourth"]) == 0
    assert "1 reused" in capsys.readouterr().out
