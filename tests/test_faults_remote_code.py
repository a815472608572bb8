"""Remote code only from the command line: a run folder (merge, analyze, resume) or a study
cannot switch trust_remote_code on; the flag on the command line does."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Case

from loralab import validate
from loralab.cli import main


@pytest.fixture
def trust_spy(monkeypatch):
    """Every trust_remote_code value loralab passes when it loads a model or tokenizer."""
    from transformers import AutoTokenizer

    from loralab.models import load as model_load

    seen: list[bool] = []

    def spy(original, position: int):
        def wrapper(*args, **kwargs):
            given = args[position] if len(args) > position else False
            seen.append(bool(kwargs.get("trust_remote_code", given)))
            return original(*args, **kwargs)

        return wrapper

    # Every model load goes through models.load.load_model; every tokenizer through transformers.
    loads = spy(model_load.load_model, 2)
    monkeypatch.setattr(model_load, "load_model", loads)
    monkeypatch.setattr(
        validate, "load_model", loads
    )  # its exported merge, by the name it imported
    tokenizer = staticmethod(spy(AutoTokenizer.from_pretrained, 99))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tokenizer)
    return seen


def _trusting_run(tmp_path: Path, shared, status: str | None = None) -> Path:
    run = Case(tmp_path, *shared).run(status)
    config = (run / "config.yaml").read_text()
    assert "trust_remote_code: false" in config
    (run / "config.yaml").write_text(
        config.replace("trust_remote_code: false", "trust_remote_code: true")
    )
    return run


COMMANDS = {
    "merge": lambda run: [
        "merge",
        str(run),
        "--dtype",
        "fp32",
        "--no-benchmark",
        "--no-export",
        "--max-eval-examples",
        "8",
        "--quiet",
    ],  # fmt: skip
    "analyze": lambda run: ["analyze", str(run), "--probe", "8"],
    "resume": lambda run: ["train", "--resume", str(run), "--quiet"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_run_folder_cannot_switch_remote_code_on(command, shared, tmp_path, trust_spy, capsys):
    run = _trusting_run(tmp_path / "a", shared, "failed" if command == "resume" else None)
    assert main(COMMANDS[command](run)) == 0
    assert trust_spy and not any(trust_spy), trust_spy
    err = capsys.readouterr().err
    assert "trust_remote_code: true" in err and "--trust-remote-code" in err  # the warning
    # The flag on the command line is what turns it on (and the spy does see it).
    trust_spy.clear()
    run = _trusting_run(tmp_path / "b", shared, "failed" if command == "resume" else None)
    assert main([*COMMANDS[command](run), "--trust-remote-code"]) == 0
    assert trust_spy and all(trust_spy), trust_spy


@pytest.mark.long
def test_study_cannot_switch_remote_code_on_for_a_worker(shared, tmp_path, capsys):
    _, data = shared
    results = tmp_path / "results"
    grid = ["--tasks", "sst2", "--methods", "lora", "--seeds", "1", "--lora-lr", "1e-3",
            "--model", "tiny-llama", "--data-dir", str(data.parent), "--output-dir", str(results),
            "--study", "s", "--quiet"]  # fmt: skip
    # Someone created the study with remote code on; this worker did not ask for it.
    assert main(["sweep", *grid, "--create-only", "model.trust_remote_code=true",
                 "train.max_steps=2", "train.batch_size=8"]) == 0  # fmt: skip
    capsys.readouterr()
    worker = ["sweep", "worker", "--study", "s", "--output-dir", str(results)]
    assert main(worker) == 0
    assert "--trust-remote-code" in capsys.readouterr().err  # the warning
    (run,) = (results / "runs").iterdir()
    assert "trust_remote_code: false" in (run / "config.yaml").read_text()


def test_validate_loads_every_model_with_the_trust_it_was_given(tmp_path, trust_spy):
    """validate's own loads (tokenizer, base, a fresh base for the reload, the exported merge) all
    follow model.trust_remote_code: a remote-code model's export cannot load without it."""
    out = tmp_path / "v.json"
    args = ["validate", "--model", "tiny-llama", "--out", str(out)]
    assert main([*args, "model.trust_remote_code=true"]) == 0
    assert len(trust_spy) == 4 and all(trust_spy), trust_spy
    trust_spy.clear()
    assert main(args) == 0
    assert len(trust_spy) == 4 and not any(trust_spy), trust_spy
