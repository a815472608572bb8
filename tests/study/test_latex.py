"""report.tex: the report's tables as LaTeX, escaped so that a cell never becomes markup."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from test_report import write_runs

from loralab.study.latex import escape, latex_table
from loralab.study.report import report
from loralab.study.tables import Table


def _balanced(tex: str) -> bool:
    """Every unescaped { has its }."""
    depth = 0
    for ch in re.sub(r"\\[{}]", "", tex):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def _cells(row_line: str) -> list[str]:
    """A tabular row's cells: split at & that are not escaped."""
    return re.split(r"(?<!\\)&", row_line.removesuffix(r" \\"))


def test_escape_special_characters_and_symbols():
    assert escape("86.15 ± 0.42 (lr 0.001, 5 seeds)") == r"86.15 $\pm$ 0.42 (lr 0.001, 5 seeds)"
    assert escape("FAIL: 0.341% & a_b #1 $x") == r"FAIL: 0.341\% \& a\_b \#1 \$x"
    assert escape("neither > 1 pt; ~11 seeds; 23.5 / 33.6") == (
        r"neither \textgreater{} 1 pt; $\sim$11 seeds; 23.5 \slash{} 33.6"
    )
    assert escape("−3.54 [−6.63, −0.44]") == r"$-$3.54 {[}$-$6.63, $-$0.44{]}"
    assert escape("r=8 α=16 ≤ 0.3% ✓ — 0.70×") == (
        r"r=8 $\alpha$=16 $\leq$ 0.3\% \checkmark{} --- 0.70$\times$"
    )
    assert escape(r"a\b{c}~^") == r"a\textbackslash{}b\{c\}$\sim$\textasciicircum{}"


def test_a_table_keeps_its_columns_whatever_its_cells_hold():
    t = Table(
        "LoRA − full",
        ["task", "verdict", "share"],
        [["sst2", "PASS: -2.43 [-3.06, -1.81]", "0.341% & more"], ["rte_x", "{odd}", "50%"]],
        note="Mean ± std; 95% interval.",
    )
    tex = latex_table(t, "x")
    rows = [line for line in tex.splitlines() if line.endswith(r" \\")]
    assert len(rows) == 3  # header + two rows
    assert all(len(_cells(r)) == 3 for r in rows)
    # Long cells wrap in a column as wide as the longest (capped at 24 characters, 12 em).
    wrap = r">{\raggedright\arraybackslash}p"
    assert rf"\sbox0{{\begin{{tabular}}{{l{wrap}{{12.0em}}{wrap}{{6.5em}}}}" in tex
    assert r"\label{tab:x}" in tex
    assert r"\caption{LoRA $-$ full}" in tex
    assert r"sst2 & PASS: -2.43 {[}-3.06, -1.81{]} & 0.341\% \& more \\" in rows
    assert r"{\footnotesize Mean $\pm$ std; 95\% interval.\par}" in tex
    assert _balanced(tex)


def test_a_narrow_table_stays_one_line_per_cell_and_stacks_a_long_header():
    t = Table("grid", ["lr", "trainable % (without head)"], [["0.001", "0.341"]])
    tex = latex_table(t, "g")
    assert r"\sbox0{\begin{tabular}{ll}" in tex
    stacked = r"\begin{tabular}[b]{@{}l@{}}trainable \% \\ (without \\ head)\end{tabular}"
    assert f"lr & {stacked} \\\\" in tex.splitlines()
    assert _balanced(tex)
    # Scaled down only where wider than the line.
    assert r"\ifdim\wd0>\linewidth\resizebox{\linewidth}{!}{\usebox0}\else\usebox0\fi" in tex


def test_the_report_writes_every_table_to_report_tex(tmp_path):
    write_runs(tmp_path)
    rep = report(tmp_path, out=tmp_path / "out")
    tex = (tmp_path / "out" / "report.tex").read_text()
    assert tmp_path / "out" / "report.tex" in rep.files
    md = (tmp_path / "out" / "report.md").read_text()
    titles = [
        line[3:] for line in md.splitlines() if line.startswith("## ") and line != "## Figures"
    ]
    assert tex.count(r"\begin{table*}") == len(rep.tables) == len(titles)
    assert [escape(t) for t in titles] == re.findall(r"\\caption\{(.*)\}\\label\{tab:", tex)
    # Every figure of report.md as a figure* float of its vector PDF, written beside the PNG.
    figures = re.findall(r"^!\[(.*)\]\(figures/(.*)\.png\)$", md, flags=re.M)
    assert len(figures) >= 3 and tex.count(r"\begin{figure*}") == len(figures)
    for i, (title, name) in enumerate(figures, 1):
        assert (
            f"{{figures/{name}.pdf}}\n\\caption{{{escape(title)}}}\\label{{fig:loralab-{i}}}" in tex
        )
        pdf = tmp_path / "out" / "figures" / f"{name}.pdf"
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf in rep.files
    before = {p.name: p.read_bytes() for p in (tmp_path / "out" / "figures").glob("*.pdf")}
    report(tmp_path, out=tmp_path / "out")  # the same runs again: the same PDFs, byte for byte
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "out" / "figures").glob("*.pdf")}
    # The main table's LoRA row for SST-2, cell by cell as report.md has it.
    main = rep.tables[0]
    row = next(r for r in main.rows if r[0] == "sst2" and r[3] == "lora" and r[7] == "0.0003")
    assert " & ".join(escape(c) for c in row) + r" \\" in tex.splitlines()
    assert _balanced(tex)


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="needs pdflatex (TeX Live)")
def test_report_tex_compiles_and_fits_the_page(tmp_path):
    """With the packages the preamble names, every table compiles and none runs past the line."""
    write_runs(tmp_path)
    report(tmp_path, out=tmp_path / "out")
    (tmp_path / "doc.tex").write_text(
        "\\documentclass{article}\\usepackage{booktabs,array,graphicx,amssymb}\n"
        "\\graphicspath{{out/}}\n"  # as report.tex's preamble says, for a paper elsewhere
        "\\begin{document}\\input{out/report.tex}\\end{document}\n"
    )
    r = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:]
    assert "Overfull \\hbox" not in r.stdout
