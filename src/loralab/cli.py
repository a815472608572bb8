"""Command line: each subcommand parses its options and makes one library call."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import LoralabError


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="Fine-tune one model on one task with LoRA or full fine-tuning.",
        description="Train one run. Precedence: defaults < --config file < flags < dotted overrides.",
    )
    p.add_argument("--task", help="sst2, mrpc, rte or squad_v2")
    p.add_argument(
        "--model", help="built-in name (see `loralab models`), hub id, local folder or .gguf file"
    )
    p.add_argument("--method", choices=["lora", "full"], help="LoRA adapters or full fine-tuning")
    p.add_argument("--head", choices=["classifier", "lm"], help="task head formulation")
    p.add_argument(
        "--data-dir", help="folder with the task's original files (GLUE train.tsv/dev.tsv)"
    )
    p.add_argument("--train-file", help="explicit training file (e.g. SQuAD v2 JSON)")
    p.add_argument("--eval-file", help="explicit evaluation file")
    p.add_argument("--output-dir", help="folder under which the run directory is created")
    p.add_argument("--max-train-examples", type=int, help="cap on training examples")
    p.add_argument("--max-eval-examples", type=int, help="cap on evaluation examples")
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or live lines")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.r=16 train.lr=3e-4")


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="List the built-in models and whether they are cached.")
    p.add_argument("--fetch", metavar="NAME", help="fetch and cache a built-in model now")


def _add_merge(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="Merge a LoRA run's adapter, check equivalence, benchmark, export.",
        description="Merge the adapter of RUN_DIR into its base, test merged vs adapter outputs on "
        "dev batches (fp32 and/or bf16), benchmark base/adapter/merged, export to RUN_DIR/merge/model. "
        "Exit status: 0 passed, 1 failed, 4 uninformative (the adapter barely changes the outputs), "
        "2 bad input.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished LoRA run directory")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "both"],
        default="both",
        help="merge precision(s) to check",
    )
    p.add_argument(
        "--tolerance",
        action="append",
        metavar="DTYPE=VALUE",
        help="bound on max |Δlogit| per unit of max |logit|, e.g. bf16=0.1 (repeatable; defaults "
        "fp32=1e-4, bf16=0.05; a bf16 merge may also be 4x the unmerged bf16 adapter's error)",
    )
    p.add_argument(
        "--max-eval-examples",
        type=int,
        default=256,
        help="dev examples checked (0 = all; default 256)",
    )
    p.add_argument("--data-dir", help="task data folder, if not the one in the run's config")
    p.add_argument(
        "--eval-file", help="explicit evaluation file, if not the one in the run's config"
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="export folder (default RUN_DIR/merge/model); must be new or empty",
    )
    p.add_argument("--no-export", action="store_true", help="skip the export")
    p.add_argument("--no-benchmark", action="store_true", help="skip the inference benchmark")
    p.add_argument(
        "--bench-batch-size", type=int, default=8, help="benchmark batch size (default 8)"
    )
    p.add_argument(
        "--bench-seq-len", type=int, default=128, help="benchmark tokens per sequence (default 128)"
    )
    p.add_argument(
        "--bench-batches", type=int, default=20, help="timed batches per model (default 20)"
    )
    p.add_argument(
        "--bench-warmup", type=int, default=3, help="untimed warm-up batches (default 3)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress output; tables still print")


def _add_analyze(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="Look inside a LoRA adapter: spectra, rank use, subspace similarity, amplification, CKA.",
        description="Analyze the adapter of RUN_DIR (optionally against a second run's adapter on "
        "the same base model and modules); write JSON, PNG plots and the probe set's hidden states "
        "to RUN_DIR/analysis/ and print a short summary.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished LoRA run directory")
    p.add_argument(
        "--compare", metavar="RUN_DIR2", help="second LoRA run (other rank or seed) to compare with"
    )
    p.add_argument(
        "--probe",
        type=int,
        default=256,
        metavar="N",
        help="first N dev examples for the representations (default 256)",
    )
    p.add_argument(
        "--layer",
        type=int,
        metavar="L",
        help="layer for the similarity heat-maps (default: the middle one)",
    )
    p.add_argument("--data-dir", help="task data folder, if not the one in the run's config")
    p.add_argument(
        "--eval-file", help="explicit evaluation file, if not the one in the run's config"
    )


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="Dequantise a GGUF checkpoint into a transformers model folder.",
        description="Any family transformers reads from GGUF; the folder's README.md and "
        "loralab_gguf.json say it was dequantised and from which quantization. (--model FILE.gguf "
        "does the same once, into the cache.)",
    )
    p.add_argument("gguf", metavar="FILE.gguf", help="the GGUF checkpoint")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new folder for the fp32 model")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _add_validate(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="Run the named checks that LoRA does what it claims on a model/config.",
        description="Exit status 0 when every check passes, 1 when any fails, 2 on bad input.",
    )
    p.add_argument(
        "--model", help="built-in name, hub id, local folder or .gguf file (default: the config's)"
    )
    p.add_argument("--config", help="YAML config file (LoRA settings are taken from it)")
    p.add_argument("--out", default="validate.json", help="where to write the JSON report")
    p.add_argument("--steps", type=int, default=20, help="training steps of the probe (default 20)")
    p.add_argument(
        "--lr", type=float, help="the probe's learning rate (default: train.lr if set, else 1e-3)"
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="merge equivalence tolerance (fp32), times max(1, max |logit|)",
    )
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. lora.r=16 lora.target=extended"
    )


def _add_study_modes(p) -> None:
    p.add_argument(
        "--create-only", action="store_true", help="create the study; leave the points to workers"
    )
    p.add_argument("--dry-run", action="store_true", help="print the grid; create nothing")


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
    p.add_argument("--head", choices=["classifier", "lm"], help="task head formulation")
    p.add_argument("--data-dir", help="task data folder (GLUE: a parent with sst2/, mrpc/, rte/)")
    p.add_argument("--max-train-examples", type=int, help="cap on training examples")
    p.add_argument("--max-eval-examples", type=int, help="cap on evaluation examples")
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
    p.add_argument("--heartbeat", type=int, default=20, help="seconds between heartbeats (20)")
    p.add_argument(
        "--grace", type=int, help="seconds without a heartbeat before a point is retried (3x)"
    )
    p.add_argument(
        "--max-retries", type=int, default=3, help="retries of a point whose worker died (3)"
    )
    p.add_argument("--quiet", action="store_true", help="no per-point progress lines")


def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="Learning-rate × seed grid of LoRA and full fine-tuning, on Optuna.",
        usage="loralab sweep [options] [key=value ...]\n"
        "       loralab sweep worker --study NAME [--storage URL] [--tasks T,...] [--output-dir DIR]",
        description="Create (or continue) a study, then run its undone points here. Every point is "
        "a train run in RESULTS/runs/<point>; finished runs are never re-trained. `loralab sweep "
        "worker` runs the points of an existing study (optionally only some tasks); start one per "
        "machine against a shared PostgreSQL storage. Exit status 0 when every point is done.",
    )
    _add_grid(p)
    _add_study_modes(p)


def _add_ablate(sub) -> None:
    p = sub.add_parser(
        "ablate",
        help="LoRA ablations (rank, alpha, module preset, or all) on Optuna.",
        description="rank: r in 4, 8, 16 with alpha = 2r; alpha: 8, 16, 32 at r = 8; modules: "
        "standard, extended, all-linear; all: the full product. Same machinery as `sweep`.",
    )
    p.add_argument("--type", required=True, choices=["rank", "alpha", "modules", "all"])
    _add_grid(p, methods=False)
    _add_study_modes(p)


def _add_study(sub) -> None:
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
    p.add_argument("--dry-run", action="store_true", help="print the points; create nothing")
    _add_storage(p)


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="Tables, plots, Markdown/HTML/CSV from a results folder or a study.",
        description="Per task and method: mean ± std over seeds at the best learning rate, "
        "LoRA − full, trainable share, time, memory, pass/fail against the targets; ablations; plots.",
    )
    p.add_argument(
        "results_dir", nargs="?", metavar="RESULTS_DIR", help="folder of run directories"
    )
    p.add_argument(
        "--study", action="append", help="read these studies' stored results (repeatable)"
    )
    p.add_argument("--storage", help="Optuna storage URL (default: RESULTS_DIR/study.db)")
    p.add_argument("--out", help="output folder (default: RESULTS_DIR/report)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loralab", description="Honest, reproducible LoRA studies."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_models(sub)
    _add_merge(sub)
    _add_analyze(sub)
    _add_validate(sub)
    _add_convert(sub)
    _add_sweep(sub)
    _add_ablate(sub)
    _add_study(sub)
    _add_report(sub)
    return parser


def cmd_train(args) -> int:
    from .config import build_config
    from .train import resume, train

    if args.resume:
        given = [
            k for k in ("task", "model", "method", "config") if getattr(args, k)
        ] + args.overrides
        if given:
            raise LoralabError(
                f"--resume continues a run with the config it was started with; drop {given} "
                "(or start a new run without --resume)."
            )
        result = resume(args.resume, quiet=args.quiet)
    else:
        cfg = build_config(
            args.config,
            args.overrides,
            model={"name": args.model, "head": args.head},
            data={
                "task": args.task,
                "data_dir": args.data_dir,
                "train_file": args.train_file,
                "eval_file": args.eval_file,
                "max_train_examples": args.max_train_examples,
                "max_eval_examples": args.max_eval_examples,
            },
            train={"method": args.method},
            run={"output_dir": args.output_dir},
        )
        result = train(cfg, quiet=args.quiet)
    shown = ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items() if isinstance(v, float))
    print(f"{result.run_dir}: {shown}")
    return 0


def cmd_models(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .models import list_models, resolve

    if args.fetch:
        path = resolve(args.fetch, progress=True)
        print(f"{args.fetch}: cached at {path}")
        return 0
    table = Table(title="Built-in models")
    for col in ("name", "family", "cached", "description"):
        table.add_column(col)
    for m in list_models():
        table.add_row(m["name"], m["family"], "yes" if m["cached"] else "no", m["description"])
    Console().print(table)
    return 0


def cmd_merge(args) -> int:
    from rich.console import Console

    from .merge import parse_tolerances, render, run_merge

    result = run_merge(
        args.run_dir,
        dtype=args.dtype,
        tolerances=parse_tolerances(args.tolerance),
        max_eval_examples=args.max_eval_examples or None,
        out=args.out,
        export=not args.no_export,
        bench=not args.no_benchmark,
        bench_batch_size=args.bench_batch_size,
        bench_seq_len=args.bench_seq_len,
        bench_batches=args.bench_batches,
        bench_warmup=args.bench_warmup,
        data_dir=args.data_dir,
        eval_file=args.eval_file,
        quiet=args.quiet,
    )
    render(result, Console())
    return result.exit_code


def cmd_analyze(args) -> int:
    from .analyze import analyze

    result = analyze(
        args.run_dir,
        compare=args.compare,
        probe=args.probe,
        layer=args.layer,
        data_dir=args.data_dir,
        eval_file=args.eval_file,
    )
    print(result.summary)
    return 0


def cmd_convert(args) -> int:
    import json

    from .convert import MARKER, convert_gguf

    out = convert_gguf(args.gguf, args.out_dir, progress=not args.quiet)
    info = json.loads((out / MARKER).read_text())
    print(f"{out}: dequantised to float32 from {info['quantization']}")
    return 0


def cmd_validate(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .config import build_config
    from .tracking import write_json
    from .validate import as_json, run_checks

    cfg = build_config(args.config, args.overrides, model={"name": args.model})
    checks = run_checks(cfg, steps=args.steps, lr=args.lr, tolerance=args.tolerance)
    report = as_json(checks, cfg)
    write_json(Path(args.out), report)
    table = Table(
        title=f"loralab validate: {cfg.model.name} (LoRA r={cfg.lora.r}, {cfg.lora.target})"
    )
    for col in ("check", "result", "detail"):
        table.add_column(col, overflow="fold")
    for c in checks:
        table.add_row(c.name, "[green]pass[/]" if c.passed else "[red]FAIL[/]", c.detail)
    console = Console(width=max(Console().width, 120))
    console.print(table)
    console.print(
        f"{len(checks) - report['n_failed']}/{len(checks)} checks passed; report: {args.out}"
    )
    return 0 if report["passed"] else 1


def _plan(args, kind: str = "sweep", ablation: str | None = None):
    from .sweep import make_plan

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
    return {
        "heartbeat": args.heartbeat,
        "grace": args.grace,
        "max_retry": args.max_retries,
        "quiet": args.quiet,
    }


def _run_plan(args, plan) -> int:
    from .sweep import default_study_name, run_sweep

    if args.dry_run:
        for p in plan.points():
            print(p["key"])
        print(f"{len(plan.points())} points; study '{args.study or default_study_name(plan)}'")
        return 0
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
    if args.overrides[:1] == ["worker"]:
        from .worker import run_worker

        grid = [f"--{k.replace('_', '-')}" for k in ("methods", "lora_lr", "full_lr", "seeds",
                "model", "head", "data_dir", "max_train_examples", "max_eval_examples", "config")
                if getattr(args, k) is not None] + args.overrides[1:]  # fmt: skip
        if grid or not args.study or args.create_only or args.dry_run:
            raise LoralabError(
                "`loralab sweep worker` runs an existing study: give --study NAME (and --storage "
                "URL, or --output-dir holding study.db), optionally --tasks T,... and --output-dir; "
                f"the grid comes from the study{f' (drop {grid})' if grid else ''}."
            )
        from .sweep import parse_list

        output = args.output_dir if args.output_dir != "results" or not args.storage else None
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
    from .study import dry_run, load_spec, run_study
    from .sweep import parse_list

    spec = load_spec(args.spec, args.data_root)
    tasks = parse_list(args.tasks, str, "--tasks")
    if args.dry_run:
        lines = dry_run(spec, tasks, args.study or spec.name)
        print("\n".join(lines))
        return 0
    out = run_study(
        spec, args.output_dir, args.storage, tasks, args.study, heartbeat=args.heartbeat,
        grace=args.grace, max_retry=args.max_retries, quiet=args.quiet,
    )  # fmt: skip
    print("\n".join(out.lines))
    if out.report is not None:
        print(f"report: {out.report.files[0]} (also .html, .csv)")
    return 1 if out.unfinished else 0


def cmd_report(args) -> int:
    from .report import report

    rep = report(args.results_dir, args.study, args.storage, args.out)
    for t in rep.tables[:1]:
        print(f"{t.title}:")
        for row in t.rows:
            print("  " + " | ".join(x for x in row if x))
    print(f"report: {rep.files[0]}, {rep.files[1]}, {rep.files[2]}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "models": cmd_models,
    "merge": cmd_merge,
    "analyze": cmd_analyze,
    "validate": cmd_validate,
    "convert": cmd_convert,
    "sweep": cmd_sweep,
    "ablate": cmd_ablate,
    "study": cmd_study,
    "report": cmd_report,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Loading reports ("newly initialized: score") are recorded in the summary instead.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if getattr(args, "quiet", False):
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return COMMANDS[args.command](args)
    except LoralabError as e:
        print(f"loralab: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("loralab: interrupted; checkpoints and finished files are kept.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
