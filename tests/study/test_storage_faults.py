"""A study's SQLite file replaced under a running worker (as `git stash` of a committed
study.db does) is a fault at a file boundary: one clear paragraph and exit 2, never a traceback,
and the finished run folder is kept (a re-run reuses it)."""

from __future__ import annotations

import os
import shutil

from conftest import write_sst2

from loralab.cli import main


def test_a_study_db_replaced_under_a_sweep_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from loralab.study.worker import Worker

    real = Worker._run_point

    def run_point(self, trial, point, lease):
        out = real(self, trial, point, lease)
        db = self.results_dir / "study.db"
        shutil.copy(db, db.with_name("copy.db"))
        os.replace(db.with_name("copy.db"), db)  # a new file under the open connection
        return out

    monkeypatch.setattr(Worker, "_run_point", run_point)
    data = write_sst2(tmp_path / "sst2", n_train=16, n_dev=8)
    argv = ["sweep", "--model", "tiny-llama", "--data-dir", str(data), "--output-dir",
            str(tmp_path / "res"), "--methods", "lora", "--lora-lr", "1e-3", "--seeds", "1",
            "--quiet", "--heartbeat", "1", "--grace", "3",  # the re-run retries the point soon
            "train.max_steps=2", "train.batch_size=8", "train.eval_batch_size=32"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("loralab: error: The study's SQLite storage could not be written")
    assert "Traceback" not in err
    (run,) = (tmp_path / "res" / "runs").iterdir()
    assert (run / "summary.json").is_file()  # kept
    monkeypatch.setattr(Worker, "_run_point", real)
    assert main(argv) == 0  # the same command continues: the finished point is reused
    assert "1 reused" in capsys.readouterr().out
