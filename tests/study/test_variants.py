"""A LoRA variant is data: the whole `lora` section of a run keys report cells, plot labels and
sweep points; run-key names stay as they were."""

from __future__ import annotations

import json

import pytest

from loralab.study import plots
from loralab.study.aggregate import aggregate, full_reference
from loralab.study.grid import make_plan
from loralab.study.records import load_runs
from loralab.study.report import report
from loralab.study.variants import legacy_suffix, lora_slug, slug_parts, variant_label

LORA = {"r": 8, "alpha": 16.0, "dropout": 0.05, "target": "standard", "bias": "none",
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "extra": {}}  # fmt: skip
FP = {"train_sha256": "ab" * 32, "eval_sha256": "ef" * 32, "train_rows": 100, "eval_rows": 50}


def summary(seed: int, accuracy: float, method: str = "lora", lr: float = 3e-4, lora=None) -> dict:
    """A hand-written summary.json as `loralab train` writes it (identity included)."""
    lora = {**LORA, **(lora or {})} if method == "lora" else None
    identity = {
        "model": {"name": "tiny-llama", "head": "classifier"},
        "data": {"task": "sst2", "max_length": 128, "fingerprint": FP,
                 "max_train_examples": None, "max_eval_examples": None},
        "train": {"method": method, "lr": lr, "epochs": 1.0, "max_steps": -1, "batch_size": 16,
                  "precision": "fp32"},
    }  # fmt: skip
    if lora:
        identity["lora"] = lora
    return {
        "status": "completed", "task": "sst2", "method": method, "model": "tiny-llama",
        "head": "classifier", "seed": seed, "lr": lr, "lora": lora,
        "metrics": {"accuracy": accuracy}, "majority_baseline": {"accuracy": 0.5},
        "identity": identity, "data_fingerprint": FP, "wall_time_s": 10, "peak_memory_mb": 100,
        "steps": 10, "params": {"total": 1000, "trainable": 5, "trainable_share_pct": 0.5,
                                "trainable_share_without_head_pct": 0.2, "lora_share_pct": 0.2},
    }  # fmt: skip


def write(root, name: str, data: dict, group: str | None = None) -> None:
    run = root / "runs" / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    (run / "summary.json").write_text(json.dumps(data))
    if group:
        (run / "sweep.json").write_text(json.dumps({"groups": [group]}))


