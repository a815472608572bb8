"""A closed pipe on stdout (`loralab ... | head`) ends the command quietly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SPEC = Path(__file__).parents[2] / "configs" / "studies" / "tiny.yaml"


def test_a_reader_that_went_away_gives_141_and_no_traceback(tmp_path):
    for task in ("sst2", "mrpc"):  # the spec's data folders must exist, even for a dry run
        (tmp_path / "glue" / task).mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "loralab.cli", "study", str(SPEC), "--dry-run", "--data-root", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ},
    )  # fmt: skip
    proc.stdout.close()  # the reader is gone before the command writes a line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err
