"""Merge a run's LoRA adapter into its base, prove the merge equivalent, benchmark, export.

The equivalence test runs the adapter model (fp32, unmerged: the reference) and each merged
variant on the same length-sorted dev batches and compares their outputs. It only counts as
evidence when the adapter visibly changes the outputs: a fresh adapter (B = 0) is an identity,
and a merge that dropped it entirely would "pass". Results go to RUN_DIR/merge/.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import tracking
from .config import ExperimentConfig
from .data import FEATURES_VERSION
from .errors import LoralabError
from .runs import load_adapter_model, load_base, open_lora_run
from .tasks import Task, get_task

MERGE_DIR = "merge"
MERGE_FILE = "merge.json"
BENCH_FILE = "benchmark.json"
EXPORT_DIR = "model"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Merge equivalence, one rule for `merge` and `validate` (see `equivalence_bound`): max |Δlogit|
# vs the fp32 adapter model, bounded relative to the logit scale (max |logit|, at least 1),
# since rounding grows with the logits (a classifier's are a few units, a causal LM's reach ±40).
# fp32: merging only reorders sums (W·x + s·B·(A·x) vs (W + s·B·A)·x): float32 rounding.
# bf16: every weight (and, natively, activation) carries a relative error of up to 2^-9; on
# SmolLM2-135M SST-2 bf16 weights alone drift 0.03-0.04 on logits of a few units.
DEFAULT_TOLERANCES = {"fp32": 1e-4, "bf16": 0.05}
# A bf16 merge is also judged against the unmerged adapter in bf16: it may be off by up to this
# many times the adapter's own bf16 error (its precision floor, which no merge can beat). A merge
# in bf16 rounds W, A and B as the adapter does, then the product s·B·A and the sum W + s·B·A
# again: 3.4× the adapter's error on tiny-llama (all-linear, B ~ N(0, 0.3), bf16 weights).
BF16_ADAPTER_FACTOR = 4.0
# The check is evidence only if removing the LoRA update moves the outputs by at least this
# many tolerances: otherwise a merge that lost the adapter would pass as well.
INFORMATIVE_FACTOR = 10.0


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


def equivalence_bound(
    dtype: str, tolerance: float, logit_scale: float, adapter_error: float | None = None
) -> float:
    """The bound on max |Δlogit| of a merged model: `tolerance` × max(1, max |logit|); for bf16
    at least BF16_ADAPTER_FACTOR × the unmerged bf16 adapter's own error vs fp32, when known."""
    bound = tolerance * max(1.0, logit_scale)
    if dtype == "bf16" and adapter_error is not None:
        bound = max(bound, BF16_ADAPTER_FACTOR * adapter_error)
    return bound


# ---------------------------------------------------------------------------------------------
# Inputs: the run directory, tolerances, dev batches


def parse_tolerances(items: list[str] | None) -> dict[str, float]:
    """["bf16=0.1"] -> defaults updated; each item is DTYPE=RELATIVE_TOLERANCE."""
    tolerances = dict(DEFAULT_TOLERANCES)
    for item in items or []:
        name, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if name not in DTYPES or not number > 0:
            raise LoralabError(
                f"Bad --tolerance '{item}': expected DTYPE=VALUE with DTYPE one of "
                f"{', '.join(DTYPES)} and VALUE > 0 (a bound on max |Δlogit| per unit of max |logit|), "
                "e.g. bf16=0.1."
            )
        tolerances[name] = number
    return tolerances


def eval_features(
    cfg: ExperimentConfig,
    task: Task,
    tokenizer,
    causal: bool,
    max_examples: int | None,
    prompting=None,
):
    """Raw dev examples (first N) and their features, sorted by length (as in training)."""
    from .data import cached_features

    raw = task.load("eval", cfg.data.data_dir, cfg.data.eval_file)
    caps = [n for n in (max_examples, cfg.data.max_eval_examples) if n]
    if caps and min(caps) < len(raw):
        raw = raw.select(range(min(caps)))
    max_length = cfg.data.max_length or task.default_max_length
    feats = cached_features(task, raw, tokenizer, cfg.data, "eval", causal, max_length, prompting)
    return raw, feats.sort("length")


