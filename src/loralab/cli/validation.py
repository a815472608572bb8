"""`loralab validate`: the named checks that LoRA does what it claims."""

from __future__ import annotations

from pathlib import Path

from ..config import build_config
from ..errors import LoralabError
from ..rundir import write_json
from .options import check_out_file, int_at_least, positive_float, refuse_unused

# What the probe reads of a config; the data files, training schedule and the rest it would ignore.
USED = (
    "model.", "lora.", "train.seed=", "train.lr=", "data.task=", "data.max_length=",
    "data.doc_stride=", "data.prompt=", "data.verbalizers=", "data.chat_template=",
)  # fmt: skip


def add_validate(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="Run the named checks that LoRA does what it claims on a model/config.",
        description="Invariants (PEFT wrapped, base frozen and unchanged, save/load, merge, "
        "export, accounting, ...) set the exit status: 0 when all hold, 1 when any fails, 2 on "
        "bad input. Targets (trainable share ≤ 0.3%; LoRA − full ≥ −3 points with --results) are "
        "reported as met/missed and fail the command only with --strict.",
    )
    p.add_argument(
        "--model", help="built-in name, hub id, local folder or .gguf file (default: the config's)"
    )
    p.add_argument("--strict", action="store_true", help="a missed target also exits 1")
    p.add_argument(
        "--results",
        metavar="DIR",
        help="folder of LoRA and full fine-tuning runs of this model: adds the LoRA − full target",
    )
    p.add_argument(
        "--config",
        help="YAML config file: its model, lora, task (data.task with its max_length, doc_stride "
        "and prompt settings), train.seed and train.lr are used (the probe has its own examples "
        "and steps)",
    )
    p.add_argument("--out", default="validate.json", help="where to write the JSON report")
    p.add_argument(
        "--steps",
        type=int_at_least(2),  # a probe compares the adapter before and after training
        default=20,
        help="training steps of the probe (default 20)",
    )
    p.add_argument(
        "--lr",
        type=positive_float,
        help="the probe's learning rate (default: train.lr if set in --config or an override, "
        "else 1e-3)",
    )
    p.add_argument(
        "--tolerance",
        type=positive_float,
        default=1e-4,
        help="merge equivalence tolerance (fp32), times max(1, max |logit|)",
    )
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. lora.r=16 lora.target=extended"
    )


def cmd_validate(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..console import known_warnings_silenced, library_bars_off
    from ..models import caveat, precheck
    from ..validate import as_json, drop_targets, run_checks

    refuse_unused(args.overrides, USED, "validate")
    cfg = build_config(args.config, args.overrides, model={"name": args.model})
    precheck(cfg.model.name)  # a typo: "did you mean", not the hub's retries and a traceback
    check_out_file(Path(args.out), "--out")
    drops = drop_targets(args.results, cfg.model.name) if args.results else []  # before the probe
    if args.results and not drops:
        raise LoralabError(
            f"--results {args.results}: no finished LoRA and full fine-tuning runs of "
            f"{cfg.model.name} on one task to compare; the LoRA − full target needs both (e.g. "
            "the results folder of `loralab sweep --methods lora,full`). Nothing was run."
        )
    with known_warnings_silenced(), library_bars_off():
        result = run_checks(cfg, steps=args.steps, lr=args.lr, tolerance=args.tolerance)
    result.targets += drops
    report = as_json(result, cfg, strict=args.strict)
    write_json(Path(args.out), report)
    title = (
        f"loralab validate: {cfg.model.name} (LoRA r={cfg.lora.r}, {cfg.lora.target}) on "
        f"{cfg.data.task} probe examples, {cfg.model.head} head"
    )
    if note := caveat(cfg.model.name):
        title += f"\n({note})"
    table = Table(title=f"{title}\ninvariants (they set the exit status)")
    for col in ("check", "result", "detail"):
        table.add_column(col, overflow="fold")
    for c in result.checks:
        table.add_row(c.name, "[green]pass[/]" if c.passed else "[red]FAIL[/]", c.detail)
    targets = Table(title="targets (reported; they fail the command only with --strict)")
    for col in ("target", "result", "figure", "detail"):
        targets.add_column(col, overflow="fold")
    for t in result.targets:
        mark = "[dim]not judged[/]" if t.met is None else "[green]met[/]" if t.met else "[yellow]target missed[/]"  # fmt: skip
        targets.add_row(t.name, mark, t.figure, t.detail)
    console = Console(width=max(Console().width, 120))
    console.print(table)
    console.print(targets)
    n_met = sum(t.met is True for t in result.targets)
    judged = sum(t.met is not None for t in result.targets)
    unjudged = len(result.targets) - judged
    console.print(
        f"{len(result.checks) - report['n_failed']}/{len(result.checks)} invariants hold; "
        f"{n_met}/{judged} targets met"
        + (f" ({unjudged} not judged)" if unjudged else "")
        + (" (--strict: a missed target fails)" if args.strict else "")
        + f"; report: {args.out}"
    )
    return report["exit_status"]
