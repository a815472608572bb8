"""A `loralab sweep` with LoRA settings beyond r, alpha and target (DoRA, another dropout) names
its LoRA points after them, so it shares a results folder with the plain sweep: its own LoRA
runs train, the full fine-tuning runs (no LoRA settings) are reused."""

from __future__ import annotations

import yaml
from conftest import write_sst2

from loralab.cli import main


def test_a_dora_sweep_shares_the_plain_sweeps_results_folder(tmp_path, capsys):
    data = write_sst2(tmp_path / "sst2", n_train=16, n_dev=8)
    res = tmp_path / "res"
    argv = ["sweep", "--model", "tiny-llama", "--data-dir", str(data), "--output-dir", str(res),
            "--methods", "lora,full", "--lora-lr", "1e-3", "--full-lr", "1e-4", "--seeds", "1",
            "--quiet", "train.max_steps=2", "train.batch_size=8", "train.eval_batch_size=32"]  # fmt: skip
    assert main([*argv, "--study", "plain"]) == 0
    assert main([*argv, "--study", "dora", "lora.use_dora=true"]) == 0
    assert "2/2 points done (1 run by this worker, 1 reused)" in capsys.readouterr().out
    runs = {p.name: p for p in (res / "runs").iterdir()}
    assert sorted(runs) == [
        "sst2-full-tiny-llama-lr0.0001-s1",
        "sst2-lora-tiny-llama-lr0.001-s1-r8-a16-standard",  # the plain sweep's key, unchanged
        "sst2-lora-tiny-llama-lr0.001-s1-r8-a16-standard-dora",
    ]
    for name, dora in (("standard", False), ("standard-dora", True)):
        config = yaml.safe_load((runs[f"sst2-lora-tiny-llama-lr0.001-s1-r8-a16-{name}"] / "config.yaml").read_text())  # fmt: skip
        assert config["lora"]["use_dora"] is dora


def test_a_variant_sweep_stored_before_keys_named_settings_keeps_its_keys(tmp_path):
    """A DoRA sweep stored by a loralab whose keys did not name `-dora` continues as it was:
    the same command joins it and enqueues nothing new (its finished points stay reused)."""
    from loralab.study.grid import Plan
    from loralab.study.storage import STUDY_ATTR, load_study, open_storage

    data = write_sst2(tmp_path / "sst2", n_train=16, n_dev=8)
    res = tmp_path / "res"
    argv = ["sweep", "--model", "tiny-llama", "--data-dir", str(data), "--output-dir", str(res),
            "--methods", "lora", "--lora-lr", "1e-3", "--seeds", "1", "--study", "old",
            "--create-only", "lora.use_dora=true"]  # fmt: skip
    assert main(argv) == 0
    storage = open_storage(f"sqlite:///{res / 'study.db'}")
    study, plan = load_study(storage, "old")
    old = {k: v for k, v in plan.to_json().items() if k != "names_settings"}  # as stored before
    old_plan = Plan.from_json(old)
    old["fingerprint"] = old_plan.fingerprint()
    study.set_user_attr(STUDY_ATTR, old)
    for t in study.get_trials():  # the trials an old version enqueued
        storage.set_trial_user_attr(t._trial_id, "point", old_plan.points()[0]["key"])
    assert main(argv) == 0  # the same command: the same study, not "a different grid"
    study, plan = load_study(storage, "old")
    assert [p["key"] for p in plan.points()] == ["sst2-lora-tiny-llama-lr0.001-s1-r8-a16-standard"]
    assert [t.user_attrs["point"] for t in study.get_trials()] == [plan.points()[0]["key"]]
