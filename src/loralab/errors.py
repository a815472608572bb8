"""The one exception type for user mistakes (printed as a paragraph, exit status 2)."""

from __future__ import annotations


class LoralabError(Exception):
    """A user mistake: bad option, missing file, unknown name. The CLI prints it and exits 2."""

    exit_code = 2


class TrainingDiverged(LoralabError):
    """The loss became NaN/inf; the run stopped and kept what was already saved."""

    exit_code = 3
