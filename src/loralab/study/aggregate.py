"""Cells and comparisons: records of one identity pooled over seeds, the learning rate chosen
on dev (`choice`), LoRA against full fine-tuning run for run.

For each identity minus the learning rate, the learning rate with the best mean dev score of
the task's main metric on the seeds every rate ran is chosen (the LoRA paper's protocol; the
dev set is also the reported set, as GLUE test labels are not public). LoRA is compared with full fine-tuning run for run:
per seed run by both, the difference of the main metric; its mean and a 95% Student-t interval
over seeds. A LoRA variant is its whole `lora` section (part of the identity), named by
`variants.lora_slug`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..identity import short_fingerprint
from .choice import choose_rate, dev_loss
from .records import (
    identity_hash,
    main_metric,
    points_per_unit,
    record_identity,
    without,
)
from .stats import UNINFORMATIVE_POINTS, exact, mean_std, seeds_to_settle, t_interval
from .variants import is_number, lora_slug, several_targets

DROP_TARGET_POINTS = 3.0  # LoRA may lose at most 3 points of the main metric to full fine-tuning
SHARE_TARGET_PCT = 0.3  # ... with at most 0.3% of the weights trainable (adapters, no head)
SETTLE_MOST = 50  # an unsettled verdict's projection stops here (more says: a tie with the target)


@dataclass
class Cell:
    """The runs of one (group, identity): same everything but the seed."""

    group: str
    identity_id: str
    runs: list = field(default_factory=list)
    best: bool = False
    # Seeds whose scores chose this cell's learning rate among 2+ (empty: no choice was made).
    chose_lr_on: frozenset = frozenset()
    # Tied with another rate on the main metric, chosen by the lower dev loss (`stats.best_rate`).
    chosen_by_loss: bool = False
    # Best because its other seeds ran here: the rate the rule now would choose (`aggregate`).
    rule_lr: float | None = None
    # The report's runs adapt different layers: the readable name says the target (`aggregate`).
    name_target: bool = False

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
    def quantization(self) -> str:
        """How the frozen base was stored ('none', 'int8', 'nf4'); only LoRA runs quantize."""
        return (self.identity.get("model") or {}).get("quantization") or "none"

    @property
    def variant(self) -> str:
        """The LoRA section's readable name, plus the base's storage when it was quantized."""
        return self.named(self.name_target)

    def named(self, name_target: bool) -> str:
        """`variant`, with the target named at its default too or not (the order of rows keeps
        to the names without it, whatever the report's targets)."""
        name = lora_slug(self.lora, name_target)
        return name if self.quantization == "none" else f"{name} {self.quantization} base"

    @property
    def done(self) -> list[dict]:
        return sorted((r for r in self.runs if r["status"] == "completed"), key=_seed_key)

    @property
    def scored(self) -> list[dict]:
        """The completed runs that report the main metric: the seeds its mean stands on."""
        return [r for r in self.done if self.metric in (r.get("metrics") or {})]

    @property
    def metric(self) -> str:
        return main_metric(self.task)

    def values(self, metric: str, source: str = "metrics") -> list[float]:
        return [r[source][metric] for r in self.done if metric in (r.get(source) or {})]

    def stat(self, metric: str) -> tuple[float, float]:
        return mean_std(self.values(metric))

    def avg(self, key: str) -> float:
        vals = [r[key] for r in self.done if is_number(r.get(key))]
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
            return (self.group, identity_hash(without(self.identity, "train.lr")))
        return (self.group, record_identity({**self.first, "lr": None}))

    @property
    def counterpart(self) -> tuple:
        """What LoRA and full fine-tuning must share to be compared: all but method, lr, LoRA,
        the base's storage (QLoRA is compared with full fine-tuning of the same model) and the
        untrained modules LoRA trains beside its adapters (full fine-tuning trains them anyway)."""
        base = without(self.identity, "train.lr", "train.method", "lora", "model.quantization",
                       "model.retrained")  # fmt: skip
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
        cap = d.get("max_eval_examples")
        if cap and fp and not d.get("eval_subset") and cap < fp.get("eval_rows", 0):
            caps[-1] += " (first)"  # capped before `data.spread`: the dev set's first rows
        return " ".join([text, *caps]) if caps else f"{text} uncapped" if fp else text

    @property
    def schedule(self) -> str:
        t = self.identity.get("train") or {}
        plan = f"{t['max_steps']} steps" if (t.get("max_steps") or -1) > 0 else (
            f"{t['epochs']:g} ep" if is_number(t.get("epochs")) else "—")  # fmt: skip
        steps = {r.get("steps") for r in self.done if r.get("steps")}
        return plan + (f" ({'/'.join(map(str, sorted(steps)))} steps)" if steps and "steps" not in plan else "")  # fmt: skip


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
        return paired(self.lora, self.full) if self.full is not None else []

    @property
    def diffs(self) -> list[float]:
        """LoRA − full per seed, in points."""
        return paired_diffs(self.lora, self.full) if self.full is not None else []

    @property
    def interval(self) -> tuple[float, float, float]:
        """(mean, low, high) of the paired differences: 95% Student-t over seeds."""
        return t_interval(self.diffs) if self.diffs else (math.nan, math.nan, math.nan)

    @property
    def picked_seeds(self) -> frozenset:
        """The seeds whose scores chose either method's learning rate."""
        return self.lora.chose_lr_on | (self.full.chose_lr_on if self.full else frozenset())

    @property
    def held_out_diffs(self) -> list[float]:
        """LoRA − full on the seeds that chose neither method's learning rate. On the seeds that
        did, each method's score is the best of its grid, a maximum that flatters it (more so
        with the larger grid); these seeds are free of that selection."""
        picked = self.picked_seeds
        return [d for (s, _, _), d in zip(self.pairs, self.diffs, strict=True) if s not in picked]

    @property
    def delta_points(self) -> float:
        return self.interval[0]

    @property
    def uninformative(self) -> bool:
        """Neither method more than 1 point above always answering the majority class (below
        it counts too: a method under the baseline learned nothing usable): no signal."""
        if self.full is None:
            return False
        k = points_per_unit(self.task)
        base = self.lora.reference("majority")
        if math.isnan(base):
            base = self.full.reference("majority")
        means = [c.stat(c.metric)[0] for c in (self.lora, self.full)]
        return not math.isnan(base) and all(exact(k * (m - base)) <= UNINFORMATIVE_POINTS for m in means)  # fmt: skip

    @property
    def drop_ok(self) -> bool | None:
        d = self.delta_points
        return None if math.isnan(d) else exact(d) >= -DROP_TARGET_POINTS

    @property
    def share_ok(self) -> bool | None:
        """The share target (set for the standard preset, SPEC §4); None: another preset, or
        no share recorded."""
        s = self.lora.avg("trainable_share_without_head_pct")
        if math.isnan(s) or (self.lora.lora or {}).get("target", "standard") != "standard":
            return None
        return s <= SHARE_TARGET_PCT

    @property
    def verdict(self) -> str:
        """e.g. 'PASS: −1.20 [−2.90, +0.50]'; 'FAIL: −4.10 [−6.00, −1.20]; unsettled (…)';
        'uninformative: …'; 'n/a: …'."""
        if self.full is None:
            return "n/a: no comparable full run"
        if not self.diffs:
            return "n/a: no seed run by both methods"
        mean, lo, hi = self.interval
        ci = f" [{lo:+.2f}, {hi:+.2f}]" if not math.isnan(lo) else " (1 seed, no interval)"
        if self.uninformative:  # the dev loss may still tell the methods apart
            losses = [dev_loss(c, frozenset()) for c in (self.lora, self.full)]
            by_loss = ("; final dev loss LoRA {:.2f} / full {:.2f}".format(*losses)
                       if None not in losses else "")  # fmt: skip
            return f"uninformative (neither > {UNINFORMATIVE_POINTS:g} pt above majority): {mean:+.2f}{ci}{by_loss}"
        if not self.unsettled:
            return f"{'PASS' if self.drop_ok else 'FAIL'}: {mean:+.2f}{ci}"
        n = self.seeds_to_settle
        more = f"~{n} seeds in all" if n else f"over {self.settle_reach} seeds"
        return (f"{'PASS' if self.drop_ok else 'FAIL'}: {mean:+.2f}{ci}; unsettled (the interval "
                f"spans -{DROP_TARGET_POINTS:g}; {more} at this mean and spread would settle it)")  # fmt: skip

    @property
    def seeds_to_settle(self) -> int | None:
        """Unsettled: how many paired seeds would clear the target at the same mean and spread
        (`stats.seeds_to_settle`; None: over `settle_reach`); None where it is settled."""
        if not self.unsettled:
            return None
        return seeds_to_settle(self.diffs, -DROP_TARGET_POINTS, most=self.settle_reach)

    @property
    def settle_reach(self) -> int:
        """How far the projection looks: `SETTLE_MOST` seeds, or the seeds in hand if more."""
        return max(SETTLE_MOST, len(self.diffs))

    @property
    def unsettled(self) -> bool | None:
        """The 95% interval reaches both sides of the drop target: more seeds could flip the
        verdict the mean gives. None where no PASS/FAIL stands: no interval (one seed, or no
        comparable full run) or an uninformative task."""
        _, lo, hi = self.interval
        if math.isnan(lo) or self.uninformative:
            return None
        return exact(lo) < -DROP_TARGET_POINTS < exact(hi)


def paired(a: Cell, b: Cell) -> list[tuple]:
    """(seed, a's value, b's value) of the main metric for each seed both cells finished."""
    m, other = a.metric, {r["seed"]: r["metrics"][b.metric] for r in b.scored}
    return [(r["seed"], r["metrics"][m], other[r["seed"]]) for r in a.scored if r["seed"] in other]


def paired_diffs(a: Cell, b: Cell) -> list[float]:
    """a − b per seed both cells finished (`paired`), in points."""
    k = points_per_unit(a.task)
    return [k * (x - y) for _, x, y in paired(a, b)]


def families(cells: list[Cell]) -> list[list[Cell]]:
    """The cells grouped by `Cell.family` (equal but for the learning rate), in their order."""
    families: dict[tuple, list[Cell]] = {}
    for c in cells:
        families.setdefault(c.family, []).append(c)
    return list(families.values())


def aggregate(records: list[dict]) -> tuple[list[Cell], list[Comparison]]:
    """Cells (every lr, `best` marked) and LoRA-vs-full comparisons at the best lr."""
    cells: dict[tuple, Cell] = {}
    for r in records:
        key = (r["group"], record_identity(r))
        cells.setdefault(key, Cell(*key)).runs.append(r)
    name_target = several_targets(r.get("lora") for r in records)
    for c in cells.values():
        c.name_target = name_target
    ordered = sorted(cells.values(), key=_order)
    for fam in families(ordered):
        scored = [c for c in fam if not math.isnan(c.stat(c.metric)[0])]
        if scored:
            choose_rate(scored)
    best = [c for c in ordered if c.best]
    fulls = {c.counterpart: c for c in best if c.method == "full"}
    comps = [Comparison(c, fulls.get(c.counterpart)) for c in best
             if c.method == "lora" and not is_ablation(c.group)]  # fmt: skip
    return ordered, comps


def is_ablation(group: str) -> bool:
    return group.startswith("ablation")


def _order(c: Cell) -> tuple:
    return (is_ablation(c.group), c.group, c.task, c.model, c.head, c.data, c.method != "lora",
            c.lora.get("r", 0) if c.lora else 0, c.named(False), c.lr)  # fmt: skip


def ablation_base(cell: Cell, cells: list[Cell]) -> Cell | None:
    """The base setting of `cell`'s ablation axis: the best cell of the same group and
    counterpart whose settings but the lr are those of a non-ablation group's cell (the study's
    own LoRA settings: the grid's runs reused, or the axis's own rates for them). None when the
    axis left the base out."""
    outside = {c.family[1] for c in cells if not is_ablation(c.group)}
    return next((c for c in cells if c.best and c.group == cell.group and c.method == "lora"
                 and c.counterpart == cell.counterpart and c.family[1] in outside), None)  # fmt: skip


def full_reference(cell: Cell, cells: list[Cell]) -> Cell | None:
    """The best full fine-tuning cell comparable with `cell` (ablations run LoRA alone: the sweep's)."""
    key = cell.counterpart[1]
    for c in cells:
        if c.best and c.method == "full" and c.counterpart[1] == key:
            return c
    return None
