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
    p.add_argument("--model", help="built-in name (see `loralab models`), hub id or local folder")
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
        help="bound on max |Δlogit|, e.g. bf16=0.5 (repeatable; defaults fp32=1e-4, bf16=0.25)",
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


def _add_validate(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="Run the named checks that LoRA does what it claims on a model/config.",
        description="Exit status 0 when every check passes, 1 when any fails, 2 on bad input.",
    )
    p.add_argument("--model", help="built-in name, hub id or local folder (default: the config's)")
    p.add_argument("--config", help="YAML config file (LoRA settings are taken from it)")
    p.add_argument("--out", default="validate.json", help="where to write the JSON report")
    p.add_argument("--steps", type=int, default=10, help="training steps on the probe batch")
    p.add_argument(
        "--tolerance", type=float, default=1e-4, help="merge equivalence tolerance (fp32)"
    )
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. lora.r=16 lora.target=extended"
    )


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


def cmd_validate(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .config import build_config
    from .tracking import write_json
    from .validate import as_json, run_checks

    cfg = build_config(args.config, args.overrides, model={"name": args.model})
    checks = run_checks(cfg, steps=args.steps, tolerance=args.tolerance)
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


COMMANDS = {
    "train": cmd_train,
    "models": cmd_models,
    "merge": cmd_merge,
    "analyze": cmd_analyze,
    "validate": cmd_validate,
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
