"""`loralab analyze` on tiny trained runs: JSON, plots, hidden states, errors, refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import write_sst2

from loralab.analysis.sections import format_summary
from loralab.cli import main


def _train(tmp, data_dir, name, *overrides):
    from loralab.config import build_config
    from loralab.train import train

    cfg = build_config(
        overrides=[
            "model.name=tiny-llama",
            f"data.data_dir={data_dir}",
            "train.max_steps=4",
            "train.batch_size=8",
            "train.lr=1e-2",
            "train.save_steps=100",
            f"run.output_dir={tmp}",
            f"run.name={name}",
            *overrides,
        ]  # fmt: skip
    )
    return train(cfg, quiet=True).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analyze")
    data = write_sst2(tmp / "sst2", n_train=32, n_dev=24)
    return {
        "data": data,
        "r4": _train(tmp, data, "r4", "lora.r=4", "lora.alpha=8", "train.seed=1"),
        "r8": _train(tmp, data, "r8", "lora.r=8", "lora.alpha=16", "train.seed=2"),
    }


def _valid_png(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].var()) > 1e-3, f"{path.name} is blank"


def test_analyze_compare_writes_json_plots_and_hidden_states(runs, capsys):
    from safetensors.torch import load_file

    assert main(["analyze", str(runs["r8"]), "--compare", str(runs["r4"]), "--probe", "16"]) == 0
    out = capsys.readouterr().out
    assert "rank utilisation" in out and "φ(1,1)" in out and "CKA" in out
    folder = runs["r8"] / "analysis"
    data = json.loads((folder / "analysis.json").read_text())
    assert data["lora"]["r"] == 8 and data["compare"]["lora"]["r"] == 4
    names = list(data["modules"])
    assert len(names) == 4 and {data["modules"][n]["kind"] for n in names} == {
        "q",
        "v",
    }  # 2 layers × q, v
    m = data["modules"][names[0]]
    assert len(m["singular_values"]) == 8 and 0 < m["rank_utilisation"] <= 1
    assert m["amplification"]["amplification"] > 0
    sim = data["compare"]["similarity"][names[0]]
    assert len(sim["phi"]) == 8 and len(sim["phi"][0]) == 4 and 0 <= sim["phi_top1"] <= 1
    assert len(sim["phi_out"]) == 8 and 0 <= sim["phi_out_top1"] <= 1
    for name in names:  # the summary numbers are read off each module's φ matrix
        s = data["compare"]["similarity"][name]
        assert s["phi_top1"] == s["phi"][0][0] and s["phi_out_top1"] == s["phi_out"][0][0]
        assert s["phi_diag"] == [s["phi"][i][i] for i in range(4)]  # min(r1, r2) = 4 entries
    # φ at the smaller rank: per kind, the mean of each module's last diagonal entry.
    for kind, means in data["compare"]["similarity_by_kind"].items():
        last = [s["phi_diag"][-1] for n, s in data["compare"]["similarity"].items()
                if s["kind"] == kind]  # fmt: skip
        assert len(last) == 2 and means["phi_min_rank"] == pytest.approx(sum(last) / 2)
        assert means["phi_min_rank"] != pytest.approx(means["phi_top1"])
    assert data["compare"]["heatmap_layer"] == 1 and len(data["compare"]["heatmap_modules"]) == 2
    cka = data["representations"]["cka"]
    assert set(cka) == {"base_vs_adapted", "base_vs_compare", "adapted_vs_compare"}
    assert set(data["representations"]["cosine_median"]) == set(cka)
    assert len(cka["base_vs_adapted"]["mean"]) == 3  # embeddings + 2 layers
    assert cka["base_vs_adapted"]["mean"][0] == pytest.approx(1.0)  # LoRA leaves embeddings alone
    for f in data["files"]:
        assert (folder / f).is_file(), f
        if f.endswith(".png"):
            _valid_png(folder / f)
    assert "similarity_layer1.png" in data["files"]
    assert "CKA" in format_summary(data)  # the summary also works from the JSON on disk
    hidden = load_file(folder / "hidden_states.safetensors")
    assert hidden["base.mean"].shape == (3, 16, 64) and hidden["compare.token"].shape == (3, 16, 64)
    assert not torch.equal(hidden["base.mean"][-1], hidden["adapted.mean"][-1])
    # The compared run's states are its own (another adapter), not the analysed run's again.
    for pool in ("mean", "token"):
        assert not torch.equal(hidden[f"compare.{pool}"][-1], hidden[f"adapted.{pool}"][-1])
        assert not torch.equal(hidden[f"compare.{pool}"][-1], hidden[f"base.{pool}"][-1])
    assert torch.equal(hidden["compare.mean"][0], hidden["base.mean"][0])  # same embeddings

    # Without --compare the folder is replaced: no stale heat-map survives.
    assert main(["analyze", str(runs["r8"]), "--probe", "8"]) == 0
    data = json.loads((folder / "analysis.json").read_text())
    assert data["compare"] is None and not list(folder.glob("similarity*"))


def test_analyze_bad_inputs_exit_2(runs, tmp_path, capsys):
    def fails(*argv, needle):
        assert main(["analyze", *map(str, argv)]) == 2
        err = capsys.readouterr().err
        assert needle in err, err

    no_adapter = tmp_path / "no-adapter"
    no_adapter.mkdir()
    shutil.copy(runs["r4"] / "config.yaml", no_adapter / "config.yaml")
    fails(no_adapter, needle="has no saved adapter")
    # A finished run copied without its adapter: resuming it would do nothing, so no such advice.
    shutil.copy(runs["r4"] / "summary.json", no_adapter / "summary.json")
    assert main(["analyze", str(no_adapter)]) == 2
    err = capsys.readouterr().err
    assert "run status: completed): the run finished, so the folder was moved" in err
    assert "--resume" not in err
    # One still training (its lock held): wait for it, not resume it (resume would refuse).
    from loralab.rundir import hold_run_lock

    (no_adapter / "summary.json").unlink()
    lock = hold_run_lock(no_adapter)
    try:
        fails(no_adapter, needle="it is still training (another process holds its lock)")
    finally:
        lock.close()
    fails(no_adapter, needle="finish the run with `loralab train --resume")  # lock released
    fails(tmp_path, needle="not a loralab run directory")
    fails(runs["r4"], "--probe", 1000, needle="--probe 1000 is out of range")
    fails(runs["r8"], "--compare", runs["r4"], "--layer", 7, needle="--layer 7 has no adapted")
    fails(runs["r8"], "--layer", 0, needle="--layer 0 picks the layer of the similarity heat-maps")

    other_model = tmp_path / "bert"
    shutil.copytree(
        runs["r4"], other_model, ignore=shutil.ignore_patterns("checkpoints", "analysis")
    )
    cfg = (other_model / "config.yaml").read_text()
    (other_model / "config.yaml").write_text(cfg.replace("tiny-llama", "tiny-bert"))
    fails(runs["r8"], "--compare", other_model, needle="different base models")

    ext = _train(tmp_path, runs["data"], "ext", "lora.target=extended", "train.max_steps=1")
    fails(runs["r8"], "--compare", ext, needle="different modules")


def test_analyze_lm_head_run_probes_with_its_prompts(tmp_path, capsys):
    from safetensors.torch import load_file

    from loralab.analysis.analyze import probe_batches
    from loralab.config import from_dict, load_yaml
    from loralab.models import load_tokenizer
    from loralab.tasks import get_task

    data = write_sst2(tmp_path / "sst2", n_train=32, n_dev=24)
    run = _train(tmp_path, data, "lm", "model.head=lm")
    assert main(["analyze", str(run), "--probe", "8"]) == 0
    result = json.loads((run / "analysis" / "analysis.json").read_text())
    assert len(result["modules"]) == 4 and result["representations"]["cka"]
    hidden = load_file(run / "analysis" / "hidden_states.safetensors")
    assert hidden["base.mean"].shape[1] == 8
    # The probe inputs are the prompts the LM was trained on, not bare sentences.
    cfg = from_dict(load_yaml(run / "config.yaml"))
    tok = load_tokenizer("tiny-llama")
    task = get_task("sst2")
    batch = probe_batches(cfg, task, task.load("eval", str(data)).select(range(2)), tok, True)[0]
    text = tok.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert "Review: " in text and text.rstrip().endswith("Sentiment:"), text


def test_dora_and_pissa_runs_are_analysed_and_an_unconverted_pissa_adapter_is_refused(tmp_path):
    """DoRA: dense ΔW statistics, live and in analyze. PiSSA: the converted adapter is analysed;
    one saved unconverted (its config still says pissa) is refused, exit 2, nothing written."""
    from loralab.cli import main

    data = write_sst2(tmp_path / "d")
    dora = _train(tmp_path / "runs", data, "dora", "lora.use_dora=true")
    lines = (dora / "metrics.jsonl").read_text().splitlines()
    assert any("lora_adapters/" in line for line in lines)  # live statistics, from the dense ΔW
    assert main(["analyze", str(dora), "--probe", "4"]) == 0
    data_dora = json.loads((dora / "analysis" / "analysis.json").read_text())
    assert data_dora["lora"]["variant"] == "dora" and "dense" in data_dora["lora"]["update"]
    assert all(m["update"] == "dense" for m in data_dora["modules"].values())

    pissa = _train(tmp_path / "runs", data, "pissa", "lora.init_lora_weights=pissa")
    assert main(["analyze", str(pissa), "--probe", "4"]) == 0
    assert json.loads((pissa / "analysis" / "analysis.json").read_text())["lora"]["r"] == 16
    shutil.rmtree(pissa / "analysis")
    config = pissa / "adapter" / "adapter_config.json"
    config.write_text(
        config.read_text().replace('"init_lora_weights": true', '"init_lora_weights": "pissa"')
    )
    assert main(["analyze", str(pissa)]) == 2
    assert not (pissa / "analysis").exists()
