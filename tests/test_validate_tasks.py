"""`loralab validate` checks the config's own task and head: spans, pairs, more than two labels."""

from __future__ import annotations

import json

import pytest
from test_validate import CHECKS

from loralab import cli, validate
from loralab.config import build_config
from loralab.heads import head_for
from loralab.models import is_causal, load_config, load_tokenizer
from loralab.tasks import Task, get_task, probes, register_task


def _validate(tmp_path, model, *overrides):
    out = tmp_path / "v.json"
    rc = cli.main(["validate", "--model", model, "--out", str(out), *overrides])
    return rc, json.loads(out.read_text()) if out.exists() else None


def _figures(report) -> dict:
    detail = next(c for c in report["checks"] if c["name"] == "parameter_accounting_adds_up")
    pairs = [p.split("=") for p in detail["detail"].replace(",", "").split() if "=" in p]
    return {k: int(v) for k, v in pairs if k in ("head", "trainable", "total")}


def _hidden(model: str) -> int:
    return load_config(model).hidden_size


def _batch(model: str, *overrides):
    cfg = build_config(overrides=[f"model.name={model}", *overrides])
    head = head_for(cfg, get_task(cfg.data.task))
    tok = load_tokenizer(model)
    tok.padding_side = "right"
    head.prepare(tok)
    return validate.probe_batch(head, tok, is_causal(load_config(model))), tok


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bert"])
def test_squad_validates_the_span_head(tmp_path, model):
    rc, report = _validate(tmp_path, model, "data.task=squad_v2")
    assert rc == 0, [c for c in report["checks"] if not c["passed"]]
    assert {c["name"] for c in report["checks"]} == CHECKS
    assert (report["task"], report["head"]) == ("squad_v2", "classifier")
    # The span head (qa_outputs: hidden -> start/end, with a bias) is what trains beside LoRA,
    # not a two-label sentence classifier.
    assert _figures(report)["head"] == 2 * _hidden(model) + 2


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bert"])
def test_the_span_probe_batch_points_at_each_answer(model):
    batch, tok = _batch(model, "data.task=squad_v2")
    rows = probes.qa_rows()
    assert len(batch["input_ids"]) == len(rows["id"])  # short contexts: one window each
    for ids, start, end, answers in zip(
        batch["input_ids"], batch["start_positions"], batch["end_positions"], rows["answers"],
        strict=True,
    ):  # fmt: skip
        if answers["text"]:
            span = tok.decode(ids[start : end + 1]).strip()
            assert span == answers["text"][0]
        else:  # unanswerable: the null position (BERT's [CLS]; the decoder's appended token)
            assert start == end
            assert int(ids[start]) in (tok.cls_token_id, tok.eos_token_id)


def test_a_pair_task_probes_with_pairs(tmp_path):
    batch, tok = _batch("tiny-bert", "data.task=rte")
    # BERT's segment ids mark the second text: one of each pair in every row.
    assert all(row.max() == 1 for row in batch["token_type_ids"])
    single, _ = _batch("tiny-bert", "data.task=sst2")
    assert all(row.max() == 0 for row in single["token_type_ids"])
    rc, report = _validate(tmp_path, "tiny-bert", "data.task=rte")
    assert rc == 0 and report["task"] == "rte"


def _three_label_task(tmp_path) -> str:
    data = tmp_path / "topics"
    data.mkdir()
    rows = ["stocks fell,business", "a late goal,sport", "a new chip,tech"]
    (data / "train.csv").write_text("\n".join(["text,label", *rows * 3]) + "\n")
    return f"csv:{data}"


@pytest.mark.parametrize("head", ["classifier", "lm"])
def test_a_three_label_user_task_validates_with_its_labels(tmp_path, head):
    task = _three_label_task(tmp_path)
    rc, report = _validate(tmp_path, "tiny-llama", f"data.task={task}", f"model.head={head}")
    assert rc == 0, [c for c in report["checks"] if not c["passed"]]
    assert {c["name"] for c in report["checks"]} == CHECKS
    if head == "classifier":  # Llama's score layer: hidden -> three labels, no bias
        assert _figures(report)["head"] == 3 * _hidden("tiny-llama")
    batch, _ = _batch("tiny-llama", f"data.task={task}", f"model.head={head}")
    if head == "classifier":
        assert sorted(set(batch["labels"].tolist())) == [0, 1, 2]


