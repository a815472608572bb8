"""`loralab sweep`, `ablate`, `study` and `report`: grids of runs on Optuna, and their report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import LoralabError
from ..rundir import REPORT_DIR, STUDY_DB, check_not_a_run, check_writable
from .options import add_trust, check_results_dir, int_at_least


def _add_study_modes(p) -> None:
    modes = p.add_mutually_exclusive_group()  # creating only and creating nothing: pick one
    modes.add_argument(
        "--create-only", action="store_true", help="create the study; leave the points to workers"
    )
    modes.add_argument("--dry-run", action="store_true", help="print the grid; create nothing")


def _add_grid(p, methods: bool = True) -> None:
    """Options that define a study's grid (shared by sweep, ablate and study)."""
    p.add_argument(
        "--tasks",
        help="comma list, e.g. sst2,mrpc (default: the config's task; a worker: only these)",
    )
    if methods:
        p.add_argument("--methods", help="comma list of lora, full (default: lora,full)")
        p.add_argument("--full-lr", help="full fine-tuning learning rates (default 1e-5,3e-5)")
    p.add_argument("--lora-lr", help="LoRA learning rates, comma list (default 1e-4,3e-4)")
    p.add_argument("--seeds", help="comma list (default 42,1337,2024)")
    p.add_argument("--model", help="built-in name, hub id or local folder")
    p.add_argument("--head", help="task head: classifier (default), lm, or one you registered")
    p.add_argument("--data-dir", help="task data folder (GLUE: a parent with sst2/, mrpc/, rte/)")
    p.add_argument("--max-train-examples", type=int_at_least(1), help="cap on training examples")
    p.add_argument("--max-eval-examples", type=int_at_least(1), help="cap on evaluation examples")
    p.add_argument("--config", help="YAML experiment config every point starts from")
    p.add_argument("--output-dir", default="results", help="results folder (default: results)")
    _add_storage(p)
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides for every point (train.max_steps=200), or for one task's points "
        "(squad_v2:data.train_file=...)",
    )


def _add_storage(p) -> None:
    p.add_argument("--study", help="study name (default: derived from the grid)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite in the results folder)")
    p.add_argument(
        "--heartbeat", type=int_at_least(1), default=20, help="seconds between heartbeats (20)"
    )
    p.add_argument(
        "--grace",
        type=int_at_least(1),
        help="seconds without a heartbeat before a point is retried (3x)",
    )
    p.add_argument(
        "--max-retries",
        type=int_at_least(0),
        default=3,
        help="retries of a point whose worker died (3)",
    )
    p.add_argument("--quiet", action="store_true", help="no per-point progress lines")
    add_trust(p)


def add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="Learning-rate × seed grid of LoRA and full fine-tuning, on Optuna.",
        usage="loralab sweep [options] [key=value ...]\n"
        "       loralab sweep worker --study NAME [--storage URL] [--tasks T,...] [--output-dir DIR]\n"
        "       loralab sweep status --study NAME [--storage URL] [--tasks T,...] [--output-dir DIR]",
        description="Create (or continue) a study, then run its undone points here. Every point is "
        "a train run in RESULTS/runs/<point>; finished runs are never re-trained. `loralab sweep "
        "worker` runs the points of an existing study (optionally only some tasks); start one per "
        "machine against a shared PostgreSQL storage; `loralab sweep status` shows each point's state. "
        "Exit status 0 when every point is done.",
    )
    _add_grid(p)
    _add_study_modes(p)


SWEEP_MODES = {
    "worker": "Run the waiting points of an existing study (made by `loralab sweep` or "
    "`--create-only`) here until none is left; the grid, config and results folder come from the "
    "study. Start one per machine against a shared --storage. Exit status 0 when every point of "
    "its tasks is done (a diverged point is done: its divergence is its result), 1 when some "
    "crashed or could not finish, 2 on a user error.",
    "status": "Print each point of an existing study (done, running, interrupted, ...), how far "
    "the unfinished ones got and the training CPU time left; change nothing.",
}


