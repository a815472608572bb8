import re
from pathlib import Path

import pytest

from loralab.config import (
    ExperimentConfig,
    build_config,
    dump_yaml,
    from_dict,
    parse_overrides,
    to_dict,
)
from loralab.errors import LoralabError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_follow_the_spec():
    cfg = ExperimentConfig()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target) == (
        8,
        16.0,
        0.05,
        "standard",
    )
    assert cfg.train.warmup_ratio == 0.06
    assert cfg.model.name == "smollm2-135m"
    assert cfg.lr == 3e-4
    cfg.train.method = "full"
    assert cfg.lr == 3e-5


def test_yaml_round_trip(tmp_path):
    cfg = build_config(
        overrides=["lora.r=16", "lora.target=[q_proj,k_proj]", "train.lr=1e-4", "data.task=mrpc"]
    )
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    again = build_config(path)
    assert to_dict(again) == to_dict(cfg)
    assert (
        again.lora.r == 16 and again.lora.target == ["q_proj", "k_proj"] and again.train.lr == 1e-4
    )


def test_overrides_parse_types_and_win_over_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: 4\ntrain:\n  epochs: 2\n")
    cfg = build_config(
        path,
        ["lora.r=32", "train.precision=bf16", "data.max_train_examples=100", "lora.use_dora=true"],
    )
    assert cfg.lora.r == 32 and cfg.train.epochs == 2.0
    assert (
        cfg.train.precision == "bf16"
        and cfg.data.max_train_examples == 100
        and cfg.lora.use_dora is True
    )
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize(
    "override, section, key, expected",
    [
        ("run.name=007", "run", "name", "007"),
        ("run.name=no", "run", "name", "no"),
        ("run.name=2024-01-05", "run", "name", "2024-01-05"),
        ("run.name=null", "run", "name", None),
        ("data.prompt=Text {text_a}. Mood:", "data", "prompt", "Text {text_a}. Mood:"),
        ("data.prompt=Rate #1 {text_a}", "data", "prompt", "Rate #1 {text_a}"),
        ('data.prompt="Review: {text_a}"', "data", "prompt", "Review: {text_a}"),
        ("model.name= 1e3 ", "model", "name", "1e3"),
        ("tracking.project=true", "tracking", "project", "true"),
        # not text fields: YAML as before
        ("lora.target=[q_proj, v_proj]", "lora", "target", ["q_proj", "v_proj"]),
        ("data.max_length=64", "data", "max_length", 64),
        ("data.max_length=064", "data", "max_length", 64),  # decimal, not YAML 1.1's octal 52
        ("train.max_steps=010", "train", "max_steps", 10),
        ("lora.r=08", "lora", "r", 8),
    ],
)
def test_text_fields_keep_the_override_as_typed(override, section, key, expected):
    # YAML would make 007 an int, no a bool, a date a date and "Mood:" a mapping
    assert parse_overrides([override]) == {section: {key: expected}}
    cfg = build_config(None, [override, "lora.r=8"])
    assert getattr(getattr(cfg, section), key) == expected


def test_flags_sit_between_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  task: rte\n")
    cfg = build_config(path, ["train.method=full"], data={"task": "mrpc"}, train={"method": "lora"})
    assert cfg.data.task == "mrpc" and cfg.train.method == "full"


@pytest.mark.parametrize(
    "override, needle",
    [
        (["lora.rank=8"], "lora.rank"),
        (["nosuch.key=1"], "nosuch"),
        (["lora.r=0"], "lora.r"),
        (["lora.r=abc"], "lora.r"),
        (["lora.alpha=-1"], "lora.alpha"),
        (["lora.dropout=1.5"], "lora.dropout"),
        (["train.method=half"], "lora, full"),
        (["train.precision=fp8"], "train.precision"),
        (["train.lr=0"], "train.lr"),
        # 0 and -5 used to mean "no cap" silently, as -1 does
        (
            ["train.max_steps=0"],
            "train.max_steps must be a positive number of optimiser steps, or -1",
        ),
        (["train.max_steps=-5"], "got -5"),
        (["noequals"], "section.key=value"),
        # A choice of words echoes the word as typed (YAML 1.1 would have read `yes` as True).
        (["tracking.wandb=yes"], "Bad value 'yes' for 'tracking.wandb'"),
        # null clears optional settings only; a number is refused with what it needs.
        (["train.max_steps=null"], "'train.max_steps' cannot be null: it is not an optional"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(LoralabError) as e:
        build_config(overrides=override)
    assert needle in str(e.value)


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 1e-4\n")
    with pytest.raises(LoralabError, match="train.learning_rate"):
        build_config(path)


def test_from_dict_rejects_non_mapping_section():
    with pytest.raises(LoralabError, match="lora"):
        from_dict({"lora": 3})


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path, tmp_path):
    from loralab.tasks import get_task

    cfg = build_config(path)
    get_task(cfg.data.task)  # names a registered task
    # What each file is for, and that the YAML it round-trips to builds the same config.
    task = {"quick-tiny": "sst2", "sst2-lm": "sst2"}.get(path.stem, path.stem)
    assert (cfg.data.task, cfg.train.method) == (task, "lora")
    assert cfg.model.head == ("lm" if path.stem == "sst2-lm" else "classifier")
    assert cfg.model.name == ("tiny-llama" if path.stem == "quick-tiny" else "smollm2-135m")
    again = tmp_path / "again.yaml"
    again.write_text(dump_yaml(cfg))
    assert to_dict(build_config(again)) == to_dict(cfg)


def test_configs_exist_for_every_task():
    names = {p.stem for p in CONFIGS}
    assert {"sst2", "mrpc", "rte", "squad_v2"} <= names


STUDIES = sorted((Path(__file__).parent.parent / "configs" / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_every_shipped_study_spec_validates(path):
    from loralab.study.phases import phases
    from loralab.study.spec import load_spec

    spec = load_spec(path)  # validates every point's config; data need not exist here
    # Named after its file; a spec whose grid grew carries a version (its stored studies
    # keep their grids, so the new grid needs new study names: smollm2-cpu-v2, -v3).
    assert re.fullmatch(rf"{re.escape(path.stem)}(-v\d+)?", spec.name) and phases(spec)


TASK_FILES = sorted((Path(__file__).parent.parent / "configs" / "tasks").glob("*.yaml"))


def test_every_yaml_under_configs_is_checked():
    """Experiment configs and study specs here; task files in test_users.py."""
    every = set((Path(__file__).parent.parent / "configs").rglob("*.yaml"))
    assert every == set(CONFIGS) | set(STUDIES) | set(TASK_FILES) and len(STUDIES) >= 3
