"""The benchmarks keep working against the library (they broke silently once): each one's
measuring code runs here on tiny-llama and data written by the test, and its figures add up."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import write_sst2

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _tiny_llama_config():
    from transformers import AutoConfig

    from loralab.models import resolve

    return AutoConfig.from_pretrained(resolve("tiny-llama"))


def _decoder_linear_weights() -> int:
    """N of the 2N-flops-per-pass rule: tiny-llama's decoder Linear weights, from its config."""
    c = _tiny_llama_config()
    h, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attention = h * q + 2 * h * kv + q * h
    return c.num_hidden_layers * (attention + 3 * h * c.intermediate_size)


def load(name: str, monkeypatch):
    monkeypatch.setenv("LORALAB_BENCH_MODEL", "tiny-llama")  # read at import
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config,method", [("B", "full"), ("C", "lora")])
def test_train_throughput_measures_a_baseline_and_a_loralab_configuration(
    tmp_path, monkeypatch, config, method
):
    bench = load("train_throughput", monkeypatch)
    data = write_sst2(tmp_path / "sst2", n_train=96)
    got = bench.child({"config": config, "method": method, "device": "cpu", "examples": 96,
                       "steps": 3, "warmup": 1, "data_dir": str(data)})  # fmt: skip
    assert got["measured_steps"] == 3
    assert got["step_time_s"] > 0 and got["tokens_per_s_real"] > 0
    # Real tokens never exceed padded ones; the flops per token are 4N (LoRA) or 6N (full).
    assert got["tokens_per_s_padded"] >= got["tokens_per_s_real"]
    assert 0 <= got["padding_share"] < 1
    n = got["flops_per_real_token"] / (4 if method == "lora" else 6)
    assert n == _decoder_linear_weights()
    assert got["model_gflops_per_s"] == pytest.approx(
        got["flops_per_real_token"] * got["tokens_per_s_real"] / 1e9
    )


def test_fused_ops_benchmark_compares_the_same_model_with_and_without(monkeypatch):
    bench = load("fused_ops", monkeypatch)
    monkeypatch.setenv("LORALAB_FUSED", "1")  # the benchmark sets it per model; restored after
    got = bench.measure("lora", rounds=2, batch_size=4, length=12)
    layers = _tiny_llama_config().num_hidden_layers
    # one gated MLP per layer; one LoRA dropout per adapted layer (q and v)
    assert got["fused_ops"] == {"gated_mlps": layers, "dropouts": 2 * layers}
    assert set(got["step_s"]) == {"plain", "fused"} and min(got["step_s"].values()) > 0
    assert got["fused_over_plain_time"] == got["step_s"]["fused"] / got["step_s"]["plain"]
    assert 0 < got["saved_mb"]["fused"] < got["saved_mb"]["plain"]
    draws = bench.masks(rounds=2, shape=(4, 12, 32))
    assert set(draws["ns_per_element"]) == {"bernoulli", "keep_mask"}
    assert draws["bernoulli_over_keep_mask"] == pytest.approx(
        draws["ns_per_element"]["bernoulli"] / draws["ns_per_element"]["keep_mask"]
    )


def test_matmul_shapes_times_each_product_against_the_peak(monkeypatch, capsys):
    bench = load("matmul_shapes", monkeypatch)
    monkeypatch.setattr(bench, "timed", lambda fn, seconds=0.3: (fn(), 100.0)[1])  # 100 µs each
    assert bench.main(["--tokens", "8", "--dtype", "fp32", "--threads", "1"]) == 0
    got = json.loads(capsys.readouterr().out)
    down = got["shapes"]["down_proj"]
    assert down["shape"] == [8, 1536, 576]
    assert down["gflops"]["forward"] == pytest.approx(2 * 8 * 1536 * 576 / 1e9 / 100e-6)
    assert got["peak_gflops"] == pytest.approx(2 * 2048 * 576 * 1536 / 1e9 / 100e-6)
    # 7 frozen products × 2 (forward, input gradient) + 4 LoRA factors × 3, 30 layers, 100 µs
    assert got["lora_step_products_ms"] == pytest.approx((7 * 2 + 4 * 3) * 30 * 0.1)