def sweep_mode_help(mode: str) -> str:
    """The help of `loralab sweep worker|status` (the sweep parser's options are the grid's)."""
    p = argparse.ArgumentParser(prog=f"loralab sweep {mode}", description=SWEEP_MODES[mode])
    p.add_argument("--study", required=True, help="the study's name")
    p.add_argument("--storage", help="Optuna storage URL (default: study.db in --output-dir)")
    p.add_argument("--tasks", help="comma list: only these tasks' points")
    p.add_argument(
        "--output-dir", help="results folder (default: the study's with --storage, else results)"
    )
    if mode == "worker":
        p.add_argument("--heartbeat", help="seconds between heartbeats (20)")
        p.add_argument("--grace", help="seconds without a heartbeat before a point is retried (3x)")
        p.add_argument("--max-retries", help="retries of a point whose worker died (3)")
        p.add_argument("--quiet", action="store_true", help="no per-point progress lines")
        add_trust(p)
    return p.format_help()


def add_ablate(sub) -> None:
    p = sub.add_parser(
        "ablate",
        help="LoRA ablations (rank, alpha, module preset, or all) on Optuna.",
        description="rank: r in 4, 8, 16 with alpha = 2r; alpha: 8, 16, 32 at r = 8; modules: "
        "standard, extended, all-linear; all: the full product. Same machinery as `sweep`.",
    )
    p.add_argument("--type", required=True, choices=["rank", "alpha", "modules", "all"])
    _add_grid(p, methods=False)
    _add_study_modes(p)


def add_study(sub) -> None:
    p = sub.add_parser(
        "study",
        help="Run a study described in YAML (configs/studies/): grids, seeds, ablations, report.",
        description="Create or continue the spec's Optuna studies (per task: the lr grid, the other "
        "seeds at the best lr, the ablations) and run their points here until none of the selected "
        "tasks is left, then write RESULTS/report. Finished points are never retrained. Start "
        "several with different --tasks to split the work. Exit status 0 when every point is done.",
    )
    p.add_argument("spec", metavar="SPEC.yaml", help="study spec, e.g. configs/studies/tiny.yaml")
    p.add_argument("--output-dir", help="results folder (default: the spec's, results/<name>)")
    p.add_argument("--tasks", help="comma list: work only on these tasks' points")
    p.add_argument(
        "--data-root", help="folder the tasks' relative data paths join onto (replaces the spec's)"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the points; create nothing")
    mode.add_argument(
        "--status",
        action="store_true",
        help="print each point's state (done, running, interrupted, ...), how far the unfinished "
        "ones got and the training CPU time left; change nothing",
    )
    p.add_argument(
        "--workers",
        default=None,
        type=_workers,
        help="worker processes on this machine: auto (default: one 1-thread worker per CPU core, "
        "one per GPU) or a number; they share the study's points",
    )
    _add_storage(p)


def _workers(text: str) -> str:
    """--workers: 'auto' or a whole number >= 1 (checked when parsed, like every number)."""
    if text == "auto" or (text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(
        f"expected 'auto' (one 1-thread worker per CPU core, one per GPU) or a whole number >= 1, "
        f"got {text!r}"
    )


def add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="Tables, plots, Markdown/HTML/CSV/LaTeX from a results folder or a study.",
        description="Per task and method: mean ± std over seeds at the best learning rate, LoRA − "
        "full, trainable share, time, memory, pass/fail against the targets; ablations; plots. Writes "
        "report.md/.html/.csv, runs.csv, report.tex (tables and figures as LaTeX floats) and "
        "figures/ (PNG, and PDF for the LaTeX).",
    )
    p.add_argument("results_dir", nargs="?", metavar="RESULTS_DIR", help="folder of run directories")  # fmt: skip
    p.add_argument("--study", action="append", help="read these studies' stored results (repeatable)")  # fmt: skip
    p.add_argument("--storage", help="Optuna storage URL (default: RESULTS_DIR/study.db)")
    p.add_argument(
        "--out", help="output folder (default: RESULTS_DIR/report; ./report with --study alone)"
    )


def add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="A shareable copy of a results folder: finished runs without weights, study.db, report.",
        description="Copy each finished run's config.yaml, summary.json, metrics.jsonl and "
        "sweep.json (no weights, no checkpoints), a consistent snapshot of study.db (safe while "
        "workers run), then write DEST/report from the copy. Exporting again updates DEST; a "
        "study continued from DEST never retrains what it holds.",
    )
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="folder holding runs/ and study.db")
    p.add_argument("dest", metavar="DEST", help="folder to write, e.g. results/my-study")


