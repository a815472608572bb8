"""The study report: finished runs -> per-identity statistics, tables, plots, files.

Runs pool only when their *identity* is equal: the whole run config except the seed, output
paths and logging intervals, with the data replaced by a fingerprint of its rows (see
`train.identity`). Two runs with the same identity and seed count once (the newest). For each
identity minus the learning rate, the learning rate with the best mean dev score of the task's
main metric is chosen (the LoRA paper's protocol; the dev set is also the reported set, as GLUE
test labels are not public). LoRA is compared with full fine-tuning run for run: per seed run by
both, the difference of the main metric; its mean and a 95% Student-t interval over seeds.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import tracking
from .errors import LoralabError
from .stats import mean_std, t_interval

DROP_TARGET_POINTS = 3.0  # LoRA may lose at most 3 points of the main metric to full fine-tuning
SHARE_TARGET_PCT = 0.3  # ... with at most 0.3% of the weights trainable (adapters, no head)
UNINFORMATIVE_POINTS = 1.0  # both methods this close to the majority baseline: nothing learned
RUN_FIELDS = ("status", "task", "method", "model", "head", "seed", "lr", "wall_time_s",
              "train_time_s", "peak_memory_mb", "steps", "run_dir")  # fmt: skip
SHARE_FIELDS = ("trainable_share_pct", "trainable_share_without_head_pct", "lora_share_pct",
                "total", "trainable")  # fmt: skip
# LoRA settings shown in a variant's name only when they differ from these (r and α: always).
LORA_DEFAULTS = {"dropout": 0.05, "target": "standard", "bias": "none", "use_rslora": False,
                 "use_dora": False, "init_lora_weights": True, "extra": {}}  # fmt: skip


def record_from_summary(summary: dict) -> dict:
    """The part of a run's summary.json the report needs (also stored in Optuna trials)."""
    rec = {k: summary.get(k) for k in RUN_FIELDS}
    params = summary.get("params") or {}
    rec.update({k: params.get(k) for k in SHARE_FIELDS})
    rec["lora"] = summary.get("lora") if summary.get("method") == "lora" else None
    rec["metrics"] = _numbers(summary.get("metrics"))
    rec["majority"] = _numbers(summary.get("majority_baseline"))
    rec["zero_shot"] = _numbers(summary.get("zero_shot"))
    rec["identity"] = summary.get("identity")
    rec["data_known"] = bool((summary.get("identity") or {}).get("data", {}).get("fingerprint"))
    return rec


def _numbers(d) -> dict:
    return {k: v for k, v in (d or {}).items() if _num(v)}


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@functools.cache  # asked for by every statistic; the registry builds every task object
def main_metric(task: str) -> str:
    from .tasks import get_task

    try:
        return get_task(task).primary_metric
    except LoralabError:
        return "accuracy"


@functools.cache
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
# Identity


