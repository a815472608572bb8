"""The study report's files: report.md, report.html (figures embedded), report.csv, runs.csv,
report.tex and figures/*.png (*.pdf for report.tex), from run directories or from studies' stored trials (`loralab report`)."""

from __future__ import annotations

import base64
import csv
import io
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from ..errors import LoralabError
from ..models.registry import BUILTIN_MODELS
from ..rundir import FIGURES_DIR, REPORT_DIR, REPORT_FILES, atomic_write
from .aggregate import Comparison, aggregate
from .caveats import (
    ablation_hardware_warnings,
    allocator_warnings,
    diverged_warnings,
    hardware_warnings,
    lent_warnings,
    lost_seed_warnings,
)
from .grid_edges import grid_edge_warnings
from .latex import latex_report
from .plots import make_figures
from .records import (
    RUN_FIELDS,
    SHARE_FIELDS,
    deduplicate,
    load_runs,
    load_study_runs,
    pending_lrs,
    record_identity,
    stored_groups,
)
from .storage import existing, stored_url
from .tables import GLANCE_TITLE, Table, csv_rows, tables
from .variants import lora_slug, several_targets


@dataclass
class Report:
    out_dir: Path
    files: list[Path]
    tables: list[Table]
    comparisons: list[Comparison]
    warnings: list[str] = field(default_factory=list)


def _md_table(t: Table) -> str:
    esc = [[str(x).replace("|", "\\|") for x in row] for row in t.rows]
    lines = [f"## {t.title}", "", "| " + " | ".join(t.headers) + " |",
             "|" + "---|" * len(t.headers)] + ["| " + " | ".join(r) + " |" for r in esc]  # fmt: skip
    return "\n".join(lines + ([f"\n{t.note}"] if t.note else [])) + "\n"


def reading_order(tabs: list[Table]) -> list[Table]:
    """The order a report shows `tables`' tables in: the at-a-glance verdicts (the answer a
    reader came for) first, then the rest as listed, the full comparison table next."""
    return sorted(tabs, key=lambda t: t.title != GLANCE_TITLE)


BADGES = {"PASS": "pass", "FAIL": "fail", "uninformative": "uninf", "n/a": "na"}


def _html_cell(x) -> str:
    text = str(x)
    for word, cls in BADGES.items():
        if text.startswith(word):  # a verdict: a coloured badge, then its figures
            rest = text[len(word) :].lstrip(":")
            return f"<td><span class='badge {cls}'>{escape(word)}</span>{escape(rest)}</td>"
    return f"<td>{escape(text)}</td>"


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(_html_cell(x) for x in r) + "</tr>" for r in t.rows)
    note = f"<p class='note'>{escape(t.note)}</p>" if t.note else ""
    # A table wider than the page scrolls on its own, not the page with it.
    return f"<h2>{escape(t.title)}</h2><div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{note}"


STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1500px}table{border-collapse:collapse;"
    "margin:1em 0;font-size:13px}td,th{border:1px solid #bbb;padding:3px 6px;text-align:left;"
    "vertical-align:top}th{background:#eee}.note{color:#555;max-width:1100px}.wide{overflow-x:auto}"
    "img{max-width:100%;max-height:760px}figure{margin:1em 0}"
    "figcaption{color:#555;font-style:italic}.badge{display:inline-block;padding:1px 7px;border-radius:4px;"
    "font-weight:bold;color:#fff;margin-right:4px}.pass{background:#1a7f37}"
    ".fail{background:#cf222e}.uninf{background:#9a6700}.na{background:#6e7781}"
    ".warn{background:#fff8c5;border:1px solid #d4a72c;padding:.5em 1em}"
)


MD_TITLE = "# loralab study report"


