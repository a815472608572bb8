"""The committed study results regenerate their committed reports (issue 14: a fresh clone's
`loralab report results/NAME` reproduces report.md byte for byte, apart from the line that
names the folder and the generation time)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loralab.cli import main

RESULTS = Path(__file__).resolve().parents[2] / "results"
STUDIES = sorted(p.parent.parent.name for p in RESULTS.glob("*/report/report.md"))


def _without_source_line(text: str) -> list[str]:
    """The report's lines but its first ("Source: FOLDER. N finished runs; generated TIME.")."""
    return [line for line in text.splitlines() if not line.startswith("Source: ")]


@pytest.mark.parametrize("name", STUDIES)
def test_committed_report_regenerates_unchanged(tmp_path, monkeypatch, name):
    # A copy (reading a study opens its SQLite storage, which must not touch the committed
    # file) at the same relative path, as a fresh clone's repository root has it: the report
    # names its runs by the path it was given.
    copy = tmp_path / "results" / name
    shutil.copytree(RESULTS / name, copy, ignore=shutil.ignore_patterns("report"))
    monkeypatch.chdir(tmp_path)
    assert main(["report", f"results/{name}"]) == 0
    committed, fresh = RESULTS / name / "report", copy / "report"
    assert _without_source_line((fresh / "report.md").read_text()) == _without_source_line(
        (committed / "report.md").read_text()
    )
    for table in ("report.csv", "runs.csv", "report.tex"):
        assert (fresh / table).read_text() == (committed / table).read_text(), table


def _glance_rows(report_md: str) -> list[str]:
    """The rows of the report's "At a glance" table (header and separator included)."""
    lines = report_md.splitlines()
    start = lines.index("## At a glance: LoRA vs full fine-tuning per task") + 2
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return lines[start:end]


@pytest.mark.parametrize("name", ["smollm2-cpu", "minilm-cpu"])
def test_readme_shows_each_studys_table_as_its_report_has_it(name):
    """The README's Results section copies each study's at-a-glance table (issue 14), header to
    last row: a report regenerated after new points must be copied again, or this fails."""
    readme = (RESULTS.parent / "README.md").read_text().splitlines()
    rows = _glance_rows((RESULTS / name / "report" / "report.md").read_text())
    assert len(rows) == 6  # header, separator, four tasks
    assert rows[2] in readme, f"README lacks {name}'s table; copy it from its report.md"
    first = readme.index(rows[2]) - 2
    assert readme[first : first + len(rows)] == rows
