"""The study report: aggregated numbers against values computed by hand from run summaries."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shutil
import statistics
from pathlib import Path

import pytest
from optuna.trial import TrialState

from loralab.cli import main
from loralab.rundir import METRICS_FILE
from loralab.study import plots
from loralab.study.aggregate import ablation_base, aggregate, full_reference
from loralab.study.grid import make_plan
from loralab.study.grid_edges import grid_edge_warnings
from loralab.study.phases import Values, best_so_far, grid_values
from loralab.study.records import (
    deduplicate,
    load_runs,
    pending_lrs,
    points_per_unit,
    stored_groups,
)
from loralab.study.report import report
from loralab.study.stats import best_rate, mean_std, t_interval, t_quantile
from loralab.study.storage import create_or_check, open_storage
from loralab.study.variants import lora_slug

LORA = {"r": 8, "alpha": 16.0, "dropout": 0.05, "target": "standard", "bias": "none",
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "extra": {}}  # fmt: skip


def fingerprint(train="ab", eval="ef"):
    """What data.load_splits records: SHA-256 of the uncapped train and eval rows, row counts."""
    return {
        "train_sha256": train * 32,
        "eval_sha256": eval * 32,
        "train_rows": 100,
        "eval_rows": 50,
    }


FP = fingerprint()


def identity(task="sst2", method="lora", lr=3e-4, lora=None, head="classifier", fp=FP,
             caps=(None, None), epochs=1.0, precision="fp32", model="tiny-llama"):  # fmt: skip
    """What train.identity writes: the config minus seed/paths/intervals, data fingerprinted."""
    d = {
        "model": {"name": model, "head": head},
        "data": {"task": task, "max_length": 128, "fingerprint": fp,
                 "max_train_examples": caps[0], "max_eval_examples": caps[1]},
        "train": {"method": method, "lr": lr, "epochs": epochs, "max_steps": -1,
                  "batch_size": 16, "precision": precision},
    }  # fmt: skip
    if method == "lora":
        d["lora"] = {**LORA, **(lora or {})}
    return d


def write_run(root, name, seed, metrics, group=None, majority=None, curve=None, share=(0.5, 0.2),
              status="completed", **ident):  # fmt: skip
    """A run folder as `loralab train` leaves it: config.yaml, summary.json, metrics.jsonl."""
    idn = identity(**ident)
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    summary = {
        "status": status, "task": idn["data"]["task"], "method": idn["train"]["method"],
        "model": idn["model"]["name"], "head": idn["model"]["head"], "seed": seed,
        "lr": idn["train"]["lr"], "lora": idn.get("lora"), "metrics": metrics,
        "majority_baseline": majority or {}, "identity": idn, "data_fingerprint": FP,
        "wall_time_s": 10, "peak_memory_mb": 100, "steps": 10,
        "params": {"total": 1000, "trainable": 5, "trainable_share_pct": share[0],
                   "trainable_share_without_head_pct": share[1], "lora_share_pct": share[1]},
    }  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    if group:
        (run / "sweep.json").write_text(json.dumps({"groups": [group]}))
    if curve:
        lines = [{"time": 0, "step": s, f"eval/{next(iter(metrics))}": v} for s, v in curve]
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


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
        metrics = {} if acc is None else {"accuracy": acc}
        if task == "mrpc" and acc is not None:
            metrics["f1"] = acc - 0.1
        lora = {"r": r, "alpha": float(alpha)} if method == "lora" else None
        run = write_run(
            root / "runs", f"{i:02d}-{task}-{method}", seed, metrics, group=group,
            share=SHARES.get((task, method, r), (100.0, 99.9)),
            status="diverged" if acc is None else "completed",
            task=task, method=method, lr=lr, lora=lora,
        )  # fmt: skip
        summary = json.loads((run / "summary.json").read_text())
        summary.update(wall_time_s=wall, peak_memory_mb=mem)
        if i % 2 == 0:  # half the runs recorded their training CPU time (older runs did not)
            summary["train_cpu_time_s"] = wall / 4
        (run / "summary.json").write_text(json.dumps(summary))
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


def test_t_quantiles_equal_closed_forms():
    # df = 1 is Cauchy: tan(π(p − ½)); df = 2: (2p − 1)·sqrt(2 / (4p(1 − p))).
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), abs=1e-9)
    assert t_quantile(0.975, 2) == pytest.approx(
        0.95 * math.sqrt(2 / (4 * 0.975 * 0.025)), abs=1e-9
    )
    # df = 4: p = ½ + x(3 − x²)/4 · ... in closed form via u = t/sqrt(t² + 4): F = ½ + u(3 − u²)/4
    t4 = t_quantile(0.975, 4)
    u = t4 / math.sqrt(t4**2 + 4)
    assert 0.5 + u * (3 - u**2) / 4 == pytest.approx(0.975, abs=1e-12)
    # Printed tables (4 decimals) for larger df, where no closed form is handy.
    for df, table in ((5, 2.5706), (10, 2.2281), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(table, abs=5e-5)


def test_an_ablation_setting_is_paired_by_seed_with_the_axis_base(tmp_path):
    """The base's runs are the sweep's, filed under the ablation too (as a study reuses them);
    each other setting is compared with them on the seeds both ran."""
    runs = [("sweep", 8, 16, 1, 0.85), ("sweep", 8, 16, 2, 0.87), ("sweep", 8, 16, 3, 0.89),
            ("sweep", 8, 16, 4, 0.90),  # a seed the ablation did not run: not paired
            ("ablation-rank", 4, 8, 1, 0.80), ("ablation-rank", 4, 8, 2, 0.86),
            ("ablation-rank", 4, 8, 3, 0.85), ("ablation-rank", 16, 32, 1, 0.88),
            ("ablation-rank", 16, 32, 2, 0.86)]  # fmt: skip
    for i, (group, r, alpha, seed, acc) in enumerate(runs):
        run = write_run(tmp_path / "runs", f"{i:02d}", seed, {"accuracy": acc}, group=group,
                        lora={"r": r, "alpha": float(alpha)})  # fmt: skip
        if group == "sweep" and seed < 4:
            (run / "sweep.json").write_text(json.dumps({"groups": ["sweep", "ablation-rank"]}))
    for seed, acc in ((1, 0.90), (2, 0.91)):  # full fine-tuning, seeds 1 and 2
        write_run(tmp_path / "runs", f"full{seed}", seed, {"accuracy": acc}, group="sweep", method="full", lr=1e-5)  # fmt: skip
    report(tmp_path, out=tmp_path / "out")
    rows = _rows(tmp_path / "out" / "report.csv")
    md = (tmp_path / "out" / "report.md").read_text()
    # − full on the seeds both ran: r = 4 (80−90, 86−91) = (−10, −5); r = 16 (88−90, 86−91).
    half = t_quantile(0.975, 1) * statistics.stdev([-10, -5]) / math.sqrt(2)
    r4 = _row(rows, "ablation-rank", "sst2", "lora", 3e-4, 4)
    got = [float(r4[k]) for k in ("minus_full_points", "minus_full_ci95_low", "minus_full_ci95_high")]  # fmt: skip
    assert got == pytest.approx([-7.5, -7.5 - half, -7.5 + half], abs=1e-9)
    # 3 seeds: t(2) 4.303 x 3.54 / 1.73 = 8.78 > 7.5; 4 seeds: t(3) 3.182 x 3.54 / 2 = 5.63 < 7.5
    assert r4["minus_full_seeds_to_tell_apart"] == "4"
    assert f"| 90.50 ± 0.71 | -7.50 [{-7.5 - half:+.2f}, {-7.5 + half:+.2f}] (2 seeds; ~" in md
    # The base row too (85−90, 87−91): the LoRA − full of the study's own settings.
    assert float(_row(rows, "ablation-rank", "sst2", "lora", 3e-4, 8)["minus_full_points"]) == pytest.approx(-4.5)  # fmt: skip
    assert _row(rows, "sweep", "sst2", "lora", 3e-4, 8)["minus_full_points"] == ""
    # r = 4 − r = 8 per seed: (80−85, 86−87, 85−89) = (−5, −1, −4) points.
    mean, lo, hi = -10 / 3, *(-10 / 3 + s * t_quantile(0.975, 2) * statistics.stdev([-5, -1, -4]) / math.sqrt(3) for s in (-1, 1))  # fmt: skip
    r4 = _row(rows, "ablation-rank", "sst2", "lora", 3e-4, 4)
    got = [float(r4[k]) for k in ("minus_base_points", "minus_base_ci95_low", "minus_base_ci95_high")]  # fmt: skip
    assert got == pytest.approx([mean, lo, hi], abs=1e-9)
    # The interval spans 0; at this mean and spread 4 seeds would not: t(3) 3.182 x 2.082 / 2
    # = 3.31 < 3.33, while 3 give 4.303 x 2.082 / 1.732 = 5.17.
    assert f"| accuracy: 83.67 ± 3.21 | {mean:+.2f} [{lo:+.2f}, {hi:+.2f}] (3 seeds; ~4 to tell apart) |" in md  # fmt: skip
    assert r4["minus_base_seeds_to_tell_apart"] == "4"
    # r = 16 ran seeds 1 and 2 only: (88−85, 86−87) = (+3, −1).
    half = t_quantile(0.975, 1) * statistics.stdev([3, -1]) / math.sqrt(2)
    # (+3, −1): mean 1, std 2.83; 34 seeds would be the first whose interval clears 0.
    assert f"| +1.00 [{1 - half:+.2f}, {1 + half:+.2f}] (2 seeds; ~34 to tell apart) |" in md  # fmt: skip
    assert float(_row(rows, "ablation-rank", "sst2", "lora", 3e-4, 16)["minus_base_points"]) == pytest.approx(1.0)  # fmt: skip
    # The base's own row says so; in the sweep nothing is an ablation.
    assert "| r=8 α=16 | abababab/efefefef uncapped | 0.0003 | 3 | accuracy: 87.00 ± 2.00 | base |" in md  # fmt: skip
    assert _row(rows, "sweep", "sst2", "lora", 3e-4, 8)["minus_base_points"] == ""
    assert _row(rows, "ablation-rank", "sst2", "lora", 3e-4, 8)["minus_base_points"] == ""
    assert "Best lr: the ablation keeps LoRA's, tuned for the base." in md

    # The paired figure: one row per setting (r = 4 on top), its seeds' differences as dots,
    # their mean; zero and full fine-tuning − base on the base's seeds (85−90, 87−91: +4.5).
    assert "![Ablation: rank, paired with the base by seed](figures/ablation_rank_paired.png)" in md
    cells, _ = aggregate(load_runs(tmp_path / "runs"))
    abl = [c for c in cells if c.group == "ablation-rank" and c.best]
    fig = plots.ablation_paired(abl, "rank", lambda c: ablation_base(c, cells), lambda c: full_reference(c, cells))  # fmt: skip
    (ax,) = fig.axes
    dots = {ln.get_ydata()[0]: sorted(ln.get_xdata()) for ln in ax.lines if ln.get_marker() == "o"}
    assert dots == {1: pytest.approx([-5, -4, -1]), 0: pytest.approx([-1, 3])}
    means = {ln.get_ydata()[0]: ln.get_xdata()[0] for ln in ax.lines if ln.get_marker() == "D"}
    assert means == {1: pytest.approx(-10 / 3), 0: pytest.approx(1.0)}
    vertical = sorted(ln.get_xdata()[0] for ln in ax.lines if ln.get_marker() in ("None", "", None))  # fmt: skip
    assert vertical == pytest.approx([0.0, 4.5])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["r=16 α=32", "r=4 α=8"]
    assert ax.get_xlabel() == "− r=8 α=16 (points of dev accuracy), paired by seed"
    # An axis without its base in the results pairs nothing: no figure.
    assert plots.ablation_paired(abl, "rank", lambda c: None, lambda c: None) is None


def test_an_axis_with_its_own_lr_grid_scores_each_setting_at_its_best_rate(tmp_path):
    """An alpha axis run at two rates: alpha = 32 wins at the lower one, the base at the
    higher; each row is its own best, and − base pairs the two bests by seed."""
    # (groups, alpha, lr, seed, accuracy); the base at 1e-3 and its seed 1 at 3e-4 are grid runs.
    both = ("sweep", "ablation-alpha")
    runs = [(both, 16, 1e-3, 1, 0.85), (both, 16, 1e-3, 2, 0.87), (both, 16, 3e-4, 1, 0.84),
            (("ablation-alpha",), 16, 3e-4, 2, 0.84),
            (("ablation-alpha",), 32, 3e-4, 1, 0.88), (("ablation-alpha",), 32, 3e-4, 2, 0.91),
            (("ablation-alpha",), 32, 1e-3, 1, 0.80), (("ablation-alpha",), 32, 1e-3, 2, 0.82)]  # fmt: skip
    for i, (groups, alpha, lr, seed, acc) in enumerate(runs):
        run = write_run(tmp_path / "runs", f"{i:02d}", seed, {"accuracy": acc}, lr=lr,
                        lora={"alpha": float(alpha)})  # fmt: skip
        (run / "sweep.json").write_text(json.dumps({"groups": list(groups)}))
    report(tmp_path, out=tmp_path / "out")
    rows = _rows(tmp_path / "out" / "report.csv")
    md = (tmp_path / "out" / "report.md").read_text()
    best = {(r["alpha"], float(r["lr"])): r["best_lr"] for r in rows if r["group"] == "ablation-alpha"}  # fmt: skip
    assert best == {("16.0", 1e-3): "True", ("16.0", 3e-4): "False",
                    ("32.0", 3e-4): "True", ("32.0", 1e-3): "False"}  # fmt: skip
    # alpha 32 at 3e-4 minus the base at 1e-3, per seed: (88−85, 91−87) = (+3, +4) points.
    half = t_quantile(0.975, 1) * statistics.stdev([3, 4]) / math.sqrt(2)
    assert f"| 0.0003 | 2 | accuracy: 89.50 ± 2.12 | +3.50 [{3.5 - half:+.2f}, {3.5 + half:+.2f}] (2 seeds; ~3 to tell apart) |" in md  # fmt: skip
    assert "Best lr: each setting's own, from the axis's lr grid, chosen on the seeds every rate ran, which are also the seeds it is scored on" in md  # fmt: skip
    # 3e-4 is the lowest rate of alpha 32's grid and beats the other: it may be under-tuned.
    assert "sst2 lora r=8 α=32 (tiny-llama, ablation-alpha): the best learning rate, 0.0003, is the lowest" in md  # fmt: skip


def test_an_axis_whose_own_rates_miss_the_grids_still_finds_its_base(tmp_path):
    """The sweep ran the base (alpha 16) at 3e-4 only; the axis ran alpha 16 and 32 at 1e-4
    and 1e-3, none of its runs shared with the sweep: the base is still the alpha = 16 row."""
    runs = [("sweep", 16, 3e-4, 1, 0.86), ("sweep", 16, 3e-4, 2, 0.86)]
    for seed in (1, 2):
        runs += [("ablation-alpha", 16, 1e-4, seed, 0.80 + seed / 100),
                 ("ablation-alpha", 16, 1e-3, seed, 0.84 + seed / 100),
                 ("ablation-alpha", 32, 1e-4, seed, 0.85 + seed / 100),
                 ("ablation-alpha", 32, 1e-3, seed, 0.83)]  # fmt: skip
    for i, (group, alpha, lr, seed, acc) in enumerate(runs):
        write_run(tmp_path / "runs", f"{i:02d}", seed, {"accuracy": acc}, group=group, lr=lr,
                  lora={"alpha": float(alpha)})  # fmt: skip
    report(tmp_path, out=tmp_path / "out")
    rows = [r for r in _rows(tmp_path / "out" / "report.csv") if r["group"] == "ablation-alpha" and r["best_lr"] == "True"]  # fmt: skip
    by = {r["alpha"]: r for r in rows}
    assert float(by["16.0"]["lr"]) == 1e-3 and float(by["32.0"]["lr"]) == 1e-4
    # alpha 32 at 1e-4 minus alpha 16 at 1e-3, per seed: (86−85, 87−86) = (+1, +1) points.
    assert float(by["32.0"]["minus_base_points"]) == pytest.approx(1.0)
    assert by["16.0"]["minus_base_points"] == ""  # the base itself
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| accuracy: 85.50 ± 0.71 | base |" in md


def test_an_axis_over_tasks_with_their_own_base_rates_keeps_the_bases(tmp_path):
    """One module axis on SST-2 (base rate 3e-4) and MRPC (1e-3): two rates in the group, but
    one per setting, so the caption says the axis keeps the base's rate."""
    for task, lr in (("sst2", 3e-4), ("mrpc", 1e-3)):
        for seed in (1, 2):
            base = write_run(tmp_path / "runs", f"{task}-{seed}", seed, {"accuracy": 0.8}, task=task, lr=lr)  # fmt: skip
            (base / "sweep.json").write_text(json.dumps({"groups": ["sweep", "ablation-modules"]}))
            write_run(tmp_path / "runs", f"{task}-{seed}-ext", seed, {"accuracy": 0.82}, task=task, lr=lr,
                      group="ablation-modules", lora={"target": "extended"})  # fmt: skip
    report(tmp_path, out=tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    section = md[md.index("## Ablation: modules") :]
    assert "Best lr: the ablation keeps LoRA's, tuned for the base." in section
    assert "from the axis's lr grid" not in section


def test_an_axis_at_a_rate_of_its_own_says_so(tmp_path):
    """`lr: 3.0e-3` on an axis that leaves its base out (minilm-squad-3ep's q/v point): the
    setting ran at the axis's one rate, not at the grid's best (1e-3), and the caption says so."""
    write_run(tmp_path / "runs", "grid", 1, {"accuracy": 0.8}, lr=1e-3, lora={"target": "all-linear"})  # fmt: skip
    write_run(tmp_path / "runs", "qv", 1, {"accuracy": 0.7}, lr=3e-3, group="ablation-target",
              lora={"target": "standard"})  # fmt: skip
    report(tmp_path, out=tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    section = md[md.index("## Ablation: target") :]
    assert "Best lr: the one rate the axis gives (its `lr:`)" in section
    assert "keeps LoRA's" not in section
    # Two targets in one report: the q/v row names its default target beside all-linear's.
    assert "| r=8 α=16 standard |" in section and "| r=8 α=16 all-linear |" in md


def test_the_default_target_is_named_only_beside_another(tmp_path):
    from loralab.study.variants import lora_slug, several_targets

    qv, every = {"r": 8, "alpha": 16, "target": "standard"}, {"r": 8, "alpha": 16, "target": "all-linear"}  # fmt: skip
    assert several_targets([qv, None, every]) and not several_targets([qv, None, dict(qv)])
    assert lora_slug(qv) == "r=8 α=16" and lora_slug(qv, name_target=True) == "r=8 α=16 standard"
    write_run(tmp_path / "runs", "qv", 1, {"accuracy": 0.7}, lora=qv)
    report(tmp_path, out=tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| r=8 α=16 |" in md and "α=16 standard" not in md  # one target: named as before


def test_an_axis_grid_on_the_first_seed_is_scored_on_every_seed(tmp_path):
    """`grid_on_first_seed` on an axis: seed 1 ran both rates, seed 2 each value at its best
    only; the best is chosen on seed 1 and scored on both, and the caption says so."""
    both = ("sweep", "ablation-alpha")
    runs = [(both, 16, 1e-3, 1, 0.85), (both, 16, 3e-4, 1, 0.84), (both, 16, 1e-3, 2, 0.87),
            (("ablation-alpha",), 32, 3e-4, 1, 0.88), (("ablation-alpha",), 32, 1e-3, 1, 0.80),
            (("ablation-alpha",), 32, 3e-4, 2, 0.91)]  # fmt: skip
    for i, (groups, alpha, lr, seed, acc) in enumerate(runs):
        run = write_run(tmp_path / "runs", f"{i:02d}", seed, {"accuracy": acc}, lr=lr,
                        lora={"alpha": float(alpha)})  # fmt: skip
        (run / "sweep.json").write_text(json.dumps({"groups": list(groups)}))
    report(tmp_path, out=tmp_path / "out")
    rows = [r for r in _rows(tmp_path / "out" / "report.csv") if r["group"] == "ablation-alpha" and r["best_lr"] == "True"]  # fmt: skip
    got = {(r["alpha"], float(r["lr"]), r["seeds"], r["lr_chosen_on_seeds"]) for r in rows}
    assert got == {("16.0", 1e-3, "1 2", "1"), ("32.0", 3e-4, "1 2", "1")}
    (a32,) = [r for r in rows if r["alpha"] == "32.0"]
    assert float(a32["minus_base_points"]) == pytest.approx(3.5)  # (88−85, 91−87)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "chosen on the seeds every rate ran (`lr_chosen_on_seeds` in report.csv); its scores on the other seeds are free of that choice" in md  # fmt: skip
    assert "which are also the seeds it is scored on" not in md


def test_the_seeds_to_tell_two_settings_apart():
    from loralab.study.tables import _to_tell_apart

    assert _to_tell_apart([2.0, 2.1, 1.9]) == ""  # the interval already excludes 0
    assert _to_tell_apart([1.0]) == ""  # one seed: no interval, no projection
    assert _to_tell_apart([1.0, -1.0, 0.1]) == ">50"  # mean 0.03, std 1: a tie at any count
    assert _to_tell_apart([-5.0, -1.0, -4.0]) == 4


def test_t_quantiles_equal_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7, 29, 120):
        assert t_quantile(0.975, df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-9)


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
    # Training CPU time: the mean over the runs that recorded it (one of the three here).
    assert float(lora["train_cpu_time_s"]) == pytest.approx(5.0)
    assert float(_row(rows, "sweep", "sst2", "full", 3e-5)["train_cpu_time_s"]) == pytest.approx(
        15.0
    )
    assert float(lora["peak_memory_mb"]) == pytest.approx(120.0)
    full = _row(rows, "sweep", "sst2", "full", 3e-5)
    assert full["best_lr"] == "True"
    assert float(full["accuracy_mean"]) == pytest.approx(0.92)
    assert float(full["accuracy_std"]) == pytest.approx(0.01)
    # Paired by seed: (85−93, 87−91, 89−92) = (−8, −4, −3), mean −5, sd √7; t(0.975, 2) = 4.3027.
    assert float(lora["lora_minus_full_points"]) == pytest.approx(-5.0)
    half = 4.302652729749464 * math.sqrt(7) / math.sqrt(3)
    assert float(lora["ci95_low"]) == pytest.approx(-5.0 - half, abs=1e-9)
    assert float(lora["ci95_high"]) == pytest.approx(-5.0 + half, abs=1e-9)
    assert lora["drop_target_pass"] == "False" and lora["share_target_pass"] == "False"
    assert float(lora["trainable_share_pct"]) == 0.5
    assert float(lora["trainable_share_without_head_pct"]) == 0.34

    # mrpc: the diverged seed is counted apart; seeds 1, 2 paired: (70−73, 74−73) = (−3, +1).
    m = _row(rows, "sweep", "mrpc", "lora", 3e-4, 8)
    assert (m["n"], m["n_diverged"], m["seeds"]) == ("2", "1", "1 2")
    assert float(m["accuracy_mean"]) == pytest.approx(0.72)
    assert float(m["accuracy_std"]) == pytest.approx(statistics.stdev([0.70, 0.74]))
    assert float(m["f1_mean"]) == pytest.approx(0.62)
    assert float(m["lora_minus_full_points"]) == pytest.approx(-1.0)
    assert float(m["ci95_low"]) == pytest.approx(-1 - 12.706204736174696 * 2 * math.sqrt(2) / math.sqrt(2))  # fmt: skip
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
    row = "| sst2 | classifier | tiny-llama | lora | r=8 α=16 | abababab/efefefef uncapped | 1 ep (10 steps) | 0.0003 | 3 | accuracy: 87.00 ± 2.00 |"  # fmt: skip
    assert row in md
    assert "1: -8.00, 2: -4.00, 3: -3.00" in md
    assert f"FAIL: -5.00 [{-5 - half:+.2f}, {-5 + half:+.2f}]" in md and "FAIL: 0.340%" in md
    assert "PASS: -1.00 [" in md and "PASS: 0.250%" in md
    assert "| mrpc | classifier | tiny-llama | lora | r=8 α=16 | abababab/efefefef uncapped | 1 ep (10 steps) | 0.0003 | 2 (+1 diverged) |" in md  # fmt: skip
    assert "ddof = 1" in md
    assert "## Ablation: rank" in md
    # This axis left its base (r = 8) out: nothing to pair with ("—"); full FT's 3e-5 beside it.
    assert "| sst2 | classifier | tiny-llama | r=4 α=8 | abababab/efefefef uncapped | 0.0003 | 2 | accuracy: 68.00 ± 2.83 | — | 92.00 ± 1.00 |" in md  # fmt: skip
    assert r4["minus_base_points"] == ""
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # LoRA vs full, paired, rank ablation
    assert "src='figures" not in html and "87.00 ± 2.00" in html
    assert "<span class='badge fail'>FAIL</span>" in html
    assert "<span class='badge pass'>PASS</span>" in html
    for name in ("lora_vs_full.png", "paired_differences.png", "ablation_rank.png"):
        assert (tmp_path / "out" / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [c.task for c in rep.comparisons] == ["mrpc", "sst2"]


def test_a_grid_that_scored_the_same_everywhere_is_not_called_under_tuned(tmp_path):
    # Every rate at the same score (SQuAD v2 runs that all learned only to abstain): the first
    # rate wins the tie, but "a rate beyond it may score better" would send the user to widen a
    # grid that chose nothing. A best tied by a rate inside the grid is on a plateau: no warning.
    for i, lr in enumerate((1e-4, 3e-4, 1e-3)):
        write_run(tmp_path / "flat", f"r{i}", 1, {"accuracy": 0.5}, lr=lr)
    cells, _ = aggregate(load_runs(tmp_path / "flat"))
    assert [c.lr for c in cells if c.best] == [1e-4]
    (warned,) = grid_edge_warnings(cells)
    assert "every learning rate of its grid (0.0001, 0.0003, 0.001) scored the same" in warned
    assert "(accuracy 50.00 points)" in warned and "lowest" not in warned
    for i, (lr, acc) in enumerate([(1e-4, 0.8), (3e-4, 0.8), (1e-3, 0.6)]):
        write_run(tmp_path / "plateau", f"r{i}", 1, {"accuracy": acc}, lr=lr)
    cells, _ = aggregate(load_runs(tmp_path / "plateau"))
    assert [c.lr for c in cells if c.best] == [1e-4] and grid_edge_warnings(cells) == []
    # The same grid with the edge ahead by one example is warned about, as before.
    for i, (lr, acc) in enumerate([(1e-4, 0.81), (3e-4, 0.8), (1e-3, 0.6)]):
        write_run(tmp_path / "edge", f"r{i}", 1, {"accuracy": acc}, lr=lr)
    cells, _ = aggregate(load_runs(tmp_path / "edge"))
    (warned,) = grid_edge_warnings(cells)
    assert "the best learning rate, 0.0001, is the lowest of its grid" in warned


def _with_loss(run, loss):
    summary = json.loads((run / "summary.json").read_text())
    summary["eval_loss"] = loss
    (run / "summary.json").write_text(json.dumps(summary))


def test_an_ablation_table_shows_the_dev_loss_where_runs_recorded_it(tmp_path):
    """Settings tied on the metric (SQuAD v2 at the prior) still differ in dev loss: the
    ablation table shows it, as the per-task tables do; without losses it has no such column."""
    for name, r, group, seed, loss in (("b1", 8, "sweep", 1, 3.0), ("b2", 8, "sweep", 2, 2.8),
                                       ("a1", 4, "ablation-rank", 1, 2.2), ("a2", 4, "ablation-rank", 2, 2.4)):  # fmt: skip
        run = write_run(tmp_path / "runs", name, seed, {"accuracy": 0.5}, group=group,
                        lora={"r": r, "alpha": 2.0 * r})  # fmt: skip
        _with_loss(run, loss)
        if group == "sweep":
            (run / "sweep.json").write_text(json.dumps({"groups": ["sweep", "ablation-rank"]}))
    rep = report(tmp_path, out=tmp_path / "out")
    (table,) = [t for t in rep.tables if t.title.startswith("Ablation: rank")]
    col = table.headers.index("dev loss")
    assert table.headers[col - 1] == "main metric"
    by_variant = {row[3]: row[col] for row in table.rows}
    assert by_variant == {"r=8 α=16": "2.900 ± 0.141", "r=4 α=8": "2.300 ± 0.141"}
    assert "Dev loss: the final evaluation's" in table.note
    for run in (tmp_path / "runs").iterdir():  # the same runs without losses: no column
        _with_loss(run, None)
    rep = report(tmp_path, out=tmp_path / "out2")
    (table,) = [t for t in rep.tables if t.title.startswith("Ablation: rank")]
    assert "dev loss" not in table.headers and "Dev loss" not in table.note


def test_rates_tied_on_the_metric_are_told_apart_by_their_dev_loss(tmp_path):
    """Every rate at the baseline (SQuAD v2 on a small budget) but with falling dev losses: the
    loss chooses, in the report and in the study alike; one rate without a recorded loss (an
    older run) leaves the tie to the smaller rate, as before the loss was recorded."""
    losses = {1e-4: 3.8, 3e-4: 3.5, 1e-3: 3.1}
    for i, (lr, loss) in enumerate(losses.items()):
        for seed in (1, 2):
            _with_loss(write_run(tmp_path / "loss", f"r{i}s{seed}", seed, {"accuracy": 0.5}, lr=lr),
                       loss + seed / 100)  # fmt: skip
    cells, _ = aggregate(load_runs(tmp_path / "loss"))
    (best,) = [c for c in cells if c.best]
    assert best.lr == 1e-3 and best.chosen_by_loss and best.chose_lr_on == {1, 2}
    (warned,) = grid_edge_warnings(cells)
    assert (
        "scored the same (accuracy 50.00 points); the lowest final dev loss chose 0.001" in warned
    )
    assert "It is the highest of its grid" in warned
    report(tmp_path / "loss", out=tmp_path / "out")
    assert "| 0.001 | 2 | 50.00 ± 0.00 | ✓ (tie: lower dev loss) |" in (tmp_path / "out" / "report.md").read_text()  # fmt: skip
    # The study's own choice from the same points: values and losses as its trials store them.
    plan = make_plan(tasks="sst2", methods="lora", lora_lr="1e-4,3e-4,1e-3", seeds="1,2",
                     results_dir=str(tmp_path / "res"), model={"name": "tiny-llama"})  # fmt: skip
    values = Values({p["key"]: 0.5 for p in plan.points()})
    values.losses = {p["key"]: losses[p["lr"]] + p["seed"] / 100 for p in plan.points()}
    assert best_so_far(plan, values) == {"lora": 1e-3}
    # A better score still beats a lower loss: the loss only breaks ties.
    values[next(p["key"] for p in plan.points() if p["lr"] == 1e-4)] = 0.51
    assert best_so_far(plan, values) == {"lora": 1e-4}
    # A tied rate without a loss: the smaller rate, in both.
    values = Values({p["key"]: 0.5 for p in plan.points()})
    values.losses = {p["key"]: losses[p["lr"]] for p in plan.points() if p["lr"] != 1e-4}
    assert best_so_far(plan, values) == {"lora": 1e-4}
    summary = json.loads((tmp_path / "loss" / "r0s1" / "summary.json").read_text())
    del summary["eval_loss"]
    (tmp_path / "loss" / "r0s1" / "summary.json").write_text(json.dumps(summary))
    cells, _ = aggregate(load_runs(tmp_path / "loss"))
    (best,) = [c for c in cells if c.best]
    assert best.lr == 1e-4 and not best.chosen_by_loss
    (warned,) = grid_edge_warnings(cells)
    assert "so the grid chose none; its other seeds run at the smallest, 0.0001" in warned


def test_rates_within_a_point_of_the_majority_baseline_tie_and_the_dev_loss_chooses(tmp_path):
    """minilm-squad's all-linear grid: 1e-3 a little under the baseline (a model starting to
    answer, its first answers mostly wrong) with the lower dev loss, 3e-3 at it. Both show
    nothing learned, so they tie and the loss chooses 1e-3, in the report and in the study
    alike; a rate more than a point above the baseline still wins on the metric."""

    def grid(root, scores):
        for i, (lr, (acc, loss)) in enumerate(scores.items()):
            run = write_run(root, f"r{i}", 1, {"accuracy": acc}, majority={"accuracy": 0.5}, lr=lr)
            _with_loss(run, loss)
        return aggregate(load_runs(root))[0]

    cells = grid(tmp_path / "near", {1e-3: (0.499, 2.20), 3e-3: (0.5, 2.84)})
    (best,) = [c for c in cells if c.best]
    assert best.lr == 1e-3 and best.chosen_by_loss
    (warned,) = grid_edge_warnings(cells)
    assert (
        "every learning rate of its grid (0.001, 0.003) scored within 1 point of the majority "
        "baseline (accuracy 49.90 to 50.00 points against its 50.00), which shows nothing "
        "learned: they count as tied; the lowest final dev loss chose 0.001" in warned
    )
    assert "It is the lowest of its grid" in warned  # the side the loss points to
    cells = grid(tmp_path / "learned", {1e-3: (0.499, 2.20), 3e-3: (0.511, 2.84)})
    assert [c.lr for c in cells if c.best] == [3e-3]
    # The study's own choice from the same points, as its trials store them.
    plan = make_plan(tasks="sst2", methods="lora", lora_lr="1e-3,3e-3", seeds="1",
                     results_dir=str(tmp_path / "res"), model={"name": "tiny-llama"})  # fmt: skip
    keys = {p["lr"]: p["key"] for p in plan.points()}
    values = Values({keys[1e-3]: 0.499, keys[3e-3]: 0.5})
    values.losses = {keys[1e-3]: 2.20, keys[3e-3]: 2.84}
    values.baselines = {k: 0.5 for k in keys.values()}
    assert best_so_far(plan, values) == {"lora": 1e-3}
    assert best_so_far(plan, values.without_baselines()) == {"lora": 3e-3}  # the rule before
    values[keys[3e-3]] = 0.511
    assert best_so_far(plan, values) == {"lora": 3e-3}


def test_the_report_compares_where_the_other_seeds_ran_and_says_the_rule_now_differs(tmp_path):
    """A study that ran its other seeds at 1e-4 under an older rule (its seed-1 score higher by
    one example); the rule now ties the two rates near the baseline and picks 1e-3 by its dev
    loss. The tables stay at 1e-4, where the seeds are, and a warning names both rates."""
    for name, lr, seed, acc, loss in (("a1", 1e-4, 1, 0.5, 3.0), ("a2", 1e-4, 2, 0.52, 2.9),
                                      ("b1", 1e-3, 1, 0.499, 2.0)):  # fmt: skip
        run = write_run(tmp_path, name, seed, {"accuracy": acc}, majority={"accuracy": 0.5}, lr=lr)
        _with_loss(run, loss)
    cells, _ = aggregate(load_runs(tmp_path))
    (best,) = [c for c in cells if c.best]
    assert best.lr == 1e-4 and best.rule_lr == 1e-3 and not best.chosen_by_loss
    (warned,) = grid_edge_warnings(cells)
    assert "the other seeds ran at 0.0001, the rate chosen when they were run; the learning-rate rule now chooses 0.001" in warned  # fmt: skip
    # Once 1e-3 has run the other seed too, the rule's choice is where the seeds are.
    _with_loss(write_run(tmp_path, "b2", 2, {"accuracy": 0.53}, majority={"accuracy": 0.5}, lr=1e-3), 1.9)  # fmt: skip
    cells, _ = aggregate(load_runs(tmp_path))
    (best,) = [c for c in cells if c.best]
    assert best.lr == 1e-3 and best.rule_lr is None


def test_a_tie_where_a_rate_diverged_on_a_seed_goes_to_the_smaller_rate(tmp_path):
    """Both rates diverged on seed 2 (both score worst): a loss from seed 1 alone does not break
    the tie, in the report as in the study, whose diverged trials have no loss."""
    for lr, loss in ((1e-4, 3.5), (1e-3, 3.0)):
        _with_loss(write_run(tmp_path, f"{lr:g}-s1", 1, {"accuracy": 0.5}, lr=lr), loss)
        write_run(tmp_path, f"{lr:g}-s2", 2, {}, lr=lr, status="diverged")
    cells, _ = aggregate(load_runs(tmp_path))
    (best,) = [c for c in cells if c.best]
    assert best.lr == 1e-4 and not best.chosen_by_loss
    plan = make_plan(tasks="sst2", methods="lora", lora_lr="1e-4,1e-3", seeds="1,2",
                     results_dir=str(tmp_path / "res"), model={"name": "tiny-llama"})  # fmt: skip
    values = Values({p["key"]: 0.5 if p["seed"] == 1 else -math.inf for p in plan.points()})
    values.losses = {p["key"]: {1e-4: 3.5, 1e-3: 3.0}[p["lr"]] for p in plan.points() if p["seed"] == 1}  # fmt: skip
    assert best_so_far(plan, values) == {"lora": 1e-4}


def test_grid_values_read_losses_from_trials_else_from_their_run_folders(tmp_path):
    """A trial recorded before results carried `eval_loss` takes it from its run folder's
    summary, as the report does; a plain dict of values has none (the old rule)."""
    import optuna

    plan = make_plan(tasks="sst2", methods="lora", lora_lr="1e-4,1e-3", seeds="1",
                     results_dir=str(tmp_path / "res"), model={"name": "tiny-llama"})  # fmt: skip
    st = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = create_or_check(st, "s", plan)
    new, old = sorted(plan.points(), key=lambda p: p["lr"])
    run = tmp_path / "res" / "runs" / old["key"]
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"status": "completed", "eval_loss": 2.5}))
    results = {new["key"]: {"eval_loss": 3.0, "run_dir": "nowhere"},
               old["key"]: {"run_dir": str(run)}}  # fmt: skip
    for t in study.get_trials():
        key = t.user_attrs["point"]
        st.set_trial_user_attr(t._trial_id, "result", results[key])
        st.set_trial_state_values(t._trial_id, TrialState.RUNNING)
        st.set_trial_state_values(t._trial_id, TrialState.COMPLETE, [0.5])
    values = grid_values(optuna.load_study(study_name="s", storage=st), plan)
    assert values == {new["key"]: 0.5, old["key"]: 0.5}
    assert values.losses == {new["key"]: 3.0, old["key"]: 2.5}
    assert best_so_far(plan, values) == {"lora": 1e-3}  # the folder's loss is the lower
    assert best_so_far(plan, dict(values)) == {"lora": 1e-4}