def make_batches(features, tokenizer, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Padded model inputs (no labels), in feature order."""
    from transformers import DataCollatorWithPadding

    cols = [
        c for c in ("input_ids", "attention_mask", "token_type_ids") if c in features.column_names
    ]
    rows = features.select_columns(cols)
    collate = DataCollatorWithPadding(tokenizer)
    return [
        dict(collate([rows[j] for j in range(i, min(i + batch_size, len(rows)))]))
        for i in range(0, len(rows), batch_size)
    ]


# ---------------------------------------------------------------------------------------------
# Models


def merge(model: nn.Module) -> nn.Module:
    """Fold ΔW = s·B·A into each base weight and drop the PEFT wrappers (head included)."""
    return model.merge_and_unload()


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """LoRA layers off, trained head kept: what the model computes without the LoRA update."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def forward_all(model: nn.Module, batches: list[dict]) -> list[torch.Tensor]:
    """Per batch: logits as fp32 on CPU, [batch, labels] (QA: [batch, 2, seq], start/end; causal
    LM head: [batch, vocab], the next-token logits after each prompt)."""
    dev = next(model.parameters()).device
    outs = []
    for batch in batches:
        out = model(**{k: v.to(dev) for k, v in batch.items()})
        if hasattr(out, "start_logits"):
            logits = torch.stack([out.start_logits, out.end_logits], dim=1)
        elif out.logits.dim() == 3:  # [batch, seq, vocab]: keep each row's last real position
            last = batch["attention_mask"].sum(1).to(dev) - 1
            logits = out.logits[torch.arange(len(last), device=dev), last]
        else:
            logits = out.logits
        outs.append(logits.float().cpu())
    return outs


def compare(ref: list[torch.Tensor], out: list[torch.Tensor]) -> dict:
    """max |Δ|; max relative |Δ| (per example, over its largest |logit|); changed argmaxes."""
    max_abs = max_rel = 0.0
    changed = total = 0
    for r, o in zip(ref, out, strict=True):
        d = (o - r).abs().flatten(1)
        max_abs = max(max_abs, float(d.max()))
        scale = r.abs().flatten(1).amax(1).clamp_min(1e-12)
        max_rel = max(max_rel, float((d.amax(1) / scale).max()))
        flips = (o.argmax(-1) != r.argmax(-1)).reshape(len(r), -1).any(1)
        changed += int(flips.sum())
        total += len(r)
    return {
        "max_abs_diff": max_abs,
        "max_rel_diff": max_rel,
        "changed_predictions": changed / total,
    }


def _predictions(outs: list[torch.Tensor], task: Task):
    """Batch outputs -> what `task.score` takes (as from Trainer.predict; QA padded with -100)."""
    if task.kind == "classification":
        return torch.cat(outs).numpy()
    width = max(o.shape[-1] for o in outs)
    padded = torch.cat([nn.functional.pad(o, (0, width - o.shape[-1]), value=-100.0) for o in outs])
    return padded[:, 0].numpy(), padded[:, 1].numpy()


# ---------------------------------------------------------------------------------------------
# Equivalence


def native_bf16() -> bool:
    """Whether this device has bf16 kernels; CPUs without them run bf16 matmuls ~100× slower."""
    from .precision import native_bf16 as native

    return native()


def variants(dtype: str, native: bool = True) -> dict[str, tuple[str, Callable]]:
    """name -> (dtype, build from a freshly loaded fp32 adapter model).

    Without native bf16 the bf16 variants keep their bf16-rounded weights but compute in fp32
    (`native=False`): the merge's rounding is still measured, the activation rounding is not.
    """
    bf16 = torch.bfloat16
    done = (lambda m: m) if native else (lambda m: m.float())
    out: dict = {}
    if dtype in ("fp32", "both"):
        out["fp32 merge"] = ("fp32", merge)
    if dtype in ("bf16", "both"):
        out["bf16 adapter (unmerged)"] = ("bf16", lambda m: done(m.to(bf16)))
        out["bf16 merge in bf16"] = ("bf16", lambda m: done(merge(m.to(bf16))))
        out["bf16 merge in fp32, then cast"] = ("bf16", lambda m: done(merge(m).to(bf16)))
    return out


def _verdict(name: str, row: dict, bound: float, effect: float) -> str:
    if "unmerged" in name:
        return "reference"  # the bf16 noise floor: no merge involved
    if effect < INFORMATIVE_FACTOR * bound:
        return "uninformative"
    return "passed" if row["max_abs_diff"] <= bound else "failed"


def overall_status(rows: dict) -> str:
    """failed if any merge failed; passed if one passed with evidence; else uninformative.

    A bf16 row can be uninformative (its tolerance too coarse to see the update) while the fp32
    row, through the same merge code, proves the merge: that run passed.
    """
    verdicts = {r["status"] for r in rows.values()}
    if "failed" in verdicts:
        return "failed"
    return "passed" if "passed" in verdicts else "uninformative"


def lora_update_norms(model: nn.Module) -> dict:
    """How many adapted layers have a non-zero update (B = 0 means ΔW = 0); trained heads."""
    from peft.utils import ModulesToSaveWrapper

    from .analysis import lora_factors

    factors = lora_factors(model, check_variant=False)  # counts layers, reads B only
    zero = [f.name for f in factors if not torch.any(f.B)]
    heads = [
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if isinstance(m, ModulesToSaveWrapper)
    ]
    return {"layers": len(factors), "zero_B_layers": len(zero), "heads": heads}


# ---------------------------------------------------------------------------------------------
# Benchmark


def make_bench_batches(
    features, n: int, batch_size: int, seq_len: int, with_token_types: bool
) -> list[dict]:
    """`n` full batches [batch_size, seq_len] cut from the dev token stream (cycled): no padding,
    so every model sees exactly batch_size·seq_len real tokens."""
    stream = np.concatenate([np.asarray(ids) for ids in features["input_ids"]])
    need = n * batch_size * seq_len
    ids = torch.from_numpy(np.resize(stream, need).astype(np.int64)).view(n, batch_size, seq_len)
    out = []
    for b in ids:
        batch = {"input_ids": b, "attention_mask": torch.ones_like(b)}
        if with_token_types:
            batch["token_type_ids"] = torch.zeros_like(b)
        out.append(batch)
    return out


@torch.inference_mode()
def benchmark(models: dict[str, nn.Module], batches: list[dict], warmup: int) -> dict:
    """Latency per batch for each model on the same batches, interleaved round by round (with a
    rotating order) so background load hits every model alike."""
    dev = _device()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i, batch in enumerate(batches):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            sync()
            t0 = time.perf_counter()
            models[name](**batch)
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    tokens = int(batches[0]["input_ids"].numel())
    out = {}
    for name, ts in times.items():
        a = np.asarray(ts)
        med = float(np.median(a))
        out[name] = {
            "median_s": med,
            "p90_s": float(np.percentile(a, 90)),
            "mean_s": float(a.mean()),
            "min_s": float(a.min()),
            "tokens_per_s": tokens / med,
        }
    return out


# ---------------------------------------------------------------------------------------------
# Export


def export_model(
    model: nn.Module, tokenizer, out: Path, card: str, task: Task | None = None
) -> Path:
    """Save model + tokenizer + README.md into a temp folder, then rename it into place."""
    model.config.pad_token_id = tokenizer.pad_token_id  # batched inference needs it (Llama)
    labels = getattr(task, "label_names", None)
    if labels and task.kind == "classification":
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {n: i for i, n in enumerate(labels)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Unpredictable names in the target's parent (same file system: the renames stay atomic).
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        from .console import library_bars_off

        with library_bars_off():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            out.rename(old)  # replaces the empty folder just made
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_card(
    cfg: ExperimentConfig, task: Task, run_dir: Path, report: dict, export_dtype: str
) -> str:
    """A short README.md for the exported folder: provenance, LoRA settings, metric, equivalence."""
    summary_path = run_dir / tracking.SUMMARY_FILE
    summary = tracking.read_json(summary_path) if summary_path.is_file() else {}
    adapter_cfg = tracking.read_json(run_dir / tracking.ADAPTER_DIR / "adapter_config.json")
    lo = cfg.lora
    scaling = lo.alpha / (lo.r**0.5 if lo.use_rslora else lo.r)
    targets = adapter_cfg.get("target_modules")
    targets = sorted(targets) if isinstance(targets, list) else targets
    metrics = ", ".join(
        f"{k} {v:.4f}" for k, v in (summary.get("metrics") or {}).items() if isinstance(v, float)
    )
    n_eval = (summary.get("examples") or {}).get("eval", "?")
    if cfg.model.head == "lm":
        auto = "AutoModelForCausalLM"
    elif task.kind == "classification":
        auto = "AutoModelForSequenceClassification"
    else:
        auto = "AutoModelForQuestionAnswering"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [loralab, lora, merged]",
        "---",
        f"# {task.name}: {cfg.model.name} + LoRA, merged",
        "",
        f"An ordinary transformers model ({export_dtype}): the LoRA adapter of loralab run "
        f"`{run_dir.name}` folded into the base weights with `merge_and_unload`. No PEFT needed.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{cfg.model.name}`: {_base_description(cfg.model.name)} |",
        f"| task | {task.name} ({task.kind}) |",
        f"| LoRA | r={lo.r}, alpha={lo.alpha:g} (scaling {scaling:g}{', rsLoRA' if lo.use_rslora else ''}"
        f"{', DoRA' if lo.use_dora else ''}), dropout {lo.dropout:g}, target `{lo.target}` -> "
        f"{targets} ({report['lora_effect']['layers']} layers) |",
        f"| trained head | {', '.join(report['lora_effect']['heads']) or 'none'} (fully trained) |",
        f"| training | lr {cfg.lr:g}, {summary.get('steps', '?')} steps, seed {cfg.train.seed}, "
        f"{(summary.get('examples') or {}).get('train', '?')} examples |",
        f"| dev metric (adapter model, {n_eval} examples) | {metrics or 'n/a'} |",
        "",
        f"## Merge equivalence ({report['examples']} dev examples; status: **{report['status']}**)",
        "",
        f"Reference: the unmerged fp32 adapter model. LoRA update effect on the logits: "
        f"max |Δ| {report['lora_effect']['max_abs_diff']:.3g}.",
        "",
        "| variant | max abs Δlogit | max rel Δ | changed predictions | metric | bound | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in report["variants"].items():
        metric = row["metrics"].get(task.primary_metric, float("nan"))
        lines.append(
            f"| {name} | {row['max_abs_diff']:.3g} | {row['max_rel_diff']:.3g} | "
            f"{row['changed_predictions']:.2%} | {metric:.4f} | {row['bound']:.3g} | {row['status']} |"
        )
    lines += [
        "",
        "## Use",
        "",
        "```python",
        f"from transformers import {auto}, AutoTokenizer",
        "",
        f'model = {auto}.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
    ]
    return "\n".join(lines)


def _base_description(name: str) -> str:
    from .models import canonical

    return canonical(name)["description"]


# ---------------------------------------------------------------------------------------------
# The command


@dataclass
class Loaded:
    """A run's config, task, tokenizer, fp32 adapter model and dev batches."""

    run_dir: Path
    cfg: ExperimentConfig
    task: Task
    tokenizer: object
    reference: nn.Module
    raw: object
    feats: object
    batches: list[dict]
    prompting: object = None  # `--head lm` runs: the prompt and verbalizers they were trained with

    def score(self, model: nn.Module, outs: list[torch.Tensor]) -> dict:
        """Task metrics of `model`, whose dev-batch outputs are `outs`. The LM formulation scores
        verbalizers (or generates answers) with the model itself, as training's evaluation did."""
        if self.prompting is None:
            return self.task.score(self.raw, self.feats, _predictions(outs, self.task))
        from . import lm

        return lm.evaluate(
            self.task, model, self.tokenizer, self.raw, self.feats, self.prompting,
            self.cfg.train.eval_batch_size, progress=False,
        )  # fmt: skip

    def adapter_model(self) -> nn.Module:
        """A fresh fp32 copy of the adapter model on the device."""
        return load_adapter_model(self.cfg, self.task, self.run_dir, self.tokenizer).to(_device())


def load_run(
    run_dir, max_eval_examples, data_dir=None, eval_file=None, quiet=False, trust_remote_code=False
) -> Loaded:
    from .models import load_tokenizer
    from .train import is_causal

    run_dir, cfg = open_lora_run(run_dir, "merge", trust_remote_code)
    if data_dir or eval_file:  # e.g. the run was trained elsewhere, or with a relative path
        cfg.data.data_dir = data_dir or cfg.data.data_dir
        cfg.data.eval_file = eval_file or cfg.data.eval_file
    task = get_task(cfg.data.task)
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code, progress=not quiet)
    tokenizer.padding_side = "right"  # as in training (QA positions are absolute)
    reference = load_adapter_model(cfg, task, run_dir, tokenizer, progress=not quiet).to(_device())
    prompting = None
    if cfg.model.head == "lm":
        from .lm import prompting_for

        prompting = prompting_for(task, cfg.data, tokenizer)
    raw, feats = eval_features(
        cfg, task, tokenizer, is_causal(reference.config), max_eval_examples, prompting
    )
    batches = make_batches(feats, tokenizer, cfg.train.eval_batch_size)
    return Loaded(run_dir, cfg, task, tokenizer, reference, raw, feats, batches, prompting)


def check_equivalence(run: Loaded, dtype: str, tol: dict[str, float]) -> dict:
    """Each merged variant vs the fp32 adapter model on the dev batches, with verdicts."""
    task, ref = run.task, run.reference
    ref_out = forward_all(ref, run.batches)
    with lora_disabled(ref):
        effect = compare(ref_out, forward_all(ref, run.batches))
    # The PEFT task wrapper should only route inputs to the model it wraps; some drop inputs
    # (PEFT 0.21's question-answering wrapper loses token_type_ids), which a merge then "fixes".
    # Such a wrapper misroutes every batch, so two batches are enough to see it.
    unwrapped = compare(ref_out[:2], forward_all(ref.get_base_model(), run.batches[:2]))
    ref_metrics = run.score(ref, ref_out)
    rows = {}
    native = native_bf16()
    scale = max(float(o.abs().max()) for o in ref_out)
    adapter_error = None  # the unmerged bf16 adapter's error: the row before the bf16 merges
    for name, (dt, build) in variants(dtype, native).items():
        model = build(run.adapter_model())
        outs = forward_all(model, run.batches)
        row = {"dtype": dt, **compare(ref_out, outs), "tolerance": tol[dt]}
        row["bound"] = equivalence_bound(dt, tol[dt], scale, adapter_error)
        row["metrics"] = run.score(model, outs)
        row["metric_delta"] = row["metrics"][task.primary_metric] - ref_metrics[task.primary_metric]
        row["status"] = _verdict(name, row, row["bound"], effect["max_abs_diff"])
        if "unmerged" in name:
            adapter_error = row["max_abs_diff"]
        rows[name] = row
    status = overall_status(rows)
    notes = []
    update = lora_update_norms(ref)
    if update["zero_B_layers"] == update["layers"]:
        notes.append(
            f"All {update['layers']} LoRA layers have B = 0: the adapter is an identity (a fresh, "
            "untrained adapter), so the merge check proves nothing."
        )
    elif status == "uninformative":
        notes.append(
            f"The LoRA update moves the logits by at most {effect['max_abs_diff']:.3g}, less than "
            f"{INFORMATIVE_FACTOR:g}× the tolerance: a merge that lost the adapter would pass too."
        )
    if unwrapped["max_abs_diff"] > equivalence_bound("fp32", tol["fp32"], scale):
        notes.append(
            f"The PEFT wrapper ({type(ref).__name__}) gives other outputs than the model it "
            f"wraps on the same inputs (max |Δ| {unwrapped['max_abs_diff']:.3g}): it does not pass "
            "every input on (PEFT's question-answering wrapper drops token_type_ids). The adapter "
            "was trained and evaluated that way; the merged model uses all inputs, so they differ."
        )
    return {
        "status": status,
        "run_dir": str(run.run_dir),
        "task": task.name,
        "model": run.cfg.model.name,
        "primary_metric": task.primary_metric,
        "examples": len(run.raw),
        "features": len(run.feats),
        # Featurisation can change after a run was trained (then the dev inputs differ from
        # training's eval; the merge check itself is unaffected: both sides see the same inputs).
        "features_version": FEATURES_VERSION,
        "device": _device().type,
        "bf16_compute": "native" if native else "emulated: bf16-rounded weights, fp32 arithmetic",
        "reference": {"name": "fp32 adapter (unmerged)", "metrics": ref_metrics},
        "lora_effect": {**effect, **update, "informative_factor": INFORMATIVE_FACTOR},
        "logit_scale": scale,
        "wrapper_vs_unwrapped": unwrapped,
        "variants": rows,
        "notes": notes,
        "versions": tracking.versions(),
    }


def run_benchmark(
    run: Loaded, merged: nn.Module, dtype: str, batch_size, seq_len, n, warmup
) -> dict:
    """Base, adapter (unmerged) and merged model on the same full batches, in `dtype`."""
    dt, dev = DTYPES[dtype], _device()
    base = load_base(run.cfg, run.task, run.tokenizer).to(dev, dt)
    models = {"base": base, "adapter": run.reference.to(dtype=dt), "merged": merged}
    token_types = "token_type_ids" in run.feats.column_names
    batches = make_bench_batches(run.feats, warmup + n, batch_size, seq_len, token_types)
    timings = benchmark(models, batches, warmup)
    b = timings["base"]["median_s"]
    return {
        "dtype": dtype,
        "device": dev.type,
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "batches": n,
        "warmup": warmup,
        "models": timings,
        "adapter_overhead_pct": 100 * (timings["adapter"]["median_s"] / b - 1),
        "merged_vs_base_pct": 100 * (timings["merged"]["median_s"] / b - 1),
    }


def run_merge(
    run_dir: str | Path,
    dtype: str = "both",
    tolerances: dict[str, float] | None = None,
    max_eval_examples: int | None = 256,
    out: str | Path | None = None,
    export: bool = True,
    bench: bool = True,
    bench_batch_size: int = 8,
    bench_seq_len: int = 128,
    bench_batches: int = 20,
    bench_warmup: int = 3,
    data_dir: str | None = None,
    eval_file: str | None = None,
    quiet: bool = False,
    trust_remote_code: bool = False,
) -> MergeResult:
    """Merge, check equivalence per dtype, benchmark base/adapter/merged, export; write merge/.

    Remote code runs only with `trust_remote_code` (the command line), never because the run
    folder's config says so."""
    if dtype not in (*DTYPES, "both"):
        raise LoralabError(f"Unknown --dtype '{dtype}'; use fp32, bf16 or both.")
    if bench and (min(bench_batch_size, bench_seq_len, bench_batches) < 1 or bench_warmup < 0):
        raise LoralabError(
            "The benchmark needs --bench-batch-size, --bench-seq-len, --bench-batches ≥ 1 "
            "and --bench-warmup ≥ 0."
        )
    if max_eval_examples is not None and max_eval_examples < 1:
        raise LoralabError(
            f"--max-eval-examples must be at least 1 (or 0 = all), got {max_eval_examples}."
        )
    if export and out:
        tracking.check_writable(out, "--out")
        if Path(out).exists() and any(Path(out).iterdir()):
            raise LoralabError(f"--out '{out}' exists and is not empty; choose a new folder.")
    tracking.check_writable(tracking.open_run_dir(run_dir) / MERGE_DIR, "The merge folder")
    summary = Path(run_dir) / tracking.SUMMARY_FILE
    if summary.is_file():
        tracking.read_json(summary)  # the model card reads it: a damaged one fails now
    tol = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    torch.manual_seed(0)
    run = load_run(run_dir, max_eval_examples, data_dir, eval_file, quiet, trust_remote_code)
    merge_dir = run.run_dir / MERGE_DIR
    report = check_equivalence(run, dtype, tol)
    tracking.write_json(merge_dir / MERGE_FILE, report)
    notes = report["notes"]

    # Benchmark and export use bf16 only when fp32 was not asked for.
    main_dtype = "bf16" if dtype == "bf16" else "fp32"
    merged = merge(run.adapter_model()).to(dtype=DTYPES[main_dtype])
    bench_report = None
    if bench and main_dtype == "bf16" and not native_bf16():
        notes.append(
            "This device has no bf16 kernels: the bf16 benchmark times slow fallback code."
        )
    if bench:
        bench_report = run_benchmark(
            run, merged, main_dtype, bench_batch_size, bench_seq_len, bench_batches, bench_warmup
        )
        tracking.write_json(merge_dir / BENCH_FILE, bench_report)

    export_dir = None
    failed = [
        r
        for r in report["variants"].values()
        if r["dtype"] == main_dtype and r["status"] == "failed"
    ]
    if export and failed:
        notes.append(f"Not exported: the {main_dtype} merge failed its equivalence check.")
    elif export:
        card = model_card(run.cfg, run.task, run.run_dir, report, main_dtype)
        export_dir = export_model(
            merged,
            run.tokenizer,
            Path(out) if out else merge_dir / EXPORT_DIR,
            card,
            None if run.prompting else run.task,  # an LM has no label mapping
        )
        report["export_dir"] = str(export_dir)
    _mirror_to_wandb(run.cfg, run.run_dir, report, bench_report, notes)
    tracking.write_json(merge_dir / MERGE_FILE, report)
    return MergeResult(run.run_dir, report["status"], report, bench_report, export_dir, notes)


def flat_metrics(report: dict, bench_report: dict | None) -> dict[str, float]:
    """Scalar results under merge/... keys (for trackers)."""
    flat = {"merge/lora_effect_max_abs": report["lora_effect"]["max_abs_diff"]}
    for name, row in report["variants"].items():
        key = name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        flat[f"merge/{key}/max_abs_diff"] = row["max_abs_diff"]
        flat[f"merge/{key}/changed_predictions"] = row["changed_predictions"]
        flat[f"merge/{key}/{report['primary_metric']}"] = row["metrics"][report["primary_metric"]]
    for name, t in ((bench_report or {}).get("models") or {}).items():
        flat[f"merge/bench/{name}/median_s"] = t["median_s"]
        flat[f"merge/bench/{name}/tokens_per_s"] = t["tokens_per_s"]
    return flat


def _mirror_to_wandb(
    cfg, run_dir: Path, report: dict, bench_report: dict | None, notes: list[str]
) -> None:
    """Merge results into the run's W&B summary (same run id as training), when tracking is on.

    W&B is a mirror of the run directory, so a failure here is a note, never an error.
    """
    if cfg.tracking.wandb == "disabled":
        return
    try:
        tracker = tracking.Tracker(run_dir, cfg, resuming=True)
        tracker.summary({**flat_metrics(report, bench_report), "merge/status": report["status"]})
        tracker.finish()
    except Exception as e:  # missing key, no network, wandb not installed, ...
        why = (str(e).splitlines() or [type(e).__name__])[0]
        notes.append(f"Not mirrored to W&B ({why}); the results are in merge/.")


def render(result: MergeResult, console) -> None:
    """Rich tables of the equivalence check and the benchmark."""
    from rich.table import Table

    r = result.report
    eff = r["lora_effect"]
    if not console.is_terminal:
        console.width = max(console.width, 120)  # piped output: no 80-column squeeze
    table = Table(
        title=f"Merge equivalence vs the fp32 adapter model ({r['examples']} dev examples; "
        f"LoRA effect max |Δ| {eff['max_abs_diff']:.3g})",
        caption=f"bf16 compute: {r['bf16_compute']}"
        if any(row["dtype"] == "bf16" for row in r["variants"].values())
        else None,
    )
    for col in (
        "variant",
        "max |Δlogit|",
        "max rel Δ",
        "changed preds",
        r["primary_metric"],
        "bound",
        "status",
    ):
        table.add_column(col)
    ref = r["reference"]["metrics"][r["primary_metric"]]
    table.add_row("fp32 adapter (reference)", "", "", "", f"{ref:.4f}", "", "")
    colour = {"passed": "green", "failed": "red", "uninformative": "yellow", "reference": "dim"}
    for name, row in r["variants"].items():
        table.add_row(
            name, f"{row['max_abs_diff']:.3g}", f"{row['max_rel_diff']:.3g}",
            f"{row['changed_predictions']:.2%}", f"{row['metrics'][r['primary_metric']]:.4f}",
            f"{row['bound']:.3g}", f"[{colour[row['status']]}]{row['status']}[/]",
        )  # fmt: skip
    console.print(table)
    if result.benchmark:
        b = result.benchmark
        bt = Table(
            title=f"Inference benchmark ({b['dtype']}, {b['device']}, {b['threads']} threads, batch "
            f"{b['batch_size']}×{b['seq_len']} tokens, median of {b['batches']} batches)"
        )
        for col in ("model", "median ms", "p90 ms", "tokens/s", "vs base"):
            bt.add_column(col)
        base = b["models"]["base"]["median_s"]
        for name, t in b["models"].items():
            bt.add_row(
                name, f"{t['median_s'] * 1e3:.1f}", f"{t['p90_s'] * 1e3:.1f}", f"{t['tokens_per_s']:.0f}",
                f"{100 * (t['median_s'] / base - 1):+.1f}%",
            )  # fmt: skip
        console.print(bt)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(
        f"status: [bold {colour[result.status]}]{result.status}[/]  ({result.run_dir / MERGE_DIR})"
    )
    if result.export_dir:
        console.print(f"exported: {result.export_dir}")
