"""Inside the adapters: spectra, subspace similarity, amplification, CKA, `loralab analyze`."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import write_sst2

from loralab import analysis as an
from loralab.analyze import format_summary
from loralab.cli import main


def _planted(out=48, inp=40, r=8, k=3, seed=0):
    """A, B with rank(B A) = k: only k of the r rank-one terms are non-zero."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, inp, generator=g)
    B = torch.randn(out, r, generator=g)
    B[:, k:] = 0
    return A, B


def _orthonormal(d, k, g):
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


# ---------------------------------------------------------------------------------------------
# Spectra and ranks


def test_factor_singular_values_equal_dense_svd():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(6, 50, generator=g), torch.randn(70, 6, generator=g)
    dense = torch.linalg.svdvals(2.5 * B.double() @ A.double())[:6]
    torch.testing.assert_close(
        an.delta_singular_values(A, B, 2.5).double(), dense, rtol=1e-5, atol=1e-6
    )
    U, S, V = an.delta_svd(A, B, 2.5)
    torch.testing.assert_close(U @ torch.diag(S) @ V.T, 2.5 * B.double() @ A.double())
    torch.testing.assert_close(U.T @ U, torch.eye(6, dtype=torch.float64))


def test_planted_rank_is_recovered():
    A, B = _planted(k=3)
    sv = an.delta_singular_values(A, B, 2.0)
    assert an.numerical_rank(sv) == 3
    assert an.numerical_rank(sv) == int(torch.linalg.matrix_rank(B @ A))
    assert 1.0 < an.effective_rank(sv) <= 3.0 + 1e-5
    # Equal singular values: effective rank is exactly k, utilisation k / r.
    Q = torch.linalg.qr(torch.randn(40, 8, generator=torch.Generator().manual_seed(2)))[0]
    A_eq, B_eq = Q.T.clone(), torch.zeros(48, 8)
    B_eq[:3, :3] = torch.eye(3)
    stats = an.module_stats(an.LoraFactors("layers.0.q_proj", A_eq, B_eq, 1.0))
    assert stats["effective_rank"] == pytest.approx(3.0, abs=1e-5)
    assert stats["rank_utilisation"] == pytest.approx(3 / 8, abs=1e-5)
    assert stats["stable_rank"] == pytest.approx(3.0, abs=1e-5)
    assert stats["numerical_rank"] == 3


def test_module_stats_match_dense_delta():
    A, B = _planted(k=8, seed=3)
    f = an.LoraFactors("x", A, B, 0.5)
    dense = 0.5 * B.double() @ A.double()
    s = an.module_stats(f)
    assert s["delta_fro_norm"] == pytest.approx(float(dense.norm()), rel=1e-5)
    assert s["delta_spectral_norm"] == pytest.approx(
        float(torch.linalg.matrix_norm(dense, 2)), rel=1e-5
    )
    assert s["delta_mean"] == pytest.approx(float(dense.mean()), abs=1e-6)
    assert s["delta_std"] == pytest.approx(float(dense.std(unbiased=False)), rel=1e-4)


def test_module_kind_and_layer():
    assert an.module_kind("model.layers.3.self_attn.v_proj") == "v"
    assert an.module_layer("model.layers.3.self_attn.v_proj") == 3
    assert an.module_layer("bert.encoder.layer.11.attention.self.query") == 11
    assert an.module_layer("transformer.h.0.attn.c_attn") == 0
    assert an.module_layer("score") is None


# ---------------------------------------------------------------------------------------------
# Subspace similarity


def test_similarity_of_an_adapter_with_itself_is_one_on_the_diagonal():
    A = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    phi = an.adapter_similarity(A, A)
    assert phi.shape == (8, 8)
    torch.testing.assert_close(torch.diagonal(phi), torch.ones(8, dtype=torch.float64))
    assert float(phi.min()) >= 0 and float(phi.max()) <= 1 + 1e-9
    # A lower-rank copy of the same top directions is contained: φ = 1 up to the smaller rank.
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    phi4 = an.adapter_similarity(A, Vh[:4] * S[:4, None])
    torch.testing.assert_close(phi4, torch.ones(8, 4, dtype=torch.float64))


def test_output_similarity_sees_the_learned_directions_of_b():
    g = torch.Generator().manual_seed(8)
    A1, A2 = torch.randn(4, 32, generator=g), torch.randn(6, 32, generator=g)
    B1 = torch.randn(20, 4, generator=g)
    B2 = torch.cat([B1, torch.randn(20, 2, generator=g)], 1)  # column space of B2 ⊇ that of B1
    phi = an.output_similarity(A1, B1, A2, B2)
    assert phi.shape == (4, 6)
    assert float(phi[3, 5]) == pytest.approx(1.0)  # ΔW1's 4 output directions lie in ΔW2's 6
    torch.testing.assert_close(
        torch.diagonal(an.output_similarity(A1, B1, A1, B1)), torch.ones(4, dtype=torch.float64)
    )


def test_similarity_of_random_subspaces_matches_its_expectation():
    d, r1, r2, trials = 64, 8, 6, 400
    g = torch.Generator().manual_seed(5)
    mean = (
        sum(
            an.subspace_similarity(_orthonormal(d, r1, g), _orthonormal(d, r2, g))
            for _ in range(trials)
        )
        / trials
    )
    i = torch.arange(1, r1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, r2 + 1, dtype=torch.float64)[None, :]
    expected = i * j / (d * torch.minimum(i, j))
    torch.testing.assert_close(mean, expected, rtol=0.1, atol=0.004)


def test_orthogonal_subspaces_have_zero_similarity():
    eye = torch.eye(10, dtype=torch.float64)
    assert float(an.subspace_similarity(eye[:, :3], eye[:, 3:7]).abs().max()) == 0.0


