"""Golden runs: fixed-seed tiny runs whose figures a refactoring must not change.

Each case trains through the CLI, then merges and analyses the run, and compares every
deterministic figure (dev metrics, loss, parameter counts, the adapter's SHA-256, merge.json,
analysis.json) with `tests/golden/golden.json`, which holds one set per CPU kind (AMX, AVX-512
without AMX, other: each has its own fp32 kernels, whose sums round differently and so train a
slightly different adapter). The runs use one thread and fp32, so on a kind with its own set the
figures are bit-for-bit identical; a kind without one (so far "other": AVX2-only CPUs, whose
generations may not round alike) is compared with the recorded kinds, without the adapter hash:
each figure within 1e-4 relative (1e-5 absolute) of the range the recorded kinds span. Some
figures move more than 1e-4 between kinds (merge's `logit_scale`, a maximum over positions, by
0.5% between an AMX Xeon and an AVX-512 EPYC), so a new kind may differ by that much too.

Re-record only for an intended change of behaviour: `LORALAB_GOLDEN_WRITE=1 pytest
tests/test_golden.py` replaces every kind's set with this machine's (run it again with
`LORALAB_GOLDEN_WRITE=add` on the other kinds when you have them); `add` alone records this
machine's kind beside the others, for a kind that has none yet. A set may list figures added
since it was recorded under "unrecorded" (kind-specific values nobody could measure without that
CPU kind); `add` on that kind records them and drops the list.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import write_sst2

from loralab import probecache
from loralab.cli import main

GOLDEN = Path(__file__).parent / "golden" / "golden.json"
# Whole key names that vary run to run: seconds (`_s`, `_per_s`), megabytes, memory, timings,
# the thread layout. Matched as words, so `delta_std` or `trainable_share_pct` are compared.
SKIP_KEY = re.compile(r"(^|_)(time|wall|memory|layout)(_|$)|_(s|mb)$")

SQUAD = {
    "version": "v2.0",
    "data": [{"title": "t", "paragraphs": [
        {"context": "Anna keeps three grey cats in a small flat near the old mill by the river.",
         "qas": [
             {"id": "a", "question": "How many cats?", "is_impossible": False,
              "answers": [{"text": "three", "answer_start": 11}]},
             {"id": "b", "question": "Name of the dog?", "is_impossible": True, "answers": []},
         ]},
        {"context": "The bridge was built in 1890 from red stone and still carries trains.",
         "qas": [
             {"id": "c", "question": "When was the bridge built?", "is_impossible": False,
              "answers": [{"text": "1890", "answer_start": 24}]},
             {"id": "d", "question": "Who painted it?", "is_impossible": True, "answers": []},
         ]},
    ]}],
}  # fmt: skip

COMMON = [
    "train.batch_size=8", "train.lr=1e-2", "train.save_steps=100", "train.seed=7",
    "model.attention=eager",  # a measured kernel choice would vary with the load
]  # fmt: skip
CASES = {
    "llama-sst2-classifier": ["model.name=tiny-llama", "train.max_steps=4"],
    "llama-sst2-lm": ["model.name=tiny-llama", "model.head=lm", "train.max_steps=4"],
    "bert-squad-span": [
        "model.name=tiny-bert", "data.task=squad_v2", "data.max_length=48",
        "data.doc_stride=16", "train.max_steps=3",
    ],
}  # fmt: skip


def cpu_kind() -> str:
    """The kind of the CPU's fp32 kernels (the sets were recorded with LoRA dropout's masks
    from `fused.keep_mask` on every kind)."""
    flags = probecache.cpu_flags()
    return "amx" if "amx_bf16" in flags else "avx512" if "avx512f" in flags else "other"


def numbers(tree, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a JSON tree by dotted path, leaving out timings and probes."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            if not SKIP_KEY.search(str(k).lower()):
                out.update(numbers(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out.update(numbers(v, f"{prefix}[{i}]"))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix] = float(tree)
    return out


def run_case(tmp: Path, name: str) -> dict:
    data = tmp / "data"
    write_sst2(data / "sst2", n_train=32, n_dev=24, seed=3)
    squad = data / "squad.json"
    squad.write_text(json.dumps(SQUAD))
    extra = [f"data.train_file={squad}", f"data.eval_file={squad}"] if "squad" in name else []
    argv = [
        "train", *CASES[name], *COMMON, *extra, f"data.data_dir={data / 'sst2'}",
        f"run.output_dir={tmp / 'runs'}", f"run.name={name}", "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    run = tmp / "runs" / name
    merge_argv = ["merge", str(run), "--dtype", "fp32", "--no-benchmark", "--no-export", "--quiet"]
    assert main(merge_argv) == 0
    assert main(["analyze", str(run), "--probe", "4"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    kept = {k: summary[k] for k in ("metrics", "train_loss", "steps", "params", "tokens")}
    adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    return {
        "adapter_sha256": hashlib.sha256(adapter).hexdigest(),
        "summary": numbers(kept),
        "merge": numbers(json.loads((run / "merge" / "merge.json").read_text())),
        "analysis": numbers(json.loads((run / "analysis" / "analysis.json").read_text())),
    }


@pytest.fixture
def one_thread_fp32(monkeypatch):
    monkeypatch.setenv("LORALAB_PRECISION", "fp32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(tmp_path, name, one_thread_fp32):
    got = run_case(tmp_path, name)
    write = os.environ.get("LORALAB_GOLDEN_WRITE")
    if write:
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        kept = golden.get(name, {}) if write == "add" else {}
        golden[name] = {**kept, cpu_kind(): got}
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    sets = json.loads(GOLDEN.read_text())[name]
    kind = cpu_kind()
    same_kind = kind in sets
    want = sets[kind] if same_kind else sets[sorted(sets)[0]]
    rel, floor = (1e-6, 1e-9) if same_kind else (1e-4, 1e-5)
    compared = [want] if same_kind else list(sets.values())
    if same_kind:
        assert got["adapter_sha256"] == want["adapter_sha256"]
    # A set recorded before a figure was compared names it as not recorded yet (re-record it
    # with LORALAB_GOLDEN_WRITE=add on that kind); the figure must still be there.
    unrecorded = want.get("unrecorded", {})
    for part in ("summary", "merge", "analysis"):
        expected = sorted({*want[part], *unrecorded.get(part, ())})
        assert sorted(got[part]) == expected, f"{part}: the set of figures changed"
        for key in want[part]:
            values = [s[part][key] for s in compared if key in s[part]]
            lo, hi = min(values), max(values)
            slack = max(rel * max(abs(lo), abs(hi)), floor)
            assert lo - slack <= got[part][key] <= hi + slack, (
                f"{name} {part} {key}: {got[part][key]!r} != golden {values!r} ({kind} CPU)"
            )
