"""Bad input and faults across every command: exit 2, one paragraph naming the problem, no
traceback, and the output folders left exactly as they were.

Every case runs `loralab.cli.main(argv)` in-process against its own copy of the inputs; one tiny
LoRA run, trained once per module, is shared (copied where a case damages it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import FAULT_RUN_OPTS, FAULT_RUN_OVERRIDES, Case

from loralab.cli import main


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


def _non_utf8(folder: Path, name: str = "train.tsv") -> Path:
    lines = (folder / name).read_bytes().splitlines()
    lines[3] = b"caf\xe9 " + lines[3]  # latin-1 e-acute in a UTF-8 file, on line 4
    (folder / name).write_bytes(b"\n".join(lines) + b"\n")
    return folder


def _huge_field(folder: Path) -> Path:
    """A sentence longer than the csv module's field limit (e.g. a JSON file given as train.tsv)."""
    with open(folder / "train.tsv", "a") as fh:
        fh.write("x" * 200_000 + "\t1\n")
    return folder


def _csv_task(c: Case) -> str:
    """A task of the user's own CSV files (train.csv in a folder)."""
    rows = chr(10).join(["text,label", "good,1", "bad,0", ""])
    return f"csv:{c.file('t/train.csv', rows).parent}"


def _train(c: Case, *extra, out: str | None = None) -> list[str]:
    """A train command line; dotted overrides in `extra` go after the options."""
    overrides = [e for e in extra if re.match(r"^\w+\.\w+=", e)]
    options = [e for e in extra if e not in overrides]
    return ["train", *FAULT_RUN_OPTS, "--output-dir", out or c.out("runs"), *options,
            *FAULT_RUN_OVERRIDES, *overrides]  # fmt: skip


def _squad_empty_answer(c: Case) -> list[str]:
    ctx = "Paris is the capital of France."
    doc = {"data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": [
        {"id": "a", "question": "Capital?", "is_impossible": False,
         "answers": [{"text": "", "answer_start": 0}]}]}]}]}  # fmt: skip
    path = c.file("squad/train-v2.0.json", json.dumps(doc))
    return ["train", "--model", "tiny-bert", "--task", "squad_v2", "--train-file", str(path),
            "--eval-file", str(path), "--output-dir", c.out("runs"), "--quiet"]  # fmt: skip


def _resume_no_checkpoints(c: Case) -> list[str]:
    run = c.run(status="failed")
    shutil.rmtree(run / "checkpoints")
    return ["train", "--resume", str(run)]


def _resume_all_damaged(c: Case) -> list[str]:
    run = c.run(status="failed")
    for ckpt in (run / "checkpoints").iterdir():
        _truncate(ckpt / "optimizer.pt")
    return ["train", "--resume", str(run)]


def _damaged(c: Case, rel: str) -> Path:
    run = c.run()
    _truncate(run / rel)
    return run


def _resume_damaged_config(c: Case) -> list[str]:
    run = c.run(status="failed")
    (run / "config.yaml").write_text("model:\n  name: [tiny-llama\n")  # cut off mid-write
    return ["train", "--resume", str(run)]


def _header_only_dev(c: Case) -> Path:
    data = c.data()
    (data / "dev.tsv").write_text("sentence\tlabel\n")
    return data


def _without_adapter(c: Case) -> Path:
    run = c.run(status="failed")
    shutil.rmtree(run / "adapter")
    return run


def _sweep(c: Case, *extra, out: str | None = None) -> list[str]:
    return ["sweep", "--tasks", "sst2", "--methods", "lora", "--seeds", "1", "--model",
            "tiny-llama", "--data-dir", str(c.dir), "--output-dir", out or c.out("results"),
            "--quiet", *extra]  # fmt: skip


def _spec(c: Case, extra: str = "") -> Path:
    """The repository's tiny study spec, plus `extra` YAML lines."""
    spec = Path(__file__).parents[1] / "configs" / "studies" / "tiny.yaml"
    return c.file("spec.yaml", spec.read_text() + extra)


def _results_with_truncated_summary(c: Case) -> list[str]:
    results = c.dir / "results" / "runs"
    results.mkdir(parents=True)
    run = shutil.copytree(c.shared_run, results / "r")
    _truncate(run / "summary.json")
    return ["report", str(c.dir / "results")]


