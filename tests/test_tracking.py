"""Tracking: the run directory's metrics JSONL and an offline W&B run read back from disk."""

from __future__ import annotations

import json
import os
import stat
import struct
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from loralab import tracking
from loralab.callbacks import TokenCounts
from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.rundir import read_json, write_json
from loralab.tracking import create_run_dir
from loralab.train import train

NAMESPACES = (
    "lora_adapters/",
    "lora_rank/",
    "efficiency/",
    "verification/",
    "training_efficiency/",
)
BLOCK = 32 * 1024
HEADER = 7  # ":W&B" ident, uint16 magic, uint8 version


def read_wandb_records(path: Path):
    """Records of a `.wandb` file: LevelDB-style log of 32 KiB blocks of length-prefixed chunks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # zero trailer: the next chunk starts at the next block
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending += chunk
        if kind in (1, 4):  # FULL or LAST: a whole record is assembled
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec
            pending = b""
        elif kind not in (2, 3):
            raise ValueError(f"bad chunk type {kind} at {pos}")


def history_keys(path: Path) -> set[str]:
    keys = set()
    for rec in read_wandb_records(path):
        if rec.WhichOneof("record_type") == "history":
            for item in rec.history.item:
                keys.add(item.key or "/".join(item.nested_key))
    return keys


def _one_step(data_dir, out, *extra):
    """A one-step tiny-llama run's config (batch 8) writing under `out`."""
    return build_config(
        overrides=[
            "model.name=tiny-llama",
            f"data.data_dir={data_dir}",
            f"run.output_dir={out}",
            "train.max_steps=1",
            "train.batch_size=8",
            *extra,
        ]  # fmt: skip
    )


