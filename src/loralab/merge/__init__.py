"""Merge a run's LoRA adapter into its base, prove the merge equivalent, benchmark, export.

By concern: `bounds` (the equivalence rule, shared with `loralab validate`), `inputs` (the run's
reference model and dev batches), `equivalence` (merged variants vs the reference),
`benchmark` (base/adapter/merged timing), `export` (the merged folder and its model card),
`present` (rich tables, the W&B mirror), `run` (`run_merge`, the command), `options`.
"""

from .bounds import (
    BF16_ADAPTER_FACTOR,
    DEFAULT_TOLERANCES,
    INFORMATIVE_FACTOR,
    equivalence_bound,
    parse_tolerances,
)
from .equivalence import lora_disabled
from .options import MergeOptions, MergeResult
from .present import render
from .run import run_merge

__all__ = [
    "BF16_ADAPTER_FACTOR", "DEFAULT_TOLERANCES", "INFORMATIVE_FACTOR", "MergeOptions",
    "MergeResult", "equivalence_bound", "lora_disabled", "parse_tolerances", "render", "run_merge",
]  # fmt: skip
