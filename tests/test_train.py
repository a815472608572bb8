"""Training: what LoRA and full fine-tuning change, the run directory, kill + resume."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from conftest import KILLER, write_sst2

from loralab import probecache
from loralab.cli import main
from loralab.config import build_config
from loralab.models import load_tokenizer
from loralab.tasks import get_task
from loralab.train import build_model

pytestmark = pytest.mark.precision  # run once in bf16 and once in fp32 (conftest.py)

TINY_ARGS = ["train.batch_size=8", "train.logging_steps=2", "train.save_steps=4"]


def _one_step(cfg, data_dir):
    task = get_task("sst2")
    tok = load_tokenizer(cfg.model.name)
    torch.manual_seed(0)
    built = build_model(cfg, task, tok, progress=False)
    model = built.model
    raw = task.load("train", data_dir=str(data_dir))
    feats = task.featurize(raw.select(range(8)), tok, 64, 0, "train", causal=built.causal)
    from transformers import DataCollatorWithPadding

    batch = DataCollatorWithPadding(tok)(
        [{k: feats[i][k] for k in ("input_ids", "attention_mask", "labels")} for i in range(8)]
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):  # two steps: with B = 0 at init, A only moves from the second step on
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    return model, changed


@pytest.mark.parametrize("model_name, head", [("tiny-llama", "score"), ("tiny-bert", "classifier")])
def test_lora_step_changes_only_adapters_and_head(tmp_path, model_name, head):
    cfg = build_config(overrides=[f"model.name={model_name}", "train.method=lora"])
    model, changed = _one_step(cfg, write_sst2(tmp_path / "d"))
    assert changed, "a training step changed nothing"
    for n in changed:
        assert ".lora_" in n or ".modules_to_save." in n, f"base weight {n} changed under LoRA"
    assert any(".lora_A." in n for n in changed) and any(".lora_B." in n for n in changed)
    assert any(f"{head}.modules_to_save" in n for n in changed)


def test_full_step_changes_base_weights(tmp_path):
    cfg = build_config(overrides=["model.name=tiny-llama", "train.method=full"])
    model, changed = _one_step(cfg, write_sst2(tmp_path / "d"))
    assert any("self_attn.q_proj.weight" in n for n in changed)
    assert any("mlp.down_proj.weight" in n for n in changed)
    assert "score.weight" in changed


def _cli(*args) -> int:
    """The CLI in this process (a process per call costs seconds of imports): its exit status."""
    return main([*args])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_cli_train_writes_the_run_directory(tmp_path, sst2_dir, method):
    out = tmp_path / "runs"
    launched = time.time()
    status = _cli(
        "train", "--task", "sst2", "--model", "tiny-llama", "--method", method,
        "--data-dir", str(sst2_dir), "--output-dir", str(out), "--quiet",
        "train.max_steps=6", *TINY_ARGS,
    )  # fmt: skip
    assert status == 0
    (run,) = list(out.iterdir())
    for f in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (run / f).is_file(), f
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert summary["examples"] == {"train": 64, "eval": 32}
    acc = summary["metrics"]["accuracy"]  # a share of the 32 dev examples, as last logged
    assert 0.0 <= acc <= 1.0 and acc * 32 == pytest.approx(round(acc * 32))
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval/accuracy"] for r in logged if "eval/accuracy" in r][-1] == acc
    assert (
        summary["tokens"]["real"] > 0 and summary["tokens"]["padded"] >= summary["tokens"]["real"]
    )
    for key in ("wall_time_s", "peak_memory_mb", "versions", "params", "git_commit"):
        assert key in summary
    assert 0 < summary["train_cpu_time_s"] < summary["wall_time_s"] * os.cpu_count()
    # The machine it ran on: the CPU's name with the extensions that pick its kernels.
    hw = summary["hardware"]
    assert hw["cpu"] == probecache.machine() and hw["cpu"].endswith("]")
    assert hw["cores"] == os.cpu_count() and hw["memory_gb"] > 0 and hw["accelerator"] is None
    # The first step began after the launch, and before the final evaluation.
    first = summary["first_step_at"] - launched
    assert 0 < first < time.time() - launched - summary["eval_time_s"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in x for x in lines) and any("eval/accuracy" in x for x in lines)
    if method == "lora":
        assert (run / "adapter" / "adapter_config.json").is_file()
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
        assert summary["verification"]["base_unchanged"] is True
        assert summary["params"]["trainable_share_pct"] < 100
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        from loralab.models import resolve

        base = AutoModelForSequenceClassification.from_pretrained(
            resolve("tiny-llama"), num_labels=2
        )
        PeftModel.from_pretrained(base, run / "adapter")  # loadable with plain PEFT
    else:
        assert (run / "model" / "model.safetensors").is_file()
        assert summary["params"]["trainable_share_pct"] == 100.0
    assert not list(run.glob(".*tmp*")), "temporary files left behind"


@pytest.mark.long
@pytest.mark.precision("bf16")  # fp32: tests/test_resume.py resumes bit-identically, and more
def test_killed_run_resumes_to_the_same_result(tmp_path, sst2_dir):
    common = [
        "model.name=tiny-llama", "data.task=sst2", f"data.data_dir={sst2_dir}",
        "train.max_steps=16", "train.save_steps=4", "train.batch_size=8", "train.logging_steps=2",
        "lora.dropout=0.1",
    ]  # fmt: skip
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    killed = subprocess.run(
        [sys.executable, str(script), *common, f"run.output_dir={tmp_path / 'a'}", "run.name=r"],
        env={**os.environ, "KILL_AT": "8"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_a = tmp_path / "a" / "r"
    assert (run_a / "checkpoints" / "checkpoint-8").is_dir()
    assert (
        not (run_a / "summary.json").exists()
        or json.loads((run_a / "summary.json").read_text())["status"] != "completed"
    )

    assert _cli("train", "--resume", str(run_a), "--quiet") == 0
    assert _cli("train", "--quiet", *common, f"run.output_dir={tmp_path / 'b'}", "run.name=r") == 0
    run_b = tmp_path / "b" / "r"
    sa = json.loads((run_a / "summary.json").read_text())
    sb = json.loads((run_b / "summary.json").read_text())
    assert sa["resumed_from"].endswith("checkpoint-8")
    assert sa["steps"] == sb["steps"] == 16
    assert sa["metrics"]["accuracy"] == sb["metrics"]["accuracy"]

    from safetensors.torch import load_file

    wa = load_file(run_a / "adapter" / "adapter_model.safetensors")
    wb = load_file(run_b / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_predictions_come_back_in_dataset_order(tmp_path, sst2_dir):
    """Evaluation must not be reordered (transformers 5 length-groups eval when training does)."""
    from transformers import DataCollatorWithPadding

    from loralab.data import load_splits, model_inputs
    from loralab.trainer import LoralabTrainer
    from loralab.trainer import training_args as _training_args

    cfg = build_config(
        # Exact equality of batched and one-by-one logits holds in fp32 only (bf16 rounding
        # differs with the batch shape): the test is about order, so it pins fp32.
        overrides=[
            "model.name=tiny-llama",
            f"data.data_dir={sst2_dir}",
            "train.eval_batch_size=4",
            "train.precision=fp32",
        ]  # fmt: skip
    )
    task = get_task("sst2")
    tok = load_tokenizer("tiny-llama")
    built = build_model(cfg, task, tok, progress=False)
    splits = load_splits(task, cfg.data, tok, seed=0, causal=True)
    trainer = LoralabTrainer(
        model=built.model,
        args=_training_args(cfg, tmp_path, quiet=True),
        data_collator=DataCollatorWithPadding(tok),
        processing_class=tok,
    )
    logits = trainer.predict(model_inputs(splits.eval)).predictions
    built.model.eval()
    with torch.no_grad():
        for i in range(len(splits.eval)):
            ids = torch.tensor([splits.eval[i]["input_ids"]])
            one = built.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            torch.testing.assert_close(torch.as_tensor(logits[i]), one, rtol=1e-4, atol=1e-5)


def test_nan_loss_stops_the_run_and_keeps_checkpoints(tmp_path, sst2_dir):
    from transformers import TrainerCallback

    from loralab.errors import TrainingDiverged
    from loralab.train import train

    class PoisonAfterSave(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kw):
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if ".lora_A." in n:
                        p.fill_(float("nan"))

    cfg = build_config(
        overrides=[
            "model.name=tiny-llama",
            f"data.data_dir={sst2_dir}",
            f"run.output_dir={tmp_path}",
            "run.name=r",
            "train.max_steps=12",
            "train.save_steps=4",
            "train.batch_size=8",
        ]  # fmt: skip
    )
    with pytest.raises(TrainingDiverged, match="step 5"):
        train(cfg, quiet=True, callbacks=[PoisonAfterSave()])
    run = tmp_path / "r"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and "nan" in summary["error"].lower()
    assert (run / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_recomputes_layers_and_changes_nothing(tmp_path, sst2_dir, method):
    """With train.gradient_checkpointing each layer runs again in the backward pass (its attention
    is called twice per step), and the trained weights equal those of a run without it."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from loralab.train import train

    class AttentionCalls(TrainerCallback):
        trainer = None

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.calls = 0
            layer = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn"))
            layer.register_forward_hook(lambda *a: setattr(self, "calls", self.calls + 1))

        def on_train_end(self, args, state, control, **kw):
            self.in_training = self.calls  # the final evaluation comes after

    weights, calls = {}, {}
    for on in (False, True):
        counter = AttentionCalls()
        cfg = build_config(
            overrides=[
                "model.name=tiny-llama",
                f"data.data_dir={sst2_dir}",
                f"train.method={method}",
                f"run.output_dir={tmp_path}",
                f"run.name={method}-{on}",
                "train.max_steps=3",
                "train.batch_size=8",
                "train.precision=fp32",
                "train.eval_steps=1000",
                f"train.gradient_checkpointing={on}",
            ]  # fmt: skip
        )
        run = train(cfg, quiet=True, callbacks=[counter]).run_dir
        calls[on] = counter.in_training
        name = (
            "adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors"
        )
        weights[on] = load_file(str(run / name))
    assert calls[True] - calls[False] == 3  # one recompute per step (3 steps)
    assert weights[True].keys() == weights[False].keys()
    for k in weights[False]:
        torch.testing.assert_close(weights[True][k], weights[False][k], rtol=0, atol=0)