def identity_hash(identity: dict) -> str:
    """A short stable name of an identity (equal dicts, equal names)."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def derived_identity(config: dict, summary: dict) -> dict:
    """The identity of a run whose summary predates `identity`, from its config.yaml.

    Built as `train.identity` builds it; the summary's own fields (what actually ran) win over
    the config's. Without a data fingerprint the data paths stay in, so runs on other files
    still never pool.
    """
    import dataclasses
    from types import SimpleNamespace

    from .config import ExperimentConfig, from_dict
    from .train import identity

    try:
        cfg = from_dict(config)
    except LoralabError:
        cfg = ExperimentConfig()  # a config from an older version: the summary's fields decide
    cfg.data.task = summary.get("task") or cfg.data.task
    cfg.model.name = summary.get("model") or cfg.model.name
    cfg.model.head = summary.get("head") or cfg.model.head
    cfg.train.method = summary.get("method") or cfg.train.method
    cfg.train.lr = summary.get("lr") if _num(summary.get("lr")) else cfg.train.lr
    lora_fields = {f.name for f in dataclasses.fields(cfg.lora)}
    lora = {k: v for k, v in (summary.get("lora") or {}).items() if k in lora_fields}
    cfg.lora = dataclasses.replace(cfg.lora, **lora)
    ran = summary.get("precision")
    # As it ran; never `auto` resolved here (that measures this machine, not the run's).
    cfg.train.precision = ran if ran in ("bf16", "fp32") else "fp32"
    paths = {k: getattr(cfg.data, k) for k in ("data_dir", "train_file", "eval_file")}
    splits = SimpleNamespace(
        max_length=summary.get("max_length") or cfg.data.max_length,
        fingerprint=summary.get("data_fingerprint"),
    )
    d = identity(cfg, splits)
    d["train"]["precision"] = ran or "unknown"
    if not d["data"]["fingerprint"]:
        d["data"]["paths"] = paths
    return d


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
        if not summary.get("identity"):
            import yaml

            config = yaml.safe_load((run_dir / tracking.CONFIG_FILE).read_text()) or {}
            summary = {**summary, "identity": derived_identity(config, summary)}
        rec = record_from_summary(summary)
        rec["run_dir"] = str(run_dir)
        rec["time"] = path.stat().st_mtime
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
                done = t.datetime_complete.timestamp() if t.datetime_complete else 0.0
                out.append({"time": done, **t.user_attrs["result"], "group": plan.group})
    return out


def deduplicate(records: list[dict]) -> tuple[list[dict], list[str]]:
    """One record per (group, identity, seed): the newest. Warnings name both run folders."""
    newest: dict[tuple, dict] = {}
    warnings = []
    for r in records:
        key = (r["group"], _ident(r), r.get("seed"))
        old = newest.get(key)
        if old is None:
            newest[key] = r
            continue
        keep, drop = (r, old) if r.get("time", 0) >= old.get("time", 0) else (old, r)
        newest[key] = keep
        warnings.append(
            f"{drop.get('run_dir') or 'a stored trial'} and {keep.get('run_dir') or 'a stored trial'} "
            f"are the same run (identity {_ident(r)}, seed {r.get('seed')}); counted once, the "
            f"newer: {keep.get('run_dir') or 'a stored trial'}."
        )
    kept = {id(r) for r in newest.values()}
    return [r for r in records if id(r) in kept], warnings


def _ident(rec: dict) -> str:
    """A record's identity name; records without one (old stored trials) keep apart by content."""
    ident = rec.get("identity")
    if ident:
        return identity_hash(ident)
    return identity_hash({k: rec.get(k) for k in ("task", "model", "head", "method", "lr", "lora")})


def _without(identity: dict, *paths: str) -> dict:
    """A copy of `identity` without the dotted `paths` (e.g. 'train.lr', 'lora')."""
    d = json.loads(json.dumps(identity, default=str))
    for p in paths:
        *parents, last = p.split(".")
        node = d
        for k in parents:
            node = node.get(k, {})
        node.pop(last, None)
    return d


# ---------------------------------------------------------------------------------------------
# Cells and comparisons


def lora_slug(lora: dict | None) -> str:
    """The LoRA section as a short name: r and α, then whatever differs from the defaults."""
    if not lora:
        return "—"
    parts = [f"r={lora.get('r')}", f"α={float(lora.get('alpha') or 0):g}"]
    for key, default in LORA_DEFAULTS.items():
        value = lora.get(key, default)
        if value == default:
            continue
        if key == "target":
            parts.append("+".join(value) if isinstance(value, list) else str(value))
        elif key in ("use_rslora", "use_dora"):
            parts.append(key.removeprefix("use_") if value else f"no-{key.removeprefix('use_')}")
        elif key == "init_lora_weights":
            parts.append(f"init={value}")
        elif key == "extra":
            parts += [f"{k}={v}" for k, v in sorted(value.items())]
        else:
            parts.append(f"{key}={value:g}" if _num(value) else f"{key}={value}")
    return " ".join(parts)