def test_squad_validates_the_prompted_lm_head(tmp_path):
    rc, report = _validate(tmp_path, "tiny-llama", "data.task=squad_v2", "model.head=lm")
    assert rc == 0, [c for c in report["checks"] if not c["passed"]]
    assert (report["task"], report["head"]) == ("squad_v2", "lm")


def test_probe_rows_cover_every_label_with_distinct_texts():
    for n in (2, 3, 7):
        rows = probes.classification_rows(n, pair=True)
        assert all(rows["label"].count(y) >= 2 for y in range(n))
        assert len(set(zip(rows["text_a"], rows["text_b"], strict=True))) == len(rows["label"])
        assert all(rows["text_b"])
    assert not any(probes.classification_rows(2, pair=False)["text_b"])
    qa = probes.qa_rows()
    for context, answers in zip(qa["context"], qa["answers"], strict=True):
        for text, start in zip(answers["text"], answers["answer_start"], strict=True):
            assert context[start : start + len(text)] == text
    assert sum(not a["text"] for a in qa["answers"]) == 2  # unanswerable ones too


def test_a_task_without_probe_examples_is_a_user_error(tmp_path, capsys, monkeypatch):
    class Bare(Task):
        kind = "classification"

        def load(self, split, data_dir=None, file=None):
            raise AssertionError("validate must not load data")

        def featurize(self, raw, tokenizer, max_length, doc_stride, split, causal):
            raise AssertionError("no probe rows: nothing to featurize")

        def score(self, raw, features, predictions):
            return {}

    register_task(Bare(name="bare-probe"))

    def no_load(*a, **kw):
        raise AssertionError("refused only after the model loaded")

    monkeypatch.setattr(validate, "load_for_task", no_load)
    rc, report = _validate(tmp_path, "tiny-llama", "data.task=bare-probe")
    assert rc == 2 and report is None
    err = capsys.readouterr().err
    assert "bare-probe" in err and "probe_rows()" in err


def test_data_files_are_refused_as_the_probe_would_ignore_them(tmp_path, capsys):
    rc, report = _validate(tmp_path, "tiny-llama", "data.data_dir=/somewhere")
    assert rc == 2 and report is None
    err = capsys.readouterr().err
    assert "data.data_dir=/somewhere cannot be honoured" in err and "data.task" in err


def test_the_tasks_data_settings_reach_the_probe(tmp_path, monkeypatch):
    seen = []
    real = validate.probe_batch

    def spy(head, tok, causal, max_length=None, rows=None):
        batch = real(head, tok, causal, max_length, rows)
        seen.append((tok, batch))
        return batch

    monkeypatch.setattr(validate, "probe_batch", spy)
    rc, _ = _validate(tmp_path, "tiny-llama", "data.max_length=16")
    (_, batch), *_ = seen
    # The byte-level probe sentences run to ~30 tokens: cut at 16 as training would cut them.
    assert rc == 0 and batch["input_ids"].shape[1] == 16
    seen.clear()
    prompt = "Is this review kind? {text_a}\nVerdict:"
    overrides = ["model.head=lm", f"data.prompt={prompt}", 'data.verbalizers=[" harsh", " kind"]']
    assert _validate(tmp_path, "tiny-llama", *overrides, "data.chat_template=false")[0] == 0
    (tok, batch), *_ = seen
    text = tok.decode(batch["input_ids"][1][batch["attention_mask"][1].bool()])
    assert "Is this review kind? a wonderful, moving film\nVerdict: kind" in text


@pytest.mark.parametrize(
    "model, override, says",
    [
        ("tiny-llama", "data.prompt={text_a}", "model.head=lm"),
        ("tiny-llama", "data.chat_template=false", "model.head=lm"),
        ("tiny-bert", "data.max_length=4096", "positions"),
    ],
)
def test_settings_train_would_refuse_are_refused(tmp_path, capsys, model, override, says):
    rc, report = _validate(tmp_path, model, override)
    assert rc == 2 and report is None
    assert says in capsys.readouterr().err
