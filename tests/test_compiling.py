"""Regional compilation (loralab.compiling): which blocks, when `auto` compiles, and that the
compiled layers compute what the eager ones do."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from loralab import compiling, kernels
from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.models import load_tokenizer
from loralab.tasks import get_task
from loralab.train import build_model, train


def _model(name: str = "tiny-llama", *overrides: str):
    cfg = build_config(
        overrides=[f"model.name={name}", "train.precision=fp32", "lora.dropout=0.0", *overrides]
    )
    torch.manual_seed(0)
    return build_model(cfg, get_task("sst2"), load_tokenizer(name), progress=False).model


@pytest.mark.parametrize("name, layers", [("tiny-llama", "layers"), ("tiny-bert", "layer")])
def test_repeated_blocks_are_the_models_layers(name, layers):
    model = _model(name)
    stack = next(m for n, m in model.named_modules() if n.endswith(layers))
    blocks = compiling.repeated_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers == 2
    assert all(a is b for a, b in zip(blocks, stack, strict=True))
    assert compiling.repeated_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) == []
    mixed = nn.Module()
    mixed.parts = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])  # not one kind: not layers
    assert compiling.repeated_blocks(mixed) == []


def test_auto_compiles_long_runs_and_shorter_ones_once_warm(tmp_path, monkeypatch):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))
    key = compiling.signature("smollm2-135m", "lora", "bf16", "eager")
    cold, warm = compiling.MIN_STEPS_COLD, compiling.MIN_STEPS_WARM
    assert compiling.decide("auto", cold - 1, key)["compile"] is False
    assert compiling.decide("auto", cold, key)["compile"] is True
    assert compiling.decide("auto", warm, key)["compile"] is False
    compiling.remember(key)
    stored = json.loads((tmp_path / "cache" / compiling.CACHE_FILE).read_text())
    assert key in stored
    assert compiling.decide("auto", warm, key) == {
        "compile": True,
        "reason": f"{warm} steps ≥ {warm} (compiled before on this machine)",
    }
    assert compiling.decide("auto", warm - 1, key)["compile"] is False
    other = compiling.signature("smollm2-135m", "full", "bf16", "eager")
    assert compiling.decide("auto", warm, other)["compile"] is False  # another graph
    assert compiling.decide("auto", cold, key, eager="gradient checkpointing is on") == {
        "compile": False,
        "reason": "gradient checkpointing is on",
    }
    assert compiling.decide(False, 10 * cold, key)["compile"] is False
    assert compiling.decide(True, 1, key) == {"compile": True, "reason": "set in the config"}
    # another inductor cache in use, or the recorded one gone: the marker alone is not warm
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert compiling.decide("auto", warm, key)["compile"] is False
    (tmp_path / "elsewhere").mkdir()  # inductor makes it when it compiles
    compiling.remember(key)
    assert compiling.decide("auto", warm, key)["compile"] is True
    (tmp_path / "elsewhere").rmdir()
    assert compiling.decide("auto", warm, key)["compile"] is False


def test_no_compiler_turns_auto_off_and_refuses_true(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert compiling.compiler() is None
    decision = compiling.decide("auto", 10**6, "k")
    assert decision["compile"] is False and "compiler" in decision["reason"]
    with pytest.raises(LoralabError, match="train.compile=true needs a C\\+\\+ compiler"):
        compiling.decide(True, 10, "k")


@pytest.mark.parametrize(
    "overrides, features, steps",
    [
        (["train.max_steps=7"], 1000, 7),
        (["train.batch_size=16"], 4000, 250),  # the README's main command
        (["train.batch_size=16", "train.epochs=2"], 4001, 502),  # the last batch is short
        (["train.batch_size=8", "train.grad_accum=3"], 100, 4),  # 13 batches: 4 full steps
    ],
)
def test_planned_steps(overrides, features, steps):
    assert kernels.planned_steps(build_config(overrides=overrides), features) == steps


class _Counter:
    """A torch.compile backend that counts the graphs it is given and runs them eagerly."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_one_graph_serves_every_layer_and_length_and_generation_runs_eagerly(monkeypatch):
    counter = _Counter()
    real_compile = torch.compile
    asked = {}

    def compile_(fn, **kw):
        asked.update(kw)
        return real_compile(fn, backend=counter, dynamic=kw["dynamic"])

    monkeypatch.setattr(torch, "compile", compile_)
    torch.compiler.reset()
    model = _model("tiny-llama", "model.head=lm")
    assert compiling.compile_blocks(model) == 2
    # dynamic shapes; CPU kernels that follow the run's thread count (a lent core, a worker's one)
    assert asked == {"dynamic": True, "options": {"cpp.dynamic_threads": True}}
    model.eval()
    with torch.no_grad():
        for length in (5, 9, 13):  # dynamic shapes: no graph per length
            model(input_ids=torch.randint(3, 200, (2, length)))
        graphs = counter.graphs
        assert graphs >= 1
        out = model.generate(
            input_ids=torch.randint(3, 200, (1, 4)), max_new_tokens=3, do_sample=False
        )
    assert counter.graphs == graphs  # the KV-cache calls of generation did not compile
    assert out.shape == (1, 7)
    torch.compiler.reset()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_compiled_layers_compute_what_eager_ones_do(method):
    """Inductor's kernels: the same logits and gradients as eager, up to fp32 rounding."""
    torch.compiler.reset()
    eager = _model("tiny-llama", f"train.method={method}")
    fast = _model("tiny-llama", f"train.method={method}")
    if method == "lora":  # B = 0 at init: the branch would add nothing and A's gradient be 0
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in eager.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    fast.load_state_dict(eager.state_dict())
    assert compiling.compile_blocks(fast) == 2
    ids = torch.randint(3, 200, (4, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded row
    labels = torch.tensor([0, 1, 1, 0])
    outs = [m(input_ids=ids, attention_mask=mask, labels=labels) for m in (eager, fast)]
    torch.testing.assert_close(outs[1].logits, outs[0].logits, rtol=1e-5, atol=1e-5)
    for out in outs:
        out.loss.backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (eager, fast)]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    lora_a = [n for n in grads[0] if "lora_A" in n]
    assert (method == "lora") == bool(lora_a)
    assert all(grads[0][n].abs().max() > 0 for n in lora_a)  # the compiled branch is exercised
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)
    torch.compiler.reset()


