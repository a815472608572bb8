"""SQuAD v2 from the Hugging Face hub: rows mapped to the canonical columns, and a pointer to
data.data_dir when the hub cannot be reached."""

from __future__ import annotations

import pytest

from loralab.errors import LoralabError
from loralab.tasks.squad_v2 import SquadV2Task

TASK = SquadV2Task()


def test_hub_rows_are_mapped_to_canonical_columns(monkeypatch):
    import datasets

    hub = datasets.Dataset.from_dict(
        {
            "id": ["h1"],
            "title": ["T"],
            "context": ["Some text"],
            "question": ["What ?"],
            "answers": [{"text": ["text"], "answer_start": [5]}],
        }
    )
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return hub

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = TASK.load("eval")
    assert calls == [("rajpurkar/squad_v2", None, "validation")]
    assert ds.column_names == ["id", "question", "context", "answers"]
    assert ds[0]["answers"] == {"text": ["text"], "answer_start": [5]}

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LoralabError, match="data_dir"):
        TASK.load("train")
