"""A built-in model's caveat (the SmolLM2 weights are a dequantised 4-bit GGUF) is said
wherever its results are shown: train, merge, analyze, validate and report, on screen, in JSON
and in the report's figures."""

from __future__ import annotations

import json
from dataclasses import replace

from loralab import models
from loralab.cli import main

CAVEAT = "weights invented for this test"


def test_every_command_that_shows_results_names_the_caveat(tmp_path, sst2_dir, monkeypatch, capsys):
    llama = models.BUILTIN_MODELS["tiny-llama"]
    monkeypatch.setitem(models.BUILTIN_MODELS, "tiny-llama", replace(llama, caveat=CAVEAT))
    said = f"tiny-llama: {CAVEAT}"
    assert models.caveat("tiny-llama") == said and models.caveat("tiny-bert") is None

    train = ["train", "--task", "sst2", "--model", "tiny-llama", "--data-dir", str(sst2_dir),
             "--output-dir", str(tmp_path), "--quiet", "train.max_steps=4", "run.name=r",
             "train.batch_size=8", "train.lr=1e-2"]  # fmt: skip
    assert main(train) == 0
    assert f"({said})" in capsys.readouterr().out
    run = tmp_path / "r"

    assert main(["merge", str(run), "--dtype", "fp32", "--no-benchmark", "--no-export"]) == 0
    assert f"({said})" in capsys.readouterr().out
    merged = json.loads((run / "merge" / "merge.json").read_text())
    assert merged["model_source"]["description"] == llama.description

    assert main(["analyze", str(run), "--probe", "4"]) == 0
    assert f"({said})" in capsys.readouterr().out
    analysed = json.loads((run / "analysis" / "analysis.json").read_text())
    assert analysed["model_source"]["id"] == "tiny-llama"

    out = tmp_path / "validate.json"
    assert main(["validate", "--model", "tiny-llama", "--out", str(out)]) == 0
    assert said in capsys.readouterr().out.replace("\n", " ")
    assert json.loads(out.read_text())["model_source"]["kind"] == "builtin"


def test_the_report_says_the_caveat_on_screen_and_in_its_figures(tmp_path, sst2_dir, monkeypatch, capsys):  # fmt: skip
    from matplotlib.figure import Figure

    llama = models.BUILTIN_MODELS["tiny-llama"]
    monkeypatch.setitem(models.BUILTIN_MODELS, "tiny-llama", replace(llama, caveat=CAVEAT))
    base = ["train", "--task", "sst2", "--model", "tiny-llama", "--data-dir", str(sst2_dir),
            "--output-dir", str(tmp_path / "runs"), "--quiet", "train.max_steps=2",
            "train.batch_size=8"]  # fmt: skip
    assert main([*base, "run.name=l", "train.lr=1e-3"]) == 0
    assert main([*base, "run.name=f", "--method", "full", "train.lr=1e-3"]) == 0
    legends = {}
    save = Figure.savefig

    def savefig(fig, path, *a, **k):
        legends[path.name] = [lg.get_title().get_text() for lg in fig.legends]
        return save(fig, path, *a, **k)

    monkeypatch.setattr(Figure, "savefig", savefig)
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 0
    assert f"(tiny-llama: {CAVEAT})" in capsys.readouterr().out
    assert legends["lora_vs_full.png"] == [f"tiny-llama: {CAVEAT}"]
    assert legends["paired_differences.png"] == [f"tiny-llama: {CAVEAT}"]
    # A model without a caveat gets none.
    monkeypatch.setitem(models.BUILTIN_MODELS, "tiny-llama", llama)
    assert main(["report", str(tmp_path)]) == 0
    assert "(tiny-llama" not in capsys.readouterr().out and legends["lora_vs_full.png"] == [""]


def test_a_figure_without_a_legend_carries_the_caveat_under_its_panels(monkeypatch):
    from matplotlib.figure import Figure

    from loralab.study import plots

    llama = models.BUILTIN_MODELS["tiny-llama"]
    monkeypatch.setitem(models.BUILTIN_MODELS, "tiny-llama", replace(llama, caveat=CAVEAT))
    bare, labelled = Figure(), Figure()
    bare.add_subplot().plot([0, 1])
    labelled.add_subplot().plot([0, 1], label="LoRA")
    labelled.legend()
    for fig in (bare, labelled):
        plots.add_caveats(fig, {"tiny-llama", "tiny-bert"})  # tiny-bert has no caveat
    assert bare._supxlabel.get_text() == f"tiny-llama: {CAVEAT}"
    assert labelled.legends[0].get_title().get_text() == f"tiny-llama: {CAVEAT}"
    assert labelled._supxlabel is None
