"""The two lines a run prints before its first step: what trains and what `auto` chose."""

from __future__ import annotations

from loralab.cli import main
from loralab.summary import headline, metrics_text


def _summary(**over) -> dict:
    s = {
        "task": "sst2", "method": "lora", "model": "smollm2-135m",
        "lora": {"r": 8, "alpha": 16.0, "target": "standard"},
        "params": {"trainable": 461952, "total": 134976960, "trainable_share_pct": 0.34224},
        "examples": {"train": 3668, "eval": 408},
        "precision": "bf16",
        "precision_decision": {"precision": "bf16", "reason": "measured",
                               "probe": {"fp32_s": 0.0097, "bf16_s": 0.0048, "choice": "bf16"}},
        "attention": {"implementation": "eager", "reason": "measured",
                      "probe": {"sdpa_s": 0.0015, "eager_s": 0.00083}},
        "compile": {"compile": False, "reason": "250 steps < 600"},
        "layout": {"workers": 1, "threads": 1, "cores": 2},
    }  # fmt: skip
    return s | over


def test_a_lora_run_with_measured_choices():
    run, chose = headline(_summary(), 250)
    assert run == (
        "run: sst2 · lora r=8 α=16 standard · smollm2-135m · 461,952 of 134,976,960 weights "
        "trained (0.342%) · 3,668 train / 408 dev examples · 250 steps"
    )
    assert chose == (
        "chose: bf16 (measured: 2.0× fp32) · eager attention (measured: 1.8× sdpa) · layers not "
        "compiled: 250 steps < 600 · 1 thread, 2 cores"
    )


def test_a_full_run_with_settings_from_the_config_and_study_workers():
    s = _summary(
        method="full", lora=None,
        params={"trainable": 1000, "total": 1000, "trainable_share_pct": 100.0},
        precision="fp32", precision_decision={"precision": "fp32", "reason": "set in the config"},
        attention={"implementation": "sdpa", "reason": "set in the config"},
        compile={"compile": True, "reason": "train.compile=true"},
        layout={"workers": 2, "threads": 1, "cores": 2},
    )  # fmt: skip
    run, chose = headline(s, 12)
    assert run.startswith("run: sst2 · full · smollm2-135m · 1,000 of 1,000 weights trained (100%)")
    assert chose == (
        "chose: fp32 (set in the config) · sdpa attention (set in the config) · compiled layers: "
        "train.compile=true · 1 thread, 2 cores, 2 workers side by side"
    )


def test_a_list_of_modules_is_named_by_its_members():
    run, _ = headline(_summary(lora={"r": 4, "alpha": 8, "target": ["q_proj", "k_proj"]}), 1)
    assert "lora r=4 α=8 q_proj+k_proj" in run


def test_metrics_text_shows_floats_only():
    assert metrics_text({"accuracy": 0.85321, "n": 872, "f1": 0.5}) == "accuracy=0.8532, f1=0.5000"


def test_the_command_prints_them_before_training_and_not_when_quiet(tmp_path, sst2_dir, capsys):
    argv = ["train", "--task", "sst2", "--model", "tiny-llama", "--data-dir", str(sst2_dir),
            "--output-dir", str(tmp_path / "runs"), "train.max_steps=2", "train.batch_size=4",
            "train.precision=fp32", "model.attention=eager"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    run = next(line for line in err.splitlines() if line.startswith("run: "))
    assert run.startswith("run: sst2 · lora r=8 α=16 standard · tiny-llama · ") and run.endswith(" · 2 steps")  # fmt: skip
    chose = next(line for line in err.splitlines() if line.startswith("chose: "))
    assert chose.startswith("chose: fp32 (set in the config) · eager attention (set in the config)")
    assert err.index("chose: ") < err.index("final eval")
    assert main([*argv, "--quiet"]) == 0
    assert "chose: " not in capsys.readouterr().err
