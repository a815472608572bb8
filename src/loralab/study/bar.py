"""A sweep's or study's progress bar: points finished of the grid, their rate, the time left.

Shown on a terminal only (tqdm's `disable=None`): a worker whose stderr goes to a log file
keeps its plain one-line-per-point messages there, without carriage returns.
"""

from __future__ import annotations

import sys


class PointsBar:
    """`update(done)` after each point; `write(text)` prints a line above the bar."""

    def __init__(self, desc: str, total: int, done: int, quiet: bool):
        from tqdm.auto import tqdm

        self.quiet = quiet
        self.bar = tqdm(
            total=total, initial=done, desc=desc, unit="point", dynamic_ncols=True,
            file=sys.stderr, disable=True if quiet else None,
        )  # fmt: skip

    def write(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar.disable:
            print(text, file=sys.stderr, flush=True)
        else:
            self.bar.write(text, file=sys.stderr)

    def update(self, done: int) -> None:
        if not self.bar.disable and done != self.bar.n:
            self.bar.update(done - self.bar.n)  # the rate and time left follow the points

    def close(self) -> None:
        self.bar.close()
