"""The study report: finished runs -> per-(task, method) statistics, tables, plots, files.

Statistics: mean and sample standard deviation (ddof = 1; undefined for one seed) over seeds,
at the learning rate with the best mean dev score of the task's main metric (the LoRA paper's
protocol; the dev set is also the reported set, as GLUE test labels are not public).
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import tracking
from .errors import LoralabError

DROP_TARGET_POINTS = 3.0  # LoRA may lose at most 3 points of the main metric to full fine-tuning
SHARE_TARGET_PCT = 0.3  # ... with at most 0.3% of the weights trainable (adapters, no head)
RUN_FIELDS = ("status", "task", "method", "model", "head", "seed", "lr", "wall_time_s",
              "train_time_s", "peak_memory_mb", "steps", "run_dir")  # fmt: skip
SHARE_FIELDS = ("trainable_share_pct", "trainable_share_without_head_pct", "lora_share_pct",
                "total", "trainable")  # fmt: skip


def record_from_summary(summary: dict) -> dict:
    """The part of a run's summary.json the report needs (also stored in Optuna trials)."""
    rec = {k: summary.get(k) for k in RUN_FIELDS}
    params = summary.get("params") or {}
    rec.update({k: params.get(k) for k in SHARE_FIELDS})
    lora = summary.get("lora") if summary.get("method") == "lora" else None
    rec["lora"] = {k: (lora or {}).get(k) for k in ("r", "alpha", "target")} if lora else None
    rec["metrics"] = {k: v for k, v in (summary.get("metrics") or {}).items() if _num(v)}
    return rec


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def main_metric(task: str) -> str:
    from .tasks import get_task

    try:
        return get_task(task).primary_metric
    except LoralabError:
        return "accuracy"


def points_per_unit(task: str) -> float:
    """GLUE metrics are fractions (x100 = points); SQuAD's are already in points."""
    from .tasks import get_task

    try:
        return 1.0 if get_task(task).kind == "qa" else 100.0
    except LoralabError:
        return 100.0


def main_metric_value(rec: dict) -> float | None:
    return (rec.get("metrics") or {}).get(main_metric(rec["task"]))


# ---------------------------------------------------------------------------------------------
# Loading


def load_runs(results_dir: str | Path) -> list[dict]:
    """Every finished run directory under `results_dir`, once per study group that used it."""
    from .worker import SWEEP_FILE

    root = Path(results_dir)
    if not root.is_dir():
        raise LoralabError(f"Results folder '{root}' does not exist.")
    out = []
    for path in sorted(root.rglob(tracking.SUMMARY_FILE)):
        run_dir = path.parent
        if tracking.CHECKPOINT_DIR in path.parts or not (run_dir / tracking.CONFIG_FILE).is_file():
            continue
        summary = tracking.read_json(path)
        if summary.get("status") not in ("completed", "diverged"):
            continue  # running, killed or failed: no result yet
        rec = record_from_summary(summary)
        rec["run_dir"] = str(run_dir)
        note = run_dir / SWEEP_FILE
        groups = tracking.read_json(note).get("groups") if note.is_file() else None
        out += [{**rec, "group": g} for g in groups or ["sweep"]]
    return out


def load_study_runs(study_names: list[str], storage: str) -> list[dict]:
    """The results stored in the studies' trials (works without the run directories)."""
    from .sweep import is_final, load_study, open_storage

    st = open_storage(storage)
    out = []
    for name in study_names:
        study, plan = load_study(st, name)
        for t in study.get_trials(deepcopy=False):
            if is_final(t) and t.user_attrs.get("result"):
                out.append({**t.user_attrs["result"], "group": plan.group})
    return out


# ---------------------------------------------------------------------------------------------
# Statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1); std is NaN for a single value."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def variant_of(rec: dict) -> tuple:
    lora = rec.get("lora")
    if not lora:
        return ()
    target = lora["target"]
    target = "+".join(target) if isinstance(target, list) else target
    return (lora["r"], float(lora["alpha"]), target)


@dataclass
class Cell:
    """The runs of one (group, task, model, head, method, LoRA variant, learning rate)."""

    group: str
    task: str
    model: str
    head: str
    method: str
    variant: tuple
    lr: float
    runs: list = field(default_factory=list)
    best: bool = False

    @property
    def done(self) -> list[dict]:
        return [r for r in self.runs if r["status"] == "completed"]

    @property
    def metric(self) -> str:
        return main_metric(self.task)

    def stat(self, metric: str) -> tuple[float, float]:
        return mean_std([r["metrics"][metric] for r in self.done if metric in r["metrics"]])

    def avg(self, key: str) -> float:
        vals = [r[key] for r in self.done if _num(r.get(key))]
        return sum(vals) / len(vals) if vals else math.nan

    @property
    def metrics(self) -> list[str]:
        names = {m for r in self.done for m in r["metrics"]}
        return sorted(names, key=lambda m: (m != self.metric, m))

    @property
    def family(self) -> tuple:
        return (self.group, self.task, self.model, self.head, self.method, self.variant)


