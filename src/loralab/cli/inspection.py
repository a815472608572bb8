"""`loralab merge` and `loralab analyze`: look at a finished LoRA run's adapter."""

from __future__ import annotations

from pathlib import Path

from ..errors import LoralabError
from .options import add_push, add_trust, check_push_flags, int_at_least, push


def add_merge(sub) -> None:
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
        type=int_at_least(0),
        default=256,
        help="dev examples checked (0 = all; default 256)",
    )
    p.add_argument(
        "--data-dir",
        help="task data folder whose dev split replaces the run's (alone: over its eval file too)",
    )
    p.add_argument(
        "--eval-file", help="explicit evaluation file, if not the one in the run's config"
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="export folder (default RUN_DIR/merge/model); must be new or empty",
    )
    p.add_argument("--no-export", action="store_true", help="skip the export")
    add_push(p, "the merged export")
    p.add_argument("--no-benchmark", action="store_true", help="skip the inference benchmark")
    p.add_argument(
        "--bench-batch-size",
        type=int_at_least(1),
        default=8,
        help="benchmark batch size (default 8)",
    )
    p.add_argument(
        "--bench-seq-len",
        type=int_at_least(1),
        default=128,
        help="benchmark tokens per sequence (default 128)",
    )
    p.add_argument(
        "--bench-batches",
        type=int_at_least(1),
        default=20,
        help="timed batches per model (default 20)",
    )
    p.add_argument(
        "--bench-warmup",
        type=int_at_least(0),
        default=3,
        help="untimed warm-up batches (default 3)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output; tables still print")
    add_trust(p)


def add_analyze(sub) -> None:
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
        type=int_at_least(2),  # CKA compares examples: one is no set
        metavar="N",
        help="first N dev examples (at least 2) for the representations (default: min(256, dev "
        "size, the run's max_eval_examples))",
    )
    p.add_argument(
        "--layer",
        type=int_at_least(0),
        metavar="L",
        help="layer for the similarity heat-maps (default: the middle one)",
    )
    p.add_argument(
        "--data-dir",
        help="task data folder whose dev split replaces the run's (alone: over its eval file too)",
    )
    p.add_argument(
        "--eval-file", help="explicit evaluation file, if not the one in the run's config"
    )
    add_trust(p)


def cmd_merge(args) -> int:
    from rich.console import Console

    from ..merge import MergeOptions, parse_tolerances, render, run_merge

    if args.no_export and (args.push_to_hub or args.out):
        flag = "--push-to-hub uploads" if args.push_to_hub else "--out names the folder of"
        raise LoralabError(f"{flag} the merged export, which --no-export skips: drop one of them.")
    check_push_flags(args)
    # fp32's tolerance also bounds other comparisons (the PEFT wrapper's); bf16's only bf16 rows.
    unchecked = [t.partition("=")[0] for t in args.tolerance or []]
    unchecked = [d for d in unchecked if d == "bf16" and args.dtype == "fp32"]
    if unchecked:
        raise LoralabError(
            f"--tolerance {', '.join(unchecked)}=... given, but --dtype {args.dtype} checks no "
            f"{'/'.join(unchecked)} merge: drop it, or use --dtype both."
        )
    options = MergeOptions(
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
    result = run_merge(args.run_dir, options)
    render(result, Console())
    if args.push_to_hub and result.exit_code == 0 and result.export_dir is not None:
        push(args, result.export_dir, "merged model")
    return result.exit_code


def cmd_analyze(args) -> int:
    from ..analysis.analyze import analyze

    if args.layer is not None and args.compare is None:
        raise LoralabError(
            f"--layer {args.layer} picks the layer of the similarity heat-maps, which compare two "
            "runs: give --compare OTHER_RUN_DIR too, or drop --layer."
        )
    if args.compare is not None and Path(args.compare).resolve() == Path(args.run_dir).resolve():
        raise LoralabError(
            f"--compare {args.compare} is the run being analysed: every similarity would be 1. "
            "Compare with another run of the same base model (e.g. another rank or seed)."
        )
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