def cmd_export(args) -> int:
    from ..study.export import export

    check_writable(args.dest, "DEST")
    done = export(args.results_dir, args.dest)
    text = f"exported {len(done.runs)} finished runs to {done.dest}"
    if done.left_out:
        text += f" ({len(done.left_out)} unfinished left out)"
    if done.storage:
        text += f"; {STUDY_DB} copied"
    print(text)
    if done.report is not None:
        print(f"report: {done.report.files[0]} (also .html, .csv, .tex)")
    return 0


def _plan(args, kind: str = "sweep", ablation: str | None = None):
    from ..study.grid import make_plan

    return make_plan(
        kind=kind,
        ablation=ablation,
        tasks=args.tasks,
        methods=getattr(args, "methods", None),
        lora_lr=args.lora_lr,
        full_lr=getattr(args, "full_lr", None),
        seeds=args.seeds,
        config=args.config,
        overrides=args.overrides,
        results_dir=args.output_dir,
        model={"name": args.model, "head": args.head},
        data={
            "data_dir": args.data_dir,
            "max_train_examples": args.max_train_examples,
            "max_eval_examples": args.max_eval_examples,
        },
    )


def _storage_opts(args) -> dict:
    from ..study.storage import check_grace

    check_grace(args.heartbeat, args.grace)  # before a dry run too, which opens no storage
    return {
        "trust_remote_code": args.trust_remote_code,
        "heartbeat": args.heartbeat,
        "grace": args.grace,
        "max_retry": args.max_retries,
        "quiet": args.quiet,
    }


def _run_plan(args, plan) -> int:
    from ..study.grid import default_study_name
    from ..study.sweep import run_sweep

    _storage_opts(args)  # its checks, for the dry run as for the real one
    if args.dry_run:
        for p in plan.points():
            print(p["key"])
        print(f"{len(plan.points())} points; study '{args.study or default_study_name(plan)}'")
        return 0
    check_results_dir(plan.results_dir)
    rep = run_sweep(
        plan, args.study, args.storage, create_only=getattr(args, "create_only", False),
        **_storage_opts(args),
    )  # fmt: skip
    if rep is None:
        print(f"study '{args.study or default_study_name(plan)}' created; start workers with "
              "`loralab sweep worker --study NAME --storage URL`")  # fmt: skip
        return 0
    print(rep.line())
    return 1 if rep.unfinished else 0


def cmd_sweep(args) -> int:
    if args.overrides[:1] == ["status"]:
        if not args.study or args.overrides[1:]:
            raise LoralabError(
                "`loralab sweep status` shows an existing study: give --study NAME (and --storage "
                "URL, or --output-dir holding study.db), optionally --tasks T,...; nothing else."
            )
        from ..study.grid import parse_list
        from ..study.status import sweep_status
        from ..study.status_text import render

        output = args.output_dir if args.output_dir != "results" or not args.storage else None
        st = sweep_status(args.study, args.storage, output, parse_list(args.tasks, str, "--tasks"))
        print("\n".join(render(st)))
        return 0
    if args.overrides[:1] == ["worker"]:
        from ..study.worker import run_worker

        grid = [f"--{k.replace('_', '-')}" for k in ("methods", "lora_lr", "full_lr", "seeds",
                "model", "head", "data_dir", "max_train_examples", "max_eval_examples", "config")
                if getattr(args, k) is not None] + args.overrides[1:]  # fmt: skip
        if grid or not args.study or args.create_only or args.dry_run:
            raise LoralabError(
                "`loralab sweep worker` runs an existing study: give --study NAME (and --storage "
                "URL, or --output-dir holding study.db), optionally --tasks T,... and --output-dir; "
                f"the grid comes from the study{f' (drop {grid})' if grid else ''}."
            )
        from ..study.grid import parse_list

        output = args.output_dir if args.output_dir != "results" or not args.storage else None
        if output:
            check_results_dir(output)
        rep = run_worker(
            args.study, args.storage, parse_list(args.tasks, str, "--tasks"), output,
            **_storage_opts(args),
        )  # fmt: skip
        print(rep.line())
        return 1 if rep.unfinished else 0
    return _run_plan(args, _plan(args))


