"""Run-directory writes: atomic (all or nothing) and readable by others under the umask."""

from __future__ import annotations

import os
import stat

import pytest

from loralab import rundir


def _mode(p) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def test_atomic_dir_publishes_a_complete_folder_with_shared_modes(tmp_path, umask):
    final = tmp_path / "out"
    with rundir.atomic_dir(final) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.json").write_text("{}")
        assert not final.exists()  # nothing visible until the block succeeds
    assert (final / "sub" / "a.json").read_text() == "{}"
    assert _mode(final) == 0o755 and _mode(final / "sub" / "a.json") == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folders left


def test_atomic_dir_honours_a_private_umask(tmp_path, umask):
    umask(0o077)
    with rundir.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert _mode(tmp_path / "out") == 0o700 and _mode(tmp_path / "out" / "f") == 0o600


def test_atomic_dir_failure_keeps_the_old_folder(tmp_path, umask):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("kept")
    with pytest.raises(RuntimeError):
        with rundir.atomic_dir(final) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert [p.name for p in final.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_replaces_or_keeps_an_existing_folder(tmp_path, umask):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with rundir.atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    with rundir.atomic_dir(final, replace=False) as tmp:  # another process got there first
        (tmp / "mine.txt").write_text("mine")
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_write_is_readable_by_others(tmp_path, umask):
    path = tmp_path / "d" / "summary.json"
    rundir.atomic_write(path, "{}")
    assert path.read_text() == "{}" and _mode(path) == 0o644


def test_a_folder_with_a_projects_own_config_yaml_is_no_run(tmp_path):
    """Outputs are refused inside a run folder, not in any folder holding a config.yaml (a
    project's own, `--config config.yaml --output-dir .`)."""
    from loralab.errors import LoralabError
    from loralab.rundir import check_not_a_run

    (tmp_path / "config.yaml").write_text("model: {name: tiny-llama}\n")
    check_not_a_run(tmp_path, "--output-dir")  # no run's files: accepted
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(LoralabError, match=f"e.g. '{tmp_path.parent}'"):
        check_not_a_run(tmp_path, "--output-dir")
