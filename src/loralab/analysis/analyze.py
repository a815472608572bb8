"""`loralab analyze`: look inside a trained adapter (and compare it with a second one).

Loads run directories, the probe set and the models; the numbers come from the pure functions
of `loralab.analysis`, the JSON parts from `sections`, the figures from `plots`. Writes
`analysis/` in the run directory: analysis.json, PNG plots and the probe set's hidden states
(safetensors). The JSON schema is documented in docs/analysis.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import tracking
from ..config import ExperimentConfig
from ..data import dev_settings, eval_split, pad_batches
from ..errors import LoralabError
from ..heads import head_for
from ..models import canonical, is_causal, load_tokenizer
from ..rundir import ADAPTER_DIR, ANALYSIS_DIR, ANALYSIS_FILE, HIDDEN_FILE, IN_RUN_FIX, atomic_dir
from ..runs import load_adapter_model, open_lora_run
from ..tasks import get_task
from . import plots
from .factors import lora_factors, short_name, unsupported_variant
from .representations import pooled_hidden_states
from .sections import (
    compare_report,
    format_summary,
    heatmap_modules,
    lora_info,
    module_report,
    representations,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
SCHEMA_VERSION = 1
DEFAULT_PROBE = 256


@dataclass
class AnalysisResult:
    """The written `analysis/` folder, its analysis.json data and the terminal summary."""

    out_dir: Path
    data: dict
    summary: str


def _open_adapter_run(
    path: str | Path, trust_remote_code: bool = False
) -> tuple[Path, ExperimentConfig, set[str]]:
    """Run dir, its config and the names of its adapted modules (from the weight file's keys)."""
    from safetensors import safe_open

    run_dir, cfg = open_lora_run(path, "analyze", trust_remote_code)
    weights = run_dir / ADAPTER_DIR / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise LoralabError(f"'{run_dir}' has no {ADAPTER_DIR}/{ADAPTER_WEIGHTS} to analyze.")
    with safe_open(str(weights), "pt") as fh:
        keys = list(fh.keys())
    suffix = ".lora_A.weight"
    modules = {short_name(k[: -len(suffix)]) for k in keys if k.endswith(suffix)}
    return run_dir, cfg, modules


def _check_comparable(cfg1, mods1, dir2, cfg2, mods2) -> None:
    if cfg1.model.name != cfg2.model.name:
        raise LoralabError(
            f"The two adapters sit on different base models ('{cfg1.model.name}' vs "
            f"'{cfg2.model.name}' in '{dir2}'); subspaces and representations are only "
            "comparable on the same base model."
        )
    if mods1 != mods2:
        only1, only2 = sorted(mods1 - mods2), sorted(mods2 - mods1)
        raise LoralabError(
            f"The two adapters adapt different modules (only in the first: {only1[:4]}"
            f"{' ...' if len(only1) > 4 else ''}; only in '{dir2}': {only2[:4]}"
            f"{' ...' if len(only2) > 4 else ''}). Compare runs trained with the same lora.target."
        )


def _load_peft(cfg: ExperimentConfig, task, run_dir: Path):
    return load_adapter_model(cfg, task, run_dir)


def _probe_examples(cfg: ExperimentConfig, task, n: int, data_dir, eval_file):
    """The first n examples of the run's dev split (checked before any model is loaded)."""
    try:
        data = dev_settings(cfg.data, data_dir, eval_file)
        raw = task.load_dev(data.data_dir, data.train_file, data.eval_file)
    except LoralabError as e:
        raise LoralabError(
            f"{e} (The probe set is the run's dev split; point --data-dir/--eval-file at it.)"
        ) from e
    if n is None:  # as much as the run evaluated on, at most 256
        n = min(DEFAULT_PROBE, len(raw), cfg.data.max_eval_examples or len(raw))
    if n < 2 or n > len(raw):
        raise LoralabError(
            f"--probe {n} is out of range: the probe set takes the first N examples of the dev "
            f"split, which has {len(raw)}; use 2 <= N <= {len(raw)}."
        )
    return raw.select(range(n))


def probe_batches(cfg: ExperimentConfig, task, raw, tokenizer, causal: bool, batch_size=32):
    """Padded batches of the probe examples (right padding, original order), featurised by the
    run's head (a prompted-LM run sees its prompts, as in training)."""
    head = head_for(cfg, task)
    head.prepare(tokenizer)
    _, feats = eval_split(task, cfg.data, tokenizer, causal, head, sort=False, raw=raw)
    return pad_batches(feats, tokenizer, batch_size)


def _check_variant(run_dir: Path, cfg) -> None:
    """The saved adapter's own config decides: loralab saves PiSSA/OLoRA converted (init True)."""
    saved = tracking.read_json(run_dir / ADAPTER_DIR / "adapter_config.json")
    why = unsupported_variant(saved)
    if why:
        raise LoralabError(
            f"Run '{run_dir}' uses a LoRA variant the adapter analysis does not cover yet: {why}. "
            "Its statistics would be wrong, so none are written. Plain LoRA, rsLoRA, DoRA, "
            "LoRA+, Gaussian-initialised adapters and PiSSA/OLoRA adapters saved by loralab "
            "are supported."
        )


def analyze(
    run_dir: str | Path,
    compare: str | Path | None = None,
    probe: int | None = None,
    layer: int | None = None,
    data_dir: str | None = None,
    eval_file: str | None = None,
    trust_remote_code: bool = False,
) -> AnalysisResult:
    """Analyze one LoRA run (optionally against a second); write and return `analysis/`.

    `probe` None = min(256, dev size, the run's data.max_eval_examples). Remote code runs only
    with `trust_remote_code` (the command line), never because a run folder's config says so.
    """
    run_dir, cfg, mods = _open_adapter_run(run_dir, trust_remote_code)
    _check_variant(run_dir, cfg)
    tracking.check_writable(run_dir / ANALYSIS_DIR, "The analysis folder", IN_RUN_FIX)
    other_dir = other_cfg = None
    if compare is not None:
        other_dir, other_cfg, other_mods = _open_adapter_run(compare, trust_remote_code)
        _check_variant(other_dir, other_cfg)
        _check_comparable(cfg, mods, other_dir, other_cfg, other_mods)
        heatmap_modules(sorted(mods), layer)  # a bad --layer fails before the slow part
    task = get_task(cfg.data.task)
    examples = _probe_examples(cfg, task, probe, data_dir, eval_file)
    tokenizer = load_tokenizer(
        cfg.model.name, trust_remote_code=cfg.model.trust_remote_code, progress=False
    )
    tokenizer.padding_side = "right"  # pooling reads the last real token at mask.sum() - 1

    model = _load_peft(cfg, task, run_dir)
    causal = is_causal(model.config)
    batches = probe_batches(cfg, task, examples, tokenizer, causal)
    factors = lora_factors(model, with_base=True)
    modules, by_kind = module_report(factors)
    with model.disable_adapter():
        h_base = pooled_hidden_states(model, batches, causal)
    h_adapted = pooled_hidden_states(model, batches, causal)
    hidden = {f"base.{k}": v for k, v in h_base.items()} | {
        f"adapted.{k}": v for k, v in h_adapted.items()
    }
    pairs = {"base_vs_adapted": (h_base, h_adapted)}

    data = {
        "schema_version": SCHEMA_VERSION,
        "run_dir": str(run_dir),
        "model": cfg.model.name,
        "model_source": canonical(cfg.model.name),
        "task": cfg.data.task,
        "lora": lora_info(cfg, factors),
        "modules": modules,
        "by_kind": by_kind,
        "compare": None,
    }
    other_modules = None
    if other_dir is not None:
        del model  # keep a single full model in memory (factors hold only adapted weights)
        other = _load_peft(other_cfg, get_task(other_cfg.data.task), other_dir)
        f2 = lora_factors(other, with_base=True)
        other_modules, other_by_kind = module_report(f2)
        sim, sim_by_kind = compare_report(factors, f2)
        h_other = pooled_hidden_states(other, batches, causal)
        hidden |= {f"compare.{k}": v for k, v in h_other.items()}
        pairs |= {"base_vs_compare": (h_base, h_other), "adapted_vs_compare": (h_adapted, h_other)}
        heat_layer, heat_names = heatmap_modules(list(sim), layer)
        data["compare"] = {
            "run_dir": str(other_dir),
            "task": other_cfg.data.task,
            "lora": lora_info(other_cfg, f2),
            "by_kind": other_by_kind,
            "similarity": sim,
            "similarity_by_kind": sim_by_kind,
            "heatmap_layer": heat_layer,
            "heatmap_modules": heat_names,
        }
    data["representations"] = representations(len(examples), pairs, causal, HIDDEN_FILE)

    final = _write(run_dir, data, hidden, other_modules)
    return AnalysisResult(final, data, format_summary(data))


def _write(run_dir: Path, data: dict, hidden: dict, other_modules: dict | None) -> Path:
    """Plots, hidden states and JSON into a temp folder that then replaces `analysis/` whole,
    so no stale plot from an earlier --compare survives and a crash leaves the old folder."""
    from safetensors.torch import save_file

    final = run_dir / ANALYSIS_DIR
    modules, comp = data["modules"], data["compare"]
    with atomic_dir(final) as tmp:
        files = [
            plots.plot_spectra(tmp / "spectra.png", modules, data["model"]),
            plots.plot_layers(tmp / "rank_utilisation.png", modules, other_modules, data["model"]),
            plots.plot_cka(tmp / "cka.png", data["representations"], data["model"]),
        ]
        if comp is not None:
            png = tmp / f"similarity_layer{comp['heatmap_layer']}.png"
            files.append(
                plots.plot_similarity(png, comp["similarity"], comp["heatmap_modules"], data)
            )
        save_file({k: _compact(v) for k, v in hidden.items()}, str(tmp / HIDDEN_FILE))
        data["files"] = [p.name for p in files] + [HIDDEN_FILE, ANALYSIS_FILE]
        tracking.write_json(tmp / ANALYSIS_FILE, data)
    return final


def _compact(h: torch.Tensor) -> torch.Tensor:
    """fp16 halves the file (CKA is computed before, in fp64); fp32 if a value would overflow."""
    return (h.half() if h.abs().max() < 6e4 else h).contiguous()
