"""`loralab merge`: merge a run's LoRA adapter into its base, prove the merge equivalent,
benchmark, export. Results go to RUN_DIR/merge/ (merge.json, benchmark.json, model/)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import tracking
from ..errors import LoralabError
from ..rundir import BENCH_FILE, EXPORT_DIR, IN_RUN_FIX, MERGE_DIR, MERGE_FILE, SUMMARY_FILE
from . import equivalence
from .benchmark import run_benchmark
from .equivalence import DTYPES, check_equivalence
from .export import export_model, model_card
from .inputs import load_run
from .options import MergeOptions, MergeResult
from .present import mirror_to_wandb


@contextmanager
def fixed_init_rng(seed: int = 0) -> Iterator[None]:
    """Weights that loading initialises before the saved ones replace them (a classifier head,
    fresh LoRA factors) draw from a fixed seed, in a fork of the CPU generator: the caller's
    global RNG state is the same afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def check_inputs(run_dir: str | Path, options: MergeOptions) -> None:
    """User errors that need no model: bad settings, an unusable --out or merge folder, a
    damaged summary.json (the model card reads it)."""
    options.check()
    out = options.out
    if options.export and out:
        tracking.check_writable(out, "--out")
        if Path(out).exists() and any(Path(out).iterdir()):
            raise LoralabError(f"--out '{out}' exists and is not empty; choose a new folder.")
        merge_dir = (Path(run_dir) / MERGE_DIR).resolve()
        if merge_dir == Path(out).resolve() or Path(out).resolve() in merge_dir.parents:
            raise LoralabError(
                f"--out '{out}' would hold the run's merge folder ({merge_dir}), whose "
                "merge.json and benchmark.json the export would replace; choose a folder outside "
                f"it, or leave --out out to export into {MERGE_DIR}/{EXPORT_DIR}."
            )
    tracking.check_writable(
        tracking.open_run_dir(run_dir) / MERGE_DIR, "The merge folder", IN_RUN_FIX
    )
    summary = Path(run_dir) / SUMMARY_FILE
    if summary.is_file():
        tracking.read_json(summary)


def run_merge(run_dir: str | Path, options: MergeOptions | None = None) -> MergeResult:
    """Merge, check equivalence per dtype, benchmark base/adapter/merged, export; write merge/.

    Remote code runs only with `options.trust_remote_code` (the command line), never because
    the run folder's config says so."""
    o = options or MergeOptions()
    check_inputs(run_dir, o)
    with fixed_init_rng():
        run = load_run(
            run_dir, o.max_eval_examples, o.data_dir, o.eval_file, o.quiet, o.trust_remote_code
        )
        merge_dir = run.run_dir / MERGE_DIR
        limit = getattr(run.reference.config, "max_position_embeddings", None)
        if o.bench and isinstance(limit, int) and o.bench_seq_len > limit:
            raise LoralabError(
                f"--bench-seq-len {o.bench_seq_len} is longer than {run.cfg.model.name} takes "
                f"(max_position_embeddings {limit}). Give --bench-seq-len {limit} or less "
                "(default 128), or --no-benchmark; nothing was written."
            )
        report = check_equivalence(run, o.dtype, o.all_tolerances())
        report["finished"] = False  # the verdict is kept even if the benchmark or export dies
        tracking.write_json(merge_dir / MERGE_FILE, report)
        notes = report["notes"]

        # Benchmark and export use bf16 only when fp32 was not asked for.
        main_dtype = "bf16" if o.dtype == "bf16" else "fp32"
        # Through the module, so that a swapped-in merge (tests) is the one exported.
        merged = equivalence.merge(run.adapter_model()).to(dtype=DTYPES[main_dtype])
        bench_report = None
        if o.bench and main_dtype == "bf16" and not equivalence.native_bf16():
            notes.append(
                "This device has no bf16 kernels: the bf16 benchmark times slow fallback code."
            )
        if o.bench:
            bench_report = run_benchmark(
                run, merged, main_dtype, o.bench_batch_size, o.bench_seq_len, o.bench_batches,
                o.bench_warmup,
            )  # fmt: skip
            tracking.write_json(merge_dir / BENCH_FILE, bench_report)

    export_dir = None
    # The variant the export is: a merge in fp32, cast to bf16 where bf16 was asked for.
    exported = "fp32 merge" if main_dtype == "fp32" else "bf16 merge in fp32, then cast"
    if o.export and report["variants"][exported]["status"] == "failed":
        notes.append(f"Not exported: the merge it would export ({exported}) failed its equivalence check.")  # fmt: skip
    elif o.export:
        card = model_card(run.cfg, run.task, run.head, run.run_dir, report, main_dtype)
        export_dir = export_model(
            merged,
            run.tokenizer,
            Path(o.out) if o.out else merge_dir / EXPORT_DIR,
            card,
            run.head.export_labels(),
        )
        report["export_dir"] = str(export_dir)
    notes += earlier_outputs(merge_dir, bench_report is not None, export_dir)
    mirror_to_wandb(run.cfg, run.run_dir, report, bench_report, notes)
    report["finished"] = True
    tracking.write_json(merge_dir / MERGE_FILE, report)
    return MergeResult(run.run_dir, report["status"], report, bench_report, export_dir, notes)


def earlier_outputs(merge_dir: Path, benchmarked: bool, export_dir: Path | None) -> list[str]:
    """Notes on files an earlier merge left in RUN_DIR/merge/ that this one did not rewrite:
    kept (they are the user's), but never to be read as this call's."""
    notes = []
    if not benchmarked and (merge_dir / BENCH_FILE).is_file():
        notes.append(f"{BENCH_FILE} here is from an earlier merge: this one ran no benchmark.")
    if (merge_dir / EXPORT_DIR).is_dir() and export_dir != merge_dir / EXPORT_DIR:
        notes.append(f"{EXPORT_DIR}/ here is an earlier merge's export: this one "
                     + (f"exported to {export_dir}." if export_dir else "exported nothing."))  # fmt: skip
    return notes