def write_report(records: list[dict], out_dir: str | Path, source: str,
                 pending: dict | None = None) -> Report:  # fmt: skip
    """report.md, report.html (figures embedded), report.csv, runs.csv, report.tex and
    figures/*.png (and *.pdf, for report.tex);
    `pending` (records.pending_lrs) holds back grid-edge warnings for grids still running."""
    if not records:
        raise LoralabError(
            f"No finished runs in {source}: nothing to report. Run `loralab sweep` first, or "
            "point at the folder that holds the run directories."
        )
    records, warnings = deduplicate(records)
    cells, comps = aggregate(records)
    warnings += (
        grid_edge_warnings(cells, pending)
        + diverged_warnings(cells)
        + lost_seed_warnings(comps)
        + allocator_warnings(comps)
        + lent_warnings(comps)
        + hardware_warnings(comps)
        + ablation_hardware_warnings(cells)
    )
    tabs = tables(cells, comps)
    out = Path(out_dir)
    check_not_foreign(out)
    (out / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
    figures = make_figures(cells, comps, out / FIGURES_DIR)
    # One entry per run folder (a run can hold records of several groups): its machine.
    machines = {r.get("run_dir") or id(r): r.get("hardware") for r in records}
    n_runs = len(machines)
    intro = (
        f"Source: {source}. {n_runs} finished runs; generated {time.strftime('%Y-%m-%d %H:%M')}.\n\n"
        "Runs are pooled only when everything but the seed is equal (task, model, head, method, "
        "the whole LoRA section, data fingerprint and caps, epochs/steps, max length, batch "
        "size, learning rate, precision). Mean ± sample standard deviation (ddof = 1) over "
        "seeds. For each identity the learning rate is the one with the best mean dev score of "
        "the task's main metric (accuracy for GLUE, F1 for SQuAD v2) on the seeds every rate "
        "ran (the first seed, for a grid run on it; a diverged run or one without the metric "
        "scores worst; scores within 1 point of the majority baseline, either side, show nothing "
        "learned and tie with one another where each recorded a final dev loss; among tied "
        "rates, the lower final dev loss where each of them recorded one, else the smaller "
        "rate), so a rate's mean over all its seeds may trail "
        "another's; the dev set is also the "
        "reported set, as in the LoRA paper (GLUE test labels are not public). "
        f"{_hardware_line(list(machines.values()))}{_models_line(records)}\n"
    )
    # The answer first (the at-a-glance verdicts), then its caveats, then the tables behind it.
    shown = reading_order(tabs)
    glance, *rest = shown
    warn_md = [f"> **Warning:** {w}\n" for w in warnings]
    md = [MD_TITLE, "", intro, _md_table(glance), *warn_md] + [_md_table(t) for t in rest]
    md += ["## Figures", ""] + [f"![{title}]({FIGURES_DIR}/{p.name})\n" for title, p in figures]
    html = [f"<h1>loralab study report</h1><p>{escape(intro)}</p>", _html_table(glance)]
    html += [f"<p class='warn'>Warning: {escape(w)}</p>" for w in warnings]
    html += [_html_table(t) for t in rest] + ["<h2>Figures</h2>"]
    html += [
        f"<figure><img alt='{escape(title)}' src='data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode()}'><figcaption>{escape(title)}</figcaption></figure>"
        for title, p in figures
    ]  # fmt: skip
    files = [out / name for name in REPORT_FILES]  # md, html, csv, runs.csv, tex
    atomic_write(files[0], "\n".join(md))
    atomic_write(files[1], f"<!doctype html><html><head><meta charset='utf-8'><title>loralab report</title><style>{STYLE}</style></head><body>{''.join(html)}</body></html>\n")  # fmt: skip
    _write_csv(files[2], csv_rows(cells, comps))
    name_target = several_targets(r.get("lora") for r in records)
    _write_csv(files[3], [_flat_run(r, name_target) for r in records])
    pdfs = [(title, p.with_suffix(".pdf")) for title, p in figures]
    atomic_write(files[4], latex_report(shown, source, [(t, f"{FIGURES_DIR}/{p.name}") for t, p in pdfs]))  # fmt: skip
    return Report(out, files + [p for _, p in figures] + [p for _, p in pdfs], tabs, comps, warnings)  # fmt: skip


def check_not_foreign(out: Path) -> None:
    """Refuse to overwrite report files in `out` that an earlier report did not write (a user's
    own report.md, say): a loralab report.md starts with its title."""
    md = out / REPORT_FILES[0]
    title = MD_TITLE.encode()
    ours = False
    if md.is_file():
        with md.open("rb") as fh:  # its first bytes only: a report can be large
            ours = fh.read(len(title)) == title
    clash = [name for name in REPORT_FILES if (out / name).exists()]
    if clash and not ours:
        raise LoralabError(
            f"{out} already holds {', '.join(clash)}, not written by a loralab report; "
            "a report would overwrite them. Give --out a new or empty folder, or move those "
            "files away."
        )


def _hardware_line(machines: list[str | None]) -> str:
    """The report's sentence on the machines its runs recorded, one entry per run ("... A ×3,
    B ×1."), with the runs from before loralab recorded it (None) counted apart."""
    counts = Counter(hw for hw in machines if hw)
    missing = sum(1 for hw in machines if not hw)
    if not counts:
        return "Hardware: not recorded (runs from before loralab recorded it in summary.json)."
    known = ", ".join(f"{hw} ×{n}" for hw, n in sorted(counts.items()))
    rest = f"; not recorded ×{missing} (older runs)" if missing else ""
    return f"Hardware (CPU [kernel-deciding extensions] or GPU, per run): {known}{rest}."


def _models_line(records: list[dict]) -> str:
    """The report's sentence on the built-in models among the runs (" Model: NAME = what it is."),
    whose weights the name alone does not say (SmolLM2 is dequantised from a 4-bit GGUF); ""
    when there are none."""
    named = sorted({r["model"] for r in records if r.get("model") in BUILTIN_MODELS})
    known = [f"{m} = {BUILTIN_MODELS[m].description}" for m in named]
    return f" Model{'s' if len(known) > 1 else ''}: {'; '.join(known)}." if known else ""


def _flat_run(r: dict, name_target: bool = False) -> dict:
    row = {"group": r["group"], "identity": record_identity(r), **{k: r.get(k) for k in RUN_FIELDS}}
    row["lora"] = lora_slug(r.get("lora"), name_target) if r.get("lora") else ""
    row["allocator"] = r.get("allocator") or ""  # peak memory depends on it
    row["lent_share"] = r.get("lent_share")  # wall time depends on it
    row["hardware"] = r.get("hardware") or ""  # and on this
    row.update({k: r.get(k) for k in SHARE_FIELDS})
    row.update({f"metric_{k}": v for k, v in (r.get("metrics") or {}).items()})
    return row


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())


