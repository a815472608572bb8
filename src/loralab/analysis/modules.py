"""Module names (kind, layer, role) and statistics aggregated per module kind over layers.

One aggregation serves `loralab analyze` (analysis.json's `by_kind`) and the live training
records (`lora_adapters/<kind>/...`), so the two always group modules alike.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from ..lora import role_of


def module_kind(name: str) -> str:
    """Coarse module type from its name: q / k / v / qkv / o / mlp / other; the layer roles
    LoRA's target presets use (`lora.role_of`), so both name a family's layers alike."""
    role = role_of(name)
    return "other" if role == "outside" else role


def module_layer(name: str) -> int | None:
    """Transformer block index from a module name ("model.layers.7.self_attn.q_proj" -> 7)."""
    m = re.search(r"\.(?:layers|layer|h|blocks)\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else None


def module_role(name: str) -> str:
    """The module's name inside its block ("model.layers.7.self_attn.q_proj" -> "self_attn.q_proj")."""
    m = re.search(r"\.(?:layers|layer|h|blocks)\.\d+\.(.+)$", f".{name}")
    return m.group(1) if m else name


def mean(values: Iterable[float | None], finite_only: bool = True) -> float:
    """Plain mean; `finite_only` drops None, NaN and ±inf first (NaN when nothing is left)."""
    if finite_only:
        values = [v for v in values if v is not None and math.isfinite(v)]
    else:
        values = list(values)
    return sum(values) / len(values) if values else math.nan


def group_by_kind(
    rows: Iterable[tuple[str, Mapping[str, float]]], kind: Callable[[str], str] = module_kind
) -> dict[str, list[tuple[str, Mapping[str, float]]]]:
    """(module name, statistics) rows grouped by module kind, kinds in first-seen order."""
    groups: dict[str, list[tuple[str, Mapping[str, float]]]] = {}
    for row in rows:
        groups.setdefault(kind(row[0]), []).append(row)
    return groups


def kind_means(
    rows: Iterable[tuple[str, Mapping[str, float]]],
    keys: Sequence[str],
    kind: Callable[[str], str] = module_kind,
    finite_only: bool = True,
) -> dict[str, dict[str, float]]:
    """{kind: {key: mean over that kind's modules}} from (module name, statistics) rows.

    Kinds appear in first-seen order. `kind` groups differently (e.g. `lambda _: "all"`);
    `finite_only=False` lets a NaN or inf statistic show in its mean (a diverged run).
    """
    return {
        k: {key: mean((stats[key] for _, stats in group), finite_only) for key in keys}
        for k, group in group_by_kind(rows, kind).items()
    }