def test_legend_columns_split_as_matplotlib_does():
    """Matplotlib gives a short column's spare label to the first columns (4 labels in 3
    columns: 2, 1, 1); the widths are estimated on that split."""
    labels = ["x" * 40, "y", "z", "w"]  # 3 columns: 3.1 + 0.565 + 0.565 in
    assert plots.legend_columns(labels, 4.3) == 3
    assert plots.legend_columns(labels, 4.2) == 2  # 2 columns: 3.1 + 0.565 in
    assert plots.legend_columns(labels, 3.0) == 1


def test_best_rate_rule():
    assert best_rate([(0.5, 1e-4, 3.0), (0.5, 3e-4, 2.0), (0.4, 1e-3, 1.0)]) == (3e-4, True)
    assert best_rate([(0.5, 3e-4, 2.0), (0.5, 1e-4, 2.0)]) == (1e-4, False)  # equal: the rate
    assert best_rate([(0.5, 3e-4, 2.0), (0.5, 1e-4, None)]) == (1e-4, False)
    assert best_rate([(0.6, 3e-4, 9.0), (0.5, 1e-4, 1.0)]) == (3e-4, False)
    assert best_rate([(-math.inf, 1e-3, None), (-math.inf, 1e-4, None)]) == (1e-4, False)


def test_best_lr_and_comparison_objects(tmp_path):
    cells, comps = aggregate(load_runs(write_runs(tmp_path)))
    best = {(c.group, c.task, c.method, c.variant): c.lr for c in cells if c.best}
    assert best[("sweep", "sst2", "lora", "r=8 α=16")] == 3e-4
    assert best[("sweep", "sst2", "full", "—")] == 3e-5
    (sst2,) = [c for c in comps if c.task == "sst2"]
    assert sst2.delta_points == pytest.approx(-5.0) and sst2.drop_ok is False


