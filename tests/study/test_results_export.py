"""`loralab export`: finished runs' small files, a study.db snapshot and the report; no weights."""

from __future__ import annotations

import json
import os
import sqlite3
import stat

import optuna
from test_report import write_run

from loralab.cli import main
from loralab.study.grid import make_plan
from loralab.study.storage import create_or_check, open_storage


def _results(root):
    """Two finished runs (with weights and checkpoints), one still training, one without a
    summary, and a study storage."""
    runs = root / "runs"
    for i, (method, acc) in enumerate((("lora", 0.8), ("full", 0.85))):
        run = write_run(runs, f"sst2-{method}", 1, {"accuracy": acc}, method=method,
                        lr=1e-3 if method == "lora" else 1e-4)  # fmt: skip
        (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 0.5}\n')
        (run / "sweep.json").write_text(json.dumps({"groups": ["sweep"], "attempt": i}))
        (run / "adapter").mkdir()
        (run / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * 100)
        (run / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    busy = write_run(runs, "mrpc-lora", 1, {}, status="running", task="mrpc")
    (busy / "checkpoints").mkdir()
    (runs / "no-summary").mkdir()
    st = open_storage(f"sqlite:///{root / 'study.db'}")
    plan = make_plan(tasks="sst2", lora_lr="1e-3", full_lr="1e-4", seeds="1",
                     results_dir=str(root), model={"name": "tiny-llama"})  # fmt: skip
    create_or_check(st, "s-sst2-grid", plan)
    optuna.create_study(study_name="not-loralab", storage=st)  # another tool's study
    return root


def test_export_copies_finished_runs_storage_and_report_without_weights(tmp_path, capsys):
    src = _results(tmp_path / "res")
    dest = tmp_path / "repo" / "results" / "s"
    umask = os.umask(0o022)  # a known umask: shared files come out 0644, folders 0755
    try:
        assert main(["export", str(src), str(dest)]) == 0
    finally:
        os.umask(umask)
    out = capsys.readouterr().out
    assert "exported 2 finished runs" in out and "2 unfinished left out" in out
    assert sorted(p.name for p in (dest / "runs").iterdir()) == ["sst2-full", "sst2-lora"]
    for name in ("sst2-full", "sst2-lora"):
        files = sorted(p.name for p in (dest / "runs" / name).iterdir())
        assert files == ["config.yaml", "metrics.jsonl", "summary.json", "sweep.json"]
        assert stat.S_IMODE((dest / "runs" / name).stat().st_mode) == 0o755
        for f in files:
            assert (dest / "runs" / name / f).read_bytes() == (src / "runs" / name / f).read_bytes()
            assert stat.S_IMODE((dest / "runs" / name / f).stat().st_mode) == 0o644  # not 0600
    names = [r[0] for r in sqlite3.connect(dest / "study.db").execute("select study_name from studies")]  # fmt: skip
    assert names == ["s-sst2-grid", "not-loralab"]
    md = (dest / "report" / "report.md").read_text()
    assert "run directories under " + str(dest) in md and "| sst2 |" in md

    # Again, after a run finished meanwhile: it is added, the others are rewritten unchanged.
    summary = src / "runs" / "mrpc-lora" / "summary.json"
    summary.write_text(summary.read_text().replace('"running"', '"completed"'))
    assert main(["export", str(src), str(dest)]) == 0
    assert "exported 3 finished runs" in capsys.readouterr().out
    assert not (dest / "runs" / "mrpc-lora" / "checkpoints").exists()


def test_export_mistakes_exit_2(tmp_path, capsys):
    src = _results(tmp_path / "res")
    assert main(["export", str(src), str(src / "copy")]) == 2
    assert "lies inside the results folder" in capsys.readouterr().err
    assert not (src / "copy").exists()
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "d")]) == 2
    assert "nothing' does not exist: give the results folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), str(tmp_path / "d")]) == 2
    assert "has no runs/ folder" in capsys.readouterr().err


def test_export_never_replaces_another_results_folders_studies(tmp_path, capsys):
    src = _results(tmp_path / "res")
    other = tmp_path / "other"
    other.mkdir()
    create_or_check(open_storage(f"sqlite:///{other / 'study.db'}"), "theirs",
                    make_plan(tasks="sst2", lora_lr="1e-3", full_lr="1e-4", seeds="2",
                              results_dir=str(other), model={"name": "tiny-llama"}))  # fmt: skip
    before = (other / "study.db").read_bytes()
    assert main(["export", str(src), str(other)]) == 2
    err = capsys.readouterr().err
    assert "holds studies that" in err and "(theirs)" in err and "Nothing was changed" in err
    assert (other / "study.db").read_bytes() == before and not (other / "runs").exists()
    dest = tmp_path / "dest"  # an earlier export of these results is refreshed, as before
    assert main(["export", str(src), str(dest)]) == 0
    assert main(["export", str(src), str(dest)]) == 0


def test_the_exported_report_groups_runs_as_report_does(tmp_path):
    """Runs without sweep.json (runs from before it, as the committed variants study's first
    seed had) take their groups from the study storage: export's own report read them all as
    'sweep' and lost the ablation table."""
    import shutil
    from pathlib import Path

    from loralab.study.export import export
    from loralab.study.report import report

    source = tmp_path / "source"
    shutil.copytree(Path(__file__).parents[2] / "results" / "smollm2-variants", source)
    for note in (source / "runs").glob("*/sweep.json"):
        note.unlink()
    done = export(source, tmp_path / "dest")
    again = report(tmp_path / "dest", out=tmp_path / "again")
    titles = [t.title for t in done.report.tables]
    assert titles == [t.title for t in again.tables]
    assert any(t.startswith("Ablation: variants") for t in titles), titles
