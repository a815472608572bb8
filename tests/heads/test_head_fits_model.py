"""A head whose kind of transformers class the model type lacks is a user error before any
weights load (it was a ValueError traceback from the Auto class, after tokenising)."""

from __future__ import annotations

import pytest
from transformers import CohereConfig, LlamaConfig, T5Config

from loralab.cli import main
from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.heads import head_for
from loralab.tasks import get_task


def _head(head: str, task: str = "sst2"):
    cfg = build_config(overrides=[f"model.head={head}", f"data.task={task}"])
    return head_for(cfg, get_task(task))


@pytest.mark.parametrize(
    "head, config, needle",
    [
        (
            "classifier",
            CohereConfig(),
            "cohere model, for which transformers has no SequenceClassification class",
        ),  # fmt: skip
        ("lm", T5Config(), "t5 model, for which transformers has no CausalLM class"),
    ],
)
def test_a_head_the_model_type_has_no_class_for_is_refused(head, config, needle):
    with pytest.raises(LoralabError, match=needle):
        _head(head).check_model(config, "my-model")


def test_heads_the_model_type_has_pass():
    for head, task in (("classifier", "sst2"), ("classifier", "squad_v2"), ("lm", "sst2")):
        _head(head, task).check_model(LlamaConfig(), "llama")
    config = CohereConfig()
    config.auto_map = {"AutoModelForSequenceClassification": "modeling.MyClassifier"}
    _head("classifier").check_model(config, "own-code")  # its own code brings the class


def test_a_sweep_checks_every_points_head_before_it_creates_the_study(tmp_path, capsys):
    """Full fine-tuning points too; the failed command leaves no study behind."""
    out = tmp_path / "sw"
    code = main(["sweep", "--model", "tiny-bert", "--head", "lm", "--tasks", "sst2",
                 "--methods", "full", "--output-dir", str(out), "--quiet"])  # fmt: skip
    assert code == 2 and "needs a causal (decoder) language model" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