def test_flop_count_equals_the_stock_one_and_counts_weights_once(tmp_path, monkeypatch):
    from transformers import Trainer

    from loralab.trainer import LoralabTrainer
    from loralab.trainer import training_args as _training_args

    cfg = build_config(overrides=["model.name=tiny-llama", "train.precision=fp32"])
    tok = load_tokenizer("tiny-llama")
    model = build_model(cfg, get_task("sst2"), tok, progress=False).model
    trainer = LoralabTrainer(model=model, args=_training_args(cfg, tmp_path, quiet=True))
    counts = []
    base = type(model.get_base_model())  # PEFT hands num_parameters on to the base model
    real = base.num_parameters
    monkeypatch.setattr(
        base, "num_parameters", lambda self, **kw: counts.append(1) or real(self, **kw)
    )
    for shape in [(16, 12), (8, 40), (1, 3)]:
        inputs = {"input_ids": torch.ones(shape, dtype=torch.long)}
        ours = trainer.floating_point_ops(inputs)
        assert ours == Trainer.floating_point_ops(trainer, inputs) > 0
    assert len(counts) == 1 + 3  # ours once; the stock method at every call
    assert trainer.floating_point_ops({"labels": torch.ones(2)}) == 0  # no model input: none


def test_the_evaluation_bar_is_named_from_its_first_draw(tmp_path, sst2_dir, capfd):
    status = _cli(
        "train", "--task", "sst2", "--model", "tiny-llama", "--data-dir", str(sst2_dir),
        "--output-dir", str(tmp_path / "runs"), "train.max_steps=2", *TINY_ARGS,
    )  # fmt: skip
    assert status == 0
    draws = [d.strip() for d in re.split(r"[\r\n]", capfd.readouterr().err) if "it/s]" in d]
    assert any(d.startswith("Evaluating:") for d in draws)
    assert all(d.startswith(("Training:", "Evaluating:", "Tokenising")) for d in draws), draws


