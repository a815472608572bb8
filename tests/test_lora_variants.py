"""LoRA variants (issue 17, item 3): each statistic of the adapter analysis against a dense ΔW
computed from the model's weights (merged minus base); PiSSA/OLoRA adapters that reload onto the
pretrained base; LoRA+ learning rates.

(Named test_lora_variants.py: tests/study/test_variants.py tests the study's variant names.)
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf
from conftest import write_sst2
from test_lora import tiny_llama  # the same random tiny Llama (seed 0)

from loralab import analysis as an
from loralab.analysis.sections import module_report
from loralab.config import build_config
from loralab.lora import apply_lora


def wrapped(*overrides):
    """tiny Llama with q/v adapters of rank 4 whose update is far from zero."""
    spec = build_config(overrides=["lora.r=4", "lora.alpha=8", *overrides]).lora
    model = apply_lora(spec, tiny_llama(), [])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:  # B = 0 at init would make every check trivial
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif ".lora_A." in name:  # PiSSA: B·A − B₀·A₀ of full rank 2r needs A ≠ A₀ too
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in name:  # DoRA: move the magnitudes off ‖W‖ too
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return model


def dense_updates(model, base) -> dict[str, torch.Tensor]:
    """ΔW per adapted module from the weights: PEFT's merged weight minus the base's, fp64."""
    merged = copy.deepcopy(model).merge_and_unload()
    base_w = dict(base.named_parameters())
    return {
        name.removesuffix(".weight"): p.detach().double() - base_w[name].detach().double()
        for name, p in merged.named_parameters()
        if name.endswith(("q_proj.weight", "v_proj.weight"))
    }


def check_statistics(factors, dense: dict[str, torch.Tensor], atol: float = 1e-5):
    """Every reported statistic equals the one computed from the dense ΔW."""
    modules, _ = module_report(factors)
    assert set(modules) == set(dense)
    for f in factors:
        delta, m = dense[f.name], modules[f.name]
        sv = torch.linalg.svdvals(delta)
        got = torch.tensor(m["singular_values"], dtype=torch.float64)
        k = got.numel()
        torch.testing.assert_close(got, sv[:k], atol=atol, rtol=1e-4)
        assert sv[k:].abs().max() < atol if k < sv.numel() else True  # nothing left out
        assert m["delta_fro_norm"] == pytest.approx(float(delta.norm()), rel=1e-4)
        assert m["delta_spectral_norm"] == pytest.approx(float(sv[0]), rel=1e-4)
        assert m["delta_mean"] == pytest.approx(float(delta.mean()), abs=1e-6)
        assert m["delta_std"] == pytest.approx(float(delta.std(unbiased=False)), rel=1e-3)
        assert m["stable_rank"] == pytest.approx(float((sv**2).sum() / sv[0] ** 2), rel=1e-4)
        assert m["effective_rank"] == pytest.approx(an.effective_rank(sv[:k].float()), rel=1e-4)
        U, _, Vh = torch.linalg.svd(delta)
        r = f.A.shape[0]
        W = f.W.double()
        proj = float(torch.linalg.matrix_norm(U[:, :r].T @ W @ Vh[:r].T))
        assert m["amplification"]["proj_delta"] == pytest.approx(proj, rel=1e-4)
    return modules


def test_plain_lora_statistics_equal_the_dense_update():
    model = wrapped()
    modules = check_statistics(
        an.lora_factors(model, with_base=True), dense_updates(model, tiny_llama())
    )
    assert all(
        m["update"] == "factors" and len(m["singular_values"]) == 4 for m in modules.values()
    )


def test_rslora_scales_by_alpha_over_sqrt_r_and_its_statistics_are_right():
    model = wrapped("lora.use_rslora=true")
    factors = an.lora_factors(model, with_base=True)
    assert all(f.scaling == pytest.approx(8 / 4**0.5) for f in factors)
    check_statistics(factors, dense_updates(model, tiny_llama()))


def test_dora_update_is_dense_and_its_statistics_come_from_the_dense_svd():
    model = wrapped("lora.use_dora=true")
    factors = an.lora_factors(model, with_base=True)
    dense = dense_updates(model, tiny_llama())
    for f in factors:
        assert f.variant == "dora"
        torch.testing.assert_close(f.delta, dense[f.name], atol=1e-6, rtol=1e-5)
    modules = check_statistics(factors, dense)
    for m in modules.values():  # the magnitude rescales W's rows: far more than r directions
        assert m["update"] == "dense" and len(m["singular_values"]) == min(m["shape"])
        assert m["numerical_rank"] > 4
    # The formula itself, PEFT's convention: rows of W + s·B·A rescaled to the magnitude m.
    f, layer = factors[0], model.base_model.model.model.layers[0].self_attn.q_proj
    m = layer.lora_magnitude_vector["default"].weight.double()
    V = f.W.double() + f.scaling * (f.B.double() @ f.A.double())
    torch.testing.assert_close(f.delta, m[:, None] * V / V.norm(dim=1, keepdim=True) - f.W.double())


@pytest.mark.parametrize("init, dora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_residual_init_in_training_is_read_relative_to_the_pretrained_weight(init, dora):
    model = wrapped(f"lora.init_lora_weights={init}", f"lora.use_dora={dora}")
    factors = an.lora_factors(model, with_base=True)
    assert all(f.A.shape[0] == 8 for f in factors)  # [A; A0]: rank 2r
    for f in factors:  # W is the pretrained weight again, not PEFT's residual
        pretrained = dict(tiny_llama().named_parameters())[f"{f.name}.weight"]
        torch.testing.assert_close(f.W, pretrained.float(), atol=1e-5, rtol=0)
    check_statistics(factors, dense_updates(model, tiny_llama()))
    # Without the recorded A0/B0 (a PEFT model made elsewhere) the analysis refuses.
    delattr(model, "loralab_initial_adapter")
    with pytest.raises(an.UnsupportedVariant, match=init):
        an.lora_factors(model)


def _train(tmp_path, *overrides):
    """A few steps of tiny-llama SST-2 through `loralab.train`; returns (result, live model)."""
    from transformers import TrainerCallback

    from loralab.train import train

    kept = {}

    class Keep(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            kept["model"] = model

    cfg = build_config(
        overrides=[
            "model.name=tiny-llama", f"data.data_dir={write_sst2(tmp_path / 'd', 32, 8)}",
            f"run.output_dir={tmp_path / 'runs'}", "train.max_steps=3", "train.batch_size=8",
            "train.lr=1e-2", "train.save_steps=100", *overrides,
        ]
    )  # fmt: skip
    return cfg, train(cfg, quiet=True, callbacks=[Keep()]), kept["model"].eval()


def _logits(model, cfg, hidden: bool = False):
    """Logits (or the last hidden states: a fresh base has a fresh random head) of two texts."""
    from loralab.models import load_tokenizer

    tok = load_tokenizer(cfg.model.name)
    batch = tok(["the film was good", "acting is dull and weak"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=hidden)
    return out.hidden_states[-1] if hidden else out.logits


# pissa_niter_2 is randomised: re-running the decomposition on load (what PEFT does with an
# unconverted adapter) gives another residual, so only the converted adapter reloads exactly.
@pytest.mark.parametrize(
    "init, dora", [("pissa_niter_2", False), ("olora", False), ("pissa", True)]
)
def test_residual_init_adapter_reloads_onto_the_pretrained_base(tmp_path, init, dora, monkeypatch):
    from loralab.cli import main
    from loralab.runs import load_adapter_model, load_base
    from loralab.tasks import get_task

    monkeypatch.setenv("LORALAB_PRECISION", "fp32")
    cfg, result, trained = _train(
        tmp_path, f"lora.init_lora_weights={init}", f"lora.use_dora={dora}"
    )
    run = result.run_dir
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 16 and saved["lora_alpha"] == 32
    card = (run / "adapter" / "README.md").read_text()  # the card states the rank as saved
    assert f"r=16, alpha=32 (trained at r=8, alpha=16 with init {init}" in card
    reloaded = load_adapter_model(cfg, get_task("sst2"), run)
    torch.testing.assert_close(_logits(reloaded, cfg), _logits(trained, cfg), atol=1e-5, rtol=0)

    # The frozen-base check: the residual is unchanged by training, and it says what it is.
    ver = result.summary["verification"]
    assert ver["base_unchanged"] and ver["base_residual"]["init"] == init
    assert ver["base_residual"]["reconstruction_max_abs_error"] < 1e-5
    # With the adapter disabled the reloaded model is the pretrained base again.
    base = load_base(cfg, get_task("sst2"))
    with reloaded.disable_adapter():
        torch.testing.assert_close(_logits(reloaded, cfg, True), _logits(base, cfg, True))

    # The analysis: the same statistics live (A0/B0 recorded) and reloaded, equal to the dense
    # ΔW = merged - pretrained base.
    live = an.lora_factors(trained, with_base=True)
    loaded = an.lora_factors(reloaded, with_base=True)
    dense = dense_updates(reloaded, base)
    check_statistics(loaded, dense, atol=1e-5)
    check_statistics(live, dense, atol=1e-5)

    # Merge equivalence (merged logits vs adapter logits) and analyze both pass.
    assert (
        main(["merge", str(run), "--dtype", "fp32", "--no-benchmark", "--no-export", "--quiet"])
        == 0
    )
    assert main(["analyze", str(run), "--probe", "4"]) == 0
    data = json.loads((run / "analysis" / "analysis.json").read_text())
    assert data["lora"]["r"] == 16 and "B₀" in data["lora"]["update"]


def test_loraplus_gives_b_the_larger_learning_rate(tmp_path):
    from loralab.trainer import LoralabTrainer

    def first_step(ratio):
        model = wrapped()
        args = tf.TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3,
                                    weight_decay=0.0, report_to="none", use_cpu=True)  # fmt: skip
        trainer = LoralabTrainer(model=model, args=args, loraplus_lr_ratio=ratio)
        opt = trainer.create_optimizer()
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()
                 if n in before}  # fmt: skip
        return opt, moved

    opt, moved = first_step(16.0)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([1e-3, 16e-3])
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # the logged rate is the base one
    assert sum(len(g["params"]) for g in opt.param_groups) == len(moved)  # every trainable one
    # Adam's first step moves each weight by ~lr: B by 16 × the plain run's, A by the base rate.
    _, plain = first_step(None)
    for name, step in moved.items():
        want = 16e-3 if ".lora_B." in name else 1e-3
        assert step == pytest.approx(want, rel=1e-3), name
        assert plain[name] == pytest.approx(1e-3, rel=1e-3), name


def test_loraplus_run_records_the_ratio_and_keys_its_identity(tmp_path):
    _, result, _ = _train(tmp_path, "lora.loraplus_lr_ratio=16")
    assert result.summary["lora"]["loraplus_lr_ratio"] == 16.0
    assert result.summary["identity"]["lora"]["loraplus_lr_ratio"] == 16.0
    _, plain, _ = _train(tmp_path / "plain")
    # Off (None): left out of the identity, so runs from before LoRA+ keep theirs.
    assert "loraplus_lr_ratio" not in plain.summary["identity"]["lora"]
    assert plain.summary["lora"]["loraplus_lr_ratio"] is None


def test_variants_spec_is_one_ablation_with_readable_names(tmp_path):
    from pathlib import Path

    from loralab.study.phases import ablation_variants
    from loralab.study.spec import load_spec
    from loralab.study.variants import lora_slug, variant_slug

    spec = load_spec(Path(__file__).parents[1] / "configs" / "studies" / "smollm2-variants.yaml")
    (abl,) = spec.ablations
    assert abl.key == "lora" and abl.name == "variants"
    assert spec.seeds == [42] and abl.seeds == [42, 1337, 2024, 7, 123]  # v2: the axis on 5 seeds
    variants = ablation_variants(spec, "sst2", abl)
    assert variants == [{}, {"use_dora": True}, {"use_rslora": True},
                        {"init_lora_weights": "pissa"}, {"loraplus_lr_ratio": 16.0}]  # fmt: skip
    assert [variant_slug(v) for v in variants] == [
        "", "-dora", "-rslora", "-init-pissa", "-lora+16",
    ]  # fmt: skip
    base = {"r": 8, "alpha": 16.0}
    assert [lora_slug({**base, **v}) for v in variants] == [
        "r=8 α=16", "r=8 α=16 dora", "r=8 α=16 rslora", "r=8 α=16 init=pissa", "r=8 α=16 lora+16",
    ]  # fmt: skip
    # A summary from before LoRA+ (no such key) is the plain variant.
    assert lora_slug({**base, "loraplus_lr_ratio": None}) == lora_slug(base)


@pytest.mark.parametrize(
    "entry, needle",
    [
        ({"lora": [{}, {"use_dora": "maybe"}]}, "use_dora"),
        ({"lora": [{"loraplus_lr_ratio": -1}]}, "loraplus_lr_ratio must be a positive"),
        ({"lora": [16]}, "must list variants as mappings"),
    ],
)
def test_a_bad_variant_in_a_spec_is_a_user_error(tmp_path, entry, needle):
    import yaml

    from loralab.errors import LoralabError
    from loralab.study.spec import load_spec

    spec = {"name": "v", "base": {"model": {"name": "tiny-llama"}}, "tasks": {"sst2": {}},
            "methods": ["lora"], "lr": {"lora": [1e-3]}, "seeds": [1], "ablations": [entry]}  # fmt: skip
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(LoralabError, match=needle):
        load_spec(path)


def test_pissa_with_loraplus_resumes_to_the_same_adapter(tmp_path, monkeypatch):
    """A resumed run re-derives the residual and A0/B0 when it wraps the model again, and the
    LoRA+ optimizer's groups load from the checkpoint: the same converted adapter, bit for bit."""
    import shutil

    from safetensors.torch import load_file

    from loralab.rundir import CHECKPOINT_DIR
    from loralab.train import train

    monkeypatch.setenv("LORALAB_PRECISION", "fp32")
    extra = [
        "lora.init_lora_weights=pissa_niter_2",
        "lora.loraplus_lr_ratio=4",
        "train.max_steps=4",
    ]
    cfg, full, _ = _train(tmp_path, *extra, "train.save_steps=2", "train.lr=1e-3")
    resumed = tmp_path / "resumed"
    shutil.copytree(full.run_dir, resumed)
    shutil.rmtree(resumed / "adapter")
    shutil.rmtree(resumed / CHECKPOINT_DIR / "checkpoint-4")
    train(cfg, resume=resumed, checkpoint=resumed / CHECKPOINT_DIR / "checkpoint-2", quiet=True)
    a = load_file(full.run_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(".lora_B." in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
