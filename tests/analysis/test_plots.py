"""analysis/ plots: what their axes show."""

from __future__ import annotations

from loralab.analysis import plots


def _modules(utilisation: list[float]) -> dict:
    return {
        f"model.layers.{i}.self_attn.q_proj": {
            "layer": i,
            "r": 8,
            "rank_utilisation": u,
            "stable_rank": 1.0,
            "amplification": {"amplification": 2.0},
        }  # fmt: skip
        for i, u in enumerate(utilisation)
    }


def test_rank_utilisation_axis_reaches_dora_values_past_one(tmp_path, monkeypatch):
    """DoRA's dense ΔW can use more than r directions; the axis stopped at 1.05 and cut them off."""
    made = []
    real = plots._figure
    monkeypatch.setattr(plots, "_figure", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    plots.plot_layers(tmp_path / "plain.png", _modules([0.4, 0.7]))
    plots.plot_layers(tmp_path / "dora.png", _modules([0.5, 0.9]), other=_modules([3.0, 1.0]))
    assert (tmp_path / "plain.png").is_file() and (tmp_path / "dora.png").is_file()
    assert made[0][1][0].get_ylim() == (0.0, 1.05)
    assert made[1][1][0].get_ylim()[1] >= 3.0


def test_each_plot_names_its_model_and_caveat(tmp_path, monkeypatch):
    """SPEC §2: SmolLM2's dequantised weights are said wherever results are shown; an analysis
    PNG named neither the model nor that."""
    from loralab.models.registry import caveat

    made = []
    real = plots._figure
    monkeypatch.setattr(plots, "_figure", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    plots.plot_layers(tmp_path / "s.png", _modules([0.4, 0.7]), model="smollm2-135m")
    plots.plot_layers(tmp_path / "t.png", _modules([0.4, 0.7]), model="tiny-llama")
    foot = [" ".join(fig.get_supxlabel().split()) for fig, _ in made]
    assert foot[0] == caveat("smollm2-135m") and "dequantised" in foot[0]
    assert foot[1] == "model: tiny-llama"  # no caveat: the model's name alone