def test_compile_cost_splits_a_run_at_the_compile_and_compares_with_eager(tmp_path, monkeypatch):
    bench = load("compile_cost", monkeypatch)
    rows = [{"step": 0, "time": 100.0}, {"step": 1, "time": 101.0}]  # a record without a loss
    rows += [
        {"step": s, "time": 100.0 + t, "train/loss": 0.5} for s, t in [(10, 9), (20, 11), (40, 15)]
    ]
    assert bench.windows(rows, 10) == {
        "head_steps": 10,
        "head_s": 9.0,
        "steady_steps": 30,
        "steady_s": 6.0,
    }
    assert bench.windows(rows, 15)["head_s"] == 11.0  # the first logged step at or after it
    with pytest.raises(SystemExit, match="no loss after step 40"):
        bench.windows(rows, 40)
    runs = {
        "eager": {"wall_s": 100.0, "train_time_s": 80.0, "head_s": 10.0, "steady_s": 60.0, "steady_steps": 200},
        "warm": {"wall_s": 90.0, "train_time_s": 70.0, "head_s": 16.0, "steady_s": 40.0, "steady_steps": 200},
    }  # fmt: skip
    got = bench.report(runs)["over_eager"]
    assert got.keys() == {"warm"}
    assert got["warm"] == pytest.approx(
        {"wall": 0.9, "train_time": 0.875, "steady_speedup": 1.5, "head_extra_s": 6.0}
    )
    # One real (tiny, eager: test_compiling compiles) run through the CLI, as the benchmark does.
    data = write_sst2(tmp_path / "sst2", n_train=64)
    args = bench.argparse.Namespace(
        method="lora", data_dir=str(data), examples=64, lr="5e-4", head=2,
        override=["train.logging_steps=1", "train.batch_size=8"],
    )  # fmt: skip
    env = {**bench.os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    run = bench.one_run("eager", args, tmp_path / "runs", env, False)
    assert run["compile"] == {"compile": False, "reason": "set in the config"}
    assert run["head_steps"] == 2 and run["steady_steps"] == 6 and run["steady_s"] > 0
    assert 0 <= run["metrics"]["accuracy"] <= 1


def test_study_throughput_runs_each_layout_as_a_real_study(tmp_path, monkeypatch, capsys):
    bench = load("study_throughput", monkeypatch)
    data = write_sst2(tmp_path / "sst2", n_train=32, n_dev=16)
    with pytest.raises(SystemExit, match="--runs must be 1..8"):
        bench.spec(9, str(data), 32, "tiny-llama")
    argv = ["--data-dir", str(data), "--model", "tiny-llama", "--examples", "32", "--runs", "2"]
    assert bench.main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    cores = bench.os.cpu_count() or 1
    assert [r["workers"] for r in got["rows"]] == ([1, cores] if cores > 1 else [1])
    for r in got["rows"]:
        # Every point of the study ran (one per learning rate) and its figures add up.
        assert r["runs"] == 2 and len(r["accuracy"]) == 2
        assert all(0 <= a <= 1 for a in r["accuracy"])
        assert r["runs_per_hour"] == pytest.approx(2 * 3600 / r["wall_s"])
        assert r["over_one_worker"] == pytest.approx(
            r["runs_per_hour"] / got["rows"][0]["runs_per_hour"]
        )
    assert got["fastest"] == max(got["rows"], key=lambda r: r["runs_per_hour"])["layout"]


def test_a_failing_gpu_configuration_comes_back_as_an_error_row(monkeypatch):
    bench = load("train_throughput", monkeypatch)
    failed = bench.subprocess.CompletedProcess(
        [], 1, stdout="", stderr="Traceback\nBackendCompilerFailed: x"
    )
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: failed)
    spec = {"config": "D", "method": "lora", "device": "cuda"}
    assert bench._run_child(spec, must=False) == {**spec, "error": ["BackendCompilerFailed: x"]}
    with pytest.raises(SystemExit, match="configuration D \\(lora\\) failed"):
        bench._run_child(spec)


@pytest.mark.parametrize("forced, compiled", [("fp32", False), ("bf16", True)])
def test_d_compiles_only_in_bf16_where_auto_would(tmp_path, monkeypatch, forced, compiled):
    """D is loralab's fastest setting: compiled layers paid in bf16 and measured no faster in
    fp32, so D compiles only where `auto` precision picks bf16."""
    import loralab.train

    bench = load("train_throughput", monkeypatch)
    monkeypatch.setenv("LORALAB_PRECISION", forced)
    seen = {}

    class Stop(Exception):
        pass

    def captured(cfg, **kw):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(loralab.train, "train", captured)
    spec = {"config": "D", "method": "lora", "examples": 8, "steps": 1, "warmup": 1}
    with pytest.raises(Stop):
        bench._loralab(spec, str(tmp_path), tmp_path)
    assert seen["cfg"].train.compile is compiled and seen["cfg"].lora.dropout == 0.0


def test_startup_times_a_fresh_import_of_the_module_it_is_given(tmp_path, monkeypatch):
    """The import floor is timed in a new interpreter: a module that sleeps 0.3 s on import
    takes at least that, and a failing import stops the benchmark instead of timing nothing."""
    import os

    startup = load("startup", monkeypatch)
    (tmp_path / "slow_to_import.py").write_text("import time\ntime.sleep(0.3)\n")
    (tmp_path / "broken_import.py").write_text("raise ImportError('no')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    assert 0.3 <= startup.import_seconds("slow_to_import", env) < 5
    # Paused as the command pauses it: the module sees the collector off.
    (tmp_path / "says_gc.py").write_text("import gc\nassert not gc.isenabled()\n")
    assert startup.import_seconds("says_gc", env, paused=True) < 5
    with pytest.raises(SystemExit, match="importing says_gc failed"):
        startup.import_seconds("says_gc", env)
    with pytest.raises(SystemExit, match="importing broken_import failed"):
        startup.import_seconds("broken_import", env)
