"""Merge: equivalence with non-identity adapters, a wrong merge caught, B = 0 flagged, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from loralab import merge, tracking
from loralab.cli import main
from loralab.config import build_config
from loralab.models import load_tokenizer
from loralab.tasks import get_task
from loralab.train import build_model

pytestmark = pytest.mark.precision  # .ci/run repeats these in bf16 and in fp32

# B ~ N(0, std²): tiny BERT's logits react weakly to its layers (pooler tanh, small init), so it
# needs a larger update than tiny Llama for the check to be informative.
B_STD = {"tiny-llama": 0.1, "tiny-bert": 1.0}
FAST = dict(bench=False, export=False, quiet=True)


def make_run(
    root: Path, data_dir: Path, model="tiny-llama", target="standard", b_std=None, overrides=()
):
    """A LoRA run directory as `loralab train` leaves it, with B drawn at random (B ≠ 0)."""
    cfg = build_config(
        overrides=[
            f"model.name={model}", f"lora.target={target}", f"data.data_dir={data_dir}",
            f"run.output_dir={root}", *overrides,
        ]
    )  # fmt: skip
    task = get_task(cfg.data.task)
    tok = load_tokenizer(model, progress=False)
    torch.manual_seed(0)
    built = build_model(cfg, task, tok, progress=False)
    std = B_STD[model] if b_std is None else b_std
    with torch.no_grad():
        for name, p in built.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std) if std else p.zero_()
    run = tracking.create_run_dir(cfg)
    built.model.save_pretrained(run / tracking.ADAPTER_DIR)
    tok.save_pretrained(run / tracking.ADAPTER_DIR)
    return run


@pytest.mark.parametrize("target", ["standard", "extended", "all-linear"])
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bert"])
def test_merge_matches_adapter_model(tmp_path, sst2_dir, model, target):
    run = make_run(tmp_path / "runs", sst2_dir, model, target)
    result = merge.run_merge(run, dtype="fp32", **FAST)
    r = result.report
    assert result.status == "passed" and result.exit_code == 0, r
    effect = r["lora_effect"]
    assert effect["zero_B_layers"] == 0 and effect["layers"] > 0
    # Evidence: without its LoRA update the model's logits move by ≥ 10 tolerances ...
    assert effect["max_abs_diff"] >= merge.INFORMATIVE_FACTOR * merge.DEFAULT_TOLERANCES["fp32"]
    # ... while the merged model reproduces the adapter model to float32 rounding.
    row = r["variants"]["fp32 merge"]
    assert row["max_abs_diff"] < 1e-5 and row["changed_predictions"] == 0.0
    assert row["metrics"] == r["reference"]["metrics"]
    saved = json.loads((run / "merge" / "merge.json").read_text())
    assert saved["status"] == "passed" and saved["examples"] == 32


def _doubled_scaling_merge(model):
    """A plausible bug: the update folded in with scaling 2·alpha/r."""
    from peft.tuners.lora import LoraLayer

    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.scaling = {k: 2 * v for k, v in m.scaling.items()}
    return model.merge_and_unload()


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bert"])
def test_wrong_merge_is_caught(tmp_path, sst2_dir, monkeypatch, model):
    run = make_run(tmp_path / "runs", sst2_dir, model, "all-linear")
    monkeypatch.setattr(merge, "merge", _doubled_scaling_merge)
    result = merge.run_merge(run, dtype="fp32", bench=False, quiet=True)
    row = result.report["variants"]["fp32 merge"]
    assert result.status == "failed" and result.exit_code == 1
    assert row["status"] == "failed" and row["max_abs_diff"] > 10 * row["tolerance"]
    assert result.export_dir is None and not (run / "merge" / "model").exists()
    assert any("Not exported" in n for n in result.notes)


def test_cli_exit_1_on_a_wrong_merge(tmp_path, sst2_dir, monkeypatch, capsys):
    run = make_run(tmp_path / "runs", sst2_dir)
    monkeypatch.setattr(merge, "merge", _doubled_scaling_merge)
    assert main(["merge", str(run), "--dtype", "fp32", "--no-benchmark", "--quiet"]) == 1
    assert "failed" in capsys.readouterr().out


def test_fresh_adapter_is_uninformative(tmp_path, sst2_dir, capsys):
    run = make_run(tmp_path / "runs", sst2_dir, b_std=0.0)
    code = main(["merge", str(run), "--dtype", "fp32", "--no-benchmark", "--no-export", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0  # exported fine; the verdict is in the output and merge.json
    assert "uninformative" in out and "B = 0" in out
    report = json.loads((run / "merge" / "merge.json").read_text())
    assert report["status"] == "uninformative"
    assert report["variants"]["fp32 merge"]["status"] == "uninformative"
    assert report["lora_effect"]["max_abs_diff"] == 0.0
    assert report["lora_effect"]["zero_B_layers"] == report["lora_effect"]["layers"]


@pytest.mark.parametrize("native", [True, False], ids=["bf16-compute", "bf16-weights"])
def test_bf16_reports_both_merge_orders(tmp_path, sst2_dir, monkeypatch, native):
    monkeypatch.setattr(merge, "native_bf16", lambda: native)
    run = make_run(tmp_path / "runs", sst2_dir, "tiny-llama", "all-linear", b_std=0.3)
    result = merge.run_merge(run, dtype="both", tolerances={"bf16": 0.03}, **FAST)
    assert result.report["bf16_compute"].startswith("native" if native else "emulated")
    rows = result.report["variants"]
    assert list(rows) == [
        "fp32 merge", "bf16 adapter (unmerged)", "bf16 merge in bf16", "bf16 merge in fp32, then cast",
    ]  # fmt: skip
    assert rows["bf16 adapter (unmerged)"]["status"] == "reference"
    for name in ("bf16 merge in bf16", "bf16 merge in fp32, then cast"):
        assert rows[name]["dtype"] == "bf16" and rows[name]["status"] == "passed", rows[name]
        # bf16 really ran: it drifts far more than fp32, and still within its tolerance.
        assert rows["fp32 merge"]["max_abs_diff"] * 100 < rows[name]["max_abs_diff"] <= 0.03
    assert result.status == "passed"


def test_verdict_needs_one_informative_pass(tmp_path, sst2_dir):
    """Tiny Llama's update (~0.3) is below 10× the default bf16 tolerance (0.25): the bf16 rows
    prove nothing alone; the fp32 row, through the same merge code, does."""
    run = make_run(tmp_path / "runs", sst2_dir)
    both = merge.run_merge(run, dtype="both", **FAST)
    assert both.report["lora_effect"]["max_abs_diff"] < 10 * merge.DEFAULT_TOLERANCES["bf16"]
    statuses = {n: r["status"] for n, r in both.report["variants"].items()}
    assert statuses["fp32 merge"] == "passed"
    assert (
        statuses["bf16 merge in bf16"]
        == statuses["bf16 merge in fp32, then cast"]
        == "uninformative"
    )
    assert both.status == "passed"
    only_bf16 = merge.run_merge(run, dtype="bf16", **FAST)
    assert only_bf16.status == "uninformative" and only_bf16.exit_code == 0
    assert any("less than 10× the tolerance" in n for n in only_bf16.notes)


def test_results_mirror_to_wandb_when_tracking_is_on(tmp_path, sst2_dir, monkeypatch):
    seen = {}

    class FakeTracker:
        def __init__(self, run_dir, cfg, resuming=False):
            seen.update(run_dir=run_dir, resuming=resuming)

        def summary(self, values):
            seen["summary"] = values

        def finish(self, failed=False):
            seen["finished"] = True

    monkeypatch.setattr(tracking, "Tracker", FakeTracker)
    run = make_run(tmp_path / "runs", sst2_dir, overrides=["tracking.wandb=offline"])
    result = merge.run_merge(run, dtype="fp32", **FAST)
    assert seen["run_dir"] == run and seen["resuming"] and seen["finished"]
    assert seen["summary"]["merge/status"] == "passed"
    assert seen["summary"]["merge/fp32_merge/max_abs_diff"] < 1e-5
    assert seen["summary"]["merge/lora_effect_max_abs"] > 1e-3

    def broken(*args, **kwargs):
        raise RuntimeError("no API key")

    monkeypatch.setattr(tracking, "Tracker", broken)
    result = merge.run_merge(run, dtype="fp32", **FAST)
    assert result.status == "passed" and any("no API key" in n for n in result.notes)


EXPORT_CHECK = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder, texts = sys.argv[1], json.loads(sys.argv[2])
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, return_tensors="pt")).logits
    assert "peft" not in sys.modules, "loading the export imported peft"
    print(json.dumps({"logits": logits.tolist(), "labels": model.config.id2label}))
    """
)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bert"])
def test_export_reloads_without_peft(tmp_path, sst2_dir, model):
    run = make_run(tmp_path / "runs", sst2_dir, model, "extended")
    out = tmp_path / "export"
    result = merge.run_merge(run, dtype="fp32", bench=False, out=out, quiet=True)
    assert result.export_dir == out and result.status == "passed"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors"}
    assert not list(out.parent.glob(".export*")), "temporary folders left behind"
    card = (out / "README.md").read_text()
    assert "r=8, alpha=16" in card and "passed" in card and "sst2" in card

    # The exported weight is W + (alpha/r)·B·A, computed here by hand from the saved files.
    from safetensors.torch import load_file

    from loralab.models import resolve

    layer = (
        "layers.0.self_attn.q_proj"
        if model == "tiny-llama"
        else "encoder.layer.0.attention.self.query"
    )
    base = load_file(Path(resolve(model)) / "model.safetensors")
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    merged = load_file(out / "model.safetensors")
    key_w = next(k for k in merged if k.endswith(f"{layer}.weight"))
    key_base = next(k for k in base if k.endswith(f"{layer}.weight"))
    A = next(v for k, v in adapter.items() if f"{layer}.lora_A" in k)
    B = next(v for k, v in adapter.items() if f"{layer}.lora_B" in k)
    torch.testing.assert_close(merged[key_w], base[key_base] + (16 / 8) * B @ A, rtol=0, atol=1e-6)

    # A fresh process loads the folder with plain transformers (peft never imported) and
    # predicts what the adapter model predicts.
    texts = ["the film was lovely", "acting is awful and this movie is dull", "a story"]
    r = subprocess.run(
        [sys.executable, "-c", EXPORT_CHECK, str(out), json.dumps(texts)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["labels"] == {"0": "negative", "1": "positive"}
    from loralab.config import from_dict, load_yaml

    cfg = from_dict(load_yaml(run / "config.yaml"))
    tok = load_tokenizer(model, progress=False)
    tok.padding_side = "right"
    reference = merge.load_adapter_model(cfg, get_task("sst2"), run, tok)
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    (want,) = merge.forward_all(reference, [batch])
    torch.testing.assert_close(torch.tensor(got["logits"]), want, rtol=0, atol=1e-5)


def test_cli_merge_writes_benchmark_and_export(tmp_path, sst2_dir, capsys):
    run = make_run(tmp_path / "runs", sst2_dir, "tiny-bert")
    args = ["merge", str(run), "--dtype", "fp32", "--quiet", "--bench-batches", "4",
            "--bench-warmup", "1", "--bench-batch-size", "2", "--bench-seq-len", "16"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Inference benchmark" in out and "passed" in out
    bench = json.loads((run / "merge" / "benchmark.json").read_text())
    assert list(bench["models"]) == ["base", "adapter", "merged"]
    for t in bench["models"].values():
        assert 0 < t["min_s"] <= t["median_s"] <= t["p90_s"]
        assert t["tokens_per_s"] == pytest.approx(2 * 16 / t["median_s"])
    assert {"adapter_overhead_pct", "merged_vs_base_pct"} <= set(bench)
    assert (run / "merge" / "model" / "config.json").is_file()
    # A second merge replaces its own export in place.
    assert main([*args, "--no-benchmark"]) == 0
    assert (run / "merge" / "model" / "config.json").is_file()


def test_benchmark_batches_are_full_and_identical_for_all_models(tmp_path, sst2_dir):
    from datasets import Dataset

    feats = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6]]})
    batches = merge.make_bench_batches(feats, n=3, batch_size=2, seq_len=4, with_token_types=True)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 4)] * 3
    assert batches[0]["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 1, 2]]  # the stream, cycled
    assert all(b["attention_mask"].all() and not b["token_type_ids"].any() for b in batches)


def test_merge_after_real_training(tmp_path, sst2_dir):
    """An adapter as the Trainer saves it (B moved by training, not set by hand)."""
    from loralab.train import train

    cfg = build_config(
        overrides=[
            "model.name=tiny-llama", f"data.data_dir={sst2_dir}", f"run.output_dir={tmp_path}",
            "train.max_steps=4", "train.lr=5e-2", "train.batch_size=8", "train.save_steps=100",
        ]
    )  # fmt: skip
    run = train(cfg, quiet=True).run_dir
    result = merge.run_merge(run, dtype="fp32", **FAST)
    assert result.status == "passed", result.report
    assert result.report["lora_effect"]["zero_B_layers"] == 0


SQUAD = {
    "version": "v2.0",
    "data": [{"title": "t", "paragraphs": [{
        "context": "Anna keeps three grey cats in a small flat near the old mill by the river.",
        "qas": [
            {"id": "a", "question": "How many cats?", "is_impossible": False,
             "answers": [{"text": "three", "answer_start": 11}]},
            {"id": "b", "question": "Name of the dog?", "is_impossible": True, "answers": []},
        ],
    }]}],
}  # fmt: skip


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bert"])
def test_merge_question_answering(tmp_path, model):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(SQUAD))
    overrides = [
        "data.task=squad_v2",
        f"data.eval_file={path}",
        "data.max_length=48",
        "data.doc_stride=16",
    ]
    run = make_run(tmp_path / "runs", tmp_path, model, "standard", overrides=overrides)
    result = merge.run_merge(run, dtype="fp32", **FAST)
    r = result.report
    assert r["features"] > r["examples"] == 2  # long context: several windows per question
    # QA adapters use PEFT's plain wrapper, which passes every input on (its QUESTION_ANS
    # wrapper drops BERT's token_type_ids): adapter and merged model see the same inputs.
    assert result.status == "passed", r
    assert r["variants"]["fp32 merge"]["metrics"] == r["reference"]["metrics"]
    assert r["wrapper_vs_unwrapped"]["max_abs_diff"] == 0.0


