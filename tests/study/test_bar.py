"""The study progress bar: on a terminal it counts points; in a log file it is plain lines."""

from __future__ import annotations

import io
import sys

from loralab.study.bar import PointsBar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_bar_counts_points_and_lines_go_above_it(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    bar = PointsBar("study", total=5, done=1, quiet=False)
    bar.update(3)  # two points finished (here or by other workers)
    bar.update(3)  # nothing new: no redraw
    bar.write("[study] sst2-lora: completed")
    bar.close()
    out = term.getvalue()
    assert bar.bar.n == 3 and "3/5" in out and "point" in out
    assert "[study] sst2-lora: completed\n" in out


def test_in_a_log_file_it_prints_plain_lines_and_quiet_prints_nothing(capsys):
    bar = PointsBar("study", total=5, done=0, quiet=False)  # pytest's stderr is no terminal
    bar.update(2)
    bar.write("[study] a line")
    bar.close()
    assert capsys.readouterr().err == "[study] a line\n"  # no bar, no carriage returns
    quiet = PointsBar("study", total=5, done=0, quiet=True)
    quiet.write("[study] hidden")
    quiet.update(1)
    quiet.close()
    assert capsys.readouterr().err == ""
