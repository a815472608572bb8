"""No credential reaches the disk or the study: URL passwords, tokens and keys are masked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import write_sst2

from loralab import rundir
from loralab.redact import mask_secrets, mask_tree

SECRET = "s3cret-Pa55word"


@pytest.mark.parametrize(
    "text, kept",
    [
        (f"--storage postgresql://bob:{SECRET}@db.example:5432/x", "postgresql://bob:***@db"),
        (f"--storage=mysql+pymysql://u:{SECRET}@h/d", "mysql+pymysql://u:***@h/d"),
        (f"use hf_{SECRET.replace('-', '')}abc", "use hf_***"),
        (f"WANDB_API_KEY={SECRET} loralab train", "WANDB_API_KEY=*** loralab train"),
        (f"--hub-token {SECRET} --quiet", "--hub-token *** --quiet"),
        (f"tool -password {SECRET} -v", "-password *** -v"),
        (f"sqlite:////tmp/x.db?password={SECRET}", "password=***"),
    ],
)
def test_mask_secrets(text, kept):
    out = mask_secrets(text)
    assert SECRET not in out and kept in out


@pytest.mark.parametrize(
    "text",
    [
        "train --output-dir /data/tokens/x data.max_tokens=5 sqlite:////tmp/study.db lr=3e-4",
        # Were masked: a word ending in "key" before a space read as a flag and its value
        # (two prompts then shared one identity; a command lost its lr).
        "Is the key idea of {text_a} positive?",
        "train data.task=csv:/data/monkey train.lr=3e-4 --passkey-free",
    ],
)
def test_mask_keeps_ordinary_text(text):
    assert mask_secrets(text) == text


def test_mask_uses_secret_environment_values(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "abcdef0123456789")
    assert mask_tree({"a": ["x abcdef0123456789 y"], "n": 3}) == {"a": ["x *** y"], "n": 3}


def test_write_json_masks_every_string(tmp_path):
    rundir.write_json(tmp_path / "s.json", {"command": f"x --storage postgresql://u:{SECRET}@h/d"})
    assert SECRET not in (tmp_path / "s.json").read_text()


def _storage(tmp_path) -> str:
    """The CI's PostgreSQL with a password added (its trust authentication accepts any), else
    an SQLite URL carrying the secret as a query parameter (SQLite URLs cannot hold a password;
    the driver ignores the parameter)."""
    pg = os.environ.get("LORALAB_TEST_PG_URL")
    if pg:
        scheme, rest = pg.split("://", 1)
        user_host = rest.split("@", 1)
        if len(user_host) == 2:
            user, host = user_host
            return f"{scheme}://{user.split(':')[0]}:{SECRET}@{host}"
        return f"{scheme}://loralab:{SECRET}@{rest}"
    return f"sqlite:///{tmp_path / 'results' / 'study.db'}?password={SECRET}"  # ignored


@pytest.mark.long
def test_sweep_point_with_a_password_in_storage_writes_it_nowhere(tmp_path):
    write_sst2(tmp_path / "data" / "sst2")
    storage = _storage(tmp_path)
    results = tmp_path / "results"
    results.mkdir()
    study = f"secret-{os.getpid()}"
    r = subprocess.run(
        [sys.executable, "-m", "loralab.cli", "sweep", "--tasks", "sst2", "--methods", "lora",
         "--seeds", "1", "--lora-lr", "1e-3", "--model", "tiny-llama", "--data-dir",
         str(tmp_path / "data"), "--output-dir", str(results), "--storage", storage, "--study",
         study, "train.max_steps=2", "train.batch_size=8"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert SECRET not in r.stdout + r.stderr
    (run,) = (results / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert "--storage" in summary["command"] and "***" in summary["command"]  # kept, masked
    files = [p for p in results.rglob("*") if p.is_file()]
    assert len(files) > 5
    leaked = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked
    # Nor in the study itself (user attributes of the study and its trials).
    import optuna

    from loralab.study.storage import open_storage

    loaded = optuna.load_study(study_name=study, storage=open_storage(storage))
    attrs = [loaded.user_attrs] + [t.user_attrs for t in loaded.trials]
    assert loaded.trials and SECRET not in json.dumps(attrs, default=str)


def test_postgres_storage_without_a_driver_is_a_user_error_with_the_password_masked(monkeypatch):
    from loralab.errors import LoralabError
    from loralab.study import storage

    monkeypatch.setattr(storage.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LoralabError, match=r"needs a PostgreSQL driver.*loralab\[sweep\]") as e:
        storage.with_driver(f"postgresql://bob:{SECRET}@db.example:5432/x")
    assert SECRET not in str(e.value) and "postgresql://bob:***@db" in str(e.value)
    assert storage.with_driver("sqlite:///x.db") == "sqlite:///x.db"  # no driver needed