# ---------------------------------------------------------------------------------------------
# Amplification


def test_amplification_on_a_constructed_case():
    W = torch.arange(36, dtype=torch.float64).reshape(6, 6) / 10
    # ΔW = s·B·A acts only on inputs e1, e2 and outputs e3, e4, with singular values 3 and 2.
    A = torch.zeros(2, 6)
    A[0, 1], A[1, 2] = 1.5, 1.0
    B = torch.zeros(6, 2)
    B[3, 0], B[4, 1] = 1.0, 1.0
    out = an.amplification(W, A, B, scaling=2.0)
    hand_proj = float(W[3:5, 1:3].norm())  # ‖Uᵀ W V‖_F: rows {3, 4}, columns {1, 2} of W
    assert out["delta_fro_norm"] == pytest.approx(math.sqrt(3.0**2 + 2.0**2))
    assert out["proj_delta"] == pytest.approx(hand_proj)
    assert out["amplification"] == pytest.approx(math.sqrt(13.0) / hand_proj)
    top2 = torch.linalg.svdvals(W)[:2]
    assert out["proj_top"] == pytest.approx(float(top2.norm()))
    assert 0 < out["proj_random"] < out["proj_top"]


def test_amplification_of_a_zero_projection_is_infinite():
    W = torch.zeros(4, 4)
    W[0, 0] = 1.0
    A = torch.zeros(1, 4)
    A[0, 3] = 1.0
    B = torch.zeros(4, 1)
    B[2, 0] = 1.0
    assert math.isinf(an.amplification(W, A, B)["amplification"])


# ---------------------------------------------------------------------------------------------
# CKA


def test_cka_identity_and_invariances():
    g = torch.Generator().manual_seed(6)
    X = torch.randn(40, 16, generator=g, dtype=torch.float64)
    Q = _orthonormal(16, 16, g)
    assert an.linear_cka(X, X) == pytest.approx(1.0)
    assert an.linear_cka(X, 3.7 * X @ Q) == pytest.approx(1.0)
    assert an.linear_cka(X, X + 5.0) == pytest.approx(1.0)  # centring removes offsets
    assert an.linear_cka(X, 0.2 * X @ Q + 1.0) == pytest.approx(1.0)
    # Not invariant to an anisotropic scaling, and small for unrelated representations.
    scale = torch.ones(16, dtype=torch.float64)
    scale[:2] = 20
    assert an.linear_cka(X, X * scale) < 0.9
    assert an.linear_cka(X, torch.randn(40, 16, generator=g, dtype=torch.float64)) < 0.6


def test_median_cosine_ignores_a_few_high_norm_examples_that_dominate_cka():
    g = torch.Generator().manual_seed(9)
    X = torch.randn(2, 50, 16, generator=g, dtype=torch.float64)  # [layers, n, d]
    Y = X.clone()
    Y[1, 0] *= -40.0  # one example flips and blows up in layer 1
    cos = an.median_cosine_per_layer(X, Y)
    assert cos[0] == pytest.approx(1.0) and cos[1] == pytest.approx(1.0)
    cka = an.cka_per_layer(X, Y)
    assert cka[0] == pytest.approx(1.0) and cka[1] < 0.5


def test_cka_is_symmetric_and_accepts_different_widths():
    g = torch.Generator().manual_seed(7)
    X, Y = torch.randn(30, 8, generator=g), torch.randn(30, 20, generator=g)
    assert an.linear_cka(X, Y) == pytest.approx(an.linear_cka(Y, X))


# ---------------------------------------------------------------------------------------------
# `loralab analyze` on tiny trained runs


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
    fails(tmp_path, needle="not a loralab run directory")
    fails(runs["r4"], "--probe", 1000, needle="--probe 1000 is out of range")
    fails(runs["r8"], "--compare", runs["r4"], "--layer", 7, needle="--layer 7 has no adapted")

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

    from loralab.analyze import _probe_batches
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
    batch = _probe_batches(cfg, task, task.load("eval", str(data)).select(range(2)), tok, True)[0]
    text = tok.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert "Review: " in text and text.rstrip().endswith("Sentiment:"), text


@pytest.mark.parametrize(
    "overrides, word",
    [(["lora.use_dora=true"], "DoRA"), (["lora.init_lora_weights=pissa"], "pissa")],
)
def test_variants_the_analysis_cannot_describe_are_refused(tmp_path, overrides, word):
    """DoRA's magnitude and PiSSA's residual base make s·B·A the wrong update: refuse, exit 2."""
    from conftest import write_sst2

    from loralab import analysis
    from loralab.cli import main
    from loralab.config import build_config
    from loralab.train import train

    cfg = build_config(
        overrides=[
            "model.name=tiny-llama", f"data.data_dir={write_sst2(tmp_path / 'd')}",
            f"run.output_dir={tmp_path / 'runs'}", "train.max_steps=2", "train.batch_size=8",
            *overrides,
        ]
    )  # fmt: skip
    result = train(cfg, quiet=True)
    assert result.summary["status"] == "completed"
    # The live statistics were skipped, not wrong: no lora_adapters/* record was written.
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert not any("lora_adapters/" in line for line in lines)
    assert main(["analyze", str(result.run_dir)]) == 2
    assert not (result.run_dir / "analysis").exists()
    from loralab.runs import load_adapter_model
    from loralab.tasks import get_task

    model = load_adapter_model(cfg, get_task("sst2"), result.run_dir)
    with pytest.raises(analysis.UnsupportedVariant, match=word):
        analysis.lora_factors(model)
    assert analysis.lora_factors(model, check_variant=False)  # structural use still works