def report(results_dir: str | Path | None = None, studies: list[str] | None = None,
           storage: str | None = None, out: str | Path | None = None) -> Report:  # fmt: skip
    """`loralab report`: from a results folder's run directories, or from studies' storage."""
    if studies:
        url = stored_url(results_dir, storage)
        if not url:
            raise LoralabError("--study needs --storage URL, or a results folder holding study.db.")
        records = load_study_runs(studies, existing(url))
        source = f"studies {', '.join(studies)}"
    elif results_dir:
        records = folder_runs(results_dir, storage)
        source = f"run directories under {results_dir}"
    else:
        raise LoralabError("Give a results folder (loralab report results) or --study NAME.")
    out_dir = out or (Path(results_dir) / REPORT_DIR if results_dir else Path(REPORT_DIR))
    return write_report(records, out_dir, source, stored_pending(results_dir, storage))


def folder_runs(results_dir: str | Path, storage: str | None = None) -> list:
    """The finished runs under a results folder, grouped as the study storage beside it (or
    `storage`) names the runs that have no sweep.json (older runs; else they read as sweep)."""
    url = stored_url(results_dir, storage)
    try:
        groups = stored_groups(url) if url else None
    except LoralabError as e:  # the runs are the results: report them, grouped by sweep.json
        print(f"warning: {e} Runs without sweep.json are reported as the grid's.", file=sys.stderr)  # fmt: skip
        groups = None
    return load_runs(results_dir, groups)


def stored_pending(results_dir: str | Path | None, storage: str | None = None) -> dict:
    """The learning rates the study storage (given, or RESULTS_DIR/study.db) has yet to run."""
    url = stored_url(results_dir, storage)
    try:
        return pending_lrs(url) if url else {}
    except LoralabError:  # folder_runs already warned; the runs alone still make the report
        return {}
