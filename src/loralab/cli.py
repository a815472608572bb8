"""Command line: each subcommand parses its options and makes one library call."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import LoralabError


class _Parser(argparse.ArgumentParser):
    """Usage mistakes read like every other user error: one paragraph, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"loralab: error: {self.prog}: {message}. See `{self.prog} --help`.\n")


def _int_at_least(low: int):
    """An argparse type: an integer >= low (a bad value is a usage error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _add_trust(p) -> None:
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow code shipped with a hub model to run (never taken from a run folder or study)",
    )


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="Fine-tune one model on one task with LoRA or full fine-tuning.",
        description="Train one run. Precedence: defaults < --config file < flags < dotted overrides.",
    )
    p.add_argument(
        "--task",
        help="sst2, mrpc, rte, squad_v2, or your own data: csv:PATH, tsv:PATH, jsonl:PATH, "
        "hub:ORG/NAME, or a task YAML file",
    )
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
    p.add_argument("--max-train-examples", type=_int_at_least(1), help="cap on training examples")
    p.add_argument("--max-eval-examples", type=_int_at_least(1), help="cap on evaluation examples")
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint"
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="with --resume: train from step 0 in the same folder when no checkpoint is usable",
    )
    _add_trust(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or live lines")
    _add_push(p, "the adapter (LoRA) or the model (full)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.r=16 train.lr=3e-4")


def _add_push(p, what: str) -> None:
    p.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help=f"upload {what} to this hub repository (user/name); token from HF_TOKEN",
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")


def _push(args, folder, what: str) -> None:
    if not getattr(args, "push_to_hub", None):
        return
    from .hub import push_folder

    url = push_folder(folder, args.push_to_hub, what, private=args.private)
    if not getattr(args, "quiet", False):
        print(f"pushed the {what} to {url}")


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="List the built-in models and whether they are cached.")
    p.add_argument("--fetch", metavar="NAME", help="fetch and cache a built-in model now")


def _add_merge(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="Merge a LoRA run's adapter, check equivalence, benchmark, export.",
        description="Merge the adapter of RUN_DIR into its base, test merged vs adapter outputs on "
        "dev batches (fp32 and/or bf16), benchmark base/adapter/merged, export to RUN_DIR/merge/model. "
        "Exit status: 0 passed or uninformative (the adapter barely changes the outputs; the "
        "verdict is in merge.json and the table), 1 failed, 2 bad input.",
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
        type=_int_at_least(0),
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
    _add_push(p, "the merged export")
    p.add_argument("--no-benchmark", action="store_true", help="skip the inference benchmark")
    p.add_argument(
        "--bench-batch-size",
        type=_int_at_least(1),
        default=8,
        help="benchmark batch size (default 8)",
    )
    p.add_argument(
        "--bench-seq-len",
        type=_int_at_least(1),
        default=128,
        help="benchmark tokens per sequence (default 128)",
    )
    p.add_argument(
        "--bench-batches",
        type=_int_at_least(1),
        default=20,
        help="timed batches per model (default 20)",
    )
    p.add_argument(
        "--bench-warmup",
        type=_int_at_least(0),
        default=3,
        help="untimed warm-up batches (default 3)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output; tables still print")
    _add_trust(p)


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
        type=_int_at_least(1),
        metavar="N",
        help="first N dev examples for the representations (default: min(256, dev size, the "
        "run's max_eval_examples))",
    )
    p.add_argument(
        "--layer",
        type=_int_at_least(0),
        metavar="L",
        help="layer for the similarity heat-maps (default: the middle one)",
    )
    p.add_argument("--data-dir", help="task data folder, if not the one in the run's config")
    p.add_argument(
        "--eval-file", help="explicit evaluation file, if not the one in the run's config"
    )
    _add_trust(p)


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
    p.add_argument("--config", help="YAML config file (LoRA settings are taken from it)")
    p.add_argument("--out", default="validate.json", help="where to write the JSON report")
    p.add_argument(
        "--steps",
        type=_int_at_least(1),
        default=20,
        help="training steps of the probe (default 20)",
    )
    p.add_argument(
        "--lr",
        type=_positive_float,
        help="the probe's learning rate (default: train.lr if set, else 1e-3)",
    )
    p.add_argument(
        "--tolerance",
        type=_positive_float,
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
    p.add_argument("--max-train-examples", type=_int_at_least(1), help="cap on training examples")
    p.add_argument("--max-eval-examples", type=_int_at_least(1), help="cap on evaluation examples")
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
        "--heartbeat", type=_int_at_least(1), default=20, help="seconds between heartbeats (20)"
    )
    p.add_argument(
        "--grace",
        type=_int_at_least(1),
        help="seconds without a heartbeat before a point is retried (3x)",
    )
    p.add_argument(
        "--max-retries",
        type=_int_at_least(0),
        default=3,
        help="retries of a point whose worker died (3)",
    )
    p.add_argument("--quiet", action="store_true", help="no per-point progress lines")
    _add_trust(p)


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
    p.add_argument(
        "--workers",
        default=None,
        help="worker processes on this machine: auto (default: one 1-thread worker per CPU core, "
        "one per GPU) or a number; they share the study's points",
    )
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
    from . import __version__

    parser = _Parser(prog="loralab", description="Honest, reproducible LoRA studies.")
    parser.add_argument("--version", action="version", version=f"loralab {__version__}")
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
    from .models import precheck

    if args.model:  # a typo or an unreachable hub fails here, before the slow imports below
        precheck(args.model)
    if args.push_to_hub:
        from .hub import check_push

        check_push(args.push_to_hub)
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
        result = resume(
            args.resume,
            quiet=args.quiet,
            restart=args.restart,
            trust_remote_code=args.trust_remote_code,
        )
    else:
        if args.restart:
            raise LoralabError("--restart goes with --resume RUN_DIR (it restarts that run).")
        cfg = build_config(
            args.config,
            args.overrides,
            model={
                "name": args.model,
                "head": args.head,
                "trust_remote_code": args.trust_remote_code or None,
            },
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
    from .tracking import ADAPTER_DIR, MODEL_DIR

    lora = (result.summary.get("method") or "lora") == "lora"
    _push(
        args, result.run_dir / (ADAPTER_DIR if lora else MODEL_DIR), "adapter" if lora else "model"
    )
    return 0


def cmd_models(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .models import BUILTIN_MODELS, check_model_name, list_models, resolve

    if args.fetch:
        if args.fetch not in BUILTIN_MODELS:
            check_model_name(args.fetch)  # "did you mean ...?"
            raise LoralabError(
                f"--fetch takes a built-in model name ({', '.join(BUILTIN_MODELS)}), not "
                f"'{args.fetch}'; hub models and folders are loaded when a command uses them."
            )
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

    if args.push_to_hub:
        from .hub import check_push

        if args.no_export:
            raise LoralabError("--push-to-hub uploads the merged export: drop --no-export.")
        check_push(args.push_to_hub)
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
        trust_remote_code=args.trust_remote_code,
    )
    render(result, Console())
    if args.push_to_hub and result.exit_code == 0 and result.export_dir is not None:
        _push(args, result.export_dir, "merged model")
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
        trust_remote_code=args.trust_remote_code,
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
    from .validate import as_json, drop_targets, run_checks

    _refuse_unused(args.overrides, ("model.", "lora.", "train.seed="), "validate")
    cfg = build_config(args.config, args.overrides, model={"name": args.model})
    _check_out_file(Path(args.out), "--out")
    result = run_checks(cfg, steps=args.steps, lr=args.lr, tolerance=args.tolerance)
    if args.results:
        result.targets += drop_targets(args.results, cfg.model.name)
    report = as_json(result, cfg, strict=args.strict)
    write_json(Path(args.out), report)
    title = f"loralab validate: {cfg.model.name} (LoRA r={cfg.lora.r}, {cfg.lora.target})"
    table = Table(title=f"{title}\ninvariants (they set the exit status)")
    for col in ("check", "result", "detail"):
        table.add_column(col, overflow="fold")
    for c in result.checks:
        table.add_row(c.name, "[green]pass[/]" if c.passed else "[red]FAIL[/]", c.detail)
    targets = Table(title="targets (reported; they fail the command only with --strict)")
    for col in ("target", "result", "figure", "detail"):
        targets.add_column(col, overflow="fold")
    for t in result.targets:
        mark = "[green]met[/]" if t.met else "[yellow]target missed[/]"
        targets.add_row(t.name, mark, t.figure, t.detail)
    console = Console(width=max(Console().width, 120))
    console.print(table)
    console.print(targets)
    n_met = sum(t.met for t in result.targets)
    console.print(
        f"{len(result.checks) - report['n_failed']}/{len(result.checks)} invariants hold; "
        f"{n_met}/{len(result.targets)} targets met"
        + (" (--strict: a missed target fails)" if args.strict else "")
        + f"; report: {args.out}"
    )
    return report["exit_status"]


def _check_results_dir(path) -> None:
    from .tracking import check_writable

    check_writable(path, "--output-dir")


def _check_out_file(path: Path, what: str) -> None:
    """Fail before slow work when file `path` cannot be written."""
    from .tracking import check_writable

    if path.is_dir():
        raise LoralabError(f"{what} '{path}' is a folder; give a file path, e.g. validate.json.")
    check_writable(path.parent if str(path.parent) else Path("."), f"The folder of {what}")


def _refuse_unused(overrides: list[str], used: tuple[str, ...], command: str) -> None:
    """Overrides a command would ignore are errors (exit 2), never silently dropped."""
    for item in overrides:
        if not item.strip().startswith(used):
            raise LoralabError(
                f"{item} cannot be honoured: `loralab {command}` uses only "
                f"{', '.join(u.rstrip('=') + ('*' if u.endswith('.') else '') for u in used)} "
                "from the config (its probe data, steps and learning rate are its own options). "
                "Drop it."
            )


def _plan(args, kind: str = "sweep", ablation: str | None = None):
    from .study.grid import make_plan

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
        "trust_remote_code": args.trust_remote_code,
        "heartbeat": args.heartbeat,
        "grace": args.grace,
        "max_retry": args.max_retries,
        "quiet": args.quiet,
    }


def _run_plan(args, plan) -> int:
    from .study.grid import default_study_name
    from .study.sweep import run_sweep

    if args.dry_run:
        for p in plan.points():
            print(p["key"])
        print(f"{len(plan.points())} points; study '{args.study or default_study_name(plan)}'")
        return 0
    _check_results_dir(plan.results_dir)
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
        from .study.worker import run_worker

        grid = [f"--{k.replace('_', '-')}" for k in ("methods", "lora_lr", "full_lr", "seeds",
                "model", "head", "data_dir", "max_train_examples", "max_eval_examples", "config")
                if getattr(args, k) is not None] + args.overrides[1:]  # fmt: skip
        if grid or not args.study or args.create_only or args.dry_run:
            raise LoralabError(
                "`loralab sweep worker` runs an existing study: give --study NAME (and --storage "
                "URL, or --output-dir holding study.db), optionally --tasks T,... and --output-dir; "
                f"the grid comes from the study{f' (drop {grid})' if grid else ''}."
            )
        from .study.grid import parse_list

        output = args.output_dir if args.output_dir != "results" or not args.storage else None
        if output:
            _check_results_dir(output)
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
    from .study.grid import parse_list
    from .study.runner import run_study
    from .study.spec import dry_run, load_spec

    spec = load_spec(args.spec, args.data_root)
    tasks = parse_list(args.tasks, str, "--tasks")
    if args.dry_run:
        lines = dry_run(spec, tasks, args.study or spec.name)
        print("\n".join(lines))
        return 0
    _check_results_dir(args.output_dir or spec.output_dir)
    from .study import layout

    workers, threads = layout.choose(args.workers)
    siblings = []
    if workers > 1:
        siblings = layout.spawn_siblings(_argv_with(args._argv, "--workers", "1"), workers, threads)
    out = run_study(spec, args.output_dir, args.storage, tasks, args.study, **_storage_opts(args))
    codes = [p.wait() for p in siblings]
    print("\n".join(out.lines))
    if out.report is not None:
        print(f"report: {out.report.files[0]} (also .html, .csv)")
    return 1 if out.unfinished or any(codes) else 0


def _argv_with(argv: list[str], flag: str, value: str) -> list[str]:
    """`argv` with `flag` set to `value` (replaced if present)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return [*out, flag, value]