@dataclass
class Cell:
    """The runs of one (group, identity): same everything but the seed."""

    group: str
    identity_id: str
    runs: list = field(default_factory=list)
    best: bool = False

    @property
    def first(self) -> dict:
        return self.runs[0]

    task = property(lambda self: self.first["task"])
    model = property(lambda self: self.first["model"])
    method = property(lambda self: self.first["method"])
    lora = property(lambda self: self.first.get("lora"))
    head = property(lambda self: self.first.get("head") or "classifier")
    lr = property(lambda self: float(self.first["lr"]))

    @property
    def identity(self) -> dict:
        return self.first.get("identity") or {}

    @property
    def variant(self) -> str:
        return lora_slug(self.lora)

    @property
    def done(self) -> list[dict]:
        return sorted((r for r in self.runs if r["status"] == "completed"), key=_seed_key)

    @property
    def metric(self) -> str:
        return main_metric(self.task)

    def values(self, metric: str, source: str = "metrics") -> list[float]:
        return [r[source][metric] for r in self.done if metric in (r.get(source) or {})]

    def stat(self, metric: str) -> tuple[float, float]:
        return mean_std(self.values(metric))

    def avg(self, key: str) -> float:
        vals = [r[key] for r in self.done if _num(r.get(key))]
        return sum(vals) / len(vals) if vals else math.nan

    def reference(self, source: str) -> float:
        """The main metric of the majority baseline / zero-shot model, mean over runs."""
        vals = [r[source][self.metric] for r in self.runs if self.metric in (r.get(source) or {})]
        return sum(vals) / len(vals) if vals else math.nan

    @property
    def metrics(self) -> list[str]:
        names = {m for r in self.done for m in r["metrics"]}
        return sorted(names, key=lambda m: (m != self.metric, m))

    @property
    def family(self) -> tuple:
        """Cells that differ only in the learning rate: the best one is chosen on dev."""
        if self.identity:
            return (self.group, identity_hash(_without(self.identity, "train.lr")))
        return (self.group, _ident({**self.first, "lr": None}))

    @property
    def counterpart(self) -> tuple:
        """What LoRA and full fine-tuning must share to be compared: all but method, lr, LoRA."""
        base = _without(self.identity, "train.lr", "train.method", "lora")
        if not self.identity:
            base = {k: self.first.get(k) for k in ("task", "model", "head")}
        return (self.group, identity_hash(base))

    @property
    def data(self) -> str:
        """Data fingerprint (short) and caps, e.g. '3fa2b1c0 train≤2000 eval≤500'."""
        d = self.identity.get("data") or {}
        fp = d.get("fingerprint")
        text = short_fingerprint(fp) if fp else "unknown (old run)" if self.identity else "—"
        caps = [f"{s}≤{d[k]}" for s, k in (("train", "max_train_examples"),
                                           ("eval", "max_eval_examples")) if d.get(k)]  # fmt: skip
        return " ".join([text, *caps]) if caps else f"{text} uncapped" if fp else text

    @property
    def schedule(self) -> str:
        t = self.identity.get("train") or {}
        plan = f"{t['max_steps']} steps" if (t.get("max_steps") or -1) > 0 else (
            f"{t['epochs']:g} ep" if _num(t.get("epochs")) else "—")  # fmt: skip
        steps = {r.get("steps") for r in self.done if r.get("steps")}
        return plan + (f" ({'/'.join(map(str, sorted(steps)))} steps)" if steps and "steps" not in plan else "")  # fmt: skip


def short_fingerprint(fp: dict | str) -> str:
    """'1a2b3c4d/5e6f7a8b': the first hex digits of the train and eval rows' SHA-256."""
    if isinstance(fp, dict):
        return "/".join(str(fp.get(f"{s}_sha256", "?"))[:8] for s in ("train", "eval"))
    return str(fp)[:8]


def _seed_key(r: dict):
    return (str(type(r.get("seed"))), r.get("seed"))