def test_a_compiled_run_says_so_and_marks_the_cache(tmp_path, sst2_dir, monkeypatch):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))
    torch.compiler.reset()
    cfg = build_config(
        overrides=[
            "model.name=tiny-llama",
            f"data.data_dir={sst2_dir}",
            f"run.output_dir={tmp_path}",
            "train.max_steps=3",
            "train.batch_size=8",
            "train.precision=fp32",
            "train.compile=true",
        ]
    )
    summary = train(cfg, quiet=True).summary
    assert summary["compile"] == {"compile": True, "reason": "set in the config"}
    assert summary["fused_ops"] == {"compiled_blocks": 2}
    assert summary["status"] == "completed"
    stored = json.loads((tmp_path / "cache" / compiling.CACHE_FILE).read_text())
    (key,) = stored
    assert "|tiny-llama|lora|fp32|" in key
    torch.compiler.reset()


@pytest.mark.parametrize(
    "override, why",
    [
        ("train.gradient_checkpointing=true", "gradient checkpointing"),
        ("model.quantization=int8", "quantized"),
    ],
)
def test_auto_stays_eager_where_compiling_is_untested(override, why, monkeypatch):
    cfg = build_config(overrides=["train.max_steps=100000", "train.precision=bf16", override])
    decision = kernels.choose_compile(cfg, "eager", 100)
    assert decision["compile"] is False and why in decision["reason"]
    long_run = build_config(overrides=["train.max_steps=100000", "train.precision=bf16"])
    assert kernels.choose_compile(long_run, "eager", 100)["compile"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    decision = kernels.choose_compile(long_run, "eager", 100)
    assert decision["compile"] is False and "CUDA" in decision["reason"]


def test_the_warm_cache_key_follows_what_the_layers_graph_depends_on():
    def key(*overrides):
        cfg = build_config(overrides=["train.precision=bf16", *overrides])
        return kernels.choose_compile(cfg, "eager", 100)["key"]

    base = key()
    assert key("train.seed=7", "train.lr=1e-3", "lora.alpha=32") == base  # same graph
    for change in (
        "lora.r=16",
        "lora.target=all-linear",
        "lora.dropout=0",
        "train.method=full",
        "lora.bias=lora_only",
        "lora.extra.lora_bias=true",
    ):
        assert key(change) != base, change
    assert key("train.method=full", "lora.r=16") == key("train.method=full")  # no adapters


def test_auto_stays_eager_in_fp32_on_a_cpu():
    """Compiling paid in bf16; in fp32 (the CPUs without fast bf16) it was measured no faster."""
    long_run = ["train.max_steps=100000"]
    fp32 = kernels.choose_compile(build_config(overrides=[*long_run, "train.precision=fp32"]), "eager", 100)  # fmt: skip
    assert fp32["compile"] is False and fp32["reason"].startswith("fp32 on a CPU")
    bf16 = kernels.choose_compile(build_config(overrides=[*long_run, "train.precision=bf16"]), "eager", 100)  # fmt: skip
    assert bf16["compile"] is True
    forced = build_config(overrides=[*long_run, "train.precision=fp32", "train.compile=true"])
    assert kernels.choose_compile(forced, "eager", 100)["compile"] is True  # asked for: compiled