def cmd_ablate(args) -> int:
    return _run_plan(args, _plan(args, "ablation", args.type))


def cmd_study(args) -> int:
    from ..study import layout
    from ..study.grid import parse_list
    from ..study.prechecks import check_points, fetch_models
    from ..study.runner import run_study
    from ..study.spec import check_data, dry_run, load_spec, select_tasks, spec_configs

    spec = load_spec(args.spec, args.data_root)
    tasks = parse_list(args.tasks, str, "--tasks")
    selected = select_tasks(spec, tasks)
    if args.dry_run:
        _storage_opts(args)  # its checks, as the real run makes them
        check_data(spec, selected)  # as the real run does, before its plan
        check_points(spec_configs(spec, selected))
        lines = dry_run(spec, tasks, args.study or spec.name)
        print("\n".join(lines))
        return 0
    if args.status:
        from ..study.status import study_status
        from ..study.status_text import render

        st = study_status(spec, args.output_dir, args.storage, tasks, args.study or spec.name)
        print("\n".join(render(st)))
        return 0
    check_results_dir(args.output_dir or spec.output_dir)
    check_data(spec, selected)  # before a download it would make useless
    fetch_models(spec_configs(spec, selected))  # once, before any worker
    workers, threads = layout.choose(args.workers)
    siblings = layout.spawn_siblings(args.argv, workers, threads) if workers > 1 else []
    with layout.stopping_siblings(siblings):
        out = run_study(
            spec, args.output_dir, args.storage, tasks, args.study, **_storage_opts(args)
        )
        # Inside: a Ctrl-C or SIGTERM while waiting for the siblings stops them too (they hand
        # their points back), instead of leaving them to die with this process.
        codes = [p.wait() for p in siblings]
    print("\n".join(out.lines))
    if out.report is not None:
        print(f"report: {out.report.files[0]} (also .html, .csv, .tex)")
    return 1 if out.unfinished or any(codes) else 0


def cmd_report(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..models import caveat
    from ..study.report import report
    from ..study.tables import CONSOLE_COLUMNS

    if args.results_dir and not Path(args.results_dir).is_dir():
        state = "is a file" if Path(args.results_dir).exists() else "does not exist"
        raise LoralabError(
            f"RESULTS_DIR '{args.results_dir}' {state}: give the results folder of a sweep or "
            "study (the one holding runs/), or --study NAME with --storage URL."
        )
    if args.out or args.results_dir or args.study:
        # The report goes to --out, else into RESULTS_DIR, else (--study alone) into ./report.
        where = "--out" if args.out else "RESULTS_DIR/report" if args.results_dir else "./report"
        out = Path(args.out or (Path(args.results_dir or ".") / REPORT_DIR))
        check_writable(out, where)
        check_not_a_run(out, where)
    rep = report(args.results_dir, args.study, args.storage, args.out)
    for w in rep.warnings:
        print(f"warning: {w}", file=sys.stderr)
    main_table = rep.tables[0]
    shown = [main_table.headers.index(h) for h in CONSOLE_COLUMNS]
    table = Table(title=main_table.title, caption="All columns: report.md/.html/.csv/.tex")
    for i in shown:
        table.add_column(main_table.headers[i], overflow="fold")
    for row in main_table.rows:
        table.add_row(*[row[i] for i in shown])
    Console(width=max(Console().width, 200)).print(table)
    col = main_table.headers.index("model")  # each model's caveat, as train prints it
    for note in filter(None, map(caveat, sorted({r[col] for r in main_table.rows}))):
        print(f"({note})")
    print(f"report: {rep.files[0]} (also .html, .csv, .tex; runs.csv, figures/)")
    return 0