def test_a_builtins_untrained_module_trains_under_lora_and_marks_the_identity(
    tmp_path, sst2_dir, monkeypatch
):
    from dataclasses import replace

    from safetensors.torch import load_file
    from transformers import AutoModel

    from loralab import models

    def run(name):
        status = _cli(
            "train", "--task", "sst2", "--model", "tiny-bert", "--data-dir", str(sst2_dir),
            "--output-dir", str(tmp_path), "--quiet", "train.max_steps=4", "train.lr=1e-2",
            f"run.name={name}", *TINY_ARGS,
        )  # fmt: skip
        assert status == 0
        return json.loads((tmp_path / name / "summary.json").read_text())

    before = run("frozen")  # as the built-in MiniLM's pooler was before: left frozen
    bert = models.BUILTIN_MODELS["tiny-bert"]
    monkeypatch.setitem(models.BUILTIN_MODELS, "tiny-bert", replace(bert, untrained=("pooler",)))
    after = run("trained")
    assert (
        before["new_modules"] == ["classifier"] and "retrained" not in before["identity"]["model"]
    )
    assert after["new_modules"] == ["classifier", "pooler"]
    assert after["identity"]["model"]["retrained"] == ["pooler"]  # never pools with `before`
    assert after["verification"]["base_unchanged"] is True  # the original pooler stays as it was
    saved = load_file(tmp_path / "trained" / "adapter" / "adapter_model.safetensors")
    trained = [k for k in saved if "pooler" in k]
    assert trained, sorted(saved)
    base = models.load_model("tiny-bert", AutoModel, progress=False)[0]
    weight = next(saved[k] for k in trained if k.endswith("dense.weight"))
    assert not torch.equal(weight.float(), base.pooler.dense.weight.float())  # it learned


