"""The inference benchmark: full identical batches for every model, benchmark.json via the CLI."""

from __future__ import annotations

import json

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
    assert {"adapter_overhead_pct", "merged_vs_base_pct"} <= set(bench)
    assert (run / "merge" / "model" / "config.json").is_file()
    # A second merge replaces its own export in place.
    assert main([*args, "--no-benchmark"]) == 0
    assert (run / "merge" / "model" / "config.json").is_file()


def test_benchmark_batches_are_full_and_identical_for_all_models(tmp_path, sst2_dir):
    from datasets import Dataset

    feats = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6]]})
    batches = make_bench_batches(feats, n=3, batch_size=2, seq_len=4, with_token_types=True)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 4)] * 3
    assert batches[0]["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 1, 2]]  # the stream, cycled
    assert all(b["attention_mask"].all() and not b["token_type_ids"].any() for b in batches)