def cmd_report(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .study.report import report
    from .study.tables import CONSOLE_COLUMNS
    from .tracking import check_writable

    if args.out or args.results_dir:
        check_writable(args.out or Path(args.results_dir) / "report", "--out")
    rep = report(args.results_dir, args.study, args.storage, args.out)
    for w in rep.warnings:
        print(f"warning: {w}", file=sys.stderr)
    main_table = rep.tables[0]
    shown = [main_table.headers.index(h) for h in CONSOLE_COLUMNS]
    table = Table(title=main_table.title, caption="All columns: report.md/.html/.csv")
    for i in shown:
        table.add_column(main_table.headers[i], overflow="fold")
    for row in main_table.rows:
        table.add_row(*[row[i] for i in shown])
    Console(width=max(Console().width, 200)).print(table)
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args._argv = argv  # `study --workers N` starts siblings with the same arguments
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
    except OSError as e:
        if e.filename is None:
            raise  # not a file-boundary failure: a bug, keep the traceback
        # A file or folder the command had to read or write (read-only disk, no permission, a
        # file where a folder belongs, disk full): the user's to fix, not a bug.
        print(f"loralab: error: {_os_error_text(e)}", file=sys.stderr)
        return 2


def _os_error_text(e: OSError) -> str:
    from .redact import mask_secrets

    target = f"'{e.filename}'" + (f" -> '{e.filename2}'" if e.filename2 else "")
    return mask_secrets(
        f"Cannot use {target}: {e.strerror or type(e).__name__}. Check that the path is a "
        "folder you can write to (or a file you can read), on a disk with free space."
    )


if __name__ == "__main__":
    sys.exit(main())