def test_a_best_lr_at_the_edge_of_its_grid_is_warned_about(tmp_path):
    cells, _ = aggregate(load_runs(write_runs(tmp_path / "edges")))
    warned = grid_edge_warnings(cells)
    # sweep sst2: LoRA 3e-4 and full 3e-5 are the highest of their grids; rank 4 wins at its
    # highest lr, rank 16 at its lowest; mrpc has one lr per method (no grid): no warning.
    assert len(warned) == 4
    assert sum(w.startswith("sst2 lora (tiny-llama, sweep)") for w in warned) == 1
    # An ablation's warning names its setting: each setting of an axis has its own grid.
    assert sum(w.startswith("sst2 lora r=4 α=8 (tiny-llama, ablation-rank)") for w in warned) == 1
    assert sum(w.startswith("sst2 lora r=16 α=32 (tiny-llama, ablation-rank)") for w in warned) == 1
    assert sum("is the highest of its grid (1e-05, 3e-05)" in w for w in warned) == 1
    assert sum("0.0003, is the highest of its grid (0.0001, 0.0003)" in w for w in warned) == 2
    assert sum("0.0001, is the lowest of its grid (0.0001, 0.0003)" in w for w in warned) == 1
    assert not any("mrpc" in w for w in warned)
    # Drawn from the best cells (as the report does), each point names the rate it won at.
    abl = [c for c in cells if c.group == "ablation-rank" and c.best]
    (ax,) = plots.ablation(abl, "rank", lambda c: None).axes
    assert sorted(t.get_text() for t in ax.texts) == ["lr 0.0001", "lr 0.0003"]
    # A grid whose best is inside it: no warning.
    for i, (lr, acc) in enumerate([(1e-4, 0.70), (3e-4, 0.80), (1e-3, 0.75)]):
        write_run(tmp_path / "inner", f"r{i}", 1, {"accuracy": acc}, lr=lr)
    cells, _ = aggregate(load_runs(tmp_path / "inner"))
    assert [c.lr for c in cells if c.best] == [3e-4] and grid_edge_warnings(cells) == []
    rep = report(tmp_path / "edges")
    assert len([w for w in rep.warnings if "of its grid" in w]) == 4  # and mrpc's lost seed
    md = (tmp_path / "edges" / "report" / "report.md").read_text()
    assert md.count("is the highest of its grid") == 3

    # A stored study that still has sst2 LoRA at 1e-3 to run: those grids are not complete, so
    # their edges are not warned about yet (full fine-tuning's still is).
    edges = tmp_path / "edges"
    plan = make_plan(tasks="sst2", methods="lora", lora_lr="1e-4,3e-4,1e-3", seeds="1",
                     results_dir=str(edges), model={"name": "tiny-llama"})  # fmt: skip
    st = open_storage(f"sqlite:///{edges / 'study.db'}")
    study = create_or_check(st, "s", plan)
    assert pending_lrs(f"sqlite:///{edges / 'study.db'}") == {("sst2", "lora"): {1e-4, 3e-4, 1e-3}}
    rep = report(edges)
    grid = lambda rep: [w for w in rep.warnings if "of its grid" in w]  # noqa: E731
    assert len(grid(rep)) == 1 and grid(rep)[0].startswith("sst2 full")
    for t in study.get_trials():  # the grid finishes (1e-3 run elsewhere): the warnings return
        st.set_trial_state_values(t._trial_id, TrialState.RUNNING)
        st.set_trial_state_values(t._trial_id, TrialState.COMPLETE, [0.5])
    assert len(grid(report(edges))) == 4


