"""Merge equivalence: non-identity adapters pass, B = 0 is flagged, bf16 is judged by its floor,
every head formulation."""

from __future__ import annotations

import json

import pytest
from merge_runs import FAST, make_run, merge_run

from loralab import merge
from loralab.cli import main
from loralab.config import build_config
from loralab.merge import equivalence
from loralab.merge.equivalence import forward_all
from loralab.merge.inputs import load_run

pytestmark = pytest.mark.precision  # run once in bf16 and once in fp32 (conftest.py)


@pytest.mark.parametrize("target", ["standard", "extended", "all-linear"])
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bert"])
def test_merge_matches_adapter_model(tmp_path, sst2_dir, model, target):
    run = make_run(tmp_path / "runs", sst2_dir, model, target)
    result = merge_run(run, dtype="fp32", **FAST)
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
    monkeypatch.setattr(equivalence, "native_bf16", lambda: native)
    run = make_run(tmp_path / "runs", sst2_dir, "tiny-llama", "all-linear", b_std=0.3)
    result = merge_run(run, dtype="both", tolerances={"bf16": 0.03}, **FAST)
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
    """Tiny Llama's update (~0.3) is below 10× the default bf16 tolerance (10 × 0.05): the bf16 rows
    prove nothing alone; the fp32 row, through the same merge code, does."""
    run = make_run(tmp_path / "runs", sst2_dir)
    both = merge_run(run, dtype="both", **FAST)
    assert both.report["lora_effect"]["max_abs_diff"] < 10 * merge.DEFAULT_TOLERANCES["bf16"]
    statuses = {n: r["status"] for n, r in both.report["variants"].items()}
    assert statuses["fp32 merge"] == "passed"
    assert (
        statuses["bf16 merge in bf16"]
        == statuses["bf16 merge in fp32, then cast"]
        == "uninformative"
    )
    assert both.status == "passed"
    only_bf16 = merge_run(run, dtype="bf16", **FAST)
    assert only_bf16.status == "uninformative" and only_bf16.exit_code == 0
    assert any("less than 10× the tolerance" in n for n in only_bf16.notes)


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
    result = merge_run(run, dtype="fp32", **FAST)
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
    result = merge_run(run, dtype="fp32", **FAST)
    r = result.report
    assert r["features"] > r["examples"] == 2  # long context: several windows per question
    # QA adapters use PEFT's plain wrapper, which passes every input on (its QUESTION_ANS
    # wrapper drops BERT's token_type_ids): adapter and merged model see the same inputs.
    assert result.status == "passed", r
    assert r["variants"]["fp32 merge"]["metrics"] == r["reference"]["metrics"]
    assert r["wrapper_vs_unwrapped"]["max_abs_diff"] == 0.0


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
    result = merge_run(run, dtype="fp32", **{**FAST, "export": True})
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
    loaded = load_run(run, 8)
    want = forward_all(loaded.reference, loaded.batches[:1], loaded.head)[0]
    got = forward_all(exported, loaded.batches[:1], loaded.head)[0]
    assert want.shape[-1] == exported.config.vocab_size
    assert (got - want).abs().max() < 1e-4
    assert "AutoModelForCausalLM" in (result.export_dir / "README.md").read_text()


def test_bf16_merge_is_judged_against_the_bf16_adapter(tmp_path, sst2_dir, monkeypatch):
    """One rule: bound = tolerance × max(1, max |logit|), and for bf16 at least 4× the unmerged
    bf16 adapter's own error. With a near-zero bf16 tolerance the adapter's error sets it."""
    monkeypatch.setattr(equivalence, "native_bf16", lambda: False)  # same numbers on every machine
    run = make_run(tmp_path / "runs", sst2_dir, "tiny-llama", "all-linear", b_std=0.3)
    result = merge_run(run, dtype="both", tolerances={"bf16": 1e-9}, **FAST)
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


def test_dora_with_zero_b_adds_nothing_only_at_its_initial_magnitudes():
    """DoRA's output is magnitude · (W + sBA) / ‖W + sBA‖: with B = 0 it still rescales W's rows
    once the magnitudes have moved, so B = 0 alone must not call it an identity."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(3, 8)
    before = base(x)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0", "2"], use_dora=True))
    assert torch.allclose(model(x), before, atol=1e-6)  # fresh DoRA: an identity
    assert equivalence.lora_update_norms(model) == {"layers": 2, "zero_B_layers": 2, "heads": []}
    with torch.no_grad():  # a trained magnitude, B still 0: the output changes
        model.base_model.model[0].lora_magnitude_vector["default"].weight.mul_(1.5)
    assert not torch.allclose(model(x), before, atol=1e-3)
    assert equivalence.lora_update_norms(model)["zero_B_layers"] == 1


def test_compare_keeps_a_nan():
    """Python's max(0.0, nan) is 0.0: a merge whose outputs held NaN measured max |Δ| 0."""
    import torch

    ref = [torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]])]
    out = [torch.tensor([[1.0, 2.0]]), torch.tensor([[float("nan"), -1.0]])]
    diff = equivalence.compare(ref, out)
    assert diff["max_abs_diff"] != diff["max_abs_diff"]  # NaN
    assert diff["max_rel_diff"] != diff["max_rel_diff"]
    assert equivalence.compare(ref, ref)["max_abs_diff"] == 0.0


def test_a_merge_with_nan_weights_fails_and_is_not_exported(tmp_path, sst2_dir, monkeypatch):
    """Was 'passed', exit 0, and the broken model exported."""
    import torch

    run = make_run(tmp_path / "runs", sst2_dir)
    real = equivalence.merge

    def broken(model):
        merged = real(model)
        with torch.no_grad():
            next(p for n, p in merged.named_parameters() if "q_proj" in n).fill_(float("nan"))
        return merged

    monkeypatch.setattr(equivalence, "merge", broken)
    result = merge_run(run, dtype="fp32", bench=False, export=True, quiet=True)
    assert result.status == "failed" and result.exit_code == 1, result.report["variants"]
    assert not (run / "merge" / "model").exists()
