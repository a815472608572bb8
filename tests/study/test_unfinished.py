"""A point whose training crashes by itself (a bug, not a user error) leaves `sweep`, `sweep
worker` and `study` unfinished: the other points still run, the command exits 1, and its last
line names the crashed point and where its log is.

The crash happens in the real training child (forked from the fork server, which knows nothing
of this test): the model is a folder with remote code whose forward raises on seed 2 only.
"""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import write_sst2

from loralab.cli import main

pytestmark = pytest.mark.long

CRASHING = """
import torch
from transformers import LlamaForSequenceClassification


class CrashingLlamaForSequenceClassification(LlamaForSequenceClassification):
    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if self.training and torch.initial_seed() == 2:  # the training seed
            raise RuntimeError("simulated crash in the model's own code")
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs
        )
"""
SMALL = ["train.max_steps=2", "train.batch_size=8", "train.eval_batch_size=32",
         "train.save_steps=100"]  # fmt: skip


@pytest.fixture
def crashing_model(tmp_path) -> Path:
    """tiny-llama as a user's folder whose own (remote) code crashes when trained on seed 2."""
    from loralab.models.build import resolve

    folder = tmp_path / "crashing-llama"
    shutil.copytree(resolve("tiny-llama", progress=False), folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoModelForSequenceClassification": "crashing.CrashingLlamaForSequenceClassification"
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "crashing.py").write_text(textwrap.dedent(CRASHING))
    return folder


def _assert_unfinished(
    results: Path, out: str, url: str | None = None, done: str = "1/2 points done (1 run"
) -> None:
    """`out` names the one crashed point (on seed 2) as not finished, in a line saying `done`."""
    from loralab.study.storage import load_study, open_storage

    (line,) = [ln for ln in out.splitlines() if "not finished" in ln]
    assert done in line, line
    (bad,) = re.findall(r"not finished: (\S+) \(logs in ", line)  # the crashed point alone
    assert "-s2" in bad
    log = (results / "logs" / f"{bad}.log").read_text()
    assert "RuntimeError: simulated crash in the model's own code" in log  # the traceback
    # Recorded as a crash (the child's exit status 1): not a user error, not a divergence.
    note = json.loads((results / "runs" / bad / "sweep.json").read_text())
    assert [(a["outcome"], a["exitcode"]) for a in note["attempts"]] == [("crashed", 1)]
    (name,) = re.findall(r"^study '([^']+)'", line)
    study, _ = load_study(open_storage(url or f"sqlite:///{results / 'study.db'}"), name)
    outcomes = {t.user_attrs["point"]: t.user_attrs.get("outcome") for t in study.trials}
    assert outcomes == {bad: "crashed", **{k: "completed" for k in outcomes if k != bad}}
    (good,) = [p for p in (results / "runs").iterdir() if p.name != bad]  # seed 1: it trained
    assert "-s1" in good.name and (good / "summary.json").is_file()


def _grid(tmp_path: Path, model: Path) -> list[str]:
    data = write_sst2(tmp_path / "sst2", n_train=16, n_dev=8)
    return ["--model", str(model), "--data-dir", str(data), "--output-dir",
            str(tmp_path / "res"), "--methods", "lora", "--lora-lr", "1e-3", "--seeds", "1,2",
            *SMALL]  # fmt: skip


def test_a_sweep_with_a_crashed_point_exits_1(tmp_path, crashing_model, capsys):
    code = main(["sweep", *_grid(tmp_path, crashing_model), "--trust-remote-code", "--quiet"])
    assert code == 1
    _assert_unfinished(tmp_path / "res", capsys.readouterr().out)


def test_a_sweep_worker_with_a_crashed_point_exits_1(tmp_path, crashing_model, capsys):
    url = f"sqlite:///{tmp_path / 's.db'}"
    create = ["sweep", "--create-only", "--study", "s", "--storage", url]
    assert main([*create, *_grid(tmp_path, crashing_model), "model.trust_remote_code=true"]) == 0
    capsys.readouterr()
    worker = ["sweep", "worker", "--study", "s", "--storage", url, "--trust-remote-code"]
    assert main([*worker, "--quiet"]) == 1
    _assert_unfinished(tmp_path / "res", capsys.readouterr().out, url)


def test_a_study_with_a_crashed_point_exits_1(tmp_path, crashing_model, capsys):
    write_sst2(tmp_path / "data" / "glue" / "sst2", n_train=16, n_dev=8)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "crash",
        "data_root": str(tmp_path / "data"),
        "base": {"model": {"name": str(crashing_model), "trust_remote_code": True},
                 "train": {"max_steps": 2, "batch_size": 8, "eval_batch_size": 32,
                           "save_steps": 100}},
        "tasks": {"sst2": {"data_dir": "glue/sst2", "max_train_examples": 16,
                           "max_eval_examples": 8, "max_length": 32}},
        "methods": ["lora"],
        "lr": {"lora": [1.0e-3]},
        "seeds": [1, 2],
    }, sort_keys=False))  # fmt: skip
    results = tmp_path / "res"
    argv = ["study", str(spec), "--output-dir", str(results), "--workers", "1"]
    assert main([*argv, "--trust-remote-code", "--quiet"]) == 1
    out = capsys.readouterr().out
    # Seed 1 ran in the grid phase; seed 2 (at the best lr) in the seeds phase, where it crashed.
    assert "study 'crash-sst2-grid': 1/1 points done (1 run by this worker" in out
    _assert_unfinished(results, out, done="0/1 points done (0 run")
