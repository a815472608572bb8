"""A quantized frozen base (`model.quantization`): int8 through torchao on the CPU, NF4 refused
where bitsandbytes has no kernels; accounting, checksums, merge and analysis on the stored
quantized weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_sst2

from loralab import accounting, quantization
from loralab.cli import main
from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.merge import MergeOptions, run_merge
from loralab.models import load_for_task, load_tokenizer
from loralab.tasks import get_task

ARGS = ["model.name=tiny-llama", "train.max_steps=4", "train.batch_size=8", "train.lr=1e-2",
        "train.seed=7", "train.precision=fp32"]  # fmt: skip


def _train(root: Path, data: Path, *extra: str) -> Path:
    out = root / "runs"
    assert main(["train", "--data-dir", str(data), "--quiet", f"run.output_dir={out}", *ARGS,
                 *extra]) == 0  # fmt: skip
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An int8 run and the same run on the fp32 base (tiny Llama, 4 steps)."""
    pytest.importorskip("torchao")
    root = tmp_path_factory.mktemp("quant")
    data = write_sst2(root / "sst2", n_train=32, n_dev=24, seed=3)
    return {
        "int8": _train(root / "int8", data, "model.quantization=int8"),
        "none": _train(root / "none", data),
    }


def _base(quant: str = "int8"):
    cfg = build_config(overrides=["model.name=tiny-llama", f"model.quantization={quant}"])
    from loralab.heads import head_for

    head = head_for(cfg, get_task(cfg.data.task))
    torch.manual_seed(0)  # the new score head is drawn at random
    return load_for_task(cfg.model, head, load_tokenizer("tiny-llama", progress=False), False)


def test_int8_base_is_stored_quantized_except_the_head():
    pytest.importorskip("torchao")
    model, heads = _base()
    assert heads == ["score"]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = {n for n, m in linears.items() if quantization.is_quantized(m.weight)}
    assert quantized == set(linears) - {"score"}
    w = linears["model.layers.0.self_attn.q_proj"].weight
    assert dict(quantization.stored_tensors(w))[".qdata"].dtype == torch.int8
    # Weight-only int8, one scale per output row: within half a step of the fp32 weight.
    fp32, _ = _base("none")
    ref = dict(fp32.named_parameters())["model.layers.0.self_attn.q_proj.weight"].detach()
    step = ref.abs().amax(1, keepdim=True) / 127
    assert ((quantization.dequantized(w) - ref).abs() <= step / 2 + 1e-6).all()


def test_checksum_reads_the_stored_int8_bytes():
    """Loading twice quantizes to the same bytes (merge and analysis reload the base); one
    changed int8 value changes the checksum; counts are those of the fp32 model."""
    pytest.importorskip("torchao")
    a, _ = _base()
    b, _ = _base()
    fa = accounting.checksum(accounting.base_parameters(a))
    assert fa == accounting.checksum(accounting.base_parameters(b))
    qdata = a.model.layers[0].self_attn.q_proj.weight.qdata
    qdata[0, 0] = qdata[0, 0] + 1
    assert accounting.checksum(accounting.base_parameters(a)) != fa
    fp32, _ = _base("none")
    assert accounting.parameter_counts(b)["total"] == accounting.parameter_counts(fp32)["total"]


def test_int8_run_trains_the_adapter_on_a_frozen_quantized_base(runs):
    s, plain = _summary(runs["int8"]), _summary(runs["none"])
    v = s["verification"]
    assert v["base_frozen"] and v["base_unchanged"]
    assert v["base_checksum_before"] == v["base_checksum_after"]
    assert v["base_checksum_before"] != plain["verification"]["base_checksum_before"]
    assert s["quantization"]["method"] == "int8" and s["quantization"]["backend"] == "torchao"
    assert s["quantization"]["quantized_layers"] == 2 * 7  # layers × (q k v o gate up down)
    assert plain["quantization"] == {"method": "none"}
    assert s["peak_memory_mb"] > 0
    assert s["params"] == plain["params"]  # same counts: int8 stores, it does not remove
    # The identity names the quantization only when there is one (older identities hold).
    assert s["identity"]["model"]["quantization"] == "int8"
    assert "quantization" not in plain["identity"]["model"]
    from safetensors.torch import load_file

    adapter = load_file(runs["int8"] / "adapter" / "adapter_model.safetensors")
    b = [t for k, t in adapter.items() if "lora_B" in k]
    assert b and all(t.dtype == torch.float32 for t in adapter.values())
    assert any(t.abs().max() > 0 for t in b)  # B starts at 0: the adapter changed