@dataclass
class Comparison:
    task: str
    model: str
    head: str
    lora: Cell
    full: Cell | None

    @property
    def delta_points(self) -> float:
        """LoRA − full of the main metric's means, in points."""
        if self.full is None:
            return math.nan
        m = self.lora.metric
        return points_per_unit(self.task) * (self.lora.stat(m)[0] - self.full.stat(m)[0])

    @property
    def drop_ok(self) -> bool | None:
        d = self.delta_points
        return None if math.isnan(d) else d >= -DROP_TARGET_POINTS

    @property
    def share_ok(self) -> bool | None:
        s = self.lora.avg("trainable_share_without_head_pct")
        return None if math.isnan(s) else s <= SHARE_TARGET_PCT


def aggregate(records: list[dict]) -> tuple[list[Cell], list[Comparison]]:
    """Cells (every lr, `best` marked) and LoRA-vs-full comparisons at the best lr."""
    cells: dict[tuple, Cell] = {}
    for r in records:
        variant = variant_of(r)
        key = (r["group"], r["task"], r["model"], r.get("head") or "classifier", r["method"], variant, float(r["lr"]))  # fmt: skip
        cells.setdefault(key, Cell(*key)).runs.append(r)
    ordered = sorted(cells.values(), key=lambda c: (c.group != "sweep", c.group, c.task, c.model, c.head, c.method != "lora", c.variant, c.lr))  # fmt: skip
    families: dict[tuple, list[Cell]] = {}
    for c in ordered:
        families.setdefault(c.family, []).append(c)
    for fam in families.values():
        scored = [c for c in fam if not math.isnan(c.stat(c.metric)[0])]
        if scored:  # ties go to the smaller learning rate (cells are sorted by lr)
            max(scored, key=lambda c: c.stat(c.metric)[0]).best = True
    best = [c for c in ordered if c.best]
    comps = []
    for c in best:
        if c.group == "sweep" and c.method == "lora":
            full = [f for f in best if f.group == "sweep" and f.method == "full"
                    and (f.task, f.model, f.head) == (c.task, c.model, c.head)]  # fmt: skip
            comps.append(Comparison(c.task, c.model, c.head, c, full[0] if full else None))
    return ordered, comps


# ---------------------------------------------------------------------------------------------
# Tables


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


def _pm(cell: Cell, metric: str) -> str:
    mean, std = cell.stat(metric)
    if math.isnan(mean):
        return "—"
    k = points_per_unit(cell.task)
    return f"{k * mean:.2f}" + (f" ± {k * std:.2f}" if not math.isnan(std) else " (1 seed)")