def test_a_base_weight_changed_during_training_is_reported(tmp_path, sst2_dir):
    # The frozen-base verification must be able to say no: a callback nudges one base weight.
    from transformers import TrainerCallback

    from loralab import accounting
    from loralab.train import train

    class Nudge(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                name, weight = next(iter(accounting.base_parameters(model).items()))
                self.name = name
                with torch.no_grad():
                    weight.view(-1)[0] += 1.0

    nudge = Nudge()
    cfg = build_config(overrides=[
        "model.name=tiny-llama", "data.task=sst2", f"data.data_dir={sst2_dir}", "run.name=r",
        f"run.output_dir={tmp_path}", "train.max_steps=6", "tracking.log_every=2", *TINY_ARGS,
    ])  # fmt: skip
    result = train(cfg, quiet=True, callbacks=[nudge])
    check = result.summary["verification"]
    assert check["base_unchanged"] is False and nudge.name
    assert check["base_checksum_before"] != check["base_checksum_after"]
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    live = [x["verification/base_unchanged"] for x in lines if "verification/base_unchanged" in x]
    assert live[0] is True and live[-1] is False  # the live record turns at the change


def test_gradient_accumulation_averages_the_loss_over_its_batches(tmp_path, sst2_dir):
    """Batch 8 and batch 4 × 2 accumulation report the same training loss (at a learning rate
    too small to move the weights): the loss of each micro-batch is divided by the accumulation
    steps. transformers 5 leaves it undivided for models whose forward takes **kwargs (Llama),
    expecting a loss summed over `num_items_in_batch`, which the classifier's mean is not: the
    loss (and the gradient) came out 2x and 4x as large."""
    from loralab.train import train

    losses = {}
    for batch, accum in ((8, 1), (4, 2), (2, 4)):
        cfg = build_config(
            overrides=[
                "model.name=tiny-llama",
                f"data.data_dir={sst2_dir}",
                f"run.output_dir={tmp_path}",
                f"run.name=b{batch}",
                "train.max_steps=3",
                f"train.batch_size={batch}",
                f"train.grad_accum={accum}",
                "train.lr=1e-12",
                "train.precision=fp32",
                "train.eval_steps=1000",
                "lora.dropout=0",
            ]  # fmt: skip
        )
        run = train(cfg, quiet=True).run_dir
        losses[batch] = json.loads((run / "summary.json").read_text())["train_loss"]
    assert losses[4] == pytest.approx(losses[8], rel=0.15)
    assert losses[2] == pytest.approx(losses[8], rel=0.15)


def test_a_failed_final_evaluation_keeps_the_weights_and_the_resume_finishes_it(tmp_path, sst2_dir, monkeypatch):  # fmt: skip
    """The final evaluation dies after training: the adapter is saved before it and the summary
    says failed (not a folder that looks unfinished). `--resume` from the last checkpoint trains
    no step (the stock loop trained a fifth one in an epoch it resumed mid-way) and reports the
    whole run's loss from the checkpoint (the Trainer's figure for no step was 0.0)."""
    from loralab import train as train_mod

    real = train_mod._Run.evaluate
    calls = []

    def dying(self, trainer):
        calls.append(trainer.state.global_step)
        if len(calls) == 1:
            raise MemoryError("killed in the final evaluation")
        return real(self, trainer)

    monkeypatch.setattr(train_mod._Run, "evaluate", dying)
    args = ["--quiet", "--model", "tiny-llama", "--data-dir", str(sst2_dir), "--output-dir",
            str(tmp_path), "run.name=r", "train.max_steps=4", "train.save_steps=2",
            "train.eval_steps=1000", "train.batch_size=8", "train.precision=fp32"]  # fmt: skip
    with pytest.raises(MemoryError):
        main(["train", *args])
    run = tmp_path / "r"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "final evaluation" in summary["error"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    state = json.loads((run / "checkpoints" / "checkpoint-4" / "loralab_state.json").read_text())
    assert _cli("train", "--resume", str(run), "--quiet") == 0
    done = json.loads((run / "summary.json").read_text())
    assert done["status"] == "completed" and done["steps"] == 4
    assert done["train_loss"] == pytest.approx(state["loss_sum"] / 4) and done["train_loss"] > 0
    # Dated by the attempt that trained (was None: no step this attempt), which the report's
    # deduplication and the study's estimates read.
    assert done["first_step_at"] == state["first_step_at"] > 1.7e9
    assert done["tokens_per_s"] == {"real": None, "padded": None}  # no step: no rate (was 0.0)
    # The closing records once: the attempt that trained logged them (they came again, with
    # a 0.0002 s runtime, and the last step's checks twice).
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("train/runtime", "verification/base_unchanged"):
        assert [r["step"] for r in lines if key in r].count(4) == 1, key