def test_merge_is_checked_against_the_dequantized_base(runs):
    result = run_merge(runs["int8"], MergeOptions(dtype="fp32", bench=False, export=False,
                                                  quiet=True))  # fmt: skip
    r = result.report
    assert r["status"] == "passed", r["variants"]
    assert r["base_quantization"] == "int8"
    assert r["quantized_base"]["reference"] == "fp32 adapter on the dequantized base"
    # The adapter on the int8 base (as trained) computes what the dequantized base does.
    assert r["quantized_base"]["quantized_vs_dequantized"]["max_abs_diff"] < 1e-4
    assert any("dequantized base" in n for n in r["notes"])
    saved = json.loads((runs["int8"] / "merge" / "merge.json").read_text())
    assert saved["base_quantization"] == "int8"


def test_analysis_reads_the_dequantized_base_weight(runs):
    from loralab.analysis import base_weight
    from loralab.runs import load_adapter_model

    cfg = build_config(overrides=["model.name=tiny-llama", "model.quantization=int8"])
    model = load_adapter_model(cfg, get_task("sst2"), runs["int8"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    stored = layer.get_base_layer().weight
    assert quantization.is_quantized(stored)
    W = base_weight(layer)
    assert type(W) is torch.Tensor and W.dtype == torch.float32
    assert torch.equal(W, stored.dequantize().float())


def test_nf4_without_cuda_is_a_user_error(tmp_path, capsys):
    with pytest.raises(LoralabError, match="nf4 needs bitsandbytes.*CUDA GPUs.*int8"):
        quantization.check("nf4", cuda=False)
    if torch.cuda.is_available():
        return
    data = write_sst2(tmp_path / "sst2", n_train=8, n_dev=8)
    assert main(["train", "--data-dir", str(data), f"run.output_dir={tmp_path}", *ARGS,
                 "model.quantization=nf4"]) == 2  # fmt: skip
    assert "CUDA" in capsys.readouterr().err


def test_full_fine_tuning_of_a_quantized_base_is_a_user_error(tmp_path, capsys):
    data = write_sst2(tmp_path / "sst2", n_train=8, n_dev=8)
    assert main(["train", "--data-dir", str(data), f"run.output_dir={tmp_path}", *ARGS,
                 "train.method=full", "model.quantization=int8"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "full fine-tuning" in err and "train.method=lora" in err


def test_missing_backend_is_a_user_error(monkeypatch):
    monkeypatch.setattr(quantization.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LoralabError, match=r"needs the `torchao` package.*loralab\[quant\]"):
        quantization.check("int8")


def test_dequantizing_drops_the_marks_of_a_bitsandbytes_model(tmp_path):
    """An NF4 load (bitsandbytes, GPU) leaves transformers' quantizer on the model and the
    quantization entry in its config: casts are refused ("cannot cast a bitsandbytes model")
    and an export would carry the entry. Set here by hand, as such a load sets them."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.quantizers.auto import AutoHfQuantizer
    from transformers.utils.quantization_config import QuantizationMethod

    from loralab import models
    from loralab.quantization import dequantize_

    model, _ = models.load_model("tiny-llama", AutoModelForCausalLM)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model.hf_quantizer = AutoHfQuantizer.from_config(config)
    model.quantization_method = QuantizationMethod.BITS_AND_BYTES
    model.config.quantization_config = config
    with pytest.raises(ValueError, match="cannot cast a bitsandbytes model"):
        model.to(torch.bfloat16)
    dequantize_(model)
    assert model.to(torch.bfloat16).dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "export")
    assert "quantization_config" not in json.loads(
        (tmp_path / "export" / "config.json").read_text()
    )
