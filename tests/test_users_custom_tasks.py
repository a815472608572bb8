"""Issue 18, users' own data: CSV, JSONL, YAML and hub tasks with their metrics (Matthews,
macro F1), and the task files under configs/tasks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from loralab import metrics
from loralab.cli import main
from loralab.errors import LoralabError
from loralab.tasks import get_task

FAST = ["train.batch_size=8", "train.save_steps=100"]
MOODS = {"sad": ["awful", "bad", "grim"], "calm": ["fine", "okay", "plain"],
         "happy": ["great", "superb", "lovely"]}  # fmt: skip


def write_moods(folder: Path, n_train: int = 48, n_dev: int = 15) -> list[dict]:
    """A 3-label task as CSV and JSONL (same rows): train + dev; returns the dev rows."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(MOODS)
    dev = []
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = [
            {"text": f"the day was {MOODS[names[i % 3]][i % 2]}", "mood": names[i % 3]}
            for i in range(n)
        ]
        with open(folder / f"{split}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, ["text", "mood"])
            w.writeheader()
            w.writerows(rows)
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dev = rows
    return dev


# -- metrics -------------------------------------------------------------------------------------


def test_matthews_and_macro_f1_equal_hand_computed_values():
    # Binary: TP=1, FP=1, TN=2, FN=0 -> (1·2 − 1·0) / sqrt(2·1·3·2) = 2/sqrt(12).
    assert metrics.matthews([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(2 / 12**0.5)
    # 3 classes, confusion rows [1,1,0], [0,1,1], [1,0,1]: (3·6 − 12) / sqrt(24·24) = 0.25.
    y, p = [0, 0, 1, 1, 2, 2], [0, 1, 1, 2, 2, 0]
    assert metrics.matthews(p, y) == pytest.approx(0.25)
    assert metrics.f1_macro(p, y) == pytest.approx(0.5)  # each class: 2·1 / (2 + 1 + 1)
    assert metrics.matthews(y, y) == pytest.approx(1.0)
    assert metrics.matthews([1, 2, 2, 0, 0, 1], y) == pytest.approx(-0.5)  # none right: -12/24
    assert metrics.matthews([1] * 6, y) == 0.0  # undefined: one predicted class
    # A class never predicted nor present still counts in the macro mean (as scikit-learn).
    assert metrics.f1_macro([0, 1], [0, 1], num_labels=3) == pytest.approx(2 / 3)


# -- custom tasks --------------------------------------------------------------------------------


def _task_file(tmp_path: Path, **extra) -> Path:
    spec = {"name": "moods", "path": "moods", "format": "csv", "label": "mood",
            "labels": ["sad", "calm", "happy"], "metric": "matthews", **extra}  # fmt: skip
    path = tmp_path / "moods.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_csv_task_file_and_jsonl_reference_read_the_same_examples(tmp_path, monkeypatch):
    write_moods(tmp_path / "moods")
    monkeypatch.chdir(tmp_path)
    from_yaml = get_task(str(_task_file(tmp_path)))
    from_jsonl = get_task("jsonl:moods?label=mood&labels=sad|calm|happy&metric=matthews")
    for task in (from_yaml, from_jsonl):
        assert task.num_labels == 3 and task.label_names == ("sad", "calm", "happy")
        assert task.primary_metric == "matthews" and task.text_columns == ("text",)
        assert task.verbalizers == (" sad", " calm", " happy")
    for split in ("train", "eval"):
        a, b = from_yaml.load(split), from_jsonl.load(split)
        assert a.to_dict() == b.to_dict()
    dev = from_yaml.load("eval")
    assert len(dev) == 15 and dev["label"][:4] == [0, 1, 2, 0]
    assert dev["text_a"][1] == "the day was okay" and dev["text_b"][0] == ""
    # Without label names, the sorted distinct labels of the training file are used.
    assert get_task("csv:moods?label=mood").label_names == ("calm", "happy", "sad")
    # The classifier scores with the task's metric.
    scores = from_yaml.label_metrics(np.array([0, 1, 1, 2, 2, 0]), np.array([0, 0, 1, 1, 2, 2]))
    assert scores == {"accuracy": pytest.approx(0.5), "matthews": pytest.approx(0.25)}


def _write_csv(folder: Path, header: list[str], rows: list[list[str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        with open(folder / f"{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)


def test_sentence_pair_csv_reads_both_columns(tmp_path):
    """premise,hypothesis is found as a pair; an explicit text=a|b names any two columns."""
    pairs = [
        (f"a man walks, {i} steps", f"someone moves {i}", ("yes", "no")[i % 2]) for i in range(6)
    ]
    _write_csv(tmp_path / "nli", ["premise", "hypothesis", "label"], [list(p) for p in pairs])
    task = get_task(f"csv:{tmp_path / 'nli'}")
    assert task.text_columns == ("premise", "hypothesis")
    for split in ("train", "eval"):
        data = task.load(split)
        assert data["text_a"] == [p[0] for p in pairs]
        assert data["text_b"] == [p[1] for p in pairs]
        assert data["label"] == [1, 0] * 3  # sorted names: no, yes

    # Columns no guess would pick (and a `text` column it would): named in the reference.
    rows = [
        [str(i), f"claim {i}", f"evidence {i}", f"note {i}", lab]
        for i, (*_, lab) in enumerate(pairs)
    ]
    _write_csv(tmp_path / "facts", ["id", "claim", "evidence", "text", "label"], rows)
    task = get_task(f"csv:{tmp_path / 'facts'}?text=claim|evidence")
    assert task.text_columns == ("claim", "evidence")
    data = task.load("train")
    assert data["text_a"] == [r[1] for r in rows] and data["text_b"] == [r[2] for r in rows]


@pytest.mark.parametrize(
    "task, extra, needle",
    [
        ("yaml", {"colour": "red"}, "unknown key(s) ['colour']"),
        ("yaml", {"metric": "auc"}, "metric 'auc' is not one of accuracy, f1, matthews"),
        ("yaml", {"label": "stars"}, "no column(s) ['stars']"),
        ("csv:nowhere/train.csv", {}, "does not exist"),
        ("tsv:moods", {}, "has no train.tsv"),
        ("parquet:moods", {}, "Unknown task 'parquet:moods'"),
        # Were tracebacks (TypeError) or silently wrong values:
        ("yaml", {"text": None}, "`text` must be a list (or one text), got None"),
        ("yaml", {"text": 5}, "`text` must be a list (or one text), got 5"),
        ("yaml", {"label": ["mood"]}, "`label` must be text, got ['mood']"),
        (
            "yaml",
            {"verbalizers": [False, True, True]},
            "YAML reads yes/no/true/false unquoted as booleans",
        ),  # fmt: skip
        ("yaml", {"labels": ["sad", "calm", "calm"]}, "names a label twice"),
        (
            "yaml",
            {"max_length": 0},
            "max_length must be a whole number of tokens, at least 16; got 0",
        ),  # fmt: skip
        ("yaml", {"max_length": -1}, "at least 16; got -1"),
    ],
)
def test_bad_custom_tasks_exit_2_with_a_message(tmp_path, monkeypatch, capsys, task, extra, needle):
    write_moods(tmp_path / "moods")
    monkeypatch.chdir(tmp_path)
    ref = str(_task_file(tmp_path, **extra)) if task == "yaml" else task
    code = main(["train", "--task", ref, "--model", "tiny-llama", "--quiet"])
    assert code == 2
    assert needle in capsys.readouterr().err


def test_a_label_outside_the_names_names_file_and_line(tmp_path, monkeypatch, capsys):
    write_moods(tmp_path / "moods")
    with open(tmp_path / "moods" / "dev.csv", "a") as fh:
        fh.write("the day was odd,angry\n")
    monkeypatch.chdir(tmp_path)
    task = get_task(str(_task_file(tmp_path)))
    with pytest.raises(LoralabError) as err:
        task.load("eval")
    assert "dev.csv, line 17" in str(err.value) and "'angry'" in str(err.value)


@pytest.mark.parametrize(
    "fmt, row, needle",
    [
        ("csv", "it was great,really,happy", "line 15: 3 fields, but the header names 2"),
        ("csv", 'it was "great,really,happy,extra', "line 15: 4 fields"),
        ("csv", "it was fine,", "line 15: the label (column 'label') is empty"),
        (
            "tsv",
            "it was\tfine\thappy",
            "line 15: 3 fields, but the header names 2 (text, label); a TSV",
        ),
    ],
)
def test_a_malformed_row_names_file_and_line(tmp_path, fmt, row, needle):
    # Were: an extra field or an empty label became a label class of its own.
    sep = "\t" if fmt == "tsv" else ","
    rows = ["text" + sep + "label"] + [
        f"day {i} was ok{sep}{('sad', 'happy')[i % 2]}" for i in range(13)
    ]
    (tmp_path / f"train.{fmt}").write_text("\n".join([*rows, row, ""]))
    with pytest.raises(LoralabError) as err:
        get_task(f"{fmt}:{tmp_path / f'train.{fmt}'}").load("train")
    assert f"train.{fmt}, line 15" in str(err.value) and needle in str(err.value)


def test_csv_task_trains_classifier_and_lm_head_and_reports(tmp_path, monkeypatch):
    """Acceptance 1: a 3-label CSV task with Matthews correlation, both heads, then the report;
    the same task from JSONL."""
    write_moods(tmp_path / "moods")
    monkeypatch.chdir(tmp_path)  # relative paths in the reference; run folders store them absolute
    task_file = _task_file(tmp_path)
    out = tmp_path / "runs"
    common = ["--model", "tiny-llama", "--output-dir", str(out), "--quiet", *FAST]
    assert main(["train", "--task", "moods.yaml", *common, "run.name=cls"]) == 0
    assert main(["train", "--task", "moods.yaml", "--head", "lm", *common, "run.name=lm"]) == 0
    ref = "jsonl:moods?label=mood&labels=sad|calm|happy&metric=matthews"
    assert main(["train", "--task", ref, *common, "run.name=jsonl"]) == 0
    summaries = {
        n: json.loads((out / n / "summary.json").read_text()) for n in ("cls", "lm", "jsonl")
    }
    for name, s in summaries.items():
        assert set(s["metrics"]) == {"accuracy", "matthews"}, name
        assert -1.0 <= s["metrics"]["matthews"] <= 1.0 and s["examples"] == {
            "train": 48,
            "eval": 15,
        }
    assert "zero_shot" in summaries["lm"]  # verbalizers from the label names
    cards = {n: (out / n / "adapter" / "README.md").read_text() for n in ("cls", "lm")}
    assert "AutoModelForSequenceClassification" in cards["cls"] and "num_labels=3" in cards["cls"]
    assert "AutoModelForCausalLM" in cards["lm"] and "labels: sad, calm, happy" in cards["lm"]
    assert "main metric | matthews" in cards["cls"]
    # CSV and JSONL hold the same rows: the same data fingerprint and the same result.
    assert summaries["cls"]["data_fingerprint"] == summaries["jsonl"]["data_fingerprint"]
    assert summaries["cls"]["metrics"] == pytest.approx(summaries["jsonl"]["metrics"])
    saved = yaml.safe_load((out / "cls" / "config.yaml").read_text())
    assert saved["data"]["task"] == str(task_file)  # absolute: readable from any folder
    monkeypatch.chdir(out)
    assert main(["report", str(out)]) == 0
    table = (out / "report" / "report.csv").read_text()
    assert "matthews" in table and "accuracy" in table
    # merge and analyze read the task back from the run folder (from another working folder)
    assert main(["analyze", str(out / "cls")]) == 0
    analysis = json.loads((out / "cls" / "analysis" / "analysis.json").read_text())
    assert analysis["representations"]["probe"] == 15
    code = main(["merge", str(out / "lm"), "--dtype", "fp32", "--no-benchmark", "--no-export",
                 "--quiet"])  # fmt: skip
    assert code == 0
    merged = json.loads((out / "lm" / "merge" / "merge.json").read_text())
    assert merged["primary_metric"] == "matthews"


def test_sweep_runs_a_custom_task(tmp_path, monkeypatch):
    write_moods(tmp_path / "moods", n_train=24, n_dev=9)
    monkeypatch.chdir(tmp_path)
    _task_file(tmp_path)
    code = main(["sweep", "--tasks", "moods.yaml", "--methods", "lora", "--lora-lr", "1e-3",
                 "--seeds", "7", "--model", "tiny-llama", "--output-dir", "sw", "--quiet",
                 "train.batch_size=8"])  # fmt: skip
    assert code == 0
    (run,) = list((tmp_path / "sw" / "runs").iterdir())
    assert run.name.startswith("moods-") and "/" not in run.name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == str(tmp_path / "moods.yaml") and "matthews" in summary["metrics"]


def test_hub_dataset_task_uses_class_label_names(monkeypatch):
    import datasets

    rows = {"sentence": ["dull film", "great film", "bad plot", "fine cast"], "label": [0, 1, 0, 1]}
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    asked = []

    def fake_load_dataset(path, name=None, split=None, **kw):
        asked.append((path, name, split))
        return datasets.Dataset.from_dict(rows, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = get_task("hub:someone/films?config=v2&eval_split=test&metric=f1")
    assert task.label_names == ("neg", "pos") and task.text_columns == ("sentence",)
    assert task.primary_metric == "f1" and task.name == "films"
    dev = task.load("eval")
    assert dev["label"] == [0, 1, 0, 1] and dev["text_a"][1] == "great film"
    assert ("someone/films", "v2", "test") in asked
    assert task.label_metrics(np.array([1, 1, 0, 0]), np.array([0, 1, 0, 1]))["f1"] == 0.5


# -- task files under configs/tasks ------------------------------------------------------

TASK_FILES = sorted((Path(__file__).parents[1] / "configs" / "tasks").glob("*.yaml"))


@pytest.mark.parametrize("path", TASK_FILES, ids=[p.name for p in TASK_FILES])
def test_task_files_under_configs_are_valid(path):
    from loralab.tasks.custom_spec import parse_ref

    spec, base = parse_ref(str(path))
    data = base / (spec.path or spec.train)
    if not data.exists():
        pytest.skip(f"{data} is not on this machine")
    task = get_task(str(path))
    assert task.num_labels == len(spec.labels or task.label_names)
    if "glue/sst2" in str(data):  # read as plain TSV, the dev set equals the GLUE loader's
        glue = get_task("sst2").load("eval", str(data))
        mine = task.load("eval")
        assert mine["text_a"] == glue["text_a"] and mine["label"] == glue["label"]


def test_numeric_labels_keep_their_numeric_order(tmp_path):
    # "10" after "9" (a string sort would put it second): label ids follow the numbers.
    rows = ["text,label", *(f"review number {i},{i % 11}" for i in range(33)), ""]
    (tmp_path / "train.csv").write_text("\n".join(rows))
    task = get_task(f"csv:{tmp_path / 'train.csv'}")
    assert list(task.label_names) == [str(i) for i in range(11)]
    assert task.load("train")["label"][:11] == list(range(11))


def test_labels_read_from_the_data_are_the_values_the_rows_hold(tmp_path):
    """Integer JSONL labels keep 0 (it was dropped as falsy: classes 0 and 1 merged); names are
    stripped as the rows are (a trailing space made a phantom class)."""
    rows = [{"text": f"item {i}", "label": i % 3} for i in range(12)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task(f"jsonl:{tmp_path / 'train.jsonl'}")
    assert task.label_names == ("0", "1", "2")
    assert task.load("train")["label"] == [i % 3 for i in range(12)]

    spaced = ["text,label", *(f"item {i},{('pos ', 'neg', 'pos')[i % 3]}" for i in range(12)), ""]
    (tmp_path / "s.csv").write_text("\n".join(spaced))
    task = get_task(f"csv:{tmp_path / 's.csv'}?metric=f1")
    assert task.label_names == ("neg", "pos") and task.num_labels == 2
    labels = task.load("train")["label"]
    assert labels == [(1, 0, 1)[i % 3] for i in range(12)]
    assert task.label_metrics(np.array(labels), np.array(labels))["f1"] == 1.0


def test_numeric_label_names_are_never_read_as_indices(tmp_path):
    """With names that are numbers, an unseen number is an error (it used to become the class
    at that index), and labels=+1|-1 keeps its '+' (a form decoding made it a space)."""
    (tmp_path / "train.csv").write_text("text,stars\n" + "".join(f"t{i},{2 + i % 2}\n" for i in range(8)))  # fmt: skip
    (tmp_path / "dev.csv").write_text("text,stars\nfine,3\nunseen,1\n")
    task = get_task(f"csv:{tmp_path}?label=stars")
    assert task.label_names == ("2", "3")
    with pytest.raises(LoralabError, match=r"dev.csv, line 3: label '1' is out of range"):
        task.load("eval")

    (tmp_path / "pm").mkdir()
    (tmp_path / "pm" / "train.csv").write_text("text,label\n" + "".join(f"t{i},{('+1', '-1')[i % 2]}\n" for i in range(8)))  # fmt: skip
    task = get_task(f"csv:{tmp_path / 'pm' / 'train.csv'}?labels=+1|-1")
    assert task.label_names == ("+1", "-1")
    assert task.load("train")["label"] == [0, 1] * 4


def test_a_custom_tasks_majority_baseline_uses_its_own_metric():
    """3 labels with metric f1: the baseline's F1 is the macro F1 the model is scored by (it
    was the binary F1 of class 1); matthews gets a baseline too (0 for a constant guess)."""
    from datasets import Dataset

    from loralab.tasks.custom import CustomTask
    from loralab.tasks.custom_spec import TaskSpec

    raw = Dataset.from_dict({"label": [0] * 2 + [1] * 5 + [2] * 3})
    for metric, want in (("f1", 2 * (5 / 10) / (1 + 5 / 10) / 3), ("matthews", 0.0)):
        task = CustomTask(name="t", spec=TaskSpec(metric=metric))
        task.label_names, task.primary_metric = ("a", "b", "c"), metric
        base = task.majority_baseline(raw)
        assert base["accuracy"] == 0.5 and base[metric] == pytest.approx(want)


def test_the_features_cache_tells_the_truncation_side_apart():
    from loralab.data import _tokenizer_fingerprint
    from loralab.models import load_tokenizer

    tok = load_tokenizer("tiny-llama", progress=False)
    right = _tokenizer_fingerprint(tok)
    tok.truncation_side = "left"
    assert _tokenizer_fingerprint(tok) != right
