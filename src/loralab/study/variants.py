"""A LoRA variant is data: the `lora` section of a run (a dict of `lora.*` values), and its names.

Two names, both deterministic:
- `variant_slug`: the run-key suffix of a study spec's point (the settings that differ from the
  base), e.g. `-r16-a32` or `-dora`; `legacy_suffix`: the start of a `loralab sweep`/`ablate`
  point's suffix, `-r8-a16-standard`, followed by the `variant_slug` of any other setting that
  differs from `LORA_DEFAULTS` (`grid.point_key`). Run-directory names, so they never change.
- `lora_slug`: the readable name in the report and on the plots, `r=8 α=16 dora`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re

from ..config import LoraSettings as LoraConfig

# LoRA settings shown in a variant's name only when they differ from these (r and α: always).
LORA_DEFAULTS = {"dropout": 0.05, "target": "standard", "bias": "none", "use_rslora": False,
                 "use_dora": False, "init_lora_weights": True, "loraplus_lr_ratio": None,
                 "extra": {}}  # fmt: skip


def is_number(v) -> bool:
    """A finite int or float (not a bool): a NaN figure is no figure (one NaN seed would make a
    mean NaN and drop its rate from the best-lr choice)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def slug(value) -> str:
    """A value as file-name-safe text: lists joined with '+', floats in %g."""
    if isinstance(value, list):
        value = "+".join(map(str, value))
    if isinstance(value, float):
        value = f"{value:g}"
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(value))


def variant_slug(diff: dict) -> str:
    """A readable, deterministic suffix for LoRA settings that differ from the base:
    {} -> '', {r: 16, alpha: 32} -> '-r16-a32', {use_dora: True} -> '-dora',
    {loraplus_lr_ratio: 16} -> '-lora+16'."""
    order = list(LoraConfig.__dataclass_fields__)
    parts = []
    for k in sorted(diff, key=lambda k: order.index(k) if k in order else len(order)):
        v = diff[k]
        if k in ("r", "alpha", "dropout"):
            parts.append(f"{k[0]}{slug(float(v)) if k != 'r' else v}")
        elif k == "target":
            parts.append(slug(v))
        elif k in ("use_dora", "use_rslora"):
            parts.append(k[4:] if v else f"no{k[4:]}")
        elif k == "init_lora_weights":
            parts.append(f"init-{slug(v).lower()}")
        elif k == "loraplus_lr_ratio":
            parts.append(f"lora+{slug(float(v))}" if v is not None else "nolora+")
        elif k == "extra":
            parts.append("extra-" + hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:8])  # fmt: skip
        else:
            parts.append(f"{k}-{slug(v)}")
    return "".join(f"-{p}" for p in parts)


def legacy_suffix(lora: dict) -> str:
    """The r/alpha/target part of a `loralab sweep`/`ablate` LoRA point's key: '-r8-a16-standard'
    (other settings follow it, `grid.point_key`)."""
    return f"-r{lora['r']}-a{slug(float(lora['alpha']))}-{slug(lora['target'])}"


def slug_parts(lora: dict, name_target: bool = False) -> dict[str, str]:
    """Setting -> its words in the readable name: r and α always, the rest where they differ
    from `LORA_DEFAULTS`, e.g. {'r': 'r=8', 'alpha': 'α=16', 'use_dora': 'dora'}; the target
    also at its default with `name_target` (a report whose runs adapt different layers)."""
    parts = {"r": f"r={lora.get('r')}", "alpha": f"α={float(lora.get('alpha') or 0):g}"}
    for key, default in LORA_DEFAULTS.items():
        value = lora.get(key, default)
        if value == default and not (key == "target" and name_target):
            continue
        if key == "target":
            parts[key] = "+".join(value) if isinstance(value, list) else str(value)
        elif key in ("use_rslora", "use_dora"):
            name = key.removeprefix("use_")
            parts[key] = name if value else f"no-{name}"
        elif key == "init_lora_weights":
            parts[key] = f"init={value}"
        elif key == "loraplus_lr_ratio":
            parts[key] = f"lora+{float(value):g}"
        elif key == "extra":
            parts[key] = " ".join(f"{k}={v}" for k, v in sorted(value.items()))
        else:
            parts[key] = f"{key}={value:g}" if is_number(value) else f"{key}={value}"
    return parts


def lora_slug(lora: dict | None, name_target: bool = False) -> str:
    """The LoRA section as a short name: r and α, then whatever differs from the defaults (and
    the target at its default too with `name_target`)."""
    if not lora:
        return "—"
    return " ".join(slug_parts(lora, name_target).values())


def several_targets(loras) -> bool:
    """Whether these LoRA sections (None: full fine-tuning) adapt different layers: then every
    readable name says its target, `standard` included, as a q/v row beside `all-linear` would
    otherwise read as if it had none."""
    targets = {json.dumps(lo.get("target", LORA_DEFAULTS["target"])) for lo in loras if lo}
    return len(targets) > 1


def variant_label(lora: dict | None, keys) -> str:
    """The readable name restricted to `keys` (settings a plot tells apart); '' if none shows."""
    parts = slug_parts(lora or {})
    return " ".join(parts[k] for k in keys if parts.get(k))