# Each changes one part of the identity; none may pool with the base run.
DIFFERENT = {
    "data": {"fp": fingerprint(eval="cd")},
    "caps": {"caps": (2000, None)},
    "head": {"head": "lm"},
    "lora variant": {"lora": {"use_dora": True}},
    "precision": {"precision": "bf16"},
    "epochs": {"epochs": 3.0},
}


def test_runs_differing_in_identity_never_pool(tmp_path):
    write_run(tmp_path, "base-s1", 1, {"accuracy": 0.80})
    write_run(tmp_path, "base-s2", 2, {"accuracy": 0.90})  # same identity, other seed: pools
    for i, change in enumerate(DIFFERENT.values()):
        write_run(tmp_path, f"other-{i}", 1, {"accuracy": 0.50 + i / 100}, **change)
    cells, _ = aggregate(load_runs(tmp_path))
    assert len(cells) == 1 + len(DIFFERENT) and all(c.best for c in cells)
    by_n = sorted(len(c.done) for c in cells)
    assert by_n == [1] * len(DIFFERENT) + [2]
    (base,) = [c for c in cells if len(c.done) == 2]
    assert base.stat("accuracy")[0] == pytest.approx(0.85)
    slugs = {c.variant for c in cells}
    assert "r=8 α=16 dora" in slugs and "r=8 α=16" in slugs
    assert {c.data for c in cells} >= {"abababab/efefefef uncapped", "abababab/cdcdcdcd uncapped", "abababab/efefefef train≤2000"}  # fmt: skip
    assert {c.head for c in cells} == {"classifier", "lm"}


def test_a_dev_cap_spread_over_the_split_never_pools_with_one_that_took_the_first_rows(tmp_path):
    """Runs capped at 20 of the 50 dev rows before `data.spread` evaluated on the first 20; the
    report keeps them apart from spread ones and says which took the first rows."""
    write_run(tmp_path, "first", 1, {"accuracy": 0.60}, caps=(None, 20))
    spread = write_run(tmp_path, "spread", 1, {"accuracy": 0.70}, caps=(None, 20))
    summary = json.loads((spread / "summary.json").read_text())
    summary["identity"]["data"]["eval_subset"] = "spread"
    (spread / "summary.json").write_text(json.dumps(summary))
    write_run(tmp_path, "whole", 1, {"accuracy": 0.80}, caps=(None, 50))  # the cap takes every row
    cells, _ = aggregate(load_runs(tmp_path))
    assert sorted(c.data for c in cells) == [
        "abababab/efefefef eval≤20", "abababab/efefefef eval≤20 (first)", "abababab/efefefef eval≤50"
    ]  # fmt: skip


def test_duplicate_identity_and_seed_counts_once_and_warns(tmp_path, capsys):
    old = write_run(tmp_path, "first", 1, {"accuracy": 0.60})
    new = write_run(tmp_path, "again", 1, {"accuracy": 0.70})
    os.utime(old / "summary.json", (1_000_000, 1_000_000))
    os.utime(new / "summary.json", (2_000_000, 2_000_000))
    records, warnings = deduplicate(load_runs(tmp_path))
    assert [r["run_dir"] for r in records] == [str(new)]
    (w,) = warnings
    assert str(old) in w and str(new) in w and "seed 1" in w
    cells, _ = aggregate(records)
    (cell,) = cells
    assert cell.values("accuracy") == [0.70]  # the newer run, once: no "2 seeds, ± 0.00"
    assert main(["report", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and str(old) in err


def test_paired_differences_and_t_interval_equal_independent_values(tmp_path):
    lora = {1: 0.811, 2: 0.834, 3: 0.797, 4: 0.9}  # seed 4 has no full run: not paired
    full = {1: 0.825, 2: 0.829, 3: 0.822, 5: 0.95}
    for s, v in lora.items():
        write_run(tmp_path, f"l{s}", s, {"accuracy": v})
    for s, v in full.items():
        write_run(tmp_path, f"f{s}", s, {"accuracy": v}, method="full", lr=3e-5)
    _, (comp,) = aggregate(load_runs(tmp_path))
    diffs = [100 * (lora[s] - full[s]) for s in (1, 2, 3)]
    assert comp.diffs == pytest.approx(diffs, abs=1e-9)
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert sd == pytest.approx(statistics.stdev(diffs), abs=1e-12)
    half = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025)) * sd / math.sqrt(3)  # t(0.975, 2), closed form
    got = comp.interval
    assert got[0] == pytest.approx(mean, abs=1e-9)
    assert got[1] == pytest.approx(mean - half, abs=1e-9)
    assert got[2] == pytest.approx(mean + half, abs=1e-9)
    assert t_interval(diffs) == pytest.approx(got, abs=1e-12)
    assert comp.lora.stat("accuracy") == pytest.approx(
        (statistics.mean(lora.values()), statistics.stdev(lora.values())), abs=1e-9
    )
    # The interval reaches below -3: more seeds could flip the PASS. At this mean (-1.13) and
    # spread (1.52), five seeds give a half-width of t(4)·sd/√5 = 1.89 > 1.87 = |mean + 3|,
    # six give t(5)·sd/√6 = 1.59: six would settle it.
    assert t_quantile(0.975, 4) * sd / math.sqrt(5) > mean + 3 > t_quantile(0.975, 5) * sd / math.sqrt(6)  # fmt: skip
    assert comp.seeds_to_settle == 6
    assert comp.verdict == (
        f"PASS: {mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]; unsettled (the interval "
        "spans -3; ~6 seeds in all at this mean and spread would settle it)"
    )


def test_seeds_to_settle_projects_the_same_mean_and_spread():
    from loralab.study.stats import seeds_to_settle

    assert seeds_to_settle([-1.0, -1.2, -0.8], -3.0) == 3  # settled already: as many as given
    assert seeds_to_settle([-2.0, -2.0], -3.0) is None  # no spread to project from
    assert seeds_to_settle([-2.0, -4.0], -3.0) is None  # the mean sits on the target
    # mean -2.77, sd 0.81: |mean + 3| = 0.23 needs t·0.81/√n < 0.23, i.e. n ≈ 50
    far = [-2.9, -3.5, -1.9]
    assert seeds_to_settle(far, -3.0, most=10) is None
    n = seeds_to_settle(far, -3.0)
    mean, sd = statistics.mean(far), statistics.stdev(far)
    assert n is not None and 40 <= n <= 50
    assert t_quantile(0.975, n - 1) * sd / math.sqrt(n) < abs(mean + 3) <= t_quantile(0.975, n - 2) * sd / math.sqrt(n - 1)  # fmt: skip
    # Past `most` values already: the projection looks no further than the values in hand.
    tie = [-3.5, -2.4, -2.9, -3.3] * 15  # 60 values, mean -3.025: as good as a tie
    assert seeds_to_settle(tie, -3.0) is None and seeds_to_settle(tie[:8], -3.0, most=8) is None


