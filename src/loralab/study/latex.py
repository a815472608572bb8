"""report.tex: the report's tables as LaTeX floats (booktabs), to \\input into a paper. Pure
functions of the same `Table`s that report.md and report.html show."""

from __future__ import annotations

import textwrap

from .tables import Table

# LaTeX's special characters, and the non-ASCII symbols the tables use, in text mode.
ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"$\sim$",  # "about" in the report's text
    "^": r"\textasciicircum{}",
    # `\\` followed by "[" would read it as the row's spacing argument
    "[": "{[}",
    "]": "{]}",
    "<": r"\textless{}",  # in the default font encoding "<" and ">" print as ¡ and ¿
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
    "/": r"\slash{}",  # a line may break after it (data fingerprints, "LoRA / full")
    "±": r"$\pm$",
    "−": r"$-$",
    "×": r"$\times$",
    "α": r"$\alpha$",
    "≤": r"$\leq$",
    "≥": r"$\geq$",
    "—": "---",
    "✓": r"\checkmark{}",
    "Δ": r"$\Delta$",
    "σ": r"$\sigma$",
    "φ": r"$\phi$",
}

PREAMBLE = (
    "% loralab study report: every table and figure of report.md as a LaTeX float.\n"
    "% Needs \\usepackage{booktabs}, \\usepackage{array}, \\usepackage{graphicx} and\n"
    "% \\usepackage{amssymb} (for \\checkmark). Long cells wrap; a table wider than the line is\n"
    "% scaled down to it (the main table, 19 columns, reads best on a landscape page).\n"
    "% Figures are the vector PDFs in figures/, named relative to this folder: from a paper\n"
    "% elsewhere, add \\graphicspath{{path/to/report/}}.\n"
)
SHORT = 12  # characters: a column whose cells are all this short keeps them on one line
CAP = 24  # a long column's width grows with its longest cell up to this many characters
EM_PER_CHAR = 0.5  # about the mean width of a character of Computer Modern, in em


def escape(text: str) -> str:
    """`text` as LaTeX that prints it (special characters escaped, symbols in math mode)."""
    return "".join(ESCAPES.get(ch, ch) for ch in str(text))


def column_specs(rows: list[list[str]], columns: int) -> list[str]:
    """Each column's tabular spec: `l` for a column of short cells, else a ragged-right
    paragraph column as wide as its longest cell (at most CAP characters), in em."""
    longest = [max((len(str(r[i])) for r in rows), default=0) for i in range(columns)]
    return [
        "l"
        if n <= SHORT
        else rf">{{\raggedright\arraybackslash}}p{{{EM_PER_CHAR * min(n, CAP):.1f}em}}"
        for n in longest
    ]


def _header(text: str, wraps: bool) -> str:
    """A header cell; a long one over a one-line column is stacked on lines of up to SHORT
    characters (a nested tabular), so the header does not widen its column."""
    if wraps or len(text) <= SHORT:
        return escape(text)
    lines = textwrap.wrap(text, SHORT, break_long_words=False, break_on_hyphens=False)
    return r"\begin{tabular}[b]{@{}l@{}}" + r" \\ ".join(map(escape, lines)) + r"\end{tabular}"


def latex_table(t: Table, label: str) -> str:
    """One table* float: caption = the table's title, its note in small type beneath; the
    tabular is set in box 0 and scaled down to the line width only where it is wider.

    t.headers: [columns]; t.rows: [rows][columns] of str."""
    specs = column_specs(t.rows, len(t.headers))
    heads = [_header(h, c != "l") for h, c in zip(t.headers, specs, strict=True)]
    lines = [
        r"\begin{table*}[ht]",
        r"\centering" + (r"\small" if len(t.headers) <= 8 else r"\scriptsize"),
        rf"\caption{{{escape(t.title)}}}\label{{tab:{label}}}",
        rf"\sbox0{{\begin{{tabular}}{{{''.join(specs)}}}",
        r"\toprule",
        " & ".join(heads) + r" \\",
        r"\midrule",
        *(" & ".join(escape(c) for c in row) + r" \\" for row in t.rows),
        r"\bottomrule",
        r"\end{tabular}}%",
        r"\ifdim\wd0>\linewidth\resizebox{\linewidth}{!}{\usebox0}\else\usebox0\fi",
    ]
    if t.note:
        lines.append(rf"\par\smallskip{{\footnotesize {escape(t.note)}\par}}")
    return "\n".join(lines + [r"\end{table*}"]) + "\n"


def latex_figure(title: str, path: str, label: str) -> str:
    """One figure* float of the report's figure at `path` (relative to the report folder),
    as wide as the line and at most half a page high."""
    return "\n".join([
        r"\begin{figure*}[ht]",
        r"\centering",
        rf"\includegraphics[width=\linewidth,height=0.5\textheight,keepaspectratio]{{{path}}}",
        rf"\caption{{{escape(title)}}}\label{{fig:{label}}}",
        r"\end{figure*}",
    ]) + "\n"  # fmt: skip


def latex_report(tables: list[Table], source: str, figures: list[tuple[str, str]] = ()) -> str:
    """report.tex: the preamble comment, then each table and each (title, path) figure with a
    label from its position (tab:loralab-1, ..., fig:loralab-1, ...; captions say which)."""
    body = [latex_table(t, f"loralab-{i}") for i, t in enumerate(tables, 1)]
    body += [latex_figure(title, path, f"loralab-{i}") for i, (title, path) in enumerate(figures, 1)]  # fmt: skip
    return PREAMBLE + f"% Source: {' '.join(source.split())}.\n\n" + "\n".join(body)
