"""A merge's settings and its result, as data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LoralabError
from .bounds import DEFAULT_TOLERANCES


@dataclass
class MergeOptions:
    """How `run_merge` checks, benchmarks and exports a run (the `loralab merge` flags)."""

    dtype: str = "both"
    """fp32, bf16 or both: the merged variants checked; bf16 alone also benchmarks and exports
    in bf16."""
    tolerances: dict[str, float] | None = None
    """Relative tolerance per dtype (see `bounds`); missing ones take DEFAULT_TOLERANCES."""
    max_eval_examples: int | None = 256
    """N dev examples spread over the split (`data.spread`); None = all the run evaluated on."""
    out: str | Path | None = None
    """Export folder; None = RUN/merge/model."""
    export: bool = True
    bench: bool = True
    bench_batch_size: int = 8
    bench_seq_len: int = 128
    bench_batches: int = 20
    bench_warmup: int = 3
    data_dir: str | None = None
    """Replaces the run's data.data_dir (e.g. the run was trained elsewhere)."""
    eval_file: str | None = None
    """Replaces the run's data.eval_file."""
    quiet: bool = False
    trust_remote_code: bool = False
    """Remote code runs only when this (the command line) says so, never the run's config."""

    def check(self) -> None:
        """A user error for settings that cannot work, before anything is loaded."""
        if self.dtype not in (*DEFAULT_TOLERANCES, "both"):
            raise LoralabError(f"Unknown --dtype '{self.dtype}'; use fp32, bf16 or both.")
        sizes = (self.bench_batch_size, self.bench_seq_len, self.bench_batches)
        if self.bench and (min(sizes) < 1 or self.bench_warmup < 0):
            raise LoralabError(
                "The benchmark needs --bench-batch-size, --bench-seq-len, --bench-batches ≥ 1 "
                "and --bench-warmup ≥ 0."
            )
        if self.max_eval_examples is not None and self.max_eval_examples < 1:
            raise LoralabError(
                f"--max-eval-examples must be at least 1 (or 0 = all), got {self.max_eval_examples}."
            )

    def all_tolerances(self) -> dict[str, float]:
        """DEFAULT_TOLERANCES updated with `tolerances`."""
        return {**DEFAULT_TOLERANCES, **(self.tolerances or {})}


@dataclass
class MergeResult:
    """What `run_merge` found; `status` is passed, failed or uninformative."""

    run_dir: Path
    status: str
    report: dict
    benchmark: dict | None = None
    export_dir: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        # Only a failure is an error: an uninformative check (adapter too small to see) still
        # merged and exported; the verdict stays in merge.json and the printed table.
        return 1 if self.status == "failed" else 0