def _f(x: float, fmt: str = ".1f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _variant_text(v: tuple) -> str:
    return f"r={v[0]}, α={v[1]:g}, {v[2]}" if v else "—"


def _verdict(ok: bool | None, detail: str) -> str:
    return "n/a" if ok is None else f"{'PASS' if ok else 'FAIL'} ({detail})"


def _n(cell: Cell) -> str:
    div = sum(r["status"] == "diverged" for r in cell.runs)
    return f"{len(cell.done)}" + (f" (+{div} diverged)" if div else "")


def tables(cells: list[Cell], comps: list[Comparison]) -> list[Table]:
    out = []
    if comps:
        rows = []
        for c in comps:
            for cell in [c.lora] + ([c.full] if c.full else []):
                is_lora = cell is c.lora
                rows.append([
                    cell.task, cell.model, cell.method, _variant_text(cell.variant), f"{cell.lr:g}", _n(cell),
                    f"{cell.metric}: {_pm(cell, cell.metric)}",
                    _f(c.delta_points, "+.2f") if is_lora else "",
                    _f(cell.avg("trainable_share_pct"), ".3f"), _f(cell.avg("trainable_share_without_head_pct"), ".3f"),
                    _f(cell.avg("wall_time_s")), _f(cell.avg("peak_memory_mb"), ".0f"),
                    _verdict(c.drop_ok, f"{_f(c.delta_points, '+.2f')} pts") if is_lora else "",
                    _verdict(c.share_ok, f"{_f(cell.avg('trainable_share_without_head_pct'), '.3f')}%") if is_lora else "",
                ])  # fmt: skip
        out.append(Table(
            "LoRA vs full fine-tuning (best learning rate per method)",
            ["task", "model", "method", "LoRA", "best lr", "seeds", "main metric (mean ± std)",
             "LoRA − full (points)", "trainable % (with head)", "trainable % (without head)",
             "wall time (s)", "peak memory (MB)", f"drop ≤ {DROP_TARGET_POINTS:g} points",
             f"trainable ≤ {SHARE_TARGET_PCT:g}%"],
            rows,
            "Metrics in points (GLUE: % of examples; SQuAD v2: official %). Targets: LoRA may lose "
            f"at most {DROP_TARGET_POINTS:g} points of the main metric to full fine-tuning, with at "
            f"most {SHARE_TARGET_PCT:g}% of the weights trainable (adapters only, without the "
            "freshly initialised task head).",
        ))  # fmt: skip
    best = [c for c in cells if c.best]
    for task in sorted({c.task for c in best}):
        group = [c for c in best if c.task == task]
        metrics = sorted(
            {m for c in group for m in c.metrics}, key=lambda m: (m != group[0].metric, m)
        )
        out.append(Table(
            f"{task}: every metric at the best learning rate",
            ["study", "model", "method", "LoRA", "lr", "seeds", *metrics],
            [[c.group, c.model, c.method, _variant_text(c.variant), f"{c.lr:g}", _n(c),
              *[_pm(c, m) for m in metrics]] for c in group],
        ))  # fmt: skip
    out.append(Table(
        "Learning-rate grid (main metric)",
        ["study", "task", "model", "method", "LoRA", "lr", "seeds", "main metric", "best"],
        [[c.group, c.task, c.model, c.method, _variant_text(c.variant), f"{c.lr:g}", _n(c),
          _pm(c, c.metric), "✓" if c.best else ""] for c in cells],
    ))  # fmt: skip
    for group in sorted({c.group for c in best if c.group.startswith("ablation-")}):
        rows = [[c.task, c.model, str(c.variant[0]), f"{c.variant[1]:g}", c.variant[2], f"{c.lr:g}", _n(c),
                 f"{c.metric}: {_pm(c, c.metric)}", _f(c.avg("trainable_share_without_head_pct"), ".3f"),
                 _f(c.avg("wall_time_s")), _f(c.avg("peak_memory_mb"), ".0f")]
                for c in best if c.group == group and c.variant]  # fmt: skip
        out.append(Table(
            f"Ablation: {group.removeprefix('ablation-')} (best learning rate per setting)",
            ["task", "model", "r", "alpha", "modules", "best lr", "seeds", "main metric",
             "trainable % (without head)", "wall time (s)", "peak memory (MB)"],
            rows,
        ))  # fmt: skip
    return out


def csv_rows(cells: list[Cell], comps: list[Comparison]) -> list[dict]:
    """One row per cell, raw units (GLUE metrics as fractions); LoRA rows carry the deltas."""
    by_lora = {id(c.lora): c for c in comps}
    metrics = sorted({m for c in cells for m in c.metrics})
    rows = []
    for c in cells:
        comp = by_lora.get(id(c))
        row = {"group": c.group, "task": c.task, "model": c.model, "head": c.head,
               "method": c.method, "r": c.variant[0] if c.variant else "",
               "alpha": c.variant[1] if c.variant else "", "target": c.variant[2] if c.variant else "",
               "lr": c.lr, "best_lr": c.best, "n": len(c.done),
               "n_diverged": sum(r["status"] == "diverged" for r in c.runs),
               "seeds": " ".join(str(r["seed"]) for r in c.done), "main_metric": c.metric}  # fmt: skip
        for m in metrics:
            mean, std = c.stat(m)
            row[f"{m}_mean"], row[f"{m}_std"] = mean, std
        for k in ("trainable_share_pct", "trainable_share_without_head_pct", "wall_time_s", "peak_memory_mb"):  # fmt: skip
            row[k] = c.avg(k)
        row["lora_minus_full_points"] = comp.delta_points if comp else ""
        row["drop_target_pass"] = comp.drop_ok if comp else ""
        row["share_target_pass"] = comp.share_ok if comp else ""
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class Report:
    out_dir: Path
    files: list[Path]
    tables: list[Table]
    comparisons: list[Comparison]


def _md_table(t: Table) -> str:
    esc = [[str(x).replace("|", "\\|") for x in row] for row in t.rows]
    lines = [f"## {t.title}", "", "| " + " | ".join(t.headers) + " |",
             "|" + "---|" * len(t.headers)] + ["| " + " | ".join(r) + " |" for r in esc]  # fmt: skip
    return "\n".join(lines + ([f"\n{t.note}"] if t.note else [])) + "\n"


def _html_table(t: Table) -> str:
    from html import escape

    head = "".join(f"<th>{escape(h)}</th>" for h in t.headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(x))}</td>" for x in r) + "</tr>" for r in t.rows
    )
    note = f"<p class='note'>{escape(t.note)}</p>" if t.note else ""
    return f"<h2>{escape(t.title)}</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


