"""A SQuAD v2 study end to end (the span head through the study runner and the report): the
grid on the first seed, the second seed at each method's best lr, F1 reported in points."""

from __future__ import annotations

import json

import yaml
from test_golden import SQUAD

from loralab.cli import main
from loralab.study.report import report


def test_squad_v2_study_runs_its_phases_and_reports_f1_in_points(tmp_path):
    (tmp_path / "squad.json").write_text(json.dumps(SQUAD))
    spec = {
        "name": "squad-tiny",
        "data_root": str(tmp_path),
        "base": {
            "model": {"name": "tiny-bert"},
            "train": {"max_steps": 4, "batch_size": 4, "save_steps": 100, "logging_steps": 2},
        },
        "tasks": {
            "squad_v2": {
                "train_file": "squad.json",
                "eval_file": "squad.json",
                "max_length": 48,
                "data": {"doc_stride": 16},
            }
        },
        "methods": ["lora", "full"],
        "lr": {"lora": [1e-3, 1e-2], "full": [1e-4]},
        "seeds": [1, 2],
    }
    path = tmp_path / "squad-tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    res = tmp_path / "res"
    assert main(["study", str(path), "--output-dir", str(res), "--workers", "1", "--quiet"]) == 0
    runs = sorted(p.name for p in (res / "runs").iterdir())
    grid = ["squad_v2-full-tiny-bert-lr0.0001-s1", "squad_v2-lora-tiny-bert-lr0.001-s1",
            "squad_v2-lora-tiny-bert-lr0.01-s1"]  # fmt: skip
    assert set(grid) <= set(runs) and len(runs) == 5  # + one seed-2 point per method
    summaries = {r: json.loads((res / "runs" / r / "summary.json").read_text()) for r in runs}
    assert {s["status"] for s in summaries.values()} == {"completed"}
    assert all({"exact", "f1", "HasAns_f1", "NoAns_f1"} <= set(s["metrics"]) for s in summaries.values())  # fmt: skip
    lora_s1 = {r: s["metrics"]["f1"] for r, s in summaries.items() if "-lora-" in r and r.endswith("-s1")}  # fmt: skip
    # Ties (every point at the no-answer prior): the lower dev loss, then the smaller lr.
    best = max(sorted(lora_s1), key=lambda r: (lora_s1[r], -summaries[r]["eval_loss"]))
    assert best.replace("-s1", "-s2") in runs

    rep = report(res)
    (comp,) = rep.comparisons
    assert comp.task == "squad_v2" and comp.lora.metric == "f1"
    lora_f1 = [summaries[r]["metrics"]["f1"] for r in runs if "-lora-" in r and r in (best, best.replace("-s1", "-s2"))]  # fmt: skip
    (glance,) = [t for t in rep.tables if t.title.startswith("At a glance")]
    (row,) = glance.rows
    assert row[0] == "squad_v2" and row[3] == "f1"
    mean = sum(lora_f1) / 2
    assert row[5].startswith(f"{mean:.2f}")  # SQuAD's F1 is already in points: not x 100
    assert (res / "report" / "report.md").is_file()