def _results_with_a_summary_without_lr(c: Case) -> list[str]:
    """Valid JSON that says completed, without the learning rate rows are keyed by."""
    run = shutil.copytree(c.shared_run, c.dir / "results" / "runs" / "r")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "lr"}))
    return ["report", str(c.dir / "results")]


def _study_alone_where_report_is_a_file(c: Case) -> list[str]:
    """`report --study` without RESULTS_DIR writes ./report: a file there is refused first."""
    c.file("report")  # the case runs in c.dir
    return ["report", "--study", "s", "--storage", f"sqlite:///{c.dir / 'study.db'}"]


def _resume_config_cut_at_a_line(c: Case) -> list[str]:
    """config.yaml cut at a line boundary is still valid YAML: the defaults must not fill in."""
    run = c.run(status="failed")
    lines = (run / "config.yaml").read_text().splitlines(keepends=True)
    (run / "config.yaml").write_text("".join(lines[: len(lines) // 2]))
    return ["train", "--resume", str(run)]


def _empty_config(c: Case) -> Path:
    run = c.run()
    (run / "config.yaml").write_text("")
    return run


def _results_folder(c: Case, name: str) -> Path:
    """A sweep's results folder: runs/<point> (with its adapter), locks/ and a study.db."""
    import sqlite3

    root = c.dir / name
    shutil.copytree(c.shared_run, root / "runs" / "point")
    (root / "locks").mkdir()
    sqlite3.connect(root / "study.db").execute("create table t (x)").connection.close()
    return root


def _export_into_another_results_folder(c: Case) -> list[str]:
    """Two results folders whose runs share a name but not their settings (the same grid
    with another train.max_steps): DEST's run files would be overwritten."""
    src, dest = _results_folder(c, "a"), _results_folder(c, "b")
    summary = dest / "runs" / "point" / "summary.json"
    data = json.loads(summary.read_text())
    data["identity"]["train"]["max_steps"] = 7
    summary.write_text(json.dumps(data))
    return ["export", str(src), str(dest)]


def _export_damaged_study_db(c: Case) -> list[str]:
    src = _results_folder(c, "res")
    (src / "study.db").write_bytes((src / "study.db").read_bytes()[:100])
    return ["export", str(src), c.out("dest")]


# (id, argv builder, needle expected in the error paragraph)
CASES: list[tuple[str, Callable[[Case], list[str]], str]] = [
    # train: data, options, output locations, environment
    ("train-tsv-not-utf8", lambda c: _train(c, "--data-dir", str(_non_utf8(c.data()))), "line 4: not UTF-8"),
    ("train-dev-tsv-not-utf8", lambda c: _train(c, "--data-dir", str(_non_utf8(c.data(), "dev.tsv"))), "not UTF-8"),
    ("train-output-dir-is-file", lambda c: _train(c, "--data-dir", str(c.data()), out=str(c.file("f"))), "is a file"),
    ("train-output-dir-under-file", lambda c: _train(c, "--data-dir", str(c.data()), out=str(c.file("f") / "runs")), "is a file"),
    ("train-max-train-examples-0", lambda c: _train(c, "--max-train-examples", "0"), "--max-train-examples: must be at least 1"),
    ("train-max-eval-examples-neg", lambda c: _train(c, "--max-eval-examples", "-3"), "--max-eval-examples: must be at least 1"),
    ("train-max-train-examples-text", lambda c: _train(c, "--max-train-examples", "ten"), "expected an integer"),
    ("train-negative-lr", lambda c: _train(c, "train.lr=-1"), "train.lr"),
    ("train-batch-size-0", lambda c: _train(c, "train.batch_size=0"), "train.batch_size"),
    ("train-epochs-0", lambda c: _train(c, "train.epochs=0", "train.max_steps=-1"), "train.epochs"),
    ("train-epochs-inf", lambda c: _train(c, "train.epochs=inf", "train.max_steps=-1"), "train.epochs must be a finite number"),
    ("train-max-steps-0", lambda c: _train(c, "train.max_steps=0"), "or -1 (the default) to train for train.epochs, got 0"),
    ("train-seed-negative", lambda c: _train(c, "train.seed=-1"), "train.seed must be in [0, 2^32)"),
    ("train-max-grad-norm-negative", lambda c: _train(c, "train.max_grad_norm=-1"), "train.max_grad_norm must be zero or positive"),
    ("train-run-name-escapes", lambda c: _train(c, "run.name=../escaped"), "run.name must be a plain folder name"),
    ("train-alpha-inf", lambda c: _train(c, "lora.alpha=inf"), "lora.alpha must be positive"),
    ("train-unknown-lora-init", lambda c: _train(c, "--data-dir", str(c.data()), "lora.init_lora_weights=foo"), "lora.init_lora_weights='foo' is not an initialisation this PEFT knows: use true"),
    ("train-config-missing", lambda c: _train(c, "--config", c.out("nope.yaml")), "does not exist"),
    ("train-file-is-a-folder", lambda c: _train(c, "--train-file", str(c.data()), "--eval-file", str(c.data() / "dev.tsv")), "is a folder, not a file (use data.data_dir"),
    ("train-config-not-yaml", lambda c: _train(c, "--config", str(c.file("c.yaml", "model: [unclosed"))), "not valid YAML"),
    ("train-config-section-scalar", lambda c: _train(c, "--config", str(c.file("c.yaml", "model: tiny-bert\ntrain: 3\n"))), "section 'model' must be a mapping of model.* keys"),
    ("train-tsv-huge-field", lambda c: _train(c, "--data-dir", str(_huge_field(c.data()))), "not a GLUE TSV (field larger than field limit"),
    ("train-file-without-eval-file", lambda c: _train(c, "--train-file", str(c.data() / "train.tsv")), "eval split"),
    ("train-task-file-not-yaml", lambda c: _train(c, "--task", str(c.file("t.yaml", "format: csv\ntext: [a\n"))), "is not valid YAML: while parsing a flow sequence in"),
    ("models-fetch-empty", lambda c: ["models", "--fetch", ""], "--fetch takes a built-in model name"),
    ("train-own-task-one-label-listed", lambda c: _train(c, "--task", _csv_task(c) + "?labels=1"), "`labels` lists 1 label(s) ['1']"),
    ("train-own-task-and-data-dir", lambda c: _train(c, "--task", _csv_task(c), "--data-dir", str(c.data())), "replaces the data that task 'csv:"),
    ("train-config-not-utf8", lambda c: _train(c, "--config", str(c.file("c.yaml", b"model:\n  name: \xff\xfe"))), "not UTF-8"),
    ("train-dev-tsv-header-only", lambda c: _train(c, "--data-dir", str(_header_only_dev(c))), "no examples"),
    ("train-empty-data-dir", lambda c: _train(c, "--data-dir", str(c.file("e/readme.txt").parent)), "train.tsv"),
    ("train-restart-without-resume", lambda c: _train(c, "--restart"), "--restart goes with --resume"),
    ("train-wandb-mode-empty", lambda c: _train(c, "--data-dir", str(c.data()), "tracking.wandb=offline"), "WANDB_MODE"),
    ("train-squad-empty-answer", _squad_empty_answer, "empty text"),
    # train --resume
    ("resume-no-checkpoints", _resume_no_checkpoints, "has no checkpoint"),
    ("resume-all-checkpoints-damaged", _resume_all_damaged, "all of its checkpoints are damaged"),
    ("resume-completed-run", lambda c: ["train", "--resume", str(c.run())], "already finished"),
    ("train-output-dir-is-a-run", lambda c: _train(c, "--data-dir", str(c.data()), out=str(c.run())), "is a run folder (it holds config.yaml and the run"),
    ("report-out-is-a-run", lambda c: ["report", str(c.file("res/x").parent), "--out", str(c.run())], "is a run folder (it holds config.yaml and the run"),
    ("merge-the-adapter-folder", lambda c: ["merge", str(c.run() / "adapter")], "merge and analyze read its adapter/"),
    ("resume-a-checkpoint-folder", lambda c: ["train", "--resume", str(c.file("r/checkpoints/checkpoint-5/x").parent)] if c.file("r/config.yaml", "model: {}\n") else [], "is inside run directory '"),
    ("resume-missing-run", lambda c: ["train", "--resume", c.out("gone")], "is not a loralab run directory: it does not exist"),
    ("resume-not-a-run", lambda c: ["train", "--resume", str(c.file("x/y.txt").parent)], "not a loralab run directory"),
    ("resume-with-new-settings", lambda c: ["train", "--resume", str(c.run("failed")), "--task", "rte"], "drop"),
    ("resume-with-new-data", lambda c: ["train", "--resume", str(c.run("failed")), "--data-dir", str(c.data()), "--max-train-examples", "8"], "drop ['--data-dir', '--max-train-examples']"),
    ("resume-config-damaged", _resume_damaged_config, "config.yaml"),
    # merge
    ("merge-no-export-with-out", lambda c: ["merge", str(c.run()), "--no-export", "--out", c.out("m")], "--out names the folder of the merged export, which --no-export skips"),
    ("merge-private-without-push", lambda c: ["merge", str(c.run()), "--private"], "--private makes the --push-to-hub repository private"),
    ("analyze-compare-itself", lambda c: ["analyze", str(c.run()), "--compare", str(c.run())], "is the run being analysed"),
    ("train-private-without-push", lambda c: _train(c, "--private"), "--private makes the --push-to-hub repository private"),
    ("sweep-full-lr-without-full", lambda c: _sweep(c, "--full-lr", "1e-5"), "--full-lr given, but --methods is lora"),
    ("sweep-empty-lora-lr", lambda c: _sweep(c, "--lora-lr", ""), "no lora learning rates"),
    ("sweep-lora-settings-without-lora", lambda c: _sweep(c, "--methods", "full", "lora.r=4"), "lora.r given, but --methods is full"),
    ("sweep-dry-run-and-create-only", lambda c: _sweep(c, "--dry-run", "--create-only"), "not allowed with argument"),
    ("merge-max-eval-examples-neg", lambda c: ["merge", str(c.run()), "--max-eval-examples", "-5"], "must be at least 0"),
    ("merge-bench-batches-0", lambda c: ["merge", str(c.run()), "--bench-batches", "0"], "--bench-batches: must be at least 1"),
    ("merge-bad-tolerance", lambda c: ["merge", str(c.run()), "--tolerance", "bf16=-1"], "Bad --tolerance"),
    ("merge-tolerance-of-an-unchecked-dtype", lambda c: ["merge", str(c.run()), "--dtype", "fp32", "--tolerance", "bf16=0.1"], "--dtype fp32 checks no bf16 merge"),
    ("merge-truncated-adapter", lambda c: ["merge", str(_damaged(c, "adapter/adapter_model.safetensors"))], "adapter_model.safetensors"),
    ("merge-damaged-adapter-config", lambda c: ["merge", str(_damaged(c, "adapter/adapter_config.json"))], "adapter_config.json"),
    ("merge-truncated-summary", lambda c: ["merge", str(_damaged(c, "summary.json"))], "summary.json"),
    ("merge-out-is-file", lambda c: ["merge", str(c.run()), "--out", str(c.file("f"))], "is a file"),
    ("merge-out-under-file", lambda c: ["merge", str(c.run()), "--out", str(c.file("f") / "m")], "is a file"),
    ("merge-out-not-empty", lambda c: ["merge", str(c.run()), "--out", str(c.file("o/x").parent)], "not empty"),
    ("merge-out-is-the-merge-folder", lambda c: ["merge", str(c.run()), "--out", str(c.run() / "merge")], "would hold the run's merge folder"),
    ("merge-no-adapter", lambda c: ["merge", str(_without_adapter(c))], "no saved adapter"),
    ("merge-not-a-run", lambda c: ["merge", c.out("nothing")], "not a loralab run directory"),
    # analyze
    ("analyze-probe-1", lambda c: ["analyze", str(c.run()), "--probe", "1"], "--probe: must be at least 2"),
    ("analyze-layer-neg", lambda c: ["analyze", str(c.run()), "--layer", "-1"], "--layer: must be at least 0"),
    ("analyze-truncated-adapter", lambda c: ["analyze", str(_damaged(c, "adapter/adapter_model.safetensors"))], "safetensors"),
    ("analyze-dev-tsv-not-utf8", lambda c: ["analyze", str(c.run()), "--data-dir", str(_non_utf8(c.data(), "dev.tsv"))], "not UTF-8"),
    ("analyze-compare-not-a-run", lambda c: ["analyze", str(c.run()), "--compare", c.out("nothing")], "not a loralab run directory"),
    # validate
    ("validate-model-typo", lambda c: ["validate", "--model", "tiny-lama", "--out", c.out("v.json")], "did you mean tiny-llama?"),
    ("validate-results-without-full-runs", lambda c: ["validate", "--model", "tiny-llama", "--results", str(c.run().parent), "--out", c.out("v.json")], "no finished LoRA and full fine-tuning runs of tiny-llama"),
    ("validate-steps-1", lambda c: ["validate", "--model", "tiny-llama", "--steps", "1", "--out", c.out("v.json")], "--steps: must be at least 2"),
    ("validate-tolerance-0", lambda c: ["validate", "--model", "tiny-llama", "--tolerance", "0", "--out", c.out("v.json")], "--tolerance: must be a positive number"),
    ("validate-out-is-folder", lambda c: ["validate", "--model", "tiny-llama", "--out", str(c.file("d/x").parent)], "is a folder"),
    ("validate-out-under-file", lambda c: ["validate", "--model", "tiny-llama", "--out", str(c.file("f") / "v.json")], "is a file"),
    ("validate-bad-override", lambda c: ["validate", "--model", "tiny-llama", "lora.r=0", "--out", c.out("v.json")], "lora.r"),
    # sweep / study
    ("sweep-target-fits-no-layer", lambda c: _sweep(c, "lora.target=[foo]"), "foo"),
    ("sweep-unknown-lora-init", lambda c: _sweep(c, "lora.init_lora_weights=foo"), "one of gaussian"),
    ("study-model-typo", lambda c: ["study", str(c.file("s.yaml", "name: s\ntasks: {sst2: {}}\nbase: {model: {name: tiny-lama}}\nlr: {lora: [1.0e-3]}\nmethods: [lora]\nseeds: [1]\n")), "--output-dir", c.out("results")], "did you mean tiny-llama?"),
    ("study-target-fits-no-layer", lambda c: ["study", str(c.file("s.yaml", "name: s\ntasks: {sst2: {}}\nbase: {model: {name: tiny-llama}}\nlr: {lora: [1.0e-3]}\nmethods: [lora]\nseeds: [1]\nablations: [{lora.target: [standard, [foo]]}]\n")), "--output-dir", c.out("results")], "foo"),
    ("sweep-output-dir-is-file", lambda c: _sweep(c, out=str(c.file("f"))), "is a file"),
    ("sweep-heartbeat-0", lambda c: _sweep(c, "--heartbeat", "0"), "--heartbeat: must be at least 1"),
    ("sweep-grace-0", lambda c: _sweep(c, "--grace", "0"), "--grace: must be at least 1"),
    ("sweep-max-retries-neg", lambda c: _sweep(c, "--max-retries", "-1"), "--max-retries: must be at least 0"),
    ("sweep-bad-seeds", lambda c: _sweep(c, "--seeds", "one"), "--seeds"),
    ("sweep-bad-storage", lambda c: _sweep(c, "--storage", "nosuchdb://u:secret@h/x"), "Cannot open the study storage"),
    ("sweep-worker-without-study", lambda c: ["sweep", "worker", "--output-dir", c.out("results")], "give --study NAME"),
    ("study-unknown-ablation-axis", lambda c: ["study", str(c.file("s.yaml", "name: s\ntasks: {sst2: {}}\nlr: {lora: [1.0e-3], full: [1.0e-4]}\nseeds: [1]\nablations: [{lora.depth: [1, 2]}]\n")), "--output-dir", c.out("results")], "'ablations[0].lora.depth' is not a LoRA setting"),
    ("study-missing-data", lambda c: ["study", str(c.file("s.yaml", "name: s\ntasks: {sst2: {data_dir: nowhere}}\nlr: {lora: [1.0e-3], full: [1.0e-4]}\nseeds: [1]\n")), "--output-dir", c.out("results")], "tasks.sst2.data_dir is 'nowhere', which does not exist"),
    ("ablate-method-full", lambda c: ["ablate", "--type", "rank", "--model", "tiny-llama", "--output-dir", c.out("results"), "train.method=full"], "every point is LoRA. Compare with full fine-tuning in a sweep"),
    ("sweep-task-twice", lambda c: ["sweep", "--tasks", "sst2,sst2", "--model", "tiny-llama", "--output-dir", c.out("results"), "--dry-run"], "a task, learning rate or seed given twice"),
    ("ablate-override-not-honoured", lambda c: ["ablate", "--type", "rank", "--model", "tiny-llama", "--output-dir", c.out("results"), "lora.r=32"], "lora.r=32 cannot be honoured: the rank ablation sets lora.r and lora.alpha"),
    ("study-spec-missing", lambda c: ["study", c.out("nope.yaml"), "--output-dir", c.out("results")], "Study spec '"),
    ("study-spec-is-folder", lambda c: ["study", str(c.dir), "--output-dir", c.out("results")], "is a folder, not a file. Pass a YAML file, e.g. configs/studies/tiny.yaml"),
    ("study-max-steps-0", lambda c: ["study", str(c.file("s.yaml", "name: s\ntasks: {sst2: {max_steps: 0}}\nlr: {lora: [1.0e-3]}\nmethods: [lora]\nseeds: [1]\n")), "--output-dir", c.out("results")], "train.max_steps must be a positive number"),
    ("study-empty-seeds", lambda c: ["study", str(c.file("s.yaml", "name: s\ntasks: {sst2: {}}\nlr: {lora: [1.0e-3]}\nmethods: [lora]\nseeds: []\n")), "--output-dir", c.out("results")], "must be a non-empty list, e.g. [42, 1337]"),
    ("study-spec-unknown-key", lambda c: ["study", str(_spec(c, "depth: 3\n")), "--output-dir", c.out("results")], "depth"),
    ("study-output-dir-is-file", lambda c: ["study", str(_spec(c)), "--output-dir", str(c.file("f"))], "is a file"),
    ("study-offline-train-file-alone", lambda c: ["study", str(c.file("s.yaml", f"name: s\ntasks: {{squad_v2: {{train_file: {c.file('q/train-offline.json', '{}')}}}}}\nlr: {{lora: [1.0e-3], full: [1.0e-4]}}\nseeds: [1]\n")), "--output-dir", c.out("results")], "offline split's training half"),
    ("study-dry-run-missing-data", lambda c: ["study", str(_spec(c)), "--data-root", c.out("nowhere"), "--dry-run"], "which does not exist"),
    ("study-workers-0", lambda c: ["study", str(_spec(c)), "--output-dir", c.out("results"), "--workers", "0"], "--workers"),
    ("convert-a-folder", lambda c: ["convert", str(c.data()), c.out("model")], "is a folder; pass the path of a .gguf file"),
    ("convert-missing-gguf", lambda c: ["convert", c.out("nothing.gguf"), c.out("model")], "does not exist"),
    ("convert-not-gguf", lambda c: ["convert", str(c.file("x.gguf", "junk")), c.out("model")], "not a readable GGUF"),
    ("study-heartbeat-0", lambda c: ["study", str(_spec(c)), "--heartbeat", "0"], "--heartbeat: must be at least 1"),
    # report
    ("report-truncated-summary", _results_with_truncated_summary, "summary.json"),
    ("report-summary-without-lr", _results_with_a_summary_without_lr, "says the run completed but has no lr"),
    ("resume-config-cut-at-a-line", _resume_config_cut_at_a_line, "is incomplete (no "),
    ("merge-config-empty", lambda c: ["merge", str(_empty_config(c))], "is incomplete (no model"),
    ("merge-bench-seq-len-beyond-the-model", lambda c: ["merge", str(c.run()), "--bench-seq-len", "4096"], "max_position_embeddings 512"),
    ("validate-out-is-a-run-summary", lambda c: ["validate", "--model", "tiny-llama", "--out", str(c.run() / "summary.json")], "is not a `loralab validate` report"),
    ("export-damaged-study-db", _export_damaged_study_db, "study.db"),
    ("export-into-another-results-folder", _export_into_another_results_folder, "holds another run than"),
    ("report-out-is-file", lambda c: ["report", str(c.file("res/x").parent), "--out", str(c.file("f"))], "is a file"),
    ("report-missing-results", lambda c: ["report", c.out("nothing")], "does not exist"),
    ("report-results-is-file", lambda c: ["report", str(c.file("f"))], "RESULTS_DIR '"),
    ("report-nothing-given", lambda c: ["report"], "Give a results folder"),
    ("report-study-alone-report-is-a-file", _study_alone_where_report_is_a_file, "./report '"),
]  # fmt: skip


def _snapshot(root: Path) -> dict[str, str]:
    """Every file (content hash) and folder under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def test_the_corpus_is_large_and_spans_every_command():
    assert len(CASES) >= 40
    assert len({name for name, _, _ in CASES}) == len(CASES)
    commands = {name.split("-")[0] for name, _, _ in CASES}
    assert {
        "train",
        "resume",
        "merge",
        "analyze",
        "validate",
        "sweep",
        "study",
        "report",
    } <= commands


@pytest.mark.parametrize("name, build, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_paragraph(name, build, needle, shared, tmp_path, capsys,
                                              monkeypatch):  # fmt: skip
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    monkeypatch.chdir(case_dir)  # nothing may land in the working directory either
    if name == "train-wandb-mode-empty":
        monkeypatch.setenv("WANDB_MODE", "")
    argv = build(Case(case_dir, *shared))
    before = _snapshot(case_dir)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (code, err[-3000:])
    assert "Traceback" not in err
    assert err.count("loralab: error:") == 1, err
    message = err[err.index("loralab: error:") :].strip()  # warnings may come before it
    assert "\n\n" not in message, f"more than one paragraph: {message}"
    assert needle in message, message
    assert _snapshot(case_dir) == before, "the command changed files although it failed"


# ---------------------------------------------------------------------------------------------
# Smaller pieces: damaged summary on resume, OS errors, permissions, checkpoint checks


def test_resume_warns_about_a_damaged_summary_and_finishes(shared, tmp_path, capsys):
    run = Case(tmp_path, *shared).run()
    (run / "summary.json").write_text('{"status": "compl')  # killed mid-write by another tool
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert "ignoring a damaged summary.json" in capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from"].endswith("checkpoint-4")


def test_an_os_error_at_a_file_boundary_is_exit_2(monkeypatch, capsys):
    from loralab import cli

    def boom(args):
        raise PermissionError(13, "Permission denied", "/srv/results/report")

    monkeypatch.setitem(cli.COMMANDS, "report", boom)
    assert main(["report", "results"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loralab: error: Cannot use '/srv/results/report': Permission denied")
    # Without a file name it is a bug: the traceback stays.
    monkeypatch.setitem(cli.COMMANDS, "report", lambda a: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        main(["report", "results"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_output_dir_without_write_permission_exits_2(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["validate", "--model", "tiny-llama", "--out", str(locked / "v.json")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_output_dir_failing_the_write_probe_exits_2(tmp_path, capsys, monkeypatch):
    """As root too: the writability probe (a real mkdtemp in the folder) is refused."""
    from loralab import rundir

    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkdtemp, probed = rundir.tempfile.mkdtemp, []

    def refuse_in_locked(suffix=None, prefix=None, dir=None):
        if dir is not None and Path(dir) == locked:
            probed.append(dir)
            raise PermissionError(13, "Permission denied", str(locked))
        return real_mkdtemp(suffix, prefix, dir)

    monkeypatch.setattr(rundir.tempfile, "mkdtemp", refuse_in_locked)
    assert main(["validate", "--model", "tiny-llama", "--out", str(locked / "v.json")]) == 2
    assert probed  # the refusal came from the probe, not from something else
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("loralab: error:") == 1, err
    message = err[err.index("loralab: error:") :].strip()
    assert "\n\n" not in message, f"more than one paragraph: {message}"
    assert f"'{locked}' is not writable" in message and "Permission denied" in message
    assert list(locked.iterdir()) == []


def test_a_read_only_run_folder_says_to_analyse_a_copy(shared, tmp_path, monkeypatch, capsys):
    """analyze writes into RUN/analysis/ (no option moves it): the advice is a writable copy."""
    from loralab import rundir

    run = Case(tmp_path, *shared).run()
    real_mkdtemp = rundir.tempfile.mkdtemp

    def refuse_in_run(suffix=None, prefix=None, dir=None):
        if dir is not None and Path(dir) == run:
            raise OSError(30, "Read-only file system", str(run))
        return real_mkdtemp(suffix, prefix, dir)

    monkeypatch.setattr(rundir.tempfile, "mkdtemp", refuse_in_run)
    assert main(["analyze", str(run)]) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and "copy the run folder somewhere writable" in err


def test_checkpoint_check_finds_each_kind_of_damage(shared, tmp_path):
    from loralab.checkpoints import checkpoint_problem, newest_good_checkpoint

    run = Case(tmp_path, *shared).run()
    newest = run / "checkpoints" / "checkpoint-4"
    assert checkpoint_problem(newest) is None
    for name, needle in [("trainer_state.json", "not valid JSON"),
                         ("adapter_model.safetensors", "safetensors"),
                         ("optimizer.pt", "optimizer.pt"), ("scheduler.pt", "scheduler.pt")]:  # fmt: skip
        backup = (newest / name).read_bytes()
        _truncate(newest / name)
        assert needle in (checkpoint_problem(newest) or ""), name
        (newest / name).write_bytes(backup)
    # A flipped byte inside the optimizer archive fails its CRC.
    data = bytearray((newest / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "optimizer.pt").write_bytes(bytes(data))
    good, skipped = newest_good_checkpoint(run)
    assert good.name == "checkpoint-2" and len(skipped) == 1 and "checkpoint-4" in skipped[0]


@pytest.mark.parametrize(
    "exitcode, action",
    [(-9, "resume"), (-15, "resume"), (1, "train"), (None, "train")],
)
def test_a_resume_killed_by_a_signal_resumes_again(exitcode, action, shared, tmp_path):
    """A resumed point whose child a signal killed (e.g. the out-of-memory killer) keeps its
    checkpoints for the next attempt; one that crashed by itself (exit 1, or a note from before
    exit codes were recorded) may have a checkpoint that breaks it, and trains afresh."""
    from loralab.config import from_dict, load_yaml
    from loralab.study.reuse import decide

    run = Case(tmp_path, *shared).run(status="failed")
    cfg = from_dict(load_yaml(run / "config.yaml"))
    attempt = {"action": "resume", "outcome": "crashed"}
    if exitcode is not None:
        attempt["exitcode"] = exitcode
    (run / "sweep.json").write_text(json.dumps({"attempts": [attempt]}))
    assert decide(run, cfg) == action
    assert len(list((run / "checkpoints").glob("checkpoint-*"))) == 2  # decide deletes nothing


def test_a_killed_child_is_named_with_its_signal():
    from loralab.study.worker import _killed_by

    assert "killed by SIGKILL" in _killed_by(-9) and "out-of-memory" in _killed_by(-9)
    assert "killed by SIGTERM" in _killed_by(-15) and "out-of-memory" not in _killed_by(-15)
    assert _killed_by(1) == _killed_by(0) == _killed_by(None) == ""


def test_a_completed_points_checkpoints_go_unless_asked_to_keep(shared, tmp_path, monkeypatch):
    from loralab.study.reuse import KEEP_CHECKPOINTS_ENV, drop_checkpoints

    run = Case(tmp_path, *shared).run()
    monkeypatch.setenv(KEEP_CHECKPOINTS_ENV, "1")
    assert not drop_checkpoints(run) and (run / "checkpoints" / "checkpoint-4").is_dir()
    monkeypatch.delenv(KEEP_CHECKPOINTS_ENV)
    assert drop_checkpoints(run) and not (run / "checkpoints").exists()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()  # the weights stay
    assert not drop_checkpoints(run)  # nothing left to remove


def test_report_of_results_with_a_damaged_study_db_warns_and_reports(shared, tmp_path, capsys):
    """README: an unreadable study.db leaves the report grouped by sweep.json, with a warning
    (the pending-learning-rate lookup read the storage again and failed with exit 2)."""
    res = _results_folder(Case(tmp_path, *shared), "res")
    (res / "study.db").write_bytes((res / "study.db").read_bytes()[:100])
    assert main(["report", str(res)]) == 0
    err = capsys.readouterr().err
    assert "warning: Cannot open the study storage" in err and "error" not in err
    assert (res / "report" / "report.md").is_file()


def test_a_re_export_into_a_folder_a_study_continued_in_is_taken(shared, tmp_path):
    """The README's refresh: a study continued in DEST (locks/, adapters) and the workers'
    results exported over it again; the same runs under the same names are no conflict."""
    c = Case(tmp_path, *shared)
    src, dest = _results_folder(c, "src"), _results_folder(c, "dest")
    (dest / "logs").mkdir()
    (dest / "runs" / "point" / "adapter").mkdir(exist_ok=True)
    assert main(["export", str(src), str(dest)]) == 0
    assert (dest / "report" / "report.md").is_file() and (
        dest / "runs" / "point" / "adapter"
    ).is_dir()