def write_report(records: list[dict], out_dir: str | Path, source: str) -> Report:
    """report.md, report.html (figures embedded), report.csv, runs.csv and figures/*.png."""
    import base64
    from html import escape

    from .plots import make_figures

    if not records:
        raise LoralabError(
            f"No finished runs in {source}: nothing to report. Run `loralab sweep` first, or "
            "point at the folder that holds the run directories."
        )
    cells, comps = aggregate(records)
    tabs = tables(cells, comps)
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    figures = make_figures(cells, comps, out / "figures")
    n_runs = len({r.get("run_dir") or id(r) for r in records})
    intro = (
        f"Source: {source}. {n_runs} finished runs; generated {time.strftime('%Y-%m-%d %H:%M')}.\n\n"
        "Mean ± sample standard deviation (ddof = 1) over seeds. For each task, method and LoRA "
        "setting the learning rate is the one with the best mean dev score of the task's main "
        "metric (accuracy for GLUE, F1 for SQuAD v2); the dev set is also the reported set, as in "
        "the LoRA paper (GLUE test labels are not public).\n"
    )
    md = ["# loralab study report", "", intro] + [_md_table(t) for t in tabs]
    md += ["## Figures", ""] + [f"![{title}](figures/{p.name})\n" for title, p in figures]
    html = [f"<h1>loralab study report</h1><p>{escape(intro)}</p>"] + [_html_table(t) for t in tabs]
    html += ["<h2>Figures</h2>"] + [
        f"<figure><img alt='{escape(title)}' src='data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode()}'><figcaption>{escape(title)}</figcaption></figure>"
        for title, p in figures
    ]  # fmt: skip
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:left}"
             "th{background:#eee}.note{color:#555}img{max-width:100%}")  # fmt: skip
    files = [out / "report.md", out / "report.html", out / "report.csv", out / "runs.csv"]
    tracking.atomic_write(files[0], "\n".join(md))
    tracking.atomic_write(files[1], f"<!doctype html><html><head><meta charset='utf-8'><title>loralab report</title><style>{style}</style></head><body>{''.join(html)}</body></html>\n")  # fmt: skip
    _write_csv(files[2], csv_rows(cells, comps))
    _write_csv(files[3], [_flat_run(r) for r in records])
    for f in files:
        f.chmod(0o644)  # a report is for sharing (atomic_write's temp files are private)
    return Report(out, files + [p for _, p in figures], tabs, comps)


def _flat_run(r: dict) -> dict:
    row = {"group": r["group"], **{k: r.get(k) for k in RUN_FIELDS}}
    row.update({f"lora_{k}": (r.get("lora") or {}).get(k, "") for k in ("r", "alpha", "target")})
    row.update({k: r.get(k) for k in SHARE_FIELDS})
    row.update({f"metric_{k}": v for k, v in (r.get("metrics") or {}).items()})
    return row


def _write_csv(path: Path, rows: list[dict]) -> None:
    import io

    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
    tracking.atomic_write(path, buf.getvalue())


def report(results_dir: str | Path | None = None, studies: list[str] | None = None,
           storage: str | None = None, out: str | Path | None = None) -> Report:  # fmt: skip
    """`loralab report`: from a results folder's run directories, or from studies' storage."""
    from .sweep import storage_url

    if studies:
        if not storage and not (results_dir and (Path(results_dir) / "study.db").is_file()):
            raise LoralabError("--study needs --storage URL, or a results folder holding study.db.")
        records = load_study_runs(studies, storage or storage_url(None, results_dir))
        source = f"studies {', '.join(studies)}"
    elif results_dir:
        records = load_runs(results_dir)
        source = f"run directories under {results_dir}"
    else:
        raise LoralabError("Give a results folder (loralab report results) or --study NAME.")
    out_dir = out or (Path(results_dir) / "report" if results_dir else Path("report"))
    return write_report(records, out_dir, source)