@dataclass
class Comparison:
    """A LoRA cell against the full fine-tuning cell it is comparable with (best lr each)."""

    lora: Cell
    full: Cell | None

    task = property(lambda self: self.lora.task)
    model = property(lambda self: self.lora.model)
    head = property(lambda self: self.lora.head)

    @property
    def pairs(self) -> list[tuple]:
        """(seed, LoRA value, full value) of the main metric for each seed both methods ran."""
        if self.full is None:
            return []
        m = self.lora.metric
        full = {r["seed"]: r["metrics"][m] for r in self.full.done if m in r["metrics"]}
        return [(r["seed"], r["metrics"][m], full[r["seed"]])
                for r in self.lora.done if m in r["metrics"] and r["seed"] in full]  # fmt: skip

    @property
    def diffs(self) -> list[float]:
        """LoRA − full per seed, in points."""
        k = points_per_unit(self.task)
        return [k * (a - b) for _, a, b in self.pairs]

    @property
    def interval(self) -> tuple[float, float, float]:
        """(mean, low, high) of the paired differences: 95% Student-t over seeds."""
        return t_interval(self.diffs) if self.diffs else (math.nan, math.nan, math.nan)

    @property
    def delta_points(self) -> float:
        return self.interval[0]

    @property
    def uninformative(self) -> bool:
        """Both methods within 1 point of always answering the majority class: no signal."""
        if self.full is None:
            return False
        k = points_per_unit(self.task)
        base = self.lora.reference("majority")
        if math.isnan(base):
            base = self.full.reference("majority")
        means = [c.stat(c.metric)[0] for c in (self.lora, self.full)]
        return not math.isnan(base) and all(abs(k * (m - base)) <= UNINFORMATIVE_POINTS for m in means)  # fmt: skip

    @property
    def drop_ok(self) -> bool | None:
        d = self.delta_points
        return None if math.isnan(d) else d >= -DROP_TARGET_POINTS

    @property
    def share_ok(self) -> bool | None:
        s = self.lora.avg("trainable_share_without_head_pct")
        return None if math.isnan(s) else s <= SHARE_TARGET_PCT

    @property
    def verdict(self) -> str:
        """e.g. 'PASS: −1.20 [−2.90, +0.50]'; 'uninformative: …'; 'n/a: …'."""
        if self.full is None:
            return "n/a: no comparable full run"
        if not self.diffs:
            return "n/a: no seed run by both methods"
        mean, lo, hi = self.interval
        ci = f" [{lo:+.2f}, {hi:+.2f}]" if not math.isnan(lo) else " (1 seed, no interval)"
        if self.uninformative:
            return (
                f"uninformative (both ≤ {UNINFORMATIVE_POINTS:g} pt from majority): {mean:+.2f}{ci}"
            )
        return f"{'PASS' if self.drop_ok else 'FAIL'}: {mean:+.2f}{ci}"


def _selection_score(cells: list[Cell]):
    """Score learning rates on the seeds every one of them has (the LoRA paper's choice on dev).

    With a grid on the first seed and the other seeds at the winner, comparing means over all
    seeds would set the winner's three seeds against the others' one: only the shared seed(s)
    compare like with like, and that is also what the study chose on.
    """
    shared = set.intersection(*({r["seed"] for r in c.done} for c in cells))

    def score(c: Cell) -> float:
        vals = [r["metrics"][c.metric] for r in c.done
                if r["seed"] in shared and c.metric in r["metrics"]]  # fmt: skip
        return sum(vals) / len(vals) if vals else c.stat(c.metric)[0]

    return score


def aggregate(records: list[dict]) -> tuple[list[Cell], list[Comparison]]:
    """Cells (every lr, `best` marked) and LoRA-vs-full comparisons at the best lr."""
    cells: dict[tuple, Cell] = {}
    for r in records:
        key = (r["group"], _ident(r))
        cells.setdefault(key, Cell(*key)).runs.append(r)
    ordered = sorted(cells.values(), key=_order)
    families: dict[tuple, list[Cell]] = {}
    for c in ordered:
        families.setdefault(c.family, []).append(c)
    for fam in families.values():
        scored = [c for c in fam if not math.isnan(c.stat(c.metric)[0])]
        if scored:  # ties go to the smaller learning rate (cells are sorted by lr)
            max(scored, key=_selection_score(scored)).best = True
    best = [c for c in ordered if c.best]
    fulls = {c.counterpart: c for c in best if c.method == "full"}
    comps = [Comparison(c, fulls.get(c.counterpart)) for c in best
             if c.method == "lora" and not is_ablation(c.group)]  # fmt: skip
    return ordered, comps


def is_ablation(group: str) -> bool:
    return group.startswith("ablation")