def _bad_run_dirs(tmp_path, sst2_dir):
    full = build_config(overrides=["train.method=full", f"run.output_dir={tmp_path / 'full'}"])
    unfinished = build_config(overrides=[f"run.output_dir={tmp_path / 'lora'}"])
    (tmp_path / "plain").mkdir()
    return {
        "full": (tracking.create_run_dir(full), "full fine-tuning run"),
        "no adapter": (tracking.create_run_dir(unfinished), "no saved adapter"),
        "not a run": (tmp_path / "plain", "not a loralab run directory"),
    }


@pytest.mark.parametrize("case", ["full", "no adapter", "not a run"])
def test_bad_run_dirs_exit_2(tmp_path, sst2_dir, capsys, case):
    run, needle = _bad_run_dirs(tmp_path, sst2_dir)[case]
    assert main(["merge", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--dtype", "fp16"], "invalid choice: 'fp16'"),
        (["--tolerance", "fp16=1e-3"], "Bad --tolerance"),
    ],
)
def test_bad_options_exit_2(tmp_path, sst2_dir, extra, needle):
    run = make_run(tmp_path / "runs", sst2_dir)
    r = subprocess.run(
        [sys.executable, "-m", "loralab.cli", "merge", str(run), "--quiet", *extra],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2 and needle in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    with pytest.raises(Exception, match="Unknown --dtype"):
        merge.run_merge(run, dtype="fp16")


def test_merge_lm_head_run(tmp_path, sst2_dir):
    """A `--head lm` run: merged vs adapter next-token logits, verbalizer metrics, causal-LM export."""
    from transformers import AutoModelForCausalLM

    from loralab.train import train

    cfg = build_config(
        overrides=[
            "model.name=tiny-llama", "model.head=lm", f"data.data_dir={sst2_dir}",
            f"run.output_dir={tmp_path}", "train.max_steps=4", "train.lr=5e-2",
            "train.batch_size=8", "train.save_steps=100",
        ]
    )  # fmt: skip
    run = train(cfg, quiet=True).run_dir
    result = merge.run_merge(run, dtype="fp32", **{**FAST, "export": True})
    r = result.report
    assert result.status == "passed", r
    row = r["variants"]["fp32 merge"]
    assert row["max_abs_diff"] < 1e-4 and row["changed_predictions"] == 0.0
    assert set(r["reference"]["metrics"]) == {"accuracy"}
    assert row["metrics"] == r["reference"]["metrics"]
    # The LoRA update changes the next-token distribution (the check is informative).
    assert r["lora_effect"]["max_abs_diff"] >= merge.INFORMATIVE_FACTOR * 1e-4
    exported = AutoModelForCausalLM.from_pretrained(result.export_dir).eval()
    assert not any("lora" in n for n, _ in exported.named_parameters())
    loaded = merge.load_run(run, 8)
    want = merge.forward_all(loaded.reference, loaded.batches[:1])[0]
    got = merge.forward_all(exported, loaded.batches[:1])[0]
    assert want.shape[-1] == exported.config.vocab_size
    assert (got - want).abs().max() < 1e-4
    assert "AutoModelForCausalLM" in (result.export_dir / "README.md").read_text()


def test_bf16_merge_is_judged_against_the_bf16_adapter(tmp_path, sst2_dir, monkeypatch):
    """One rule: bound = tolerance × max(1, max |logit|), and for bf16 at least 4× the unmerged
    bf16 adapter's own error. With a near-zero bf16 tolerance the adapter's error sets it."""
    monkeypatch.setattr(merge, "native_bf16", lambda: False)  # same numbers on every machine
    run = make_run(tmp_path / "runs", sst2_dir, "tiny-llama", "all-linear", b_std=0.3)
    result = merge.run_merge(run, dtype="both", tolerances={"bf16": 1e-9}, **FAST)
    report, rows = result.report, result.report["variants"]
    scale = report["logit_scale"]
    assert rows["fp32 merge"]["bound"] == pytest.approx(1e-4 * max(1.0, scale))
    floor = rows["bf16 adapter (unmerged)"]["max_abs_diff"]
    assert floor > 1e-4  # bf16 really rounds
    for name in ("bf16 merge in bf16", "bf16 merge in fp32, then cast"):
        assert rows[name]["bound"] == pytest.approx(merge.BF16_ADAPTER_FACTOR * floor)
        # Measured: 0.0154 (merge in bf16) and 0.0045 (fp32 merge, cast) vs a floor of 0.0046.
        assert rows[name]["status"] == "passed", rows[name]
    assert merge.equivalence_bound("bf16", 0.1, 40.0, adapter_error=0.625) == 4.0
    assert merge.equivalence_bound("bf16", 0.01, 40.0, adapter_error=0.625) == 2.5
    assert merge.equivalence_bound("fp32", 1e-4, 0.2, adapter_error=5.0) == 1e-4
