"""`loralab train` on a user's mistake: exit status 2, one paragraph naming the fix, no traceback.

In-process through `loralab.cli.main` (a subprocess per case costs seconds of imports); one case
also goes through a real process, to check the status the shell sees.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from loralab.cli import main

BAD_INPUTS = [
    (["--task", "qnli"], "Unknown task 'qnli'"),
    (["--model", "no-such-model"], "no-such-model"),
    (["lora.r=0"], "lora.r"),
    (["lora.dropout=1.5"], "lora.dropout"),
    (["lora.target=[c_attn]"], "c_attn"),
    (["lora.rank=4"], "Unknown config key 'lora.rank'"),
    (["--method", "lora", "train.precision=fp4"], "train.precision"),
    (["data.max_length=4096"], "at most 512"),
    (["--max-train-examples", "40", "train.grad_accum=4"], "an epoch holds only 3 batches"),
    (["--method", "full", "lora.r=16"], "lora.r given with train.method=full"),
    (["data.verbalizers=[' no', ' yes']"], "the classifier head would ignore it"),
    (["data.chat_template=false"], "data.chat_template is for a prompted language model"),
    (["--task", "squad_v2", "--head", "lm", "data.verbalizers=[' a']"], "squad_v2 has no labels"),
]


def _train_args(tmp_path, data_dir) -> list[str]:
    return ["train", "--task", "sst2", "--model", "tiny-llama", "--data-dir", str(data_dir),
            "--output-dir", str(tmp_path / "runs"), "--quiet"]  # fmt: skip


def _run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra, needle", BAD_INPUTS)
def test_bad_inputs_exit_2_with_a_message(tmp_path, sst2_dir, capsys, extra, needle):
    # Options first, overrides together at the end (argparse takes positionals in one block).
    code, err = _run([*_train_args(tmp_path, sst2_dir), *extra, "train.max_steps=1"], capsys)
    assert "unrecognized arguments" not in err
    assert code == 2, err[-2000:]
    assert needle in err and err.startswith("loralab: error: ")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_shell_sees_status_2_and_no_traceback(tmp_path, sst2_dir):
    r = subprocess.run(
        [sys.executable, "-m", "loralab.cli", *_train_args(tmp_path, sst2_dir), "lora.r=0"],
        capture_output=True, text=True, env=dict(os.environ), timeout=600,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert "lora.r" in r.stderr and "Traceback" not in r.stderr


def test_missing_data_file_and_malformed_row_exit_2(tmp_path, sst2_dir, capsys):
    base = ["train", "--task", "sst2", "--model", "tiny-llama", "--output-dir",
            str(tmp_path / "runs"), "--quiet"]  # fmt: skip
    (tmp_path / "empty").mkdir()
    code, err = _run([*base, "--data-dir", str(tmp_path / "empty")], capsys)
    assert code == 2 and "train.tsv" in err, err
    lines = (sst2_dir / "train.tsv").read_text().splitlines()
    lines[5] = "no tab here"
    (sst2_dir / "train.tsv").write_text("\n".join(lines) + "\n")
    code, err = _run([*base, "--data-dir", str(sst2_dir)], capsys)
    assert code == 2 and "line 6" in err, err
    code, err = _run(["train", "--resume", str(tmp_path / "empty")], capsys)
    assert code == 2 and "not a loralab run directory" in err, err


def test_overrides_on_both_sides_of_an_option_all_count(tmp_path, sst2_dir, capsys):
    # The second block reaches the config: its mistake is the one reported.
    args = [*_train_args(tmp_path, sst2_dir)[:-1], "train.max_steps=1", "--quiet", "lora.rank=4"]
    code, err = _run(args, capsys)
    assert code == 2 and "Unknown config key 'lora.rank'" in err, err
    with pytest.raises(SystemExit) as stop:  # argparse's own exit, as for any usage error
        main([*_train_args(tmp_path, sst2_dir), "--bogus"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "unrecognized arguments: --bogus" in err, err


@pytest.mark.parametrize(
    "failure",
    [
        lambda: OSError(errno.ENOSPC, "No space left on device"),  # no path: a flush
        lambda: RuntimeError("safetensors: I/O error: No space left on device (os error 28)"),
    ],
)
def test_a_full_disk_is_a_user_error_wherever_it_is_raised(failure, monkeypatch, tmp_path, capsys):
    from loralab import cli

    def report(args):
        try:
            raise RuntimeError("PytorchStreamWriter failed writing file: unexpected pos")
        except RuntimeError as first:
            raise failure() from first

    monkeypatch.setitem(cli.COMMANDS, "report", report)
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loralab: error: The disk is full") and "Traceback" not in err


def test_other_errors_without_a_path_keep_their_traceback(monkeypatch, tmp_path):
    from loralab import cli

    def report(args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setitem(cli.COMMANDS, "report", report)
    with pytest.raises(OSError, match="Input/output error"):
        cli.main(["report", str(tmp_path)])
