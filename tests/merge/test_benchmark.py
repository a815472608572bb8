"""The inference benchmark: full identical batches for every model, benchmark.json via the CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from merge_runs import make_run

from loralab.cli import main
from loralab.merge.benchmark import make_bench_batches

pytestmark = pytest.mark.precision  # run once in bf16 and once in fp32 (conftest.py)


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
    med = {name: t["median_s"] for name, t in bench["models"].items()}
    assert bench["adapter_overhead_pct"] == pytest.approx(100 * (med["adapter"] / med["base"] - 1))
    assert bench["merged_vs_base_pct"] == pytest.approx(100 * (med["merged"] / med["base"] - 1))
    assert (run / "merge" / "model" / "config.json").is_file()
    assert json.loads((run / "merge" / "merge.json").read_text())["examples"] == 32  # all of dev
    # A second merge replaces its own export in place; --max-eval-examples caps the check.
    assert main([*args, "--no-benchmark", "--max-eval-examples", "4"]) == 0
    assert (run / "merge" / "model" / "config.json").is_file()
    assert json.loads((run / "merge" / "merge.json").read_text())["examples"] == 4


def test_benchmark_times_bench_batches_after_warmup_and_a_merged_model(
    tmp_path, sst2_dir, monkeypatch
):
    """A fake clock: each model call takes a set time (warm-up calls 100 s), so the statistics
    and percentages show exactly which calls were timed; the model timed as "merged" holds no
    LoRA layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from loralab.merge import benchmark as bench_module

    clock, calls, seen = [0.0], {}, {}
    # Seconds of each timed call; medians, means and minima give different percentages.
    took = {"base": [1.0, 2.0, 3.0, 10.0], "adapter": [3.0, 4.0, 5.0, 12.0],
            "merged": [1.0, 3.0, 4.0, 20.0]}  # fmt: skip
    real = bench_module.benchmark

    def spy(models, batches, warmup):
        seen.update(models=dict(models), batches=len(batches), warmup=warmup)

        def timed(name, model):
            def call(**batch):
                i = calls[name] = calls.get(name, 0) + 1
                model(**batch)
                clock[0] += 100.0 if i <= warmup else took[name][i - warmup - 1]

            return call

        return real({name: timed(name, m) for name, m in models.items()}, batches, warmup)

    monkeypatch.setattr(bench_module, "benchmark", spy)
    monkeypatch.setattr(bench_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    run = make_run(tmp_path / "runs", sst2_dir, "tiny-bert")
    args = ["merge", str(run), "--dtype", "fp32", "--quiet", "--no-export", "--bench-batches",
            "4", "--bench-warmup", "2", "--bench-batch-size", "2", "--bench-seq-len", "8"]  # fmt: skip
    assert main(args) == 0
    assert seen["batches"] == 6 and seen["warmup"] == 2  # 2 warm-up + 4 timed batches
    assert calls == {"base": 6, "adapter": 6, "merged": 6}
    bench = json.loads((run / "merge" / "benchmark.json").read_text())
    assert bench["batches"] == 4 and bench["warmup"] == 2
    for name, t in bench["models"].items():  # the 4 timed calls only, no 100 s warm-up
        d = took[name]
        assert t["median_s"] == pytest.approx(np.median(d)) and t["min_s"] == pytest.approx(d[0])
        assert t["mean_s"] == pytest.approx(np.mean(d))
        assert t["p90_s"] == pytest.approx(np.percentile(d, 90))
        assert t["tokens_per_s"] == pytest.approx(2 * 8 / np.median(d))
    assert bench["adapter_overhead_pct"] == pytest.approx(80.0)  # medians 4.5 s vs 2.5 s
    assert bench["merged_vs_base_pct"] == pytest.approx(40.0)  # 3.5 s vs 2.5 s

    def lora_layers(model):
        return [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]

    assert lora_layers(seen["models"]["adapter"])  # the unmerged model does hold them
    assert not lora_layers(seen["models"]["merged"]) and not lora_layers(seen["models"]["base"])


def test_benchmark_batches_are_full_and_identical_for_all_models(tmp_path, sst2_dir):
    from datasets import Dataset

    feats = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6]]})
    batches = make_bench_batches(feats, n=3, batch_size=2, seq_len=4, with_token_types=True)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 4)] * 3
    assert batches[0]["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 1, 2]]  # the stream, cycled
    assert all(b["attention_mask"].all() and not b["token_type_ids"].any() for b in batches)
