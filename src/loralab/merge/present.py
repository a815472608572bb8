"""Where merge results go besides merge/: the rich tables of `loralab merge` and the run's W&B
summary (a mirror of the run directory)."""

from __future__ import annotations

from pathlib import Path

from .. import tracking
from ..models import caveat
from ..rundir import MERGE_DIR
from .options import MergeResult


def flat_metrics(report: dict, bench_report: dict | None) -> dict[str, float]:
    """Scalar results under merge/... keys (for trackers)."""
    flat = {"merge/lora_effect_max_abs": report["lora_effect"]["max_abs_diff"]}
    for name, row in report["variants"].items():
        key = name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        flat[f"merge/{key}/max_abs_diff"] = row["max_abs_diff"]
        flat[f"merge/{key}/changed_predictions"] = row["changed_predictions"]
        flat[f"merge/{key}/{report['primary_metric']}"] = row["metrics"][report["primary_metric"]]
    for name, t in ((bench_report or {}).get("models") or {}).items():
        flat[f"merge/bench/{name}/median_s"] = t["median_s"]
        flat[f"merge/bench/{name}/tokens_per_s"] = t["tokens_per_s"]
    return flat


def mirror_to_wandb(
    cfg, run_dir: Path, report: dict, bench_report: dict | None, notes: list[str]
) -> None:
    """Merge results into the run's W&B summary (same run id as training), when tracking is on.

    W&B is a mirror of the run directory, so a failure here is a note, never an error.
    """
    if cfg.tracking.wandb == "disabled":
        return
    try:
        tracker = tracking.Tracker(run_dir, cfg, resuming=True)
        tracker.summary({**flat_metrics(report, bench_report), "merge/status": report["status"]})
        tracker.finish()
    except Exception as e:  # missing key, no network, wandb not installed, ...
        why = (str(e).splitlines() or [type(e).__name__])[0]
        notes.append(f"Not mirrored to W&B ({why}); the results are in merge/.")


def render(result: MergeResult, console) -> None:
    """Rich tables of the equivalence check and the benchmark."""
    from rich.table import Table

    r = result.report
    eff = r["lora_effect"]
    if note := caveat(r.get("model") or ""):
        console.print(f"({note})")
    if not console.is_terminal:
        console.width = max(console.width, 120)  # piped output: no 80-column squeeze
    table = Table(
        title=f"Merge equivalence vs the fp32 adapter model ({r['examples']} dev examples; "
        f"LoRA effect max |Δ| {eff['max_abs_diff']:.3g})",
        caption=f"bf16 compute: {r['bf16_compute']}"
        if any(row["dtype"] == "bf16" for row in r["variants"].values())
        else None,
    )
    for col in (
        "variant",
        "max |Δlogit|",
        "max rel Δ",
        "changed preds",
        r["primary_metric"],
        "bound",
        "status",
    ):
        table.add_column(col)
    ref = r["reference"]["metrics"][r["primary_metric"]]
    table.add_row("fp32 adapter (reference)", "", "", "", f"{ref:.4f}", "", "")
    colour = {"passed": "green", "failed": "red", "uninformative": "yellow", "reference": "dim"}
    for name, row in r["variants"].items():
        table.add_row(
            name, f"{row['max_abs_diff']:.3g}", f"{row['max_rel_diff']:.3g}",
            f"{row['changed_predictions']:.2%}", f"{row['metrics'][r['primary_metric']]:.4f}",
            f"{row['bound']:.3g}", f"[{colour[row['status']]}]{row['status']}[/]",
        )  # fmt: skip
    console.print(table)
    if result.benchmark:
        b = result.benchmark
        bt = Table(
            title=f"Inference benchmark ({b['dtype']}, {b['device']}, {b['threads']} threads, batch "
            f"{b['batch_size']}×{b['seq_len']} tokens, median of {b['batches']} batches)"
        )
        for col in ("model", "median ms", "p90 ms", "tokens/s", "vs base"):
            bt.add_column(col)
        base = b["models"]["base"]["median_s"]
        for name, t in b["models"].items():
            bt.add_row(
                name, f"{t['median_s'] * 1e3:.1f}", f"{t['p90_s'] * 1e3:.1f}", f"{t['tokens_per_s']:.0f}",
                f"{100 * (t['median_s'] / base - 1):+.1f}%",
            )  # fmt: skip
        console.print(bt)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(
        f"status: [bold {colour[result.status]}]{result.status}[/]  ({result.run_dir / MERGE_DIR})"
    )
    if result.export_dir:
        console.print(f"exported: {result.export_dir}")
