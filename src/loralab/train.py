"""One run: build model and data, train with the HF Trainer, evaluate, write the run directory.

LoRA and full fine-tuning share every line here except the wrapping step in `build_model`; the
task's formulation (classifier/span head or prompted LM) is the run's head object.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import set_seed

from . import accounting, distributed, fused, kernels, precision, residual, rundir, tracking
from .artefacts import finish_adapter
from .callbacks import LiveProgress, TokenCounts, TrackingCallback
from .checkpoints import continue_from, logged, run_facts
from .compiling import compile_blocks, remember
from .config import ExperimentConfig, validate
from .console import library_bars_off
from .data import Splits, check_accumulation, check_max_length, load_splits, model_inputs
from .errors import TrainingDiverged
from .heads import Head, head_for
from .lora import apply_lora, check_init, check_targets
from .models import is_causal, load_config, load_for_task, load_tokenizer, resolve
from .quantization import check as check_quantization
from .stopping import GracefulStop
from .summary import base_summary, headline, metrics_text, process_layout, resolved_config
from .tasks import Task, absolute_ref, get_task
from .trainer import LoralabTrainer, training_args


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    summary: dict


@dataclass
class BuiltModel:
    model: torch.nn.Module
    tokenizer: object
    heads: list[str]
    causal: bool
    fused: dict = field(default_factory=dict)  # loralab.fused's replacements: kind -> count


def build_model(
    cfg: ExperimentConfig,
    task: Task,
    tokenizer,
    progress: bool = True,
    attention: str | None = None,
    head: Head | None = None,
    compile_layers: bool = False,
) -> BuiltModel:
    """Load the base with the task head; wrap with LoRA (frozen base) or leave all trainable.

    `attention`: the attention kernel (`eager`/`sdpa`); None = `model.attention` when set
    explicitly, else transformers' default. `head`: the run's head (default: from the config).
    `compile_layers`: compile the repeated layers (`loralab.compiling`), not `loralab.fused`.
    """
    head = head or head_for(cfg, task)
    attention = attention or (None if cfg.model.attention == "auto" else cfg.model.attention)
    # A quantized base is quantized while it loads, before PEFT wraps it: PEFT then puts its
    # torchao/bitsandbytes LoRA layers (full-precision factors) on the quantized weights.
    check_quantization(cfg.model.quantization, cfg.train.method)
    model, heads = load_for_task(cfg.model, head, tokenizer, progress, attention)
    causal = is_causal(model.config)
    if cfg.train.method == "lora":
        model = apply_lora(cfg.lora, model, heads, task_type=head.peft_task_type())
        if precision.uses_bf16(cfg.train.precision, precision.model_shape(model.config)):
            precision.cast_frozen(model)  # the frozen base needs no fp32 master copy
            precision.bridge_dtypes(model, heads)  # callable outside the trainer's autocast too
    fused_ops = {}
    if compile_layers:  # inductor fuses these ops itself (and the fused ones would split its graph)
        fused_ops = {"compiled_blocks": compile_blocks(model)}
    elif fused.enabled():  # the same numbers with less memory kept for the backward pass
        fused_ops = {"gated_mlps": fused.fuse_gated_mlps(model), "dropouts": fused.compact_dropouts(model)}  # fmt: skip
    return BuiltModel(model, tokenizer, heads, causal, fused_ops)


def absolute_data_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """A copy of `cfg` with data paths absolute, so a run directory can be re-read from any
    working directory."""
    paths = {
        key: str(Path(value).expanduser().resolve())
        for key in ("data_dir", "train_file", "eval_file")
        if (value := getattr(cfg.data, key))
    }
    return replace(cfg, data=replace(cfg.data, task=absolute_ref(cfg.data.task), **paths))


def _console(quiet: bool):
    from rich.console import Console

    return None if quiet else Console(stderr=True)


def train(
    cfg: ExperimentConfig,
    resume: str | Path | None = None,
    quiet: bool = False,
    callbacks: list | None = None,
    checkpoint: str | Path | None = None,
) -> RunResult:
    """Run one experiment and return its run directory, eval metrics and summary.

    `resume` is the run folder to train in (see `loralab.resume`), `checkpoint` the one to
    continue from (None: from step 0). `cfg` itself is not changed.

    `callbacks` are extra `transformers.TrainerCallback`s (e.g. for live tracking or tests); one
    with a `trainer` attribute is given the Trainer, one with a `tokens` attribute set to None
    the run's `TokenCounts` (for benchmarks).
    """

    validate(cfg)
    if cfg.train.method == "lora":  # a typo must not wait for a download or a conversion
        check_init(cfg.lora)
    distributed.init()  # under torchrun / accelerate launch: one run, several processes
    quiet = quiet or not distributed.is_main()  # one process speaks
    tracking.preflight(cfg)
    # Before any slow work: the run folder must be creatable and writable.
    where = "The run folder" if resume else "run.output_dir"
    tracking.check_writable(resume or cfg.run.output_dir, where)
    if not resume:  # a new run goes beside the others, not inside one
        rundir.check_not_a_run(cfg.run.output_dir, "run.output_dir (--output-dir)")
    cfg = absolute_data_paths(cfg)
    start = time.time()
    task = get_task(cfg.data.task)
    head = head_for(cfg, task)
    if not resume:  # a run resumes as it started
        head.check_data(cfg.data)
    console = _console(quiet)

    set_seed(cfg.train.seed)
    # A built-in model is materialised once, by rank 0, before the other processes read it.
    distributed.main_first(lambda: resolve(cfg.model.name, progress=not quiet))
    tokenizer = load_tokenizer(
        cfg.model.name, trust_remote_code=cfg.model.trust_remote_code, progress=not quiet
    )
    # Labels (QA span positions, the null index) are absolute positions: pad on the right.
    tokenizer.padding_side = "right"
    config = load_config(cfg.model.name, cfg.model.trust_remote_code, progress=not quiet)
    cfg, precision_decision = kernels.resolve_precision(cfg, config)
    head.check_model(config, cfg.model.name)
    check_max_length(task, cfg.data, config, cfg.model.name)
    head.prepare(tokenizer)
    if cfg.train.method == "lora":  # targets vs the model's layers, before weights and data
        check_targets(cfg.lora, config, head.auto_class(), cfg.model.trust_remote_code)
    # Data first: a bad data file should fail before the slower model load.
    causal = is_causal(config)
    splits = load_splits(task, cfg.data, tokenizer, cfg.train.seed, causal, head, not quiet)
    if checkpoint:  # before the model: a resume on other data or processes is refused
        continue_from(Path(checkpoint), splits.fingerprint, distributed.world_size())
    tr = cfg.train
    check_accumulation(len(splits.train), tr.batch_size, tr.grad_accum, distributed.world_size())
    kernel = kernels.choose_attention(cfg, config, splits)
    compiled = kernels.choose_compile(cfg, kernel["implementation"], len(splits.train))
    set_seed(cfg.train.seed)
    tracking.reset_peak_memory()  # this run's peak, not an earlier run's in this process
    built = build_model(cfg, task, tokenizer, not quiet, kernel["implementation"], head,
                        compiled["compile"])  # fmt: skip
    if resume:
        run_dir = Path(resume)
    else:  # rank 0 creates the folder; every process writes its checkpoints shards there
        created = None
        if distributed.is_main():
            resolved = resolved_config(cfg, splits.max_length, kernel["implementation"], compiled["compile"])  # fmt: skip
            created = tracking.create_run_dir(resolved)
            lock = rundir.hold_run_lock(created)  # noqa: F841 - held while this process trains
        run_dir = distributed.broadcast(created)
    run = _Run(cfg, task, head, built, splits, run_dir, resume is not None, console, quiet)
    chosen = {"precision": precision_decision, "attention": kernel, "compile": compiled}
    return run.execute(start, callbacks or [], chosen, checkpoint)


class _Run:
    """One training run in its folder: the Trainer with its callbacks, evaluation, summary."""

    def __init__(self, cfg, task, head: Head, built: BuiltModel, splits: Splits, run_dir: Path,
                 resuming: bool, console, quiet: bool):  # fmt: skip
        self.cfg, self.task, self.head, self.built, self.splits = cfg, task, head, built, splits
        self.run_dir, self.resuming, self.console, self.quiet = run_dir, resuming, console, quiet
        self.tokens, self.stop = TokenCounts(), GracefulStop(run_dir)

    def _trainer(self, params: dict, checksum: str | None, extra: list):
        cfg, splits, tokenizer = self.cfg, self.splits, self.built.tokenizer
        if distributed.is_main():
            self.tracker = tracking.Tracker(self.run_dir, cfg, resuming=self.resuming)
            if cfg.tracking.wandb == "auto" and self.console is not None:
                self.console.print(f"W&B: {self.tracker.wandb_mode} (tracking.wandb=auto)")
        else:
            self.tracker = tracking.SilentTracker()
        callbacks = [
            TrackingCallback(self.tracker, cfg.tracking.log_every, params, checksum, self.tokens,
                             self.console),
            self.stop,
            *extra,
        ]  # fmt: skip
        trainer = LoralabTrainer(
            model=self.built.model,
            args=training_args(cfg, self.run_dir, self.quiet),
            train_dataset=model_inputs(splits.train),
            data_collator=self.head.collator(tokenizer),
            processing_class=tokenizer,
            # Periodic evaluations need one (the Trainer checks); a head with its own scoring
            # loop ignores it (`own_eval` below).
            eval_dataset=model_inputs(splits.eval) if cfg.train.eval_steps else None,
            compute_metrics=(
                lambda p: self.task.score(splits.eval_raw, splits.eval, p.predictions)
            ),
            callbacks=callbacks,
            loss_fn=self.head.loss if type(self.head).loss is not Head.loss else None,
            tokens=self.tokens,
            loraplus_lr_ratio=cfg.lora.loraplus_lr_ratio if cfg.train.method == "lora" else None,
        )
        if not self.head.evaluates_in_trainer:
            trainer.own_eval = lambda: self.evaluate(trainer)
        for cb in extra:  # callbacks that ask for them get the trainer and the token counts
            if hasattr(cb, "trainer"):
                cb.trainer = trainer
            if getattr(cb, "tokens", False) is None:
                cb.tokens = self.tokens
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        if self.quiet:
            trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
        else:  # the bar itself carries loss, lr and tok/s instead of a printed dict per log step
            trainer.remove_callback(ProgressCallback)
            trainer.add_callback(LiveProgress(self.tokens))
        return trainer

    def evaluate(self, trainer) -> dict:
        """The task metrics of the model as it is now; the dev loss, where the head's scoring
        gives one (the Trainer's prediction loop with labels: the classifier and span heads), in
        `eval_loss`."""
        cfg, built, splits = self.cfg, self.built, self.splits
        self.eval_loss = None

        def predict(feats):
            out = trainer.predict(model_inputs(feats))
            self.eval_loss = (out.metrics or {}).get("test_loss")
            return out

        device = next(built.model.parameters()).device
        with precision.autocast(precision.uses_bf16(cfg.train.precision), device):
            return self.head.evaluate(
                built.model, built.tokenizer, splits.eval_raw, splits.eval,
                cfg.train.eval_batch_size, not self.quiet, predict,
            )  # fmt: skip

    def execute(self, start: float, extra: list, chosen: dict, checkpoint) -> RunResult:
        cfg, model = self.cfg, self.built.model
        params = accounting.parameter_counts(model, self.built.heads)
        lora = cfg.train.method == "lora"
        checksum_before = accounting.checksum(accounting.base_parameters(model)) if lora else None
        trainer = self._trainer(params, checksum_before, extra)
        trainer.run_facts = run_facts(self.splits.fingerprint, distributed.world_size())
        checkpoint = str(checkpoint) if checkpoint else None
        if checkpoint:
            trainer.resume_from(Path(checkpoint))
        self.extra = extra  # the callbacks: a core lender adds to the layout record
        summary = base_summary(
            cfg, self.run_dir, params, self.splits, model, self.task, process_layout(extra),
            self.built.heads,
        )  # fmt: skip
        summary["resumed_from"] = checkpoint
        summary["precision_decision"] = chosen.get("precision")
        summary["attention"] = chosen.get("attention")
        compiled = dict(chosen.get("compile") or {})
        summary["compile"] = {k: v for k, v in compiled.items() if k != "key"}
        summary["fused_ops"] = self.built.fused
        summary["new_modules"] = self.built.heads  # freshly initialised (trained in full) heads
        if self.console is not None and distributed.is_main():  # what trains, and what was chosen
            self.console.print("\n".join(headline(summary, kernels.planned_steps(cfg, len(self.splits.train)))), markup=False, highlight=False, soft_wrap=True)  # fmt: skip
        with self.stop:  # a Ctrl-C or SIGTERM during the steps stops at one, with a checkpoint
            try:  # from here on, a failure leaves a failed summary
                if self.head.reports_zero_shot() and checkpoint is not None:  # measured at step 0
                    summary["zero_shot"] = logged(self.run_dir, "zero_shot/")
                elif self.head.reports_zero_shot():
                    # The untrained model's score: the reference line fine-tuning must beat. A LoRA
                    # init with B != 0 (init_lora_weights=false) is no identity: it is left out.
                    off = cfg.train.method == "lora" and cfg.lora.init_lora_weights is False
                    with model.disable_adapter() if off else nullcontext():
                        summary["zero_shot"] = self.evaluate(trainer)
                    self.tracker.log({f"zero_shot/{k}": v for k, v in summary["zero_shot"].items()}, 0)  # fmt: skip
                    if self.console is not None:
                        self.console.print(
                            f"[bold]zero-shot[/]: {metrics_text(summary['zero_shot'])}"
                        )
                t0 = time.time()
                trainer.clock0 = (t0, time.process_time())
                trainer.setup_s = t0 - start
                train_out = trainer.train(resume_from_checkpoint=checkpoint)
                # The steps' own time: from the first step (not the Trainer's set-up), evaluations
                # and saves left out; None when this attempt trained no step (resumed at the end).
                first = trainer.first_step_at
                stepping = time.time() - first - self.tokens.paused_s if first is not None else None
                if compiled.get("compile"):  # inductor's cache now holds this model's kernels
                    remember(compiled["key"])
                # Whole-run figures (the attempts up to the checkpoint resumed from, plus this one).
                # The CPU time, unlike the wall time, is blind to pauses and to other processes'
                # load: CPU seconds over all of this process's threads.
                train_time, summary["train_cpu_time_s"] = trainer.training_time()
                # Inside the try: a final evaluation that fails (or is killed) leaves a failed
                # summary beside the weights saved before it, not a folder that looks unfinished.
                return self._finish(trainer, train_out, summary, checksum_before, start, train_time, stepping)  # fmt: skip
            except BaseException as e:
                if summary.get("status") == "completed" and (self.run_dir / rundir.SUMMARY_FILE).is_file():  # fmt: skip
                    raise  # the run's summary is written: what failed came after (tracking)
                # Keep what was saved; say in the summary why the run stopped.
                status = "diverged" if isinstance(e, TrainingDiverged) else "failed"
                why = f"interrupted (Ctrl-C or SIGTERM){f': {e}' * bool(str(e))}" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"  # SIGTERM raises it too (`cli.main`)  # fmt: skip
                summary.update(status=status, error=why, wall_time_s=time.time() - start + trainer.earlier_wall())  # fmt: skip
                if distributed.is_main():
                    tracking.write_json(self.run_dir / rundir.SUMMARY_FILE, summary)
                self.tracker.finish(failed=True)
                raise

    def _finish(self, trainer, train_out, summary, checksum_before, start, train_time, stepping):  # fmt: skip
        cfg, model = self.cfg, self.built.model
        if distributed.is_main():  # first: an evaluation that fails must not take them along
            self._save_weights(trainer)
        t1 = time.time()
        metrics = self.evaluate(trainer)
        eval_time = time.time() - t1
        logged = {f"eval/{k}": v for k, v in metrics.items()} | ({"eval/loss": self.eval_loss} if self.eval_loss is not None else {})  # fmt: skip
        self.tracker.log(logged, trainer.state.global_step)
        if self.console is not None:
            n = len(self.splits.eval_raw)
            self.console.print(f"[bold green]final eval[/] ({n} examples): {metrics_text(metrics)}")
        # Every process trained on its share of the batches: the run's figures are the sums.
        real, padded, loss, summary["train_cpu_time_s"] = distributed.total(
            [self.tokens.real, self.tokens.padded, trainer.whole_run_loss() or float("nan"), summary["train_cpu_time_s"]]
        )  # fmt: skip
        loss = loss / distributed.world_size()
        verification = {}
        if cfg.train.method == "lora":
            checksum_after = accounting.checksum(accounting.base_parameters(model))
            verification = {
                **accounting.frozen_base_report(model),
                "base_checksum_before": checksum_before,
                "base_checksum_after": checksum_after,
                "base_unchanged": checksum_before == checksum_after,
            }
            if (initial := residual.initial_adapter(model)) is not None:  # PiSSA/OLoRA
                verification["base_residual"] = initial.report()
        summary.update(
            status="completed",
            metrics=metrics,
            train_loss=loss if loss == loss else train_out.training_loss,
            steps=trainer.state.global_step,
            # This attempt's wall time, and the earlier attempts' up to the checkpoint.
            wall_time_s=trainer.earlier_wall() + time.time() - start,
            train_time_s=train_time,
            eval_time_s=eval_time,
            eval_loss=self.eval_loss,  # the final evaluation's (classifier, span head); else null
            # The whole run's tokens (the earlier attempts' up to the checkpoint, then this one's);
            # the rate is this attempt's, over its steps' own time (evaluations and saves left out).
            tokens={
                "real": trainer.tokens_before[0] + int(real),
                "padded": trainer.tokens_before[1] + int(padded),
            },  # fmt: skip
            tokens_per_s={
                "real": real / stepping if stepping else None,
                "padded": padded / stepping if stepping else None,
            },
            peak_memory_mb=tracking.peak_memory_mb(),
            first_step_at=trainer.stepping_since(),  # Unix time: the end of start-up
            verification=verification,
            layout=process_layout(self.extra),  # again at the end: the idle cores lent meanwhile
        )
        if distributed.is_main():
            tracking.write_json(self.run_dir / rundir.SUMMARY_FILE, summary)
            if cfg.train.method == "lora":  # canonical base id, model card
                finish_adapter(self.run_dir, cfg, self.task, summary)
        distributed.barrier()  # the run folder is complete before any process returns
        self.tracker.summary(
            {f"eval/{k}": v for k, v in metrics.items()}
            | {f"verification/{k}": v for k, v in verification.items() if isinstance(v, bool)}
        )
        self.tracker.finish()
        return RunResult(self.run_dir, metrics, summary)

    def _save_weights(self, trainer) -> None:
        """The adapter (PEFT format) for LoRA, the whole model for full; all or nothing."""
        lora = self.cfg.train.method == "lora"
        final = self.run_dir / (rundir.ADAPTER_DIR if lora else rundir.MODEL_DIR)
        with rundir.atomic_dir(final) as tmp, library_bars_off():
            if lora:  # PiSSA/OLoRA: converted to plain LoRA on the pretrained base
                residual.save_adapter(self.built.model, tmp)
            else:
                trainer.save_model(str(tmp))
            self.built.tokenizer.save_pretrained(str(tmp))