def _order(c: Cell) -> tuple:
    return (is_ablation(c.group), c.group, c.task, c.model, c.head, c.data, c.method != "lora",
            c.lora.get("r", 0) if c.lora else 0, c.variant, c.lr)  # fmt: skip


def full_reference(cell: Cell, cells: list[Cell]) -> Cell | None:
    """The best full fine-tuning cell comparable with `cell` in any non-ablation group."""
    key = cell.counterpart[1]
    for c in cells:
        if c.best and c.method == "full" and c.counterpart[1] == key:
            return c
    return None


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


def _points(cell: Cell, value: float) -> str:
    return _f(points_per_unit(cell.task) * value, ".2f")


def _share_verdict(ok: bool | None, share: float) -> str:
    return "n/a" if ok is None else f"{'PASS' if ok else 'FAIL'}: {share:.3f}%"


def _n(cell: Cell) -> str:
    div = sum(r["status"] == "diverged" for r in cell.runs)
    return f"{len(cell.done)}" + (f" (+{div} diverged)" if div else "")


def _per_seed(comp: Comparison | None) -> str:
    if comp is None or not comp.pairs:
        return ""
    return ", ".join(f"{s}: {d:+.2f}" for (s, _, _), d in zip(comp.pairs, comp.diffs, strict=True))


MAIN_HEADERS = ["task", "head", "model", "method", "LoRA", "data", "schedule", "best lr", "seeds",
                "main metric (mean ± std)", "majority baseline", "zero-shot",
                "LoRA − full per seed (points)", f"LoRA − full ≥ −{DROP_TARGET_POINTS:g} (mean [95% CI])",
                "trainable % (without head)", f"trainable ≤ {SHARE_TARGET_PCT:g}%",
                "wall time (s)", "peak memory (MB)"]  # fmt: skip


# The main table's columns that the console shows (the files have them all).
CONSOLE_COLUMNS = ("task", "head", "model", "method", "LoRA", "data", "schedule", "best lr",
                   "seeds", "main metric (mean ± std)", "majority baseline", "zero-shot",
                   MAIN_HEADERS[13], MAIN_HEADERS[15])  # fmt: skip


def main_table(cells: list[Cell], comps: list[Comparison]) -> Table:
    """One row per identity (at its best learning rate) outside the ablations."""
    by_lora = {id(c.lora): c for c in comps}
    rows = []
    for cell in (c for c in cells if c.best and not is_ablation(c.group)):
        comp = by_lora.get(id(cell))
        share = cell.avg("trainable_share_without_head_pct")
        rows.append([
            cell.task, cell.head, cell.model, cell.method, cell.variant, cell.data, cell.schedule,
            f"{cell.lr:g}", _n(cell), f"{cell.metric}: {_pm(cell, cell.metric)}",
            _points(cell, cell.reference("majority")), _points(cell, cell.reference("zero_shot")),
            _per_seed(comp), comp.verdict if comp else "",
            _f(share, ".3f"), _share_verdict(comp.share_ok, share) if comp else "",
            _f(cell.avg("wall_time_s")), _f(cell.avg("peak_memory_mb"), ".0f"),
        ])  # fmt: skip
    return Table(
        "LoRA vs full fine-tuning (one row per run identity, best learning rate each)",
        MAIN_HEADERS,
        rows,
        "Metrics in points (GLUE: % of examples; SQuAD v2: official %), mean ± sample std over "
        "seeds. data: fingerprint of the train/eval rows and the caps. Majority baseline: the "
        "dev-set score of always giving the most frequent answer. LoRA − full: paired by seed; "
        f"mean and 95% Student-t interval over seeds. Targets: LoRA loses at most "
        f"{DROP_TARGET_POINTS:g} points to full fine-tuning (a row where both methods are within "
        f"{UNINFORMATIVE_POINTS:g} point of the majority baseline is uninformative, not a pass), "
        f"with at most {SHARE_TARGET_PCT:g}% of the weights trainable (adapters only, without "
        "the freshly initialised task head).",
    )