def test_uninformative_rule(tmp_path):
    majority = {"accuracy": 0.5}
    cases = {  # training data -> (LoRA, full) accuracy
        "aa": (0.505, 0.509),  # both within 1 point of 50: uninformative
        "bb": (0.505, 0.60),  # full learned something: an honest FAIL
        "cc": (0.515, 0.508),  # LoRA 1.5 points above the baseline: informative, PASS
        "dd": (0.40, 0.45),  # both under the baseline: nothing learned (was a PASS at +...)
        "ee": (0.40, 0.52),  # full 2 points above: an honest FAIL
    }
    for i, (data, (lo, fu)) in enumerate(cases.items()):
        fp = fingerprint(train=data)
        write_run(tmp_path, f"l{i}", 1, {"accuracy": lo}, fp=fp, majority=majority)
        write_run(tmp_path, f"f{i}", 1, {"accuracy": fu}, fp=fp, majority=majority, method="full")
    _, comps = aggregate(load_runs(tmp_path))
    verdicts = {c.lora.identity["data"]["fingerprint"]["train_sha256"][:2]: c for c in comps}
    assert verdicts["aa"].uninformative and verdicts["aa"].unsettled is None  # no PASS/FAIL
    assert verdicts["aa"].verdict.startswith("uninformative")
    assert verdicts["bb"].unsettled is None  # one seed: no interval to settle anything
    assert not verdicts["bb"].uninformative
    assert verdicts["bb"].verdict == "FAIL: -9.50 (1 seed, no interval)"
    assert not verdicts["cc"].uninformative
    assert verdicts["cc"].verdict.startswith("PASS: +0.70")
    assert verdicts["dd"].uninformative
    assert verdicts["dd"].verdict.startswith("uninformative (neither > 1 pt above majority): -5.00")
    assert not verdicts["ee"].uninformative and verdicts["ee"].verdict.startswith("FAIL: -12.00")
    # report.csv: an uninformative row is neither a pass nor a fail of the drop target.
    report(tmp_path, out=tmp_path / "out")
    rows = [r for r in _rows(tmp_path / "out" / "report.csv") if r["method"] == "lora"]
    got = sorted((r["uninformative"], r["drop_target_pass"]) for r in rows)
    assert got == [("False", "False"), ("False", "False"), ("False", "True"), ("True", ""), ("True", "")]  # fmt: skip


@pytest.mark.parametrize(
    "lora, verdict",
    [
        ((0.795, 0.805, 0.80), "PASS: -1.00 [-2.24, +0.24]"),  # wholly above -3: settled
        (
            (0.78, 0.82, 0.80),
            "PASS: -1.00 [-5.97, +3.97]; unsettled (the interval spans -3; ~7 seeds in all at this mean and spread would settle it)",
        ),  # sd 2: t(6)·2/√7 = 1.85 < 2 ≤ t(5)·2/√6 = 2.10
        (
            (0.74, 0.78, 0.76),
            "FAIL: -5.00 [-9.97, -0.03]; unsettled (the interval spans -3; ~7 seeds in all at this mean and spread would settle it)",
        ),
        ((0.745, 0.755, 0.75), "FAIL: -6.00 [-7.24, -4.76]"),  # wholly below -3: settled
        (
            (0.70, 0.84, 0.77),
            "FAIL: -4.00 [-21.39, +13.39]; unsettled (the interval spans -3; over 50 seeds at this mean and spread would settle it)",
        ),  # sd 7, 1 point from -3: ~200
    ],
)
def test_a_verdict_whose_interval_spans_the_target_is_unsettled(tmp_path, lora, verdict):
    """Full scores 0.81 on seeds 1-3; LoRA's three seeds give the paired interval."""
    majority = {"accuracy": 0.5}
    for seed, acc in enumerate(lora, start=1):
        write_run(tmp_path, f"l{seed}", seed, {"accuracy": acc}, majority=majority)
        write_run(tmp_path, f"f{seed}", seed, {"accuracy": 0.81}, majority=majority, method="full")
    (comp,) = aggregate(load_runs(tmp_path))[1]
    assert comp.verdict == verdict
    report(tmp_path, out=tmp_path / "rep")
    (row,) = [r for r in _rows(tmp_path / "rep" / "report.csv") if r["method"] == "lora"]
    assert row["unsettled"] == str("unsettled" in verdict)  # a column for scripts
    settle = {"~7 seeds": "7", "over 50": ">50"}
    assert row["seeds_to_settle"] == next((n for k, n in settle.items() if k in verdict), "")
    assert verdict in (tmp_path / "rep" / "report.md").read_text()


def test_lora_that_retrains_an_untrained_module_still_pairs_with_full(tmp_path):
    # The built-in MiniLM's LoRA runs train its never-trained pooler (identity.model.retrained);
    # full fine-tuning trains it anyway, so the two still compare (they read "n/a" for a while).
    lora = write_run(tmp_path, "l", 1, {"accuracy": 0.80}, majority={"accuracy": 0.5})
    write_run(tmp_path, "f", 1, {"accuracy": 0.81}, majority={"accuracy": 0.5}, method="full")
    summary = json.loads((lora / "summary.json").read_text())
    summary["identity"]["model"]["retrained"] = ["pooler"]
    (lora / "summary.json").write_text(json.dumps(summary))
    (comp,) = aggregate(load_runs(tmp_path))[1]
    assert comp.full is not None and comp.verdict.startswith("PASS: -1.00")


def test_uninformative_takes_the_baseline_from_full_when_lora_lacks_it(tmp_path):
    # A LoRA run written before summaries had majority_baseline still compares to full's.
    write_run(tmp_path, "l", 1, {"accuracy": 0.505})
    write_run(tmp_path, "f", 1, {"accuracy": 0.509}, majority={"accuracy": 0.5}, method="full")
    (comp,) = aggregate(load_runs(tmp_path))[1]
    assert comp.uninformative and comp.verdict.startswith("uninformative")


def test_old_summaries_get_an_identity_from_their_config(tmp_path):
    for i, cap in enumerate((100, 100, 200)):
        run = write_run(tmp_path, f"old{i}", i, {"accuracy": 0.7})
        summary = json.loads((run / "summary.json").read_text())
        del summary["identity"], summary["data_fingerprint"]
        (run / "summary.json").write_text(json.dumps(summary))
        cfg = {"data": {"task": "sst2", "max_train_examples": cap, "train_file": f"/d/{cap}.tsv"}}
        (run / "config.yaml").write_text(json.dumps(cfg))
    cells, _ = aggregate(load_runs(tmp_path))
    assert sorted(len(c.done) for c in cells) == [1, 2]  # cap 100 (two seeds) and cap 200
    assert all(c.data.startswith("unknown") for c in cells)
    assert {c.identity["data"]["paths"]["train_file"] for c in cells} == {
        "/d/100.tsv",
        "/d/200.tsv",
    }
    assert all(c.identity["train"]["lr"] == 3e-4 for c in cells)
    assert all(c.identity["train"]["precision"] == "unknown" for c in cells)  # not measured here


def test_old_configs_this_version_cannot_read_still_keep_different_runs_apart(tmp_path):
    """A key since removed is dropped and the rest read (epochs, caps, files tell runs apart);
    a value this version rejects leaves a hash of the config, its seed aside, in the identity."""
    configs = [
        {"train": {"epochs": 1, "gone": 1, "seed": 1}, "data": {"train_file": "a.csv"}},
        {"train": {"epochs": 1, "gone": 2, "seed": 2}, "data": {"train_file": "a.csv"}},
        {"train": {"epochs": 5, "gone": 1, "seed": 3}, "data": {"train_file": "b.csv"}},
        {"train": {"epochs": "many", "seed": 4}}, {"train": {"epochs": "many", "seed": 5}},
        {"train": {"epochs": "lots", "seed": 6}},
    ]  # fmt: skip
    for i, cfg in enumerate(configs):
        run = write_run(tmp_path, f"old{i}", cfg["train"]["seed"], {"accuracy": 0.7})
        summary = json.loads((run / "summary.json").read_text())
        del summary["identity"], summary["data_fingerprint"]
        (run / "summary.json").write_text(json.dumps(summary))
        (run / "config.yaml").write_text(json.dumps(cfg))
    cells, _ = aggregate(load_runs(tmp_path))
    seeds = sorted(sorted(r["seed"] for r in c.done) for c in cells)
    assert seeds == [[1, 2], [3], [4, 5], [6]]  # the removed key's value does not split 1 and 2
    read = {c.identity["train"]["epochs"] for c in cells if "unread_config" not in c.identity}
    assert read == {1, 5}


def test_a_setting_whose_every_run_diverged_is_warned_about(tmp_path):
    """Full fine-tuning diverged at both its rates: no row, and LoRA's verdict has nothing to
    compare with; the report says why instead of leaving the row out silently."""
    write_run(tmp_path, "l1", 1, {"accuracy": 0.8}, group="sweep")
    for i, lr in enumerate((1e-4, 1e-3)):
        write_run(tmp_path, f"f{i}", 1, {}, group="sweep", method="full", lr=lr, status="diverged")
    rep = report(tmp_path, out=tmp_path / "out")
    (comp,) = rep.comparisons
    assert comp.verdict == "n/a: no comparable full run"
    (warning,) = [w for w in rep.warnings if "diverged" in w]
    assert warning.startswith("sst2 full (tiny-llama, sweep): every one of its 2 runs diverged (lr 0.0001, 0.001)")  # fmt: skip
    assert warning in (tmp_path / "out" / "report.md").read_text()


