"""The merged export: plain transformers reloads it without PEFT and predicts as the adapter did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from merge_runs import make_run, merge_run

from loralab.heads import head_for
from loralab.merge.equivalence import forward_all
from loralab.models import load_tokenizer
from loralab.runs import load_adapter_model
from loralab.tasks import get_task

pytestmark = pytest.mark.precision  # run once in bf16 and once in fp32 (conftest.py)


EXPORT_CHECK = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder, texts = sys.argv[1], json.loads(sys.argv[2])
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, return_tensors="pt")).logits
    assert "peft" not in sys.modules, "loading the export imported peft"
    print(json.dumps({"logits": logits.tolist(), "labels": model.config.id2label}))
    """
)


@pytest.mark.long
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bert"])
def test_export_reloads_without_peft(tmp_path, sst2_dir, model):
    run = make_run(tmp_path / "runs", sst2_dir, model, "extended")
    out = tmp_path / "export"
    result = merge_run(run, dtype="fp32", bench=False, out=out, quiet=True)
    assert result.export_dir == out and result.status == "passed"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors"}
    assert not list(out.parent.glob(".export*")), "temporary folders left behind"
    card = (out / "README.md").read_text()
    assert "r=8, alpha=16" in card and "passed" in card and "sst2" in card

    # The exported weight is W + (alpha/r)·B·A, computed here by hand from the saved files.
    from safetensors.torch import load_file

    from loralab.models import resolve

    layer = (
        "layers.0.self_attn.q_proj"
        if model == "tiny-llama"
        else "encoder.layer.0.attention.self.query"
    )
    base = load_file(Path(resolve(model)) / "model.safetensors")
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    merged = load_file(out / "model.safetensors")
    key_w = next(k for k in merged if k.endswith(f"{layer}.weight"))
    key_base = next(k for k in base if k.endswith(f"{layer}.weight"))
    A = next(v for k, v in adapter.items() if f"{layer}.lora_A" in k)
    B = next(v for k, v in adapter.items() if f"{layer}.lora_B" in k)
    torch.testing.assert_close(merged[key_w], base[key_base] + (16 / 8) * B @ A, rtol=0, atol=1e-6)

    # A fresh process loads the folder with plain transformers (peft never imported) and
    # predicts what the adapter model predicts.
    texts = ["the film was lovely", "acting is awful and this movie is dull", "a story"]
    r = subprocess.run(
        [sys.executable, "-c", EXPORT_CHECK, str(out), json.dumps(texts)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["labels"] == {"0": "negative", "1": "positive"}
    from loralab.config import from_dict, load_yaml

    cfg = from_dict(load_yaml(run / "config.yaml"))
    tok = load_tokenizer(model, progress=False)
    tok.padding_side = "right"
    reference = load_adapter_model(cfg, get_task("sst2"), run, tok)
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    (want,) = forward_all(reference, [batch], head_for(cfg, get_task("sst2")))
    torch.testing.assert_close(torch.tensor(got["logits"]), want, rtol=0, atol=1e-5)
