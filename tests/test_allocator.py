"""The heap allocator: which library is chosen, how the command line starts itself under it,
that a training run records it, and that the report refuses to compare peaks across them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_sst2

from loralab import allocator
from loralab.errors import LoralabError
from loralab.study.records import record_from_summary


def _libs(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"")
    return [folder]


def test_auto_prefers_tcmalloc_then_jemalloc_then_the_system(tmp_path):
    both = _libs(tmp_path / "both", "libjemalloc.so.2", "libtcmalloc_minimal.so.4")
    assert allocator.choose("auto", both) == ("tcmalloc", both[0] / "libtcmalloc_minimal.so.4")
    je = _libs(tmp_path / "je", "libjemalloc.so.2")
    assert allocator.choose("", je) == ("jemalloc", je[0] / "libjemalloc.so.2")
    assert allocator.choose("auto", _libs(tmp_path / "none")) == ("system", None)
    assert allocator.choose("system", both) == ("system", None)
    assert allocator.choose("jemalloc", both) == ("jemalloc", both[0] / "libjemalloc.so.2")


def test_a_missing_or_unknown_allocator_is_a_user_error(tmp_path):
    with pytest.raises(LoralabError, match="no tcmalloc library found.*apt install"):
        allocator.choose("tcmalloc", _libs(tmp_path / "none"))
    with pytest.raises(LoralabError, match="neither auto, system, tcmalloc, jemalloc"):
        allocator.choose("mimalloc", [tmp_path])
    lib = _libs(tmp_path / "own", "libjemalloc.so.2")[0] / "libjemalloc.so.2"
    assert allocator.choose(str(lib), []) == ("jemalloc", lib)  # a path: its kind by name


def test_current_reads_the_memory_map():
    maps = "7f00-7f10 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.9\n"
    assert allocator.current(maps) == "tcmalloc"
    assert allocator.current("7f00-7f10 r-xp 0 08:01 1 /usr/lib/libc.so.6\n") == "system"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_another_library_by_path_is_preloaded_and_named_by_its_file(tmp_path):
    """A path to, e.g., mimalloc read as 'system': a process under glibc counted as already
    running under it, so the library was never preloaded and the records said 'system'."""
    lib = _libs(tmp_path, "libmimalloc.so.2")[0] / "libmimalloc.so.2"
    assert allocator.choose(str(lib), []) == ("libmimalloc.so.2", lib)
    glibc = "7f00-7f10 r-xp 0 08:01 1 /usr/lib/libc.so.6\n"
    assert allocator.current(glibc, env={}) == "system"
    cmd, new_env = allocator.restart_command(
        "/venv/bin/loralab", ["train"], {allocator.ENV: str(lib)}
    )
    assert new_env["LD_PRELOAD"] == str(lib)
    mapped = glibc + f"7f20-7f30 r-xp 0 08:01 2 {lib}\n"  # the restarted process's map
    assert allocator.current(mapped, env=new_env) == "libmimalloc.so.2"
    assert allocator.current(glibc, env=new_env) == "system"  # given, but not loaded


def test_preload_env_puts_the_library_first_once():
    lib = Path("/x/libtcmalloc_minimal.so.4")
    env = allocator.preload_env({"LD_PRELOAD": "/y/libfoo.so /x/libtcmalloc_minimal.so.4"}, lib)
    assert env["LD_PRELOAD"] == "/x/libtcmalloc_minimal.so.4 /y/libfoo.so"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 30
    kept = allocator.preload_env({"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5"}, lib)
    assert kept["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "5"  # the user's own setting


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_restart_command_only_for_the_loralab_command_and_only_once(tmp_path, monkeypatch):
    lib = _libs(tmp_path, "libtcmalloc_minimal.so.4")[0] / "libtcmalloc_minimal.so.4"
    monkeypatch.setattr(allocator, "current", lambda maps=None, env=None: "system")
    env = {"LORALAB_ALLOCATOR": str(lib), "LD_PRELOAD": ""}
    cmd, new_env = allocator.restart_command("/venv/bin/loralab", ["train", "--quiet"], env)
    assert cmd == [sys.executable, "/venv/bin/loralab", "train", "--quiet"]
    assert new_env["LD_PRELOAD"] == str(lib) and new_env[allocator.LOADED] == str(lib)
    main_py = os.path.join("site", "loralab", "cli", "__main__.py")
    assert allocator.restart_command(main_py, ["study"], env)[0][:3] == [
        sys.executable, "-m", "loralab.cli"]  # fmt: skip
    assert allocator.restart_command("/home/me/my_script.py", ["train"], env) is None
    assert allocator.restart_command("/venv/bin/loralab", ["train"], new_env) is None  # no loop
    assert allocator.restart_command("/venv/bin/loralab", ["train"], {**env, "LORALAB_ALLOCATOR": "system"}) is None  # fmt: skip


def test_a_bad_setting_exits_2_before_training(tmp_path, sst2_dir):
    r = subprocess.run(
        [sys.executable, "-m", "loralab.cli", "train", "--task", "sst2", "--model", "tiny-llama",
         "--data-dir", str(sst2_dir), "--output-dir", str(tmp_path / "runs"), "--quiet"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "LORALAB_ALLOCATOR": "mimalloc"},
    )  # fmt: skip
    assert r.returncode == 2 and "LORALAB_ALLOCATOR='mimalloc'" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "runs").exists()


@pytest.mark.skipif(allocator.choose("auto")[1] is None, reason="no tcmalloc/jemalloc installed")
def test_a_cli_run_trains_under_the_chosen_allocator_and_records_it(tmp_path):
    name, _ = allocator.choose("auto")
    data = write_sst2(tmp_path / "sst2", n_train=16, n_dev=8)
    out = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.LOADED)}
    r = subprocess.run(
        [sys.executable, "-m", "loralab.cli", "train", "--task", "sst2", "--model", "tiny-llama",
         "--data-dir", str(data), "--output-dir", str(out), "--quiet", "train.batch_size=8",
         "run.name=a"],
        capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "a" / "summary.json").read_text())
    assert summary["layout"]["allocator"] == name
    assert record_from_summary(summary)["allocator"] == name