def test_a_completed_run_without_the_main_metric_is_not_counted_as_a_seed(tmp_path):
    """Seed 3 completed but its summary lacks accuracy (an eval that reported other keys): the
    mean stands on seeds 1 and 2, and every place that counts seeds says so."""
    write_run(tmp_path, "a", 1, {"accuracy": 0.80}, group="sweep")
    write_run(tmp_path, "b", 2, {"accuracy": 0.90}, group="sweep")
    write_run(tmp_path, "c", 3, {"loss": 0.5}, group="sweep")
    report(tmp_path, out=tmp_path / "out")
    with open(tmp_path / "out" / "report.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (row["n"], row["seeds"]) == ("2", "1 2")
    assert float(row["accuracy_mean"]) == pytest.approx(0.85)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| 2 (+1 without accuracy) |" in md
    (cell,), _ = aggregate(load_runs(tmp_path))
    assert [r["seed"] for r in cell.scored] == [1, 2] and len(cell.done) == 3


def test_lora_slug_shows_what_differs_from_the_defaults():
    assert lora_slug(LORA) == "r=8 α=16"
    changed = {**LORA, "r": 16, "alpha": 32, "target": "extended", "use_dora": True}
    assert lora_slug(changed) == "r=16 α=32 extended dora"
    assert lora_slug({**LORA, "target": ["q_proj", "o_proj"], "init_lora_weights": "gaussian",
                      "use_rslora": True}) == "r=8 α=16 q_proj+o_proj rslora init=gaussian"  # fmt: skip


def _three_identities(root):
    """sst2 LoRA and full (learning curves), mrpc LoRA; plus a rank ablation on sst2."""
    for s, (lv, fv) in enumerate(((0.80, 0.82), (0.84, 0.83)), start=1):
        write_run(root, f"sst2-lora-{s}", s, {"accuracy": lv}, curve=[(5, lv - 0.1), (10, lv)],
                  majority={"accuracy": 0.51})  # fmt: skip
        write_run(root, f"sst2-full-{s}", s, {"accuracy": fv}, curve=[(5, fv - 0.2), (10, fv)],
                  majority={"accuracy": 0.51}, method="full", lr=3e-5)  # fmt: skip
    write_run(root, "mrpc-lora-1", 1, {"accuracy": 0.70, "f1": 0.8}, task="mrpc")
    for r in (4, 16):
        write_run(root, f"abl-r{r}", 1, {"accuracy": 0.7 + r / 100}, group="ablation-rank",
                  lora={"r": r, "alpha": 2.0 * r})  # fmt: skip


def test_cli_three_identities_three_rows_figures_with_reference_line(tmp_path, capsys):
    _three_identities(tmp_path)
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "task" in out and "majority baseline" in out  # the header row
    body = [ln for ln in out.splitlines() if ln.startswith("│ sst2") or ln.startswith("│ mrpc")]
    assert len(body) == 3, out
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "Learning curves: dev metric vs training step" in html and "Ablation: rank" in html
    # Its own earlier report is refreshed; a folder with someone else's report.md is refused.
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("# My notes\n")
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--out", str(mine)]) == 2
    assert "not written by a loralab report" in capsys.readouterr().err
    assert (mine / "report.md").read_text() == "# My notes\n" and not (
        mine / "report.html"
    ).exists()
    assert html.count("data:image/png;base64,") == 4  # + the paired differences
    assert (tmp_path / "rep" / "figures" / "learning_curves.png").is_file()

    # The figures themselves: curves per seed and method; the ablation's full-FT reference line.
    cells, comps = aggregate(load_runs(tmp_path))
    fig = plots.learning_curves(comps)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "training step" and ax.get_ylabel() == "dev accuracy (points)"
    curves = [ln for ln in ax.lines if list(ln.get_xdata()) == [5, 10]]
    assert len(curves) == 4 and fig.legends  # 2 seeds x 2 methods; the legend outside the axes
    # Paired differences: sst2 only (mrpc has no full run): seeds at -2 and +1, mean -0.5 with
    # its 95% interval as the error bar; zero and the -3 target as vertical lines.
    (ax,) = plots.paired_differences(comps).axes
    seeds = [ln for ln in ax.lines if ln.get_marker() == "o"]
    assert [list(ln.get_xdata()) for ln in seeds] == [[pytest.approx(-2.0), pytest.approx(1.0)]]
    (mean,) = [ln for ln in ax.lines if ln.get_marker() == "D"]
    assert list(mean.get_xdata()) == [pytest.approx(-0.5)]
    half = t_quantile(0.975, 1) * statistics.stdev([-2.0, 1.0]) / math.sqrt(2)
    (bar,) = [c for c in ax.collections if len(c.get_segments()) == 1]
    assert bar.get_segments()[0][:, 0] == pytest.approx([-0.5 - half, -0.5 + half])
    vertical = {ln.get_xdata()[0] for ln in ax.lines if ln.get_marker() in ("None", "", None)}
    assert vertical == {0.0, -3.0}
    assert plots.paired_differences([c for c in comps if c.task == "mrpc"]) is None
    abl = [c for c in cells if c.group == "ablation-rank"]
    ref = full_reference(abl[0], cells)
    assert ref is not None and ref.method == "full"
    fig = plots.ablation(abl, "rank", lambda c: full_reference(c, cells))
    (ax,) = fig.axes
    flat = [ln for ln in ax.lines if len(set(ln.get_ydata())) == 1 and ln.get_linestyle() == "--"]
    assert [ln.get_ydata()[0] for ln in flat] == [pytest.approx(82.5)]  # mean of 82, 83
    assert ax.get_ylabel() == "dev accuracy (points)" and ax.get_xlabel().startswith("rank r")
    assert list(ax.texts) == []  # one rate on the axis: no per-point rates


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


def test_majority_baselines_of_the_tasks():
    from datasets import Dataset

    from loralab.tasks import get_task

    raw = Dataset.from_dict({"text_a": ["x"] * 5, "text_b": [""] * 5, "label": [1, 0, 1, 1, 0]})
    assert get_task("sst2").majority_baseline(raw) == {"accuracy": 0.6}
    # MRPC: always "equivalent" (1): precision 3/5, recall 1, F1 = 2·3 / (2·3 + 2) = 0.75.
    assert get_task("mrpc").majority_baseline(raw) == pytest.approx({"accuracy": 0.6, "f1": 0.75})
    zeros = Dataset.from_dict({"text_a": ["x"] * 3, "text_b": [""] * 3, "label": [0, 0, 1]})
    assert get_task("mrpc").majority_baseline(zeros) == pytest.approx(
        {"accuracy": 2 / 3, "f1": 0.0}
    )
    squad = Dataset.from_dict({
        "id": ["a", "b", "c", "d"], "question": ["q"] * 4, "context": ["c"] * 4,
        "answers": [{"text": [], "answer_start": []}, {"text": ["x"], "answer_start": [0]},
                    {"text": [], "answer_start": []}, {"text": ["y"], "answer_start": [0]}],
    })  # fmt: skip
    assert get_task("squad_v2").majority_baseline(squad) == {"exact": 50.0, "f1": 50.0}
    # The report shows points: GLUE's fractions x 100, SQuAD's official points as they are.
    assert (points_per_unit("sst2"), points_per_unit("squad_v2")) == (100.0, 1.0)


def test_preset_ablation_ticks_run_by_size_and_the_caveat_fits_the_figure(tmp_path):
    """Presets read standard, extended, all-linear (smallest trainable share first, not the
    slugs' alphabetical order); the base's tick names its preset; SmolLM2's caveat under a
    one-panel figure is wrapped to the figure's width, not clipped at its edges."""
    from loralab.models import caveat

    for name, share in (("all-linear", 1.78), ("extended", 0.68), ("standard", 0.34)):
        write_run(tmp_path, name, 1, {"accuracy": 0.8 + share / 100}, group="ablation-modules",
                  lora={"target": name}, share=(share + 0.1, share))  # fmt: skip
    cells, _ = aggregate(load_runs(tmp_path))
    fig = plots.ablation([c for c in cells if c.best], "modules", lambda c: None)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["standard", "extended", "all-linear"]
    assert ax.get_xlabel() == "LoRA variant (target)"
    plots.add_caveats(fig, {"smollm2-135m"})
    title = fig.legends[0].get_title()
    assert title.get_text().replace("\n", " ") == caveat("smollm2-135m")
    fig.canvas.draw()
    box, edge = title.get_window_extent(), fig.bbox
    assert edge.x0 <= box.x0 and box.x1 <= edge.x1, (box, edge)


def test_records_do_not_share_state(tmp_path):
    write_run(tmp_path, "a", 1, {"accuracy": 0.5})
    records = load_runs(tmp_path)
    before = copy.deepcopy(records)
    aggregate(records)
    deduplicate(records)
    assert records == before  # aggregation reads, never rewrites, the records


def test_variant_ablation_is_categorical_and_lm_rows_show_zero_shot(tmp_path):
    variants = {"standard": {}, "extended": {"target": "extended"}, "dora": {"use_dora": True}}
    for i, (name, lora) in enumerate(variants.items()):
        write_run(tmp_path, f"v-{name}", 1, {"accuracy": 0.8 + i / 100}, group="ablation-variant",
                  lora=lora)  # fmt: skip
    write_run(tmp_path, "full", 1, {"accuracy": 0.9}, method="full", lr=3e-5)
    run = write_run(tmp_path, "lm", 1, {"accuracy": 0.7}, head="lm")
    summary = json.loads((run / "summary.json").read_text())
    summary["zero_shot"] = {"accuracy": 0.55}
    (run / "summary.json").write_text(json.dumps(summary))
    cells, comps = aggregate(load_runs(tmp_path))
    fig = plots.ablation([c for c in cells if c.group == "ablation-variant"], "variant",
                         lambda c: full_reference(c, cells))  # fmt: skip
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["defaults", "dora", "extended"]
    assert ax.get_xlabel() == "LoRA variant (target, use_dora)"
    assert [ln.get_ydata()[0] for ln in ax.lines if ln.get_linestyle() == "--"] == [pytest.approx(90.0)]  # fmt: skip
    rep = report(tmp_path, out=tmp_path / "out")
    (lm_row,) = [r for r in rep.tables[0].rows if r[1] == "lm"]
    assert lm_row[11] == "55.00" and lm_row[13] == "n/a: no comparable full run"


def test_best_lr_is_chosen_on_the_seeds_every_lr_has(tmp_path):
    """Grid on seed 1, other seeds at the winner: the choice compares seed 1 only.

    On all seeds the winner (0.80 on seed 1, then 0.60, 0.60: mean 0.667) would lose to the
    other lr's single seed (0.70); on the shared seed it wins, as the study chose.
    """
    write_run(tmp_path, "a-s1", 1, {"accuracy": 0.80}, lr=1e-4)
    write_run(tmp_path, "a-s2", 2, {"accuracy": 0.60}, lr=1e-4)
    write_run(tmp_path, "a-s3", 3, {"accuracy": 0.60}, lr=1e-4)
    write_run(tmp_path, "b-s1", 1, {"accuracy": 0.70}, lr=3e-4)
    cells, _ = aggregate(load_runs(tmp_path))
    (best,) = [c for c in cells if c.best]
    assert best.lr == 1e-4 and len(best.done) == 3
    assert best.stat("accuracy")[0] == pytest.approx(2.0 / 3)  # reported over all its seeds


def test_a_run_that_diverged_keeps_its_seed_in_the_choice_and_its_rate_out(tmp_path):
    """Every rate on seeds 1-3; 1e-3 diverged on seed 3. The study scores that point -inf
    (`best_so_far`) and compares the others on all three seeds: 3e-4 (mean 0.903) beats 1e-4
    (0.867). Dropping seed 3 from the comparison would pick 1e-4 (0.90 against 0.88)."""
    for seed, a, b, c in ((1, 0.90, 0.88, 0.70), (2, 0.90, 0.88, 0.70), (3, 0.80, 0.95, None)):
        write_run(tmp_path, f"a-s{seed}", seed, {"accuracy": a}, lr=1e-4)
        write_run(tmp_path, f"b-s{seed}", seed, {"accuracy": b}, lr=3e-4)
        write_run(tmp_path, f"c-s{seed}", seed, {} if c is None else {"accuracy": c}, lr=1e-3,
                  status="diverged" if c is None else "completed")  # fmt: skip
    cells, _ = aggregate(load_runs(tmp_path))
    (best,) = [c for c in cells if c.best]
    assert best.lr == 3e-4 and best.chose_lr_on == {1, 2, 3}
    plan = make_plan(tasks="sst2", methods="lora", lora_lr="1e-4,3e-4,1e-3", seeds="1,2,3",
                     results_dir=str(tmp_path / "res"), model={"name": "tiny-llama"})  # fmt: skip
    scores = {1: (0.9, 0.88, 0.7), 2: (0.9, 0.88, 0.7), 3: (0.8, 0.95, -math.inf)}
    lrs = {1e-4: 0, 3e-4: 1, 1e-3: 2}
    values = {p["key"]: scores[p["seed"]][lrs[p["lr"]]] for p in plan.points()}
    assert best_so_far(plan, values) == {"lora": 3e-4}  # the study's choice: the same


def test_a_quantized_base_is_its_own_row_named_by_its_base_and_pairs_with_full(tmp_path):
    for seed, acc in ((1, 0.80), (2, 0.84)):
        write_run(tmp_path, f"lora-s{seed}", seed, {"accuracy": acc})
        write_run(tmp_path, f"full-s{seed}", seed, {"accuracy": 0.85}, method="full", lr=3e-5)
        run = write_run(tmp_path, f"qlora-s{seed}", seed, {"accuracy": acc - 0.02})
        summary = json.loads((run / "summary.json").read_text())
        summary["identity"]["model"]["quantization"] = "int8"
        (run / "summary.json").write_text(json.dumps(summary))
    cells, comps = aggregate(load_runs(tmp_path))
    by_variant = {c.variant: c for c in cells if c.method == "lora"}
    assert set(by_variant) == {"r=8 α=16", "r=8 α=16 int8 base"}
    assert by_variant["r=8 α=16 int8 base"].stat("accuracy")[0] == pytest.approx(0.80)
    # Both LoRA rows are compared with the one full fine-tuning row: -3 and -5 points.
    deltas = sorted(c.delta_points for c in comps)
    assert deltas == [pytest.approx(-5.0), pytest.approx(-3.0)]


def test_at_a_glance_table_pairs_the_methods_per_task(tmp_path):
    """One row per task: each method at its best lr, the paired verdict, and LoRA/full ratios
    of training CPU and peak memory; a task without full fine-tuning shows dashes."""
    for s, (lv, fv) in enumerate(((0.80, 0.82), (0.84, 0.83)), start=1):
        for name, method, value, cpu, mem, lr in (("lora", "lora", lv, 30, 100, 1e-4),
                                                   ("full", "full", fv, 120, 400, 3e-5)):  # fmt: skip
            run = write_run(tmp_path, f"sst2-{name}-{s}", s, {"accuracy": value}, method=method,
                            lr=lr, majority={"accuracy": 0.51})  # fmt: skip
            summary = json.loads((run / "summary.json").read_text())
            summary.update(train_cpu_time_s=cpu, peak_memory_mb=mem)
            (run / "summary.json").write_text(json.dumps(summary))
    write_run(tmp_path, "rte-lora-1", 1, {"accuracy": 0.55}, task="rte")
    rep = report(tmp_path, out=tmp_path / "rep")
    (glance,) = [t for t in rep.tables if t.title.startswith("At a glance")]
    rows = {r[0]: dict(zip(glance.headers, r, strict=True)) for r in glance.rows}
    sst2 = rows["sst2"]
    assert sst2["majority baseline"] == "51.00"
    assert sst2["LoRA"] == "82.00 ± 2.83 (lr 0.0001, 2 seeds)"
    assert sst2["full fine-tuning"] == "82.50 ± 0.71 (lr 3e-05, 2 seeds)"
    # paired by seed: -2.00 and +1.00 points; mean -0.50 ± t(0.975, 1) x 1.5
    half = t_quantile(0.975, 1) * statistics.stdev([-2.0, 1.0]) / math.sqrt(2)
    assert (
        sst2["LoRA − full (mean [95% CI])"]
        == f"PASS: -0.50 [{-0.5 - half:+.2f}, {-0.5 + half:+.2f}]; unsettled (the interval spans -3; ~6 seeds in all at this mean and spread would settle it)"
    )
    assert sst2["training CPU (min), LoRA / full"] == "0.5 / 2.0 (0.25×)"  # 30 s vs 120 s
    assert sst2["peak memory (MB), LoRA / full"] == "100 / 400 (0.25×)"
    assert sst2["wall time (min), LoRA / full"] == "0.2 / 0.2 (1.00×)"  # write_run: 10 s each
    rte = rows["rte"]
    assert rte["LoRA"] == "55.00 (lr 0.0003, 1 seed)" and rte["full fine-tuning"] == "—"
    assert rte["peak memory (MB), LoRA / full"] == "100 / —"
    assert rte["LoRA − full (mean [95% CI])"].startswith("n/a")
    assert "## At a glance" in (tmp_path / "rep" / "report.md").read_text()


def test_seeds_that_picked_the_lr_are_set_apart_from_the_others(tmp_path):
    """Grid on seed 1, seeds 2 and 3 at each method's best: the held-out column pairs seeds 2
    and 3 only (seed 1's scores are each grid's maximum); a family with one lr chose nothing."""
    lora = {1: 0.80, 2: 0.76, 3: 0.78}
    full = {1: 0.81, 2: 0.80, 3: 0.79}
    for seed in (1, 2, 3):
        write_run(tmp_path, f"lora-s{seed}", seed, {"accuracy": lora[seed]}, lr=3e-4)
        write_run(tmp_path, f"full-s{seed}", seed, {"accuracy": full[seed]}, method="full", lr=3e-5)
    write_run(tmp_path, "lora-low", 1, {"accuracy": 0.70}, lr=1e-4)
    write_run(tmp_path, "full-low", 1, {"accuracy": 0.75}, method="full", lr=1e-5)
    write_run(tmp_path, "rte-lora", 1, {"accuracy": 0.55}, task="rte")
    write_run(tmp_path, "rte-full", 1, {"accuracy": 0.57}, task="rte", method="full", lr=3e-5)
    rep = report(tmp_path, out=tmp_path / "rep")
    sst2, rte = sorted(rep.comparisons, key=lambda c: c.task != "sst2")
    assert sst2.lora.chose_lr_on == sst2.full.chose_lr_on == {1}
    assert sst2.diffs == pytest.approx([-1.0, -4.0, -1.0])
    assert sst2.held_out_diffs == pytest.approx([-4.0, -1.0])
    assert rte.lora.chose_lr_on == frozenset() and rte.held_out_diffs == pytest.approx([-2.0])
    (glance,) = [t for t in rep.tables if t.title.startswith("At a glance")]
    col = glance.headers.index("LoRA − full, seeds that did not pick the lr")
    rows = {r[0]: r[col] for r in glance.rows}
    half = t_quantile(0.975, 1) * statistics.stdev([-4.0, -1.0]) / math.sqrt(2)
    assert rows["sst2"] == f"-2.50 [{-2.5 - half:+.2f}, {-2.5 + half:+.2f}] (seeds 2, 3)"
    assert rows["rte"] == "-2.00 (seed 1)"
    with open(tmp_path / "rep" / "report.csv") as fh:
        csv_lora = [r for r in csv.DictReader(fh) if r["best_lr"] == "True" and r["task"] == "sst2"]
    by_method = {r["method"]: r for r in csv_lora}
    assert by_method["lora"]["lr_chosen_on_seeds"] == by_method["full"]["lr_chosen_on_seeds"] == "1"
    assert float(by_method["lora"]["held_out_minus_full_points"]) == pytest.approx(-2.5)
    assert by_method["lora"]["held_out_n"] == "2"
    # The figure: seed 1 hollow (it picked both lrs), seeds 2 and 3 filled.
    (ax,) = plots.paired_differences([sst2]).axes
    dots = {ln.get_markerfacecolor() == "none": list(ln.get_xdata()) for ln in ax.lines
            if ln.get_marker() == "o"}  # fmt: skip
    assert dots == {True: pytest.approx([-1.0]), False: pytest.approx([-4.0, -1.0])}


def test_without_a_shared_seed_every_seed_picked_the_lr(tmp_path):
    """Two lrs on disjoint seeds: the choice used every seed, so none is held out."""
    write_run(tmp_path, "a-s1", 1, {"accuracy": 0.80}, lr=1e-4)
    write_run(tmp_path, "b-s2", 2, {"accuracy": 0.70}, lr=3e-4)
    write_run(tmp_path, "full-s1", 1, {"accuracy": 0.82}, method="full", lr=3e-5)
    (comp,) = aggregate(load_runs(tmp_path))[1]
    assert comp.lora.chose_lr_on == {1, 2} and comp.held_out_diffs == []


def test_peak_memory_across_allocators_is_flagged_not_compared(tmp_path):
    """Runs of one comparison under different heap allocators (loralab.allocator): warned,
    with the count per allocator; runs from before the allocator was recorded are 'unrecorded'."""
    for method, lr in (("lora", 3e-4), ("full", 3e-5)):
        for seed in (1, 2):
            write_run(tmp_path / "same", f"{method}{seed}", seed, {"accuracy": 0.8},
                      method=method, lr=lr)  # fmt: skip
    assert report(tmp_path / "same").warnings == []
    mixed = tmp_path / "same" / "full2" / "summary.json"
    summary = json.loads(mixed.read_text())
    mixed.write_text(json.dumps({**summary, "layout": {"allocator": "tcmalloc"}}))
    (warning,) = report(tmp_path / "same").warnings
    assert warning.startswith("sst2 (tiny-llama): peak memory is not comparable")
    assert "LoRA: unrecorded ×2; full fine-tuning: tcmalloc ×1, unrecorded ×1" in warning
    md = (tmp_path / "same" / "report" / "report.md").read_text()
    assert "> **Warning:** sst2 (tiny-llama): peak memory is not comparable" in md
    rows = _rows(tmp_path / "same" / "report" / "runs.csv")
    assert sorted(r["allocator"] for r in rows) == ["", "", "", "tcmalloc"]


def test_times_of_runs_lent_idle_cores_are_flagged_not_compared(tmp_path):
    """Some runs of a comparison lent idle cores (study.spare_cores), others not: warned with the
    count per kind; a run lent cores for under 5% of its time counts as run on its own."""
    for method, lr in (("lora", 3e-4), ("full", 3e-5)):
        for seed in (1, 2):
            write_run(tmp_path, f"{method}{seed}", seed, {"accuracy": 0.8}, method=method, lr=lr)
    for name, share in (("lora1", 0.02), ("full1", 0.6), ("full2", 0.9)):
        path = tmp_path / name / "summary.json"
        summary = json.loads(path.read_text())
        path.write_text(json.dumps({**summary, "layout": {"lent_share": share}}))
    (warning,) = [w for w in report(tmp_path).warnings if "times are not comparable" in w]
    assert "LoRA: own ×2; full fine-tuning: lent cores ×2" in warning
    rows = _rows(tmp_path / "report" / "runs.csv")
    assert sorted(r["lent_share"] for r in rows) == ["", "0.02", "0.6", "0.9"]
    for name in ("lora1", "lora2"):  # every run lent cores: alike again
        path = tmp_path / name / "summary.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "layout": {"lent_share": 0.5}}))
    assert not any("times are not comparable" in w for w in report(tmp_path).warnings)


def _set_hardware(run_dir, hardware: dict) -> None:
    path = run_dir / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "hardware": hardware}))


