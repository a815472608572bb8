"""The study report: aggregated numbers against values computed by hand from run summaries."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest

from loralab.cli import main
from loralab.report import aggregate, load_runs, mean_std, report

# (group, task, method, lr, seed, accuracy or None for a diverged run, r, alpha, wall s, memory MB)
RUNS = [
    ("sweep", "sst2", "lora", 1e-4, 1, 0.80, 8, 16, 10, 100),
    ("sweep", "sst2", "lora", 1e-4, 2, 0.82, 8, 16, 10, 100),
    ("sweep", "sst2", "lora", 1e-4, 3, 0.84, 8, 16, 10, 100),
    ("sweep", "sst2", "lora", 3e-4, 1, 0.85, 8, 16, 10, 110),
    ("sweep", "sst2", "lora", 3e-4, 2, 0.87, 8, 16, 20, 120),
    ("sweep", "sst2", "lora", 3e-4, 3, 0.89, 8, 16, 30, 130),
    ("sweep", "sst2", "full", 1e-5, 1, 0.88, None, None, 40, 400),
    ("sweep", "sst2", "full", 1e-5, 2, 0.90, None, None, 40, 400),
    ("sweep", "sst2", "full", 1e-5, 3, 0.86, None, None, 40, 400),
    ("sweep", "sst2", "full", 3e-5, 1, 0.93, None, None, 50, 500),
    ("sweep", "sst2", "full", 3e-5, 2, 0.91, None, None, 60, 500),
    ("sweep", "sst2", "full", 3e-5, 3, 0.92, None, None, 70, 500),
    ("sweep", "mrpc", "lora", 3e-4, 1, 0.70, 8, 16, 5, 50),
    ("sweep", "mrpc", "lora", 3e-4, 2, 0.74, 8, 16, 5, 50),
    ("sweep", "mrpc", "lora", 3e-4, 3, None, 8, 16, 5, 50),  # diverged: counted apart
    ("sweep", "mrpc", "full", 3e-5, 1, 0.73, None, None, 9, 90),
    ("sweep", "mrpc", "full", 3e-5, 2, 0.73, None, None, 9, 90),
    ("ablation-rank", "sst2", "lora", 1e-4, 1, 0.60, 4, 8, 1, 1),
    ("ablation-rank", "sst2", "lora", 1e-4, 2, 0.62, 4, 8, 1, 1),
    ("ablation-rank", "sst2", "lora", 3e-4, 1, 0.70, 4, 8, 1, 1),
    ("ablation-rank", "sst2", "lora", 3e-4, 2, 0.66, 4, 8, 1, 1),
    ("ablation-rank", "sst2", "lora", 1e-4, 1, 0.75, 16, 32, 1, 1),
    ("ablation-rank", "sst2", "lora", 1e-4, 2, 0.77, 16, 32, 1, 1),
    ("ablation-rank", "sst2", "lora", 3e-4, 1, 0.50, 16, 32, 1, 1),
    ("ablation-rank", "sst2", "lora", 3e-4, 2, 0.52, 16, 32, 1, 1),
]
# Trainable shares (% with head, % without head) by (task, method, r): sst2 LoRA misses 0.3%.
SHARES = {("sst2", "lora", 8): (0.50, 0.34), ("mrpc", "lora", 8): (0.40, 0.25),
          ("sst2", "lora", 4): (0.30, 0.17), ("sst2", "lora", 16): (0.80, 0.68)}  # fmt: skip


def write_runs(root, runs=RUNS):
    for i, (group, task, method, lr, seed, acc, r, alpha, wall, mem) in enumerate(runs):
        run = root / "runs" / f"{i:02d}-{task}-{method}"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("{}\n")
        with_head, without = SHARES.get((task, method, r), (100.0, 99.9))
        metrics = {} if acc is None else {"accuracy": acc}
        if task == "mrpc" and acc is not None:
            metrics["f1"] = acc - 0.1
        summary = {
            "status": "diverged" if acc is None else "completed", "task": task, "method": method,
            "model": "tiny-llama", "head": "classifier", "seed": seed, "lr": lr,
            "lora": {"r": r, "alpha": alpha, "target": "standard"} if method == "lora" else None,
            "metrics": metrics, "wall_time_s": wall, "peak_memory_mb": mem, "steps": 10,
            "params": {"total": 1000, "trainable": 5, "trainable_share_pct": with_head,
                       "trainable_share_without_head_pct": without, "lora_share_pct": without},
        }  # fmt: skip
        (run / "summary.json").write_text(json.dumps(summary))
        (run / "sweep.json").write_text(json.dumps({"groups": [group]}))
    # Not results: an unfinished run, and a checkpoint's files.
    (root / "runs" / "killed").mkdir()
    (root / "runs" / "killed" / "config.yaml").write_text("{}\n")
    (root / "runs" / "killed" / "summary.json").write_text('{"status": "running"}')
    return root


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _row(rows, group, task, method, lr, r=""):
    (row,) = [
        x for x in rows
        if (x["group"], x["task"], x["method"], float(x["lr"]), x["r"]) == (group, task, method, lr, str(r))
    ]  # fmt: skip
    return row


def test_mean_and_sample_std():
    assert mean_std([0.85, 0.87, 0.89]) == pytest.approx((0.87, 0.02))
    assert mean_std([1.0, 2.0, 4.0])[1] == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))
    mean, std = mean_std([0.5])
    assert mean == 0.5 and math.isnan(std)  # one seed: no spread to report


def test_aggregates_match_hand_computed_values(tmp_path):
    write_runs(tmp_path)
    rep = report(tmp_path, out=tmp_path / "out")
    rows = _rows(tmp_path / "out" / "report.csv")

    # sst2, LoRA: lr 3e-4 (mean 0.87) beats 1e-4 (mean 0.82); full: 3e-5 (0.92) beats 1e-5 (0.88).
    lora = _row(rows, "sweep", "sst2", "lora", 3e-4, 8)
    assert (
        lora["best_lr"] == "True"
        and _row(rows, "sweep", "sst2", "lora", 1e-4, 8)["best_lr"] == "False"
    )
    assert float(lora["accuracy_mean"]) == pytest.approx(0.87)
    assert float(lora["accuracy_std"]) == pytest.approx(0.02)
    assert float(lora["wall_time_s"]) == pytest.approx(20.0)
    assert float(lora["peak_memory_mb"]) == pytest.approx(120.0)
    full = _row(rows, "sweep", "sst2", "full", 3e-5)
    assert full["best_lr"] == "True"
    assert float(full["accuracy_mean"]) == pytest.approx(0.92)
    assert float(full["accuracy_std"]) == pytest.approx(0.01)
    # LoRA − full = 100·(0.87 − 0.92) = −5 points: fails the 3-point target; 0.34% > 0.3%: fails.
    assert float(lora["lora_minus_full_points"]) == pytest.approx(-5.0)
    assert lora["drop_target_pass"] == "False" and lora["share_target_pass"] == "False"
    assert float(lora["trainable_share_pct"]) == 0.5
    assert float(lora["trainable_share_without_head_pct"]) == 0.34

    # mrpc: the diverged seed is counted apart; 100·(0.72 − 0.73) = −1 point: passes both.
    m = _row(rows, "sweep", "mrpc", "lora", 3e-4, 8)
    assert (m["n"], m["n_diverged"], m["seeds"]) == ("2", "1", "1 2")
    assert float(m["accuracy_mean"]) == pytest.approx(0.72)
    assert float(m["accuracy_std"]) == pytest.approx(statistics.stdev([0.70, 0.74]))
    assert float(m["f1_mean"]) == pytest.approx(0.62)
    assert float(m["lora_minus_full_points"]) == pytest.approx(-1.0)
    assert m["drop_target_pass"] == "True" and m["share_target_pass"] == "True"
    mf = _row(rows, "sweep", "mrpc", "full", 3e-5)
    assert float(mf["accuracy_std"]) == 0.0

    # Ablation: the best lr is chosen per rank (r=4: 3e-4, mean 0.68; r=16: 1e-4, mean 0.76).
    r4 = _row(rows, "ablation-rank", "sst2", "lora", 3e-4, 4)
    assert r4["best_lr"] == "True" and float(r4["accuracy_mean"]) == pytest.approx(0.68)
    r16 = _row(rows, "ablation-rank", "sst2", "lora", 1e-4, 16)
    assert r16["best_lr"] == "True" and float(r16["accuracy_mean"]) == pytest.approx(0.76)
    assert r4["lora_minus_full_points"] == ""  # ablations are not compared with full FT

    runs = _rows(tmp_path / "out" / "runs.csv")
    assert len(runs) == len(RUNS)  # the unfinished run is not a result

    md = (tmp_path / "out" / "report.md").read_text()
    assert (
        "| sst2 | tiny-llama | lora | r=8, α=16, standard | 0.0003 | 3 | accuracy: 87.00 ± 2.00 | -5.00 |"
        in md
    )
    assert "FAIL (-5.00 pts)" in md and "FAIL (0.340%)" in md
    assert "PASS (-1.00 pts)" in md and "PASS (0.250%)" in md
    assert "| mrpc | tiny-llama | lora | r=8, α=16, standard | 0.0003 | 2 (+1 diverged) |" in md
    assert "ddof = 1" in md
    assert (
        "## Ablation: rank" in md
        and "| sst2 | tiny-llama | 4 | 8 | standard | 0.0003 | 2 | accuracy: 68.00 ± 2.83 |" in md
    )
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2  # LoRA vs full, rank ablation: embedded
    assert "src='figures" not in html and "87.00 ± 2.00" in html
    for name in ("lora_vs_full.png", "ablation_rank.png"):
        assert (tmp_path / "out" / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [c.task for c in rep.comparisons] == ["mrpc", "sst2"]


def test_best_lr_and_comparison_objects(tmp_path):
    cells, comps = aggregate(load_runs(write_runs(tmp_path)))
    best = {(c.group, c.task, c.method, c.variant): c.lr for c in cells if c.best}
    assert best[("sweep", "sst2", "lora", (8, 16.0, "standard"))] == 3e-4
    assert best[("sweep", "sst2", "full", ())] == 3e-5
    (sst2,) = [c for c in comps if c.task == "sst2"]
    assert sst2.delta_points == pytest.approx(-5.0) and sst2.drop_ok is False


def test_cli_report_and_empty_folder(tmp_path, capsys):
    write_runs(tmp_path / "res")
    assert main(["report", str(tmp_path / "res")]) == 0
    assert (tmp_path / "res" / "report" / "report.html").is_file()
    assert "LoRA vs full" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "No finished runs" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert main(["report", "--study", "x"]) == 2
    assert "--study needs --storage" in capsys.readouterr().err