@pytest.mark.parametrize(("key", "word"), [("use_dora", "dora"), ("use_rslora", "rslora")])
def test_runs_differing_only_in_a_lora_flag_are_two_cells_with_their_own_slugs(tmp_path, key, word):
    for seed in (1, 2):
        write(tmp_path, f"plain-s{seed}", summary(seed, 0.80 + seed / 100))
        write(tmp_path, f"{word}-s{seed}", summary(seed, 0.70 + seed / 100, lora={key: True}))
        write(tmp_path, f"full-s{seed}", summary(seed, 0.90, method="full", lr=3e-5))
    cells, comps = aggregate(load_runs(tmp_path))
    lora_cells = [c for c in cells if c.method == "lora"]
    assert sorted(c.variant for c in lora_cells) == ["r=8 α=16", f"r=8 α=16 {word}"]
    assert len({c.identity_id for c in lora_cells}) == 2
    assert all(len(c.done) == 2 for c in lora_cells)  # pooled over seeds, never across variants
    by_variant = {c.lora.variant: c for c in comps}
    assert by_variant[f"r=8 α=16 {word}"].lora.stat("accuracy")[0] == pytest.approx(0.715)
    assert by_variant["r=8 α=16"].lora.stat("accuracy")[0] == pytest.approx(0.815)
    assert all(c.full is not None for c in comps)  # both compared with the same full run

    rep = report(tmp_path, out=tmp_path / "out")
    lora_rows = [r for r in rep.tables[0].rows if r[3] == "lora"]
    assert sorted(r[4] for r in lora_rows) == ["r=8 α=16", f"r=8 α=16 {word}"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"| r=8 α=16 {word} |" in md
    runs_csv = (tmp_path / "out" / "runs.csv").read_text()
    assert runs_csv.count(f"r=8 α=16 {word}") == 2

    # The bars are labelled by each variant's slug.
    (ax,) = plots.lora_vs_full_figure(comps).axes
    ticks = [t.get_text().splitlines()[-1] for t in ax.get_xticklabels()]
    assert sorted(ticks) == ["r=8 α=16", f"r=8 α=16 {word}"]


def test_bar_labels_and_ablation_lines_use_the_slug(tmp_path):
    for r in (4, 8):
        for dora in (False, True):
            data = summary(1, 0.7 + r / 100 + dora / 10, lora={"r": r, "alpha": 2.0 * r, "use_dora": dora})  # fmt: skip
            write(tmp_path, f"r{r}-dora{dora}", data, group="ablation-dora")
    write(tmp_path, "plain", summary(1, 0.8))
    write(tmp_path, "full", summary(1, 0.9, method="full", lr=3e-5))
    cells, comps = aggregate(load_runs(tmp_path))
    assert len([c for c in cells if c.group == "ablation-dora"]) == 4

    (ax,) = plots.lora_vs_full_figure(comps).axes
    assert [t.get_text().splitlines()[-1] for t in ax.get_xticklabels()] == ["r=8 α=16"]
    mine = [c for c in cells if c.group == "ablation-dora" and c.best]
    fig = plots.ablation(mine, "dora", lambda c: full_reference(c, cells))
    (ax,) = fig.axes
    assert ax.get_xlabel() == "rank r (alpha moving with it)"
    labels = {ln.get_label() for ln in ax.lines} | {
        c.get_label() for c in ax.containers if not c.get_label().startswith("_")
    }
    assert {"dora", "LoRA"} <= labels  # the use_dora=true line is named by its slug word
    assert not any("use_dora=" in label for label in labels)


def test_slug_parts_name_every_setting_that_differs_from_the_defaults():
    lora = {**LORA, "r": 16, "alpha": 32.0, "use_dora": True, "use_rslora": True,
            "init_lora_weights": "pissa", "extra": {"lora_bias": True}}  # fmt: skip
    parts = slug_parts(lora)
    assert parts == {"r": "r=16", "alpha": "α=32", "use_rslora": "rslora", "use_dora": "dora",
                     "init_lora_weights": "init=pissa", "extra": "lora_bias=True"}  # fmt: skip
    assert lora_slug(lora) == "r=16 α=32 rslora dora init=pissa lora_bias=True"
    assert variant_label(lora, ["use_dora", "dropout"]) == "dora"
    assert variant_label(LORA, ["use_dora"]) == ""
    assert lora_slug(None) == "—"


def test_sweep_points_carry_the_lora_section_and_keep_their_names(tmp_path, sst2_dir):
    plan = make_plan(tasks="sst2", seeds="42", lora_lr="1e-4", full_lr="1e-5",
                     overrides=[f"data.data_dir={sst2_dir}", "lora.use_dora=true"],
                     results_dir=str(tmp_path))  # fmt: skip
    lora_point, full_point = plan.points()
    assert lora_point["lora"] == {"r": 8, "alpha": 16.0, "target": "standard"}
    assert full_point["lora"] == {}
    # The legacy suffix, then the settings beyond r, alpha and target (plain sweeps' names,
    # and so existing results' run directories, stay as they were).
    assert lora_point["key"].endswith("-lr0.0001-s42-r8-a16-standard-dora")
    assert lora_point["key"].removesuffix("-dora").endswith(legacy_suffix(lora_point["lora"]))
    assert full_point["key"].endswith("-lr1e-05-s42")  # full fine-tuning has no LoRA settings
    plain = make_plan(tasks="sst2", seeds="42", lora_lr="1e-4", full_lr="1e-5",
                      overrides=[f"data.data_dir={sst2_dir}"], results_dir=str(tmp_path))  # fmt: skip
    assert [p["key"] for p in plain.points()] == [
        lora_point["key"].removesuffix("-dora"),
        full_point["key"],
    ]
    cfg = plan.config_for(lora_point)
    assert cfg.lora.use_dora is True and cfg.lora.r == 8  # the rest of the section from the base
    # A task's own settings name its points alone.
    per_task = make_plan(tasks="sst2,mrpc", seeds="42", methods="lora", lora_lr="1e-4",
                         overrides=["sst2:lora.dropout=0.1"], results_dir=str(tmp_path))  # fmt: skip
    suffixes = [p["key"].split("-s42")[1] for p in per_task.points()]
    assert suffixes == ["-r8-a16-standard-d0.1", "-r8-a16-standard"]


def test_a_file_task_is_named_by_its_file_in_the_figures(tmp_path):
    """A custom task's reference is a path: the figures name it by its file, so a long path
    cannot squeeze the axes to nothing."""
    ref = "csv:" + "/a-rather-long-folder-name" * 6 + "/moods.csv?label=mood&metric=matthews"
    for name, method, lr in (("lora", "lora", 3e-4), ("full", "full", 3e-5)):
        data = summary(1, 0.8, method=method, lr=lr)
        data["task"] = data["identity"]["data"]["task"] = ref
        write(tmp_path, name, data)
    cells, comps = aggregate(load_runs(tmp_path))
    fig = plots.lora_vs_full_figure(comps)
    (ax,) = fig.axes
    assert [t.get_text().splitlines()[0] for t in ax.get_xticklabels()] == ["moods (accuracy)"]