def test_an_ablation_axis_whose_settings_ran_on_different_machines_is_flagged(tmp_path):
    """The base value's runs are the study's own (often older, made elsewhere): an axis whose
    settings ran on different machines gets a warning naming each setting's machines."""
    for r, alpha in ((8, 16.0), (4, 8.0)):
        for seed in (1, 2):
            write_run(tmp_path, f"r{r}-{seed}", seed, {"accuracy": 0.8}, group="ablation-rank",
                      lora={"r": r, "alpha": alpha})  # fmt: skip
    epyc, xeon = ({"cpu": c, "accelerator": None} for c in ("AMD EPYC[avx2]", "Intel Xeon[amx_bf16]"))  # fmt: skip
    for name in ("r8-1", "r8-2", "r4-1", "r4-2"):
        _set_hardware(tmp_path / name, epyc)
    assert report(tmp_path).warnings == []  # one machine: comparable
    for name in ("r8-1", "r8-2"):
        _set_hardware(tmp_path / name, xeon)
    (warning,) = report(tmp_path).warnings
    assert warning == (
        "sst2 (tiny-llama), ablation-rank: times are not comparable between its settings: their "
        "runs ran on different machines (r=4 α=8: AMD EPYC[avx2] ×2; r=8 α=16: Intel Xeon[amx_bf16] "
        "×2; hardware in runs.csv). Compare times on runs from one machine."
    )


def test_times_from_different_machines_are_flagged_and_the_hardware_named(tmp_path):
    """The report names the machines its runs recorded (tracking.hardware) and warns when the
    two methods of a comparison ran on different ones; runs that recorded none are left out."""
    for method, lr in (("lora", 3e-4), ("full", 3e-5)):
        for seed in (1, 2):
            write_run(tmp_path, f"{method}{seed}", seed, {"accuracy": 0.8}, method=method, lr=lr)
    md = lambda: (tmp_path / "report" / "report.md").read_text()  # noqa: E731
    assert report(tmp_path).warnings == []
    assert "Hardware: not recorded (runs from before loralab recorded it" in md()
    xeon = {"cpu": "Intel Xeon[avx2,avx512f,avx512_bf16,amx_bf16,amx_tile]", "accelerator": None}
    for name in ("lora1", "full1", "full2"):
        _set_hardware(tmp_path / name, xeon)
    assert report(tmp_path).warnings == []  # an unrecorded run is not a different machine
    assert f"{xeon['cpu']} ×3; not recorded ×1 (older runs)." in md()
    _set_hardware(tmp_path / "lora2", {"cpu": "AMD EPYC[avx2]", "accelerator": None})
    _set_hardware(tmp_path / "full2", {"cpu": "AMD EPYC[avx2]", "accelerator": "NVIDIA H200"})
    (warning,) = report(tmp_path).warnings
    assert warning.startswith("sst2 (tiny-llama): times are not comparable between the methods")
    assert (
        f"(LoRA: AMD EPYC[avx2] ×1, {xeon['cpu']} ×1; full fine-tuning: {xeon['cpu']} ×1, "
        "NVIDIA H200 ×1; hardware in runs.csv)" in warning
    )
    assert (
        f"Hardware (CPU [kernel-deciding extensions] or GPU, per run): AMD EPYC[avx2] ×1, {xeon['cpu']} ×2, NVIDIA H200 ×1."
        in md()
    )
    rows = {
        r["run_dir"].rsplit("/", 1)[-1]: r["hardware"]
        for r in _rows(tmp_path / "report" / "runs.csv")
    }
    assert rows == {
        "lora1": xeon["cpu"],
        "lora2": "AMD EPYC[avx2]",
        "full1": xeon["cpu"],
        "full2": "NVIDIA H200",
    }


