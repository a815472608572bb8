"""`run_merge` and `loralab merge`: a wrong merge fails and is not exported, bad inputs exit 2,
the caller's config and RNG are left alone."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from merge_runs import FAST, make_run, merge_run

from loralab import tracking
from loralab.cli import main
from loralab.config import build_config
from loralab.merge import equivalence

pytestmark = pytest.mark.precision  # run once in bf16 and once in fp32 (conftest.py)


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
    monkeypatch.setattr(equivalence, "merge", _doubled_scaling_merge)
    result = merge_run(run, dtype="fp32", bench=False, quiet=True)
    row = result.report["variants"]["fp32 merge"]
    assert result.status == "failed" and result.exit_code == 1
    assert row["status"] == "failed" and row["max_abs_diff"] > 10 * row["tolerance"]
    assert result.export_dir is None and not (run / "merge" / "model").exists()
    assert any("Not exported" in n for n in result.notes)


def test_the_export_is_gated_on_the_variant_it_exports(tmp_path, sst2_dir, monkeypatch):
    """With --dtype bf16 the export is the fp32 merge cast to bf16: a failed merge done in bf16
    (another variant) fails the verdict but does not block it; a failed fp32-then-cast does.
    (A tiny run's bf16 rows are too coarse to see its update: the verdicts are set here.)"""
    run = make_run(tmp_path / "runs", sst2_dir)

    def failing(bad):
        def verdict(name, row, bound, effect):
            return "reference" if "unmerged" in name else "failed" if name == bad else "passed"

        return verdict

    monkeypatch.setattr(equivalence, "verdict", failing("bf16 merge in bf16"))
    result = merge_run(run, dtype="bf16", bench=False, quiet=True, out=str(tmp_path / "a"))
    assert result.status == "failed"
    assert result.export_dir is not None and (tmp_path / "a" / "config.json").is_file()
    monkeypatch.setattr(equivalence, "verdict", failing("bf16 merge in fp32, then cast"))
    result = merge_run(run, dtype="bf16", bench=False, quiet=True, out=str(tmp_path / "b"))
    assert result.export_dir is None and not (tmp_path / "b").exists()
    assert any("Not exported: the merge it would export (bf16 merge in fp32, then cast)" in n for n in result.notes)  # fmt: skip


def test_merge_json_says_whether_the_merge_finished(tmp_path, sst2_dir, monkeypatch):
    import json

    from loralab.merge import run as merge_run_module

    run = make_run(tmp_path / "runs", sst2_dir)
    merge_run(run, dtype="fp32", bench=False, quiet=True)
    assert json.loads((run / "merge" / "merge.json").read_text())["finished"] is True

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(merge_run_module, "export_model", full_disk)
    with pytest.raises(OSError):
        merge_run(run, dtype="fp32", bench=False, quiet=True, out=str(tmp_path / "deploy"))
    report = json.loads((run / "merge" / "merge.json").read_text())
    assert report["finished"] is False and report["status"] == "passed"  # verdict kept, not done


def test_cli_exit_1_on_a_wrong_merge(tmp_path, sst2_dir, monkeypatch, capsys):
    run = make_run(tmp_path / "runs", sst2_dir)
    monkeypatch.setattr(equivalence, "merge", _doubled_scaling_merge)
    assert main(["merge", str(run), "--dtype", "fp32", "--no-benchmark", "--quiet"]) == 1
    assert "failed" in capsys.readouterr().out


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
        merge_run(run, dtype="fp16")


def test_options_are_checked_before_anything_loads():
    from loralab.errors import LoralabError
    from loralab.merge import MergeOptions

    MergeOptions().check()
    MergeOptions(bench=False, bench_batches=0).check()  # benchmark settings matter only with it
    for options, needle in [
        (MergeOptions(dtype="fp16"), "Unknown --dtype 'fp16'"),
        (MergeOptions(bench_seq_len=0), "--bench-seq-len"),
        (MergeOptions(bench_warmup=-1), "--bench-warmup ≥ 0"),
        (MergeOptions(max_eval_examples=0), "--max-eval-examples must be at least 1"),
    ]:
        with pytest.raises(LoralabError, match=needle):
            options.check()
    assert MergeOptions(tolerances={"bf16": 0.1}).all_tolerances() == {"fp32": 1e-4, "bf16": 0.1}


def test_merge_leaves_the_callers_rng_alone_and_its_figures_do_not_depend_on_it(tmp_path, sst2_dir):
    run = make_run(tmp_path / "runs", sst2_dir, "tiny-bert")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = merge_run(run, dtype="fp32", **FAST)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    second = merge_run(run, dtype="fp32", **FAST)
    for key in ("variants", "lora_effect", "reference"):
        assert first.report[key] == second.report[key]


def test_load_run_overrides_data_in_a_copy(tmp_path, sst2_dir):
    from loralab.config import from_dict, load_yaml
    from loralab.merge.inputs import load_run

    run = make_run(tmp_path / "runs", sst2_dir)
    moved = tmp_path / "moved"
    shutil.copytree(sst2_dir, moved)
    loaded = load_run(run, 4, data_dir=str(moved), quiet=True)
    assert loaded.cfg.data.data_dir == str(moved) and len(loaded.raw) == 4
    assert from_dict(load_yaml(run / "config.yaml")).data.data_dir == str(sst2_dir)
    # A run with its own evaluation file: --data-dir alone takes that folder's dev split (the
    # run's file was taken over it, the override silently ignored).
    from conftest import write_sst2

    other = write_sst2(tmp_path / "other", n_dev=6, seed=5)
    own = make_run(tmp_path / "runs2", sst2_dir, overrides=[f"data.eval_file={sst2_dir / 'dev.tsv'}"])  # fmt: skip
    loaded = load_run(own, 0, data_dir=str(other), quiet=True)
    assert loaded.cfg.data.eval_file is None and len(loaded.raw) == 6


def test_an_earlier_merges_files_are_named_as_such(tmp_path):
    from loralab.merge.run import earlier_outputs

    assert earlier_outputs(tmp_path, benchmarked=False, export_dir=None) == []  # a first merge
    (tmp_path / "benchmark.json").write_text("{}")
    (tmp_path / "model").mkdir()
    notes = earlier_outputs(tmp_path, benchmarked=False, export_dir=tmp_path.parent / "deploy")
    assert notes == [
        "benchmark.json here is from an earlier merge: this one ran no benchmark.",
        f"model/ here is an earlier merge's export: this one exported to {tmp_path.parent / 'deploy'}.",
    ]
    assert earlier_outputs(tmp_path, benchmarked=True, export_dir=tmp_path / "model") == []
    assert earlier_outputs(tmp_path, True, None)[0].endswith("this one exported nothing.")
