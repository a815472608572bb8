"""Command line: each subcommand parses its options and makes one library call."""

from __future__ import annotations

import argparse
import os
import sys

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
    p.add_argument("--data-dir", help="folder with the task's original files (GLUE train.tsv/dev.tsv)")
    p.add_argument("--train-file", help="explicit training file (e.g. SQuAD v2 JSON)")
    p.add_argument("--eval-file", help="explicit evaluation file")
    p.add_argument("--output-dir", help="folder under which the run directory is created")
    p.add_argument("--max-train-examples", type=int, help="cap on training examples")
    p.add_argument("--max-eval-examples", type=int, help="cap on evaluation examples")
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars or live lines")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.r=16 train.lr=3e-4")


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="List the built-in models and whether they are cached.")
    p.add_argument("--fetch", metavar="NAME", help="fetch and cache a built-in model now")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loralab", description="Honest, reproducible LoRA studies.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_models(sub)
    return parser


def cmd_train(args) -> int:
    from .config import build_config
    from .train import resume, train

    if args.resume:
        given = [k for k in ("task", "model", "method", "config") if getattr(args, k)] + args.overrides
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


COMMANDS = {"train": cmd_train, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
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