def test_the_report_says_what_a_built_in_models_weights_are(tmp_path):
    """A built-in name hides what its weights are (SmolLM2 is dequantised from a 4-bit GGUF):
    the report's header says it; a model loralab does not ship gets no such sentence."""
    from loralab.models.registry import BUILTIN_MODELS

    write_run(tmp_path, "a", 1, {"accuracy": 0.8})  # tiny-llama
    report(tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    assert f" Model: tiny-llama = {BUILTIN_MODELS['tiny-llama'].description}." in md
    path = tmp_path / "a" / "summary.json"
    smol = {**json.loads(path.read_text()), "model": "smollm2-135m"}
    path.write_text(json.dumps(smol))
    write_run(tmp_path, "b", 2, {"accuracy": 0.8})
    report(tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    assert (
        " Models: smollm2-135m = SmolLM2-135M-Instruct dequantised from its 4-bit Q4_1 GGUF" in md
    )
    assert "; tiny-llama = " in md
    path.write_text(json.dumps({**smol, "model": "my-org/my-model"}))
    shutil.rmtree(tmp_path / "b")
    report(tmp_path)
    header = (tmp_path / "report" / "report.md").read_text().split("\n\n")[2]
    assert header.startswith("Runs are pooled") and " Model" not in header


def test_runs_without_their_sweep_json_take_their_groups_from_the_stored_study(tmp_path):
    """A run folder copied without its sweep.json is filed under the groups of the stored
    studies that finished its point (an ablation gets its ablation table), not under "sweep"."""
    plan = make_plan(kind="ablation", ablation="rank", tasks="sst2", lora_lr="3e-4", seeds="1",
                     results_dir=str(tmp_path), model={"name": "tiny-llama"})  # fmt: skip
    url = f"sqlite:///{tmp_path / 'study.db'}"
    st = open_storage(url)
    trials = {t.user_attrs["point"]: t for t in create_or_check(st, "ranks", plan).get_trials()}
    for p in plan.points():
        r = p["lora"]["r"]
        lora = {"r": r, "alpha": float(p["lora"]["alpha"])}
        write_run(tmp_path / "runs", p["key"], 1, {"accuracy": 0.7 + r / 100}, lora=lora)

    def groups():
        return {
            Path(r["run_dir"]).name: r["group"] for r in load_runs(tmp_path, stored_groups(url))
        }

    assert set(groups().values()) == {"sweep"}  # no stored point is finished yet
    assert not any(t.title.startswith("Ablation") for t in report(tmp_path).tables)
    for t in trials.values():
        st.set_trial_state_values(t._trial_id, TrialState.RUNNING)
        st.set_trial_state_values(t._trial_id, TrialState.COMPLETE, [0.5])
    assert groups() == {key: "ablation-rank" for key in trials} and len(trials) == 3
    (table,) = [t for t in report(tmp_path).tables if t.title.startswith("Ablation: rank")]
    assert len(table.rows) == 3
    # A sweep.json still has the last word.
    (tmp_path / "runs" / next(iter(trials)) / "sweep.json").write_text(
        json.dumps({"groups": ["g"]})
    )
    assert sorted(groups().values()) == ["ablation-rank", "ablation-rank", "g"]


def test_the_share_target_judges_the_standard_preset_only(tmp_path):
    """SPEC §4 sets ≤0.3% for the standard preset: a comparison at another target gets its
    share shown but no verdict (an all-linear row always "failing" it says nothing)."""
    for target, root in (("standard", "std"), ("all-linear", "wide")):
        for s in (1, 2):
            write_run(tmp_path / root / "runs", f"l{s}", s, {"accuracy": 0.8}, share=(1.2, 1.0),
                      lora={"target": target})  # fmt: skip
            write_run(tmp_path / root / "runs", f"f{s}", s, {"accuracy": 0.81}, method="full", lr=3e-5)  # fmt: skip
    (std,) = aggregate(load_runs(tmp_path / "std"))[1]
    (wide,) = aggregate(load_runs(tmp_path / "wide"))[1]
    assert (std.share_ok, wide.share_ok) == (False, None)
    report(tmp_path / "wide", out=tmp_path / "wide-report")
    md = (tmp_path / "wide-report" / "report.md").read_text()
    row = next(line for line in md.splitlines() if "| lora | r=8 α=16 all-linear |" in line)
    assert "| 1.000 | n/a |" in row and "FAIL: 1.000%" not in md
    lora = next(r for r in _rows(tmp_path / "wide-report" / "report.csv") if r["method"] == "lora")
    assert (
        lora["share_target_pass"] == "" and float(lora["trainable_share_without_head_pct"]) == 1.0
    )


def test_a_cost_ratio_is_taken_on_the_seeds_both_methods_recorded(tmp_path):
    """Older runs lack train_cpu_time_s: each side's mean over its own runs compared other
    seeds and code versions (SST-2's 0.40× in the committed study was 0.55× on its shared seeds)."""
    for seed in (1, 2, 3, 4):
        for method, lr, cpu in (("lora", 3e-4, 100.0 if seed <= 2 else None),
                                ("full", 3e-5, 200.0 if seed <= 2 else 600.0)):  # fmt: skip
            run = write_run(tmp_path / "runs", f"{method}-{seed}", seed, {"accuracy": 0.8},
                            method=method, lr=lr)  # fmt: skip
            summary = json.loads((run / "summary.json").read_text())
            summary["train_cpu_time_s"] = cpu
            (run / "summary.json").write_text(json.dumps(summary))
    (glance,) = [t for t in report(tmp_path).tables if t.title.startswith("At a glance")]
    cpu = glance.rows[0][glance.headers.index("training CPU (min), LoRA / full")]
    assert cpu == "1.7 / 6.7 (0.50× on the 2 seeds both have)", cpu
    wall = glance.rows[0][glance.headers.index("wall time (min), LoRA / full")]
    assert wall == "0.2 / 0.2 (1.00×)", wall  # every run has it: the plain ratio of the means


def test_a_drop_of_exactly_three_points_passes(tmp_path):
    """100·(0.85 − 0.88) is −3.0000000000000027 in floats: the verdict read 'FAIL: -3.00'."""
    for seed in (1, 2):
        write_run(tmp_path / "runs", f"lora-{seed}", seed, {"accuracy": 0.85}, method="lora", lr=3e-4)  # fmt: skip
        write_run(tmp_path / "runs", f"full-{seed}", seed, {"accuracy": 0.88}, method="full", lr=3e-5)  # fmt: skip
    (comp,) = aggregate(load_runs(tmp_path))[1]
    assert comp.verdict.startswith("PASS: -3.00"), comp.verdict
    assert comp.drop_ok is True and comp.unsettled is False


def test_a_run_without_the_main_metric_cannot_win_the_lr_and_a_setting_without_it_is_warned(tmp_path):  # fmt: skip
    """The study scores a finished run without the main metric -inf (`phases.grid_values`);
    the report skipped it, so 3e-3 won on its other seeds. A setting none of whose runs has
    the metric vanished from the tables without a word."""
    runs = tmp_path / "runs"
    for seed in (1, 2, 3):
        write_run(runs, f"a-{seed}", seed, {"accuracy": 0.88}, lr=1e-3)
        write_run(runs, f"b-{seed}", seed, {} if seed == 1 else {"accuracy": 0.90}, lr=3e-3)
        write_run(runs, f"full-{seed}", seed, {"f1": 0.8}, method="full", lr=3e-5)
    cells, _ = aggregate(load_runs(tmp_path))
    assert [c.lr for c in cells if c.best and c.method == "lora"] == [1e-3]
    warnings = report(tmp_path).warnings
    assert any("full" in w and "recorded accuracy" in w for w in warnings), warnings


def test_duplicates_keep_the_run_that_ran_last_even_after_a_copy(tmp_path):
    """A git clone or copy resets the files' mtimes: the recorded first-step time decides, and
    any recorded time beats an mtime (a run from before it was recorded is the older)."""
    runs = {}
    for name, started in (("late", 2_000_000.0), ("early", 1_000_000.0), ("unrecorded", None)):
        runs[name] = write_run(tmp_path, name, 1, {"accuracy": 0.6})
        summary = json.loads((runs[name] / "summary.json").read_text())
        summary["first_step_at"] = started
        (runs[name] / "summary.json").write_text(json.dumps(summary))
    os.utime(runs["early"] / "summary.json", (3_000_000, 3_000_000))  # touched last
    os.utime(runs["unrecorded"] / "summary.json", (4_000_000, 4_000_000))
    records, warnings = deduplicate(load_runs(tmp_path))
    assert [r["run_dir"] for r in records] == [str(runs["late"])] and len(warnings) == 2


def test_a_method_that_lost_seeds_at_its_rate_is_warned_about(tmp_path):
    """MRPC's LoRA diverged on seed 3: the paired verdict stands on seeds 1 and 2 alone, which
    the verdict itself does not say."""
    warnings = report(write_runs(tmp_path)).warnings
    (lost,) = [w for w in warnings if "stand on the other seeds" in w]
    assert lost.startswith("mrpc (tiny-llama): LoRA at its best lr (0.0003)") and "seed 3;" in lost


def test_dev_loss_shows_where_runs_recorded_it_and_only_there(tmp_path):
    """Runs at the majority baseline are told apart by their dev loss: the per-task table
    carries it (mean ± std over the seeds that recorded it), report.csv its mean; a task whose
    runs predate the figure gets no column."""
    majority = {"accuracy": 0.5}
    losses = {("lora", 1): 3.0, ("lora", 2): 3.2, ("full", 1): 2.0, ("full", 2): None}
    for (method, seed), loss in losses.items():
        run = write_run(tmp_path / "runs", f"{method}{seed}", seed, {"accuracy": 0.5},
                        majority=majority, method=method, lr=1e-4)  # fmt: skip
        summary = json.loads((run / "summary.json").read_text())
        if loss is not None:  # full's seed 2 is an older run, from before the figure
            summary["eval_loss"] = loss
        (run / "summary.json").write_text(json.dumps(summary))
    write_run(tmp_path / "runs", "old", 1, {"accuracy": 0.8}, task="rte", majority=majority)
    report(tmp_path, out=tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    sst2 = md[md.index("## sst2: every metric") :].split("\n## ")[0]
    assert "| dev loss |" in sst2.splitlines()[2]
    assert "| 3.100 ± 0.141 |" in sst2  # LoRA: mean and sample std of 3.0 and 3.2
    assert "| 2.000 (1 seed) |" in sst2
    rte = md[md.index("## rte: every metric") :].split("\n## ")[0]
    assert "dev loss" not in rte  # no run of the task recorded it: no column of dashes
    rows = _rows(tmp_path / "out" / "report.csv")
    assert float(_row(rows, "sweep", "sst2", "lora", 1e-4, 8)["eval_loss"]) == pytest.approx(3.1)
    assert float(_row(rows, "sweep", "sst2", "full", 1e-4)["eval_loss"]) == 2.0
    assert _row(rows, "sweep", "rte", "lora", 3e-4, 8)["eval_loss"] == "nan"
    # Both methods at the baseline: the verdict gives their dev losses once every run has one.
    (comp,) = [c for c in aggregate(load_runs(tmp_path))[1] if c.task == "sst2"]
    assert comp.uninformative and "dev loss" not in comp.verdict  # full's seed 2 has none
    _with_loss(tmp_path / "runs" / "full2", 2.2)
    (comp,) = [c for c in aggregate(load_runs(tmp_path))[1] if c.task == "sst2"]
    assert comp.verdict.endswith("; final dev loss LoRA 3.10 / full 2.10")


def test_dev_loss_curves_figure_where_runs_logged_the_loss(tmp_path):
    majority = {"accuracy": 0.5}
    for method, losses in (("lora", [3.3, 3.0]), ("full", [2.9, 2.0])):
        run = write_run(tmp_path / "runs", method, 1, {"accuracy": 0.5}, majority=majority,
                        method=method, lr=1e-4)  # fmt: skip
        lines = [
            {"step": s, "eval/accuracy": 0.5, "eval/loss": v}
            for s, v in zip((5, 10), losses, strict=True)
        ]
        (run / METRICS_FILE).write_text("".join(json.dumps(x) + "\n" for x in lines))
    _, comps = aggregate(load_runs(tmp_path))
    fig = plots.learning_curves(comps, loss=True)
    (ax,) = fig.axes
    assert ax.get_ylabel() == "dev loss" and ax.get_title().endswith("lr LoRA 0.0001, full 0.0001")
    labels = {t.get_text() for t in fig.legends[0].get_texts()}  # rates live in the titles
    assert labels == {"LoRA, one line per seed", "full fine-tuning, one line per seed"}
    got = sorted(list(ln.get_ydata()) for ln in ax.lines)
    assert got == [[2.9, 2.0], [3.3, 3.0]]  # raw losses, one line per run; no baseline line
    report(tmp_path, out=tmp_path / "out")
    assert (tmp_path / "out" / "figures" / "dev_loss_curves.png").is_file()
    assert "Dev loss vs training step" in (tmp_path / "out" / "report.md").read_text()
    # Runs that logged no loss (older ones) get no such figure.
    for run in (tmp_path / "runs").iterdir():
        (run / METRICS_FILE).write_text(json.dumps({"step": 5, "eval/accuracy": 0.5}) + "\n")
    _, comps = aggregate(load_runs(tmp_path))
    assert plots.learning_curves(comps, loss=True) is None


def test_the_report_shows_the_answer_first(tmp_path):
    """report.md, .html and .tex: the at-a-glance verdicts, then the warnings, then the main
    table; the report's table list (the console's first table) keeps the main table first."""
    for method, lr in (("lora", 3e-4), ("full", 3e-5)):
        for seed in (1, 2):
            write_run(tmp_path, f"{method}{seed}", seed, {"accuracy": 0.8}, method=method, lr=lr)
    mixed = tmp_path / "full2" / "summary.json"
    mixed.write_text(json.dumps({**json.loads(mixed.read_text()), "layout": {"allocator": "tcmalloc"}}))  # fmt: skip
    rep = report(tmp_path)
    assert rep.tables[0].title.startswith("LoRA vs full fine-tuning (one row")
    out = tmp_path / "report"
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for text, glance, warning, table in (
        (md, "## At a glance", "> **Warning:**", "## LoRA vs full fine-tuning (one row"),
        (html, "<h2>At a glance", "<p class='warn'>", "<h2>LoRA vs full fine-tuning (one row"),
    ):
        assert text.index(glance) < text.index(warning) < text.index(table)
    tex = (out / "report.tex").read_text()
    assert tex.index("At a glance") < tex.index("LoRA vs full fine-tuning (one row")
    assert "<div class='wide'><table>" in html and ".wide{overflow-x:auto}" in html


def test_at_a_glance_names_the_lora_setting_where_a_task_has_several(tmp_path):
    """Two LoRA settings of one task and model (e.g. a quantized base beside the plain one) make
    two glance rows: each LoRA cell says which; a task with one setting reads as before."""
    for r, acc in ((4, 0.80), (8, 0.84)):
        write_run(tmp_path, f"sst2-r{r}", 1, {"accuracy": acc}, lora={"r": r, "alpha": 2.0 * r})
    write_run(tmp_path, "sst2-full", 1, {"accuracy": 0.85}, method="full", lr=3e-5)
    write_run(tmp_path, "rte-lora", 1, {"accuracy": 0.60}, task="rte")
    rep = report(tmp_path)
    (glance,) = [t for t in rep.tables if t.title.startswith("At a glance")]
    col = glance.headers.index("LoRA")
    cells = sorted(row[col] for row in glance.rows if row[0] == "sst2")
    assert cells == ["r=4 α=8: 80.00 (lr 0.0003, 1 seed)", "r=8 α=16: 84.00 (lr 0.0003, 1 seed)"]
    (rte,) = [row[col] for row in glance.rows if row[0] == "rte"]
    assert rte == "60.00 (lr 0.0003, 1 seed)"
