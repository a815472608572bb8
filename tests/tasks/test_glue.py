import pytest
from conftest import write_mrpc, write_rte, write_sst2

from loralab.errors import LoralabError
from loralab.tasks.glue import glue_tasks

TASKS = glue_tasks()


def test_sst2_loader_reads_sentences_and_labels(tmp_path):
    d = write_sst2(tmp_path / "sst2", n_train=10, n_dev=4)
    ds = TASKS["sst2"].load("train", data_dir=str(d))
    assert len(ds) == 10
    assert ds["label"][:4] == [0, 1, 0, 1]
    assert ds["text_b"][0] == ""
    assert len(TASKS["sst2"].load("eval", data_dir=str(d))) == 4


def test_data_dir_may_be_the_parent_folder(tmp_path):
    write_sst2(tmp_path / "glue" / "sst2", n_train=6, n_dev=2)
    ds = TASKS["sst2"].load("train", data_dir=str(tmp_path / "glue"))
    assert len(ds) == 6


def test_mrpc_with_byte_order_mark_and_quote_characters(tmp_path):
    d = write_mrpc(tmp_path / "mrpc", n=6)
    ds = TASKS["mrpc"].load("train", data_dir=str(d))
    assert len(ds) == 6
    # The quote characters are kept verbatim (quoting is off), and the BOM did not hide the header.
    assert ds["text_a"][1] == 'He said "yes 1'
    assert ds["text_b"][1] == 'He said " yes 1'
    assert ds["label"] == [0, 1, 0, 1, 0, 1]


def test_rte_named_labels(tmp_path):
    d = write_rte(tmp_path / "rte", n=4)
    ds = TASKS["rte"].load("eval", data_dir=str(d))
    assert ds["label"] == [0, 1, 0, 1]
    assert ds["text_b"][0] == "Someone walks."


def test_malformed_row_names_file_and_line(tmp_path):
    d = write_sst2(tmp_path / "sst2", n_train=5, n_dev=2)
    lines = (d / "train.tsv").read_text().splitlines()
    lines[3] = "a sentence without a label column"
    (d / "train.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(LoralabError, match=r"train.tsv, line 4"):
        TASKS["sst2"].load("train", data_dir=str(d))


def test_label_out_of_range(tmp_path):
    d = write_sst2(tmp_path / "sst2", n_train=5, n_dev=2)
    (d / "dev.tsv").write_text("sentence\tlabel\nfine film\t1\nodd film\t7\n")
    with pytest.raises(LoralabError, match=r"line 3: label '7' is out of range"):
        TASKS["sst2"].load("eval", data_dir=str(d))


def test_missing_file_and_missing_header_column(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoralabError, match="train.tsv"):
        TASKS["sst2"].load("train", data_dir=str(tmp_path / "empty"))
    with pytest.raises(LoralabError, match="not a folder"):
        TASKS["sst2"].load("train", data_dir=str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.tsv").write_text("text\tlabel\nx\t1\n")
    with pytest.raises(LoralabError, match="sentence"):
        TASKS["sst2"].load("train", data_dir=str(bad))


def test_classification_metrics_on_hand_built_predictions():
    import numpy as np

    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])  # preds 1,0,1,0
    features = {"labels": [1, 1, 0, 0]}
    out = TASKS["mrpc"].score(None, features, logits)
    assert out["accuracy"] == pytest.approx(0.5)
    # positive class: tp=1, fp=1, fn=1 -> precision 0.5, recall 0.5, F1 0.5
    assert out["f1"] == pytest.approx(0.5)
    assert "f1" not in TASKS["sst2"].score(None, features, logits)


def test_hub_unreachable_is_a_user_error_pointing_at_data_dir(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LoralabError, match="data.data_dir"):
        TASKS["rte"].load("train")