def test_offline_wandb_run_has_all_namespaces(tmp_path, sst2_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = build_config(
        overrides=[
            "model.name=tiny-llama",
            f"data.data_dir={sst2_dir}",
            f"run.output_dir={tmp_path / 'runs'}",
            "train.max_steps=6",
            "train.batch_size=8",
            "train.logging_steps=2",
            "tracking.log_every=3",
            "tracking.wandb=offline",
        ]  # fmt: skip
    )
    result = train(cfg, quiet=True)
    (wandb_file,) = list(result.run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    keys = history_keys(wandb_file)
    deadline = time.time() + 60
    while not keys and time.time() < deadline:  # W&B's service process may still be writing
        time.sleep(0.5)
        keys = history_keys(wandb_file)
    for ns in NAMESPACES:
        assert any(k.startswith(ns) for k in keys), (ns, sorted(keys)[:20])
    assert "train/loss" in keys and "eval/accuracy" in keys
    jsonl = set()
    for line in (result.run_dir / "metrics.jsonl").read_text().splitlines():
        jsonl.update(json.loads(line))
    for ns in NAMESPACES:
        assert {k for k in keys if k.startswith(ns)} <= jsonl, ns
    # Live per-module statistics: q and v of both layers.
    assert "lora_rank/model.layers.0.self_attn.q_proj/effective_rank" in jsonl
    assert "verification/base_unchanged" in jsonl
    # Every key sits in a namespace but the axes (the Trainer's closing figures were bare).
    assert {k for k in jsonl if "/" not in k} == {"step", "epoch", "time"}, jsonl
    assert {"train/mean_loss", "train/runtime", "train/total_flos"} <= jsonl
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(
        r["verification/base_unchanged"] is True
        for r in records
        if "verification/base_unchanged" in r
    )


def test_no_secret_is_written(tmp_path, sst2_dir, monkeypatch):
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = build_config(
        overrides=[
            "model.name=tiny-llama",
            f"data.data_dir={sst2_dir}",
            f"run.output_dir={tmp_path / 'runs'}",
            "train.max_steps=2",
            "train.batch_size=8",
            "tracking.wandb=offline",
        ]  # fmt: skip
    )
    result = train(cfg, quiet=True)
    for f in result.run_dir.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


def test_online_without_key_is_a_user_error(tmp_path, sst2_dir, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = build_config(
        overrides=[
            "model.name=tiny-llama",
            f"data.data_dir={sst2_dir}",
            f"run.output_dir={tmp_path}",
            "train.max_steps=1",
            "tracking.wandb=online",
        ]  # fmt: skip
    )
    with pytest.raises(LoralabError, match="WANDB_API_KEY"):
        train(cfg, quiet=True)


def test_auto_is_online_with_a_key_and_offline_without(tmp_path, sst2_dir, monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_MODE")  # the suite's conftest sets it to disabled
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    assert tracking.wandb_mode("auto") == "online"
    assert tracking.wandb_mode("offline") == "offline"  # an explicit mode stays itself
    # WANDB_MODE saying offline or disabled wins over a key (wandb.init's mode would not).
    for env, want in (("disabled", "disabled"), ("offline", "offline"), ("online", "online")):
        monkeypatch.setenv("WANDB_MODE", env)
        assert tracking.wandb_mode("auto") == want, env
    monkeypatch.delenv("WANDB_MODE")
    netrc = tmp_path / "netrc"
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("NETRC", str(netrc))  # `wandb login` keeps the key there
    # The server this wandb logs in to (0.31: a coreweave host), and the classic one.
    for host in {"api.wandb.ai", urlparse(wandb.Settings().base_url).hostname}:
        netrc.write_text(f"machine {host}\n  login user\n  password abc\n")
        assert tracking.wandb_mode("auto") == "online", host
    netrc.write_text("machine example.com\n  login user\n  password abc\n")
    assert tracking.wandb_mode("auto") == "offline"
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert tracking.wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = _one_step(sst2_dir, tmp_path / "runs", "tracking.wandb=auto")
    result = train(cfg, quiet=True)  # no key: an offline W&B run beside the metrics
    assert list(result.run_dir.glob("wandb/offline-run-*/run-*.wandb"))


@pytest.mark.parametrize(
    "umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)]
)
def test_run_files_are_readable_by_others_under_the_umask(tmp_path, umask, file_mode, dir_mode):
    """Results are shared: not the 0600 of a temp file, but what a plain open/mkdir would give."""
    old = os.umask(umask)
    try:
        cfg = build_config(overrides=[f"run.output_dir={tmp_path / 'runs'}", "run.name=r"])
        run = create_run_dir(cfg)
        write_json(run / "summary.json", {"status": "completed", "loss": float("nan")})
    finally:
        os.umask(old)
    assert stat.S_IMODE(run.stat().st_mode) == dir_mode
    for name in ("config.yaml", "summary.json"):
        assert stat.S_IMODE((run / name).stat().st_mode) == file_mode, name
    assert read_json(run / "summary.json") == {"status": "completed", "loss": "nan"}
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "summary.json"]  # no temp left


class _DeviceMask:
    """An attention mask on a (pretend) GPU: its sum stays a tensor there until read."""

    device = torch.device("meta")

    def __init__(self, real: int, size: int):
        self.real, self.size = real, size

    def numel(self) -> int:
        return self.size

    def sum(self):
        return torch.tensor(self.real)


def test_token_counts_read_a_device_sum_only_when_asked():
    tokens = TokenCounts()
    tokens.count(torch.tensor([[1, 1, 0], [1, 0, 0]]))  # on the CPU: counted at once
    assert (tokens.real, tokens.padded, tokens._pending) == (3, 6, None)
    tokens.count(_DeviceMask(5, 8))
    tokens.count(_DeviceMask(7, 8))
    tokens.count(None)  # a batch without a mask counts nothing
    assert tokens._pending is not None and tokens._real == 3  # nothing read back per step
    assert (tokens.real, tokens.padded, tokens._pending) == (15, 22, None)


def test_each_run_reports_its_own_accelerator_peak(tmp_path, sst2_dir, monkeypatch):
    """torch.cuda's peak counter spans the process: a second run in a notebook would report the
    first run's peak unless each run resets it before it builds its model."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: calls.append("reset"))
    tracking.reset_peak_memory()
    assert calls == ["reset"]
    monkeypatch.undo()

    order = []
    monkeypatch.setattr(tracking, "reset_peak_memory", lambda: order.append("reset"))
    import loralab.train as train_module

    built = train_module.build_model
    monkeypatch.setattr(
        train_module, "build_model", lambda *a, **k: order.append("build") or built(*a, **k)
    )
    train(_one_step(sst2_dir, tmp_path / "runs"), quiet=True)
    assert order == ["reset", "build"]


def test_wandb_gets_a_masked_command_line_and_an_id_of_its_own(tmp_path, sst2_dir, monkeypatch):
    """A study worker's argv holds its storage URL with a password: W&B's metadata must get it
    masked. Two run folders of one name (two studies' points) get different W&B ids; a resume
    keeps its own (and a folder from before the id was kept, its name)."""
    import sys

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(sys, "argv", ["loralab", "sweep", "worker", "--storage",
                                      "postgresql://bob:hunter2pw@db.example/optuna"])  # fmt: skip
    ids = []
    for out in ("a", "b"):
        cfg = build_config(overrides=[
            "model.name=tiny-llama", f"data.data_dir={sst2_dir}", f"run.output_dir={tmp_path / out}",
            "run.name=same", "train.max_steps=1", "train.batch_size=8", "tracking.wandb=offline",
        ])  # fmt: skip
        run = train(cfg, quiet=True).run_dir
        ids.append((run / tracking.WANDB_ID_FILE).read_text().strip())
        for f in run.rglob("*"):
            if f.is_file():
                assert b"hunter2pw" not in f.read_bytes(), f
    assert sys.argv[-1].endswith("hunter2pw@db.example/optuna")  # put back
    assert ids[0] != ids[1] and all(i.startswith("same-") for i in ids)
    assert tracking.wandb_run_id(tmp_path / "a" / "same", resuming=True) == ids[0]
    old = tmp_path / "old.run"
    old.mkdir()
    assert tracking.wandb_run_id(old, resuming=True) == "old-run"


def test_runs_of_one_name_starting_at_once_each_get_a_folder(tmp_path, monkeypatch):
    """Two processes may both see `r` free: the folder a run gets is the one its mkdir made
    (it crashed on FileExistsError when another process made `r` in between)."""
    cfg = build_config(overrides=[f"run.output_dir={tmp_path}", "run.name=r"])
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self: False if self.name.startswith("r") else real_exists(self))  # fmt: skip
    (tmp_path / "r").mkdir()  # another process's, made after this one looked
    assert create_run_dir(cfg) == tmp_path / "r-2"
    assert create_run_dir(cfg) == tmp_path / "r-3"


def test_throughput_leaves_out_evaluations_and_saves(monkeypatch):
    """The Trainer evaluates and saves after a log step: that time fell into the next interval's
    step time and tokens/s (1.5 s and 67 tok/s below, for steps of 1 s and 100 tok/s)."""
    from types import SimpleNamespace

    from loralab import callbacks

    clock = [100.0]
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(time=lambda: clock[0]))
    logged = []
    tracker = SimpleNamespace(log=lambda record, step: logged.append(record))
    tokens = TokenCounts()
    cb = callbacks.TrackingCallback(tracker, 10**6, {}, None, tokens)
    state = SimpleNamespace(global_step=0, epoch=0.0)
    cb.on_train_begin(None, state, None, model=None)

    def steps(n):  # steps of 1 s and 100 real tokens each
        for _ in range(n):
            clock[0] += 1.0
            tokens.count(torch.ones(4, 25))
            state.global_step += 1
        cb.on_log(None, state, None, logs={"loss": 1.0})

    steps(10)
    clock[0] += 5.0  # an evaluation and a checkpoint, as the trainer counts them
    tokens.paused_s += 5.0
    steps(10)
    eff = [r for r in logged if "training_efficiency/step_time_s" in r]
    assert [r["training_efficiency/step_time_s"] for r in eff] == [1.0, 1.0]
    assert [r["training_efficiency/tokens_per_s_real"] for r in eff] == [100.0, 100.0]


def test_the_trainer_counts_evaluations_and_saves_as_paused(tmp_path, sst2_dir, monkeypatch):
    """The summary's tokens/s is over the steps' own time: each periodic evaluation (made to
    take 0.4 s longer here) is left out of it, not of the training's wall time."""
    import transformers

    real = transformers.Trainer.evaluate

    def slow(self, *args, **kwargs):
        time.sleep(0.4)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "evaluate", slow)
    cfg = _one_step(sst2_dir, tmp_path / "runs", "train.max_steps=3", "train.eval_steps=1",
                    "train.save_steps=1", "data.max_eval_examples=16")  # fmt: skip
    result = train(cfg, quiet=True)
    summary = read_json(result.run_dir / "summary.json")
    stepping = summary["tokens"]["real"] / summary["tokens_per_s"]["real"]
    assert 0 < stepping < summary["train_time_s"] - 0.8, (stepping, summary["train_time_s"])


def test_no_periodic_evaluation_on_the_last_step(tmp_path, sst2_dir):
    """eval_steps dividing the run's length scored the final model twice (the periodic
    evaluation, then the final one): now once, at the last step, by the final evaluation."""
    cfg = _one_step(sst2_dir, tmp_path / "runs", "train.max_steps=4", "train.eval_steps=2",
                    "data.max_eval_examples=16")  # fmt: skip
    run = train(cfg, quiet=True).run_dir
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in records if "eval/accuracy" in r]
    assert evals == [2, 4], evals