def tables(cells: list[Cell], comps: list[Comparison]) -> list[Table]:
    out = [main_table(cells, comps)]
    best = [c for c in cells if c.best]
    for task in sorted({c.task for c in best}):
        group = [c for c in best if c.task == task]
        metrics = sorted(
            {m for c in group for m in c.metrics}, key=lambda m: (m != group[0].metric, m)
        )
        out.append(Table(
            f"{task}: every metric at the best learning rate",
            ["study", "head", "model", "method", "LoRA", "data", "lr", "seeds", *metrics],
            [[c.group, c.head, c.model, c.method, c.variant, c.data, f"{c.lr:g}", _n(c),
              *[_pm(c, m) for m in metrics]] for c in group],
        ))  # fmt: skip
    out.append(Table(
        "Learning-rate grid (main metric)",
        ["study", "task", "head", "model", "method", "LoRA", "data", "lr", "seeds", "main metric", "best"],
        [[c.group, c.task, c.head, c.model, c.method, c.variant, c.data, f"{c.lr:g}", _n(c),
          _pm(c, c.metric), "✓" if c.best else ""] for c in cells],
    ))  # fmt: skip
    for group in sorted({c.group for c in best if is_ablation(c.group)}):
        rows = []
        for c in (c for c in best if c.group == group and c.lora):
            ref = full_reference(c, cells)
            rows.append([c.task, c.head, c.model, c.variant, c.data, f"{c.lr:g}", _n(c),
                         f"{c.metric}: {_pm(c, c.metric)}", _pm(ref, ref.metric) if ref else "—",
                         _f(c.avg("trainable_share_without_head_pct"), ".3f"),
                         _f(c.avg("wall_time_s")), _f(c.avg("peak_memory_mb"), ".0f")])  # fmt: skip
        out.append(Table(
            f"Ablation: {group.removeprefix('ablation-')} (best learning rate per setting)",
            ["task", "head", "model", "LoRA", "data", "best lr", "seeds", "main metric",
             "full fine-tuning", "trainable % (without head)", "wall time (s)", "peak memory (MB)"],
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
        lora = c.lora or {}
        target = lora.get("target", "")
        row = {"group": c.group, "identity": c.identity_id, "task": c.task, "model": c.model,
               "head": c.head, "method": c.method, "lora": c.variant if c.lora else "",
               "r": lora.get("r", ""), "alpha": lora.get("alpha", ""),
               "target": "+".join(target) if isinstance(target, list) else target,
               "data": c.data, "schedule": c.schedule, "lr": c.lr, "best_lr": c.best,
               "n": len(c.done), "n_diverged": sum(r["status"] == "diverged" for r in c.runs),
               "seeds": " ".join(str(r["seed"]) for r in c.done), "main_metric": c.metric,
               "majority_baseline": c.reference("majority"), "zero_shot": c.reference("zero_shot")}  # fmt: skip
        for m in metrics:
            mean, std = c.stat(m)
            row[f"{m}_mean"], row[f"{m}_std"] = mean, std
        for k in ("trainable_share_pct", "trainable_share_without_head_pct", "wall_time_s", "peak_memory_mb"):  # fmt: skip
            row[k] = c.avg(k)
        mean, lo, hi = comp.interval if comp else ("", "", "")
        row.update(lora_minus_full_points=mean, ci95_low=lo, ci95_high=hi,
                   paired_seeds=" ".join(str(s) for s, _, _ in comp.pairs) if comp else "",
                   uninformative=comp.uninformative if comp else "",
                   drop_target_pass=comp.drop_ok if comp else "",
                   share_target_pass=comp.share_ok if comp else "")  # fmt: skip
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
    warnings: list[str] = field(default_factory=list)


def _md_table(t: Table) -> str:
    esc = [[str(x).replace("|", "\\|") for x in row] for row in t.rows]
    lines = [f"## {t.title}", "", "| " + " | ".join(t.headers) + " |",
             "|" + "---|" * len(t.headers)] + ["| " + " | ".join(r) + " |" for r in esc]  # fmt: skip
    return "\n".join(lines + ([f"\n{t.note}"] if t.note else [])) + "\n"


BADGES = {"PASS": "pass", "FAIL": "fail", "uninformative": "uninf", "n/a": "na"}


def _html_cell(x) -> str:
    from html import escape

    text = str(x)
    for word, cls in BADGES.items():
        if text.startswith(word):  # a verdict: a coloured badge, then its figures
            rest = text[len(word) :].lstrip(":")
            return f"<td><span class='badge {cls}'>{escape(word)}</span>{escape(rest)}</td>"
    return f"<td>{escape(text)}</td>"


def _html_table(t: Table) -> str:
    from html import escape

    head = "".join(f"<th>{escape(h)}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(_html_cell(x) for x in r) + "</tr>" for r in t.rows)
    note = f"<p class='note'>{escape(t.note)}</p>" if t.note else ""
    return f"<h2>{escape(t.title)}</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1500px}table{border-collapse:collapse;"
    "margin:1em 0;font-size:13px}td,th{border:1px solid #bbb;padding:3px 6px;text-align:left;"
    "vertical-align:top}th{background:#eee}.note{color:#555;max-width:1100px}"
    "img{max-width:100%;max-height:760px}figure{margin:1em 0}"
    "figcaption{color:#555;font-style:italic}.badge{display:inline-block;padding:1px 7px;border-radius:4px;"
    "font-weight:bold;color:#fff;margin-right:4px}.pass{background:#1a7f37}"
    ".fail{background:#cf222e}.uninf{background:#9a6700}.na{background:#6e7781}"
    ".warn{background:#fff8c5;border:1px solid #d4a72c;padding:.5em 1em}"
)


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
    records, warnings = deduplicate(records)
    cells, comps = aggregate(records)
    tabs = tables(cells, comps)
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    figures = make_figures(cells, comps, out / "figures")
    n_runs = len({r.get("run_dir") or id(r) for r in records})
    intro = (
        f"Source: {source}. {n_runs} finished runs; generated {time.strftime('%Y-%m-%d %H:%M')}.\n\n"
        "Runs are pooled only when everything but the seed is equal (task, model, head, method, "
        "the whole LoRA section, data fingerprint and caps, epochs/steps, max length, batch "
        "size, learning rate, precision). Mean ± sample standard deviation (ddof = 1) over "
        "seeds. For each identity the learning rate is the one with the best mean dev score of "
        "the task's main metric (accuracy for GLUE, F1 for SQuAD v2); the dev set is also the "
        "reported set, as in the LoRA paper (GLUE test labels are not public).\n"
    )
    warn_md = [f"> **Warning:** {w}\n" for w in warnings]
    md = ["# loralab study report", "", intro, *warn_md] + [_md_table(t) for t in tabs]
    md += ["## Figures", ""] + [f"![{title}](figures/{p.name})\n" for title, p in figures]
    html = [f"<h1>loralab study report</h1><p>{escape(intro)}</p>"]
    html += [f"<p class='warn'>Warning: {escape(w)}</p>" for w in warnings]
    html += [_html_table(t) for t in tabs] + ["<h2>Figures</h2>"]
    html += [
        f"<figure><img alt='{escape(title)}' src='data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode()}'><figcaption>{escape(title)}</figcaption></figure>"
        for title, p in figures
    ]  # fmt: skip
    files = [out / "report.md", out / "report.html", out / "report.csv", out / "runs.csv"]
    tracking.atomic_write(files[0], "\n".join(md))
    tracking.atomic_write(files[1], f"<!doctype html><html><head><meta charset='utf-8'><title>loralab report</title><style>{STYLE}</style></head><body>{''.join(html)}</body></html>\n")  # fmt: skip
    _write_csv(files[2], csv_rows(cells, comps))
    _write_csv(files[3], [_flat_run(r) for r in records])
    for f in files:
        f.chmod(0o644)  # a report is for sharing (atomic_write's temp files are private)
    return Report(out, files + [p for _, p in figures], tabs, comps, warnings)


def _flat_run(r: dict) -> dict:
    row = {"group": r["group"], "identity": _ident(r), **{k: r.get(k) for k in RUN_FIELDS}}
    row["lora"] = lora_slug(r.get("lora")) if r.get("lora") else ""
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
