"""Library errors name config keys; the CLI adds the flag that sets the same key."""

from __future__ import annotations

from argparse import Namespace

import pytest

from loralab.cli import main
from loralab.cli.flags import FLAGS, flags_of, with_flags
from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.hub import check_push


@pytest.mark.parametrize(
    "text, want",
    [
        ("data.data_dir is not a folder.", "data.data_dir (--data-dir) is not a folder."),
        ("Bad value 'x' for 'model.head': allowed", "Bad value 'x' for 'model.head' (--head): allowed"),
        ("model.head=lm needs a causal model", "model.head=lm (--head lm) needs a causal model"),
        ("set run.output_dir, or data.task.", "set run.output_dir (--output-dir), or data.task (--task)."),
        ("train.method=full: no adapter", "train.method=full (--method full): no adapter"),
        # Longer keys that merely contain a mapped one, and text already mapped, stay as they are.
        ("'base.data.task' cannot be set", "'base.data.task' cannot be set"),
        ("data.task_label and model.head_x", "data.task_label and model.head_x"),
        ("model.name.sub and lora.r", "model.name.sub and lora.r"),
        ("data.data_dir (--data-dir)", "data.data_dir (--data-dir)"),
    ],
)  # fmt: skip
def test_with_flags_adds_the_flag_after_each_key(text, want):
    assert with_flags(text) == want
    assert with_flags(want) == want  # idempotent


def test_only_the_flags_a_command_has_are_shown():
    train = Namespace(data_dir=None, head=None, output_dir=None, model=None, task=None)
    sweep = Namespace(data_dir=None, head=None, output_dir=None, model=None, tasks=None)
    validate = Namespace(model=None, out=None)
    assert flags_of(train)["data.task"] == "--task"
    assert "data.task" not in flags_of(sweep)  # sweep's --tasks takes a list: not the same key
    assert flags_of(validate) == {"model.name": "--model"}
    assert with_flags("data.data_dir is missing", flags_of(validate)) == "data.data_dir is missing"
    assert flags_of(None) == FLAGS


def test_a_library_error_names_the_key_and_the_cli_prints_the_flag(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  method: prompt\n")
    with pytest.raises(LoralabError) as err:
        build_config(bad)
    assert "'train.method'" in str(err.value) and "--method" not in str(err.value)
    with pytest.raises(LoralabError, match=r"^data\.max_eval_examples must be a positive"):
        build_config(overrides=["data.max_eval_examples=0"])

    assert main(["train", "--config", str(bad), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "loralab: error: Bad value 'prompt' for 'train.method' (--method): allowed"
    )
    argv = ["train", "--task", "sst2", "--output-dir", str(tmp_path / "runs")]
    assert main([*argv, "data.max_eval_examples=0"]) == 2
    err = capsys.readouterr().err
    assert "data.max_eval_examples (--max-eval-examples) must be a positive integer" in err
    assert not (tmp_path / "runs").exists()
    # Heads are a registry (your own can be added), so an unknown one is refused by name.
    assert main([*argv, "--model", "tiny-llama", "model.head=prompt"]) == 2
    err = capsys.readouterr().err
    assert "model.head='prompt' is not a known head; known heads: classifier, lm" in err


def test_the_push_target_is_named_by_the_caller():
    with pytest.raises(LoralabError) as err:
        check_push("no-owner")
    assert str(err.value).startswith("The hub repository needs a repository id")
    with pytest.raises(LoralabError, match="^--push-to-hub needs a repository id"):
        check_push("no-owner", "--push-to-hub")


@pytest.mark.parametrize("mode", ["worker", "status"])
def test_sweep_worker_and_status_have_their_own_help(mode, capsys):
    assert main(["sweep", mode, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: loralab sweep {mode} [-h] --study STUDY")
    assert "--lora-lr" not in out and "--max-train-examples" not in out  # the grid's options
    assert ("--heartbeat" in out) == (mode == "worker")


def test_a_misspelt_option_gets_a_suggestion_and_the_commands_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--taks", "sst2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --taks (did you mean --task?)" in err
    assert "See `loralab train --help`" in err
