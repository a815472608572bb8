"""`loralab train`, `loralab models` and `loralab convert`: one run, the model registry, GGUF."""

from __future__ import annotations

import json

from ..config import build_config, dump_yaml
from ..errors import LoralabError
from ..rundir import ADAPTER_DIR, MODEL_DIR
from .options import add_push, add_trust, check_push_flags, int_at_least, push


def add_train(sub) -> None:
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
    p.add_argument("--head", help="task head: classifier (default), lm, or one you registered")
    p.add_argument(
        "--data-dir", help="folder with the task's original files (GLUE train.tsv/dev.tsv)"
    )
    p.add_argument("--train-file", help="explicit training file (e.g. SQuAD v2 JSON)")
    p.add_argument("--eval-file", help="explicit evaluation file")
    p.add_argument("--output-dir", help="folder under which the run directory is created")
    p.add_argument("--max-train-examples", type=int_at_least(1), help="cap on training examples")
    p.add_argument("--max-eval-examples", type=int_at_least(1), help="cap on evaluation examples")
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint"
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="with --resume: train from step 0 in the same folder when no checkpoint is usable",
    )
    add_trust(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or live lines")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the config the run would start with (defaults, --config, flags and "
        "overrides merged, its values checked) as YAML, and exit; checks that need the model or "
        "the data come when it trains",
    )
    add_push(p, "the adapter (LoRA) or the model (full)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.r=16 train.lr=3e-4")


def add_models(sub) -> None:
    p = sub.add_parser("models", help="List the built-in models and whether they are cached.")
    p.add_argument("--fetch", metavar="NAME", help="fetch and cache a built-in model now")


def add_convert(sub) -> None:
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


def _settle(args) -> None:
    """Once the command line is checked: the training stack imported and out of the collector's
    way (`loralab.startup`), where this process is the command's own and trains once."""
    if getattr(args, "entry", False):
        from ..startup import freeze_imports

        freeze_imports()


def cmd_train(args) -> int:
    from ..models import precheck

    if args.model and not args.print_config:  # a typo or an unreachable hub fails here, before
        precheck(args.model)  # the slow imports below
    check_push_flags(args)
    if args.resume and args.print_config:
        raise LoralabError(
            f"--print-config shows the config a new run would start with; a run's own is in "
            f"{args.resume}/config.yaml (drop --print-config to resume it)."
        )
    if args.resume:
        given = [
            f"--{k.replace('_', '-')}"
            for k in ("task", "model", "method", "head", "config", "data_dir", "train_file",
                      "eval_file", "max_train_examples", "max_eval_examples", "output_dir")
            if getattr(args, k, None) is not None
        ] + args.overrides  # fmt: skip
        if given:
            raise LoralabError(
                f"--resume continues a run with the config it was started with; drop {given} "
                "(or start a new run without --resume)."
            )
        _settle(args)
        from ..resume import resume

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
        if not args.model and not args.print_config:  # named by --config or an override:
            precheck(cfg.model.name)  # checked as early as --model
        lora_keys = [o.split("=", 1)[0] for o in args.overrides if o.startswith("lora.")]
        if cfg.train.method == "full" and lora_keys:
            raise LoralabError(
                f"{', '.join(lora_keys)} given with train.method=full: full fine-tuning trains "
                "every weight and builds no adapter, so lora.* settings would be ignored. Drop "
                "them, or train with --method lora."
            )
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        _settle(args)
        from ..train import train

        result = train(cfg, quiet=args.quiet)
    from .. import distributed

    if not distributed.is_main():  # under torchrun: rank 0 reports and pushes
        return 0
    from ..summary import metrics_text

    print(f"{result.run_dir}: {metrics_text(result.metrics)}")
    from ..models import caveat

    if note := caveat(result.summary.get("model") or ""):
        print(f"({note})")
    lora = (result.summary.get("method") or "lora") == "lora"
    push(
        args, result.run_dir / (ADAPTER_DIR if lora else MODEL_DIR), "adapter" if lora else "model"
    )
    return 0


def cmd_models(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..models import BUILTIN_MODELS, check_model_name, list_models, resolve

    if args.fetch is not None:  # "" too: a mistake, not a request for the list
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


def cmd_convert(args) -> int:
    from ..convert import MARKER, convert_gguf

    out = convert_gguf(args.gguf, args.out_dir, progress=not args.quiet)
    info = json.loads((out / MARKER).read_text())
    print(f"{out}: dequantised to float32 from {info['quantization']}")
    return 0
