"""The training loop: `fit(config)` trains, validates, checkpoints and reports one run.

The loop is a plain PyTorch loop with the bookkeeping a real run needs: a seeded step plan that
makes resume exact, loss normalised over the whole optimizer step (so gradient accumulation and
data parallelism give the same update as one big batch), atomic checkpoints, early stopping,
and a report at the end.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from shipyard.config import GDConfig, RunConfig, dump_config
from shipyard.data.augmentation import Augmenter
from shipyard.data.datasets import gather, segments_of
from shipyard.data.instructions import IGNORE_INDEX
from shipyard.errors import CheckpointError, ShipyardError, TrainError
from shipyard.evaluate.metrics import primary_metric
from shipyard.evaluate.report import read_history, write_report
from shipyard.fileio import atomic_write
from shipyard.models import count_parameters
from shipyard.train import checkpoint as ckpt
from shipyard.train.devices import device_peak_flops, pick_device, pick_precision, seed_everything
from shipyard.train.distill import DistillParams, distillation_loss
from shipyard.train.distributed import (
    DistEnv,
    all_gather_floats,
    all_reduce_sum,
    barrier,
    broadcast_text,
    setup_distributed,
    setup_single_process_group,
    teardown_distributed,
)
from shipyard.train.evaluation import (
    build_data_and_model,
    evaluate_model,
    unigram_loss,
)
from shipyard.train.losses import build_loss
from shipyard.train.memory import state_bytes, summarize_ranks
from shipyard.train.optim import build_optimizer
from shipyard.train.privacy import PrivateTraining, make_private_model
from shipyard.train.progress import TrainProgress
from shipyard.train.regularization import penalty
from shipyard.train.rundir import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    DATA_FILE,
    METRICS_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    JsonlLog,
    config_differences,
    newest_run_with_checkpoints,
    package_run,
)
from shipyard.train.schedules import build_schedule
from shipyard.train.sharding import (
    apply_activation_checkpointing,
    full_state_dict,
    load_full_weights,
    materialize_from_rank0,
    save_full_weights,
    shard_model,
    tied_names,
)
from shipyard.train.sharding import grad_norm as global_grad_norm


@dataclass
class StepInfo:
    """What a step callback sees after each optimizer step."""

    step: int
    epoch: int
    loss: float | None
    run_dir: Path
    val: dict[str, float] | None = None  # validation metrics, when this step validated


@dataclass
class RunResult:
    """The outcome of `fit`."""

    run_dir: Path
    steps: int
    epochs: int
    best_step: int | None
    metrics: dict[str, dict[str, Any]]
    stopped_early: bool
    elapsed_s: float
    resumed_from: int | None = None
    parameters: int = 0
    summary: dict[str, Any] = field(default_factory=dict)


StepCallback = Callable[[StepInfo], None]


def fit(
    config: RunConfig,
    *,
    run_dir: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = False,
    callbacks: Sequence[StepCallback] = (),
    runs_root: str | Path = "runs",
    init_weights: Mapping[str, torch.Tensor] | None = None,
    weight_masks: Mapping[str, torch.Tensor] | None = None,
    teacher: Any = None,
    distill: DistillParams | None = None,
) -> RunResult:
    """Train one run described by `config` and return its result.

    run_dir: where to write (default `runs/<name>/<timestamp>`).
    resume: "auto" (newest valid checkpoint of the run, or a fresh start if there is none), or a
        checkpoint / run directory path.
    callbacks: called after every optimizer step with a StepInfo (e.g. to stop or to log).
    init_weights: a state dict loaded (strictly) into the model after it is built, e.g. pruned
        weights to fine-tune.
    weight_masks: {parameter name: 0/1 mask}; the parameter is multiplied by its mask after every
        optimizer step, so pruned weights stay zero while fine-tuning.
    teacher: an `nn.Module` (or a `LoadedModel`) whose outputs on the same (preprocessed) batch
        are soft targets; `distill` says how to mix them with the labels (default DistillParams()).
    """
    trainer = Trainer(
        config,
        run_dir=Path(run_dir) if run_dir is not None else None,
        resume=resume,
        progress=progress,
        callbacks=callbacks,
        runs_root=Path(runs_root),
        init_weights=init_weights,
        weight_masks=weight_masks,
        teacher=teacher,
        distill=distill,
    )
    try:
        return trainer.run()
    finally:
        # The DDP wrapper holds the process group; drop it first, so nothing tied to the group
        # is destroyed after it (that ordering aborted a rank at exit now and then).
        trainer.forward_model = trainer.model
        del trainer
        gc.collect()
        teardown_distributed()


class Trainer:
    """One training run. Use `fit`; this class holds the run's state between steps."""

    def __init__(
        self,
        config: RunConfig,
        *,
        run_dir: Path | None,
        resume: str | Path | None,
        progress: bool,
        callbacks: Sequence[StepCallback],
        runs_root: Path,
        init_weights: Mapping[str, torch.Tensor] | None = None,
        weight_masks: Mapping[str, torch.Tensor] | None = None,
        teacher: Any = None,
        distill: DistillParams | None = None,
    ) -> None:
        self.config = config
        self.callbacks = list(callbacks)
        self.show_progress = progress
        self.device = pick_device(config.train.device)
        self.env: DistEnv = setup_distributed(self.device.type)
        if self.env.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.env.local_rank)
        self.fsdp = config.train.strategy == "fsdp"
        if self.fsdp:
            self._check_fsdp_options(weight_masks)
        if self.fsdp and not self.env.enabled:
            setup_single_process_group(self.device.type)
        self.amp_dtype = pick_precision(config.train.precision, self.device)
        # FSDP on CUDA computes in bf16 through its MixedPrecisionPolicy instead of autocast
        self.fsdp_param_dtype = self.amp_dtype if self.fsdp and self.device.type == "cuda" else None
        self.autocast_dtype = None if self.fsdp_param_dtype is not None else self.amp_dtype
        seed_everything(config.seed + self.env.rank)
        if config.train.deterministic:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.run_dir, resume_from = self._resolve_run_dir(run_dir, resume, runs_root)
        self.ckpt_dir = self.run_dir / CHECKPOINTS_DIR
        self.resume_from = resume_from

        # data, model, optimisation; under FSDP only rank 0 materialises the initial weights
        on_meta = self.fsdp and self.env.rank != 0
        self.data, model = build_data_and_model(config, meta_model=on_meta)
        info = self.data.info
        if init_weights is not None:
            try:
                model.load_state_dict(dict(init_weights), strict=True)
            except RuntimeError as exc:
                raise TrainError(
                    f"init_weights do not fit the model of this config: {exc}"
                ) from None
        self.n_params = count_parameters(model)
        self.n_trainable = count_parameters(model, trainable_only=True)
        self.aliases = tied_names(model)
        if self.fsdp:
            full = model.state_dict() if not on_meta else {}
            buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
            if config.train.activation_checkpointing:
                apply_activation_checkpointing(model)
            fsdp_cfg = config.train.fsdp
            shard_model(
                model,
                device=self.device,
                world_size=self.env.world_size,
                param_dtype=self.fsdp_param_dtype,
                cpu_offload=fsdp_cfg.cpu_offload,
                reshard_after_forward=fsdp_cfg.reshard_after_forward,
            )
            materialize_from_rank0(
                model, full, buffers, device=self.device, cpu_offload=fsdp_cfg.cpu_offload
            )
            del full, buffers
            self.model = model
        else:
            if config.train.activation_checkpointing:
                apply_activation_checkpointing(model)
            self.model = model.to(self.device)
        privacy = config.train.privacy
        if privacy is not None:
            if self.env.enabled:
                raise TrainError(
                    "train.privacy runs in one process; drop --nproc (DP-SGD across processes "
                    "is not supported yet)"
                )
            self.model = make_private_model(self.model)  # before the optimizer sees it
        self.masks = self._resolve_masks(weight_masks)
        self.apply_masks()
        self.teacher: nn.Module | None = None
        self.distill = distill
        if teacher is not None:
            module = teacher if isinstance(teacher, nn.Module) else getattr(teacher, "model", None)
            if not isinstance(module, nn.Module):
                raise TrainError("teacher must be an nn.Module or a LoadedModel")
            self.teacher = module.to(self.device).eval()
            self.distill = distill or DistillParams()
        elif distill is not None:
            raise TrainError("distill parameters were given without a teacher")
        self.packed = getattr(self.data.train, "segments", None) is not None
        if self.packed:
            check_packing(model, self.teacher)
        aug = config.data.augmentation
        self.augmenter = Augmenter(aug, info.input_shape, config.task) if aug is not None else None
        self.is_lm = config.task == "language-modeling"
        block_size = (
            self.data.info.input_shape[0]
            if self.is_lm
            else None  # windows / rows of the prepared data
        )
        self.tokens_per_row = int(block_size) if self.is_lm and block_size else 1
        # instruction data scores only its answer tokens (the others are IGNORE_INDEX): count
        # them per row once, so a step's count is a sum over its rows
        self.scored_per_row: torch.Tensor | None = None
        if self.data.instructions is not None:
            targets = self.data.train.y  # type: ignore[attr-defined]  # ArrayDataset
            self.scored_per_row = (targets != IGNORE_INDEX).sum(dim=1)
        peak = config.train.peak_tflops
        self.peak_flops = peak * 1e12 if peak else device_peak_flops(self.device)
        self.loss_fn = build_loss(
            config.task,
            config.train.loss,
            label_smoothing=config.regularization.label_smoothing,
            num_classes=info.num_outputs,
        )
        self.optimizer = build_optimizer(config.optim, self.model)
        self.full_batch = isinstance(config.optim, GDConfig)
        self.n_train = len(self.data.train)  # type: ignore[arg-type]
        self.global_batch = self.n_train if self.full_batch else config.train.batch_size
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = self._total_steps()
        self.schedule = build_schedule(config.schedule, self.optimizer, self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.forward_model: nn.Module = self.model
        self.private: PrivateTraining | None = None
        if privacy is not None:
            self.private = PrivateTraining(
                privacy,
                self.model,
                self.optimizer,
                n_train=self.n_train,
                batch_size=self.global_batch,
                total_steps=self.total_steps,
            )
            self.forward_model = self.private.module
            self.optimizer = self.private.optimizer  # the schedule shares its param groups
        if config.train.compile:
            self.forward_model = torch.compile(self.model)  # type: ignore[assignment]
        if self.env.enabled and not self.fsdp:
            self.forward_model = DistributedDataParallel(
                self.forward_model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        es = config.train.early_stopping
        self.watch_metric, self.watch_mode = (
            (es.metric, es.mode) if es is not None else primary_metric(config.task)
        )

        # counters (restored on resume)
        self.resumed_step: int | None = None
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.stopped_early = False
        self.last_val: dict[str, Any] = {}
        self.memory: dict[str, int] | None = None

    def _check_fsdp_options(self, weight_masks: Mapping[str, torch.Tensor] | None) -> None:
        reg = self.config.regularization
        if weight_masks:
            raise TrainError(
                "weight masks (pruned fine-tuning) need train.strategy ddp; set train.strategy=ddp"
            )
        if reg.l1 or reg.l2:
            raise TrainError(
                f"regularization.l1/l2 ({reg.l1}/{reg.l2}) are not supported with train.strategy "
                "fsdp; use the optimizer's weight_decay instead"
            )

    # ------------------------------------------------------------------ set-up helpers

    def _resolve_run_dir(
        self, run_dir: Path | None, resume: str | Path | None, runs_root: Path
    ) -> tuple[Path, Path | None]:
        """Pick the run directory and the checkpoint to resume from (if any)."""
        name = self.config.name
        resume_from: Path | None = None
        if resume is not None and str(resume) != "auto":
            path = Path(resume)
            if (path / ckpt.META).exists() or path.name.startswith("step-"):
                resume_from = path
                run_dir = run_dir or path.parent.parent
            elif (path / CHECKPOINTS_DIR).is_dir():
                run_dir = run_dir or path
                resume = "auto"
            else:
                raise TrainError(f"--resume {path}: not a checkpoint or run directory")
        if run_dir is None and resume == "auto":
            run_dir = newest_run_with_checkpoints(runs_root / name)
        if run_dir is None:
            stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
            candidate = runs_root / name / stamp
            n = 1
            while candidate.exists():
                n += 1
                candidate = runs_root / name / f"{stamp}-{n}"
            run_dir = candidate
        run_dir = Path(broadcast_text(str(run_dir), self.env, self.device))
        if resume == "auto" and resume_from is None:
            latest, skipped = ckpt.find_latest(run_dir / CHECKPOINTS_DIR)
            for note in skipped:
                _warn(f"skipping damaged checkpoint: {note}", self.env)
            resume_from = latest.path if latest else None
        if resume is None and ckpt.list_checkpoints(run_dir / CHECKPOINTS_DIR):
            raise TrainError(
                f"{run_dir} already has checkpoints; continue it with --resume auto, or choose "
                "another --run-dir"
            )
        if self.env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        barrier(self.env)
        return run_dir, resume_from

    def _resolve_masks(
        self, masks: Mapping[str, torch.Tensor] | None
    ) -> list[tuple[nn.Parameter, torch.Tensor]]:
        if not masks:
            return []
        params = dict(self.model.named_parameters())
        resolved = []
        for name, mask in masks.items():
            if name not in params or params[name].shape != mask.shape:
                raise TrainError(
                    f"weight mask {name!r} {tuple(mask.shape)} matches no parameter of the model"
                )
            resolved.append((params[name], mask.to(self.device, params[name].dtype)))
        return resolved

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the masked-out weights (after each optimizer step when masks were given)."""
        for param, mask in self.masks:
            param.mul_(mask)

    def _steps_per_epoch(self) -> int:
        n = self.n_train
        if self.full_batch:
            return 1
        steps = n // self.global_batch
        if steps == 0:
            raise TrainError(
                f"the train split has {n} examples, fewer than one optimizer step needs "
                f"(train.batch_size={self.global_batch}); lower train.batch_size"
            )
        if self.global_batch < self.env.world_size:
            raise TrainError(
                f"train.batch_size={self.global_batch} is the global batch and must be at least "
                f"the number of processes ({self.env.world_size}); raise it or use fewer processes"
            )
        return steps

    def _total_steps(self) -> int:
        t = self.config.train
        candidates = []
        if t.epochs is not None:
            candidates.append(t.epochs * self.steps_per_epoch)
        if t.max_steps is not None:
            candidates.append(t.max_steps)
        return min(candidates)

    def _epoch_plan(self, epoch: int) -> list[torch.Tensor]:
        """Row indices of every optimizer step of an epoch, the same on every rank and resume."""
        n = self.n_train
        shuffle = not (self.is_lm and self.config.data.sampling == "sequential")
        if shuffle:
            gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        if self.full_batch:
            return [order]
        if self.private is not None:
            # Poisson sampling, as the privacy accountant assumes; seeded, so resume is exact
            gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            return [self.private.poisson_rows(n, gen) for _ in range(self.steps_per_epoch)]
        g = self.global_batch
        return [order[i * g : (i + 1) * g] for i in range(self.steps_per_epoch)]

    def _micro_batches(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """This rank's share of one step's rows, cut into micro-batches.

        The step's rows are the global batch; processes only split them, so any number of
        processes takes the same optimizer step. Under FSDP every rank runs the same number of
        micro-batches (each forward is a collective), so a short share may get an empty one.
        """
        t = self.config.train
        mine = torch.tensor_split(rows, self.env.world_size)[self.env.rank]
        size = t.micro_batch_size or (t.batch_size if self.full_batch else None)
        if size is not None:
            largest = math.ceil(len(rows) / self.env.world_size)
            parts = math.ceil(largest / size)
        else:
            parts = t.grad_accum
        chunks = list(torch.tensor_split(mine, parts))
        return chunks if self.fsdp else [m for m in chunks if len(m)]

    # ------------------------------------------------------------------ the run

    def run(self) -> RunResult:
        started = time.perf_counter()
        cfg = self.config
        if self.resume_from is not None:
            self._restore(self.resume_from)
        elif self.env.is_main:
            atomic_write(self.run_dir / CONFIG_FILE, dump_config(cfg))
            self._write_data_artifacts()
            (self.run_dir / METRICS_FILE).touch()
        barrier(self.env)
        log = JsonlLog(
            self.run_dir / METRICS_FILE,
            enabled=self.env.is_main,
            tensorboard=cfg.train.tensorboard,
        )
        if self.resume_from is not None:
            log.truncate_after(self.step)
            _say(f"resuming {self.run_dir} from step {self.step}", self.env)

        eval_every = cfg.eval.every_steps
        ckpt_every = cfg.train.checkpoint.every_steps
        window_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        window_count = 0
        window_rows = 0
        window_start = time.perf_counter()
        last_log_step = self.step
        progress = TrainProgress(
            total=self.total_steps,
            start=self.step,
            enabled=self.show_progress and self.env.is_main,
            title=cfg.name,
        )
        done = self.step >= self.total_steps
        with progress:
            while not done:
                plan = self._epoch_plan(self.epoch)
                while self.step_in_epoch < len(plan):
                    rows = plan[self.step_in_epoch]
                    scored = self._scored_count(rows)
                    loss_sum, grad_norm = self._train_step(rows, scored)
                    self.step += 1
                    self.step_in_epoch += 1
                    window_loss += loss_sum
                    window_count += scored
                    window_rows += len(rows)
                    end_of_epoch = self.step_in_epoch == len(plan)
                    last = self.step >= self.total_steps
                    loss_value: float | None = None
                    if self.step % cfg.train.log_every == 0 or last or end_of_epoch:
                        total = all_reduce_sum(window_loss.clone(), self.env)
                        loss_value = float(total) / max(window_count, 1)
                        elapsed = max(time.perf_counter() - window_start, 1e-9)
                        record = self._train_record(
                            loss_value, grad_norm, window_rows, elapsed, self.step - last_log_step
                        )
                        log.write(record)
                        progress.update(self.step, record)
                        window_loss.zero_()
                        window_count = window_rows = 0
                        window_start = time.perf_counter()
                        last_log_step = self.step
                    else:
                        progress.update(self.step, None)
                    validate = (
                        (eval_every is not None and self.step % eval_every == 0)
                        or (eval_every is None and end_of_epoch and cfg.train.epochs is not None)
                        or last
                    )
                    saved = False
                    val_now: dict[str, float] | None = None
                    if validate:
                        improved = self._validate(log)
                        val_now = {
                            k: float(v)
                            for k, v in self.last_val.items()
                            if isinstance(v, int | float)
                        } or None
                        if improved or ckpt_every is None:
                            self._save()
                            saved = True
                    if not saved and (
                        (ckpt_every is not None and self.step % ckpt_every == 0) or last
                    ):
                        self._save()
                    for callback in self.callbacks:
                        callback(StepInfo(self.step, self.epoch, loss_value, self.run_dir, val_now))
                    if last or self.stopped_early:
                        done = True
                        break
                if not done:
                    self.epoch += 1
                    self.step_in_epoch = 0
        return self._finish(log, started)

    def _write_data_artifacts(self) -> None:
        """What serving needs from the data, once: shapes, labels, preprocessing, tokenizer."""
        data = {
            "info": self.data.info.to_dict(),
            "preprocessing": (
                self.data.preprocessor.to_dict() if self.data.preprocessor is not None else None
            ),
        }
        atomic_write(self.run_dir / DATA_FILE, json.dumps(data, indent=2))
        if self.data.tokenizer is not None:
            atomic_write(self.run_dir / TOKENIZER_FILE, self.data.tokenizer.to_json())
            settings = self.data.tokenizer.config_json()  # an HF checkpoint's tokenizer
            if settings is not None:
                atomic_write(self.run_dir / TOKENIZER_CONFIG_FILE, settings)

    def _scored_count(self, rows: torch.Tensor) -> int:
        """Targets the loss scores over one step's rows (all ranks): every token of a window,
        but only the answer tokens of instruction data (the others are IGNORE_INDEX)."""
        if self.scored_per_row is None:
            return len(rows) * self.tokens_per_row
        return max(1, int(self.scored_per_row[rows].sum()))

    def _train_step(self, rows: torch.Tensor, scored: int) -> tuple[torch.Tensor, float | None]:
        """One optimizer step over `rows` (all ranks, all micro-batches) whose loss scores
        `scored` targets (`_scored_count`)."""
        cfg = self.config
        model = self.forward_model
        if not (model.training and self.model.training):
            # only after validation (or at the start): walking every module each step costs
            # milliseconds on a model with hundreds of modules (LoRA adds three per layer)
            model.train()
        micro = self._micro_batches(rows)
        # DP-SGD averages over the expected batch size, whatever the Poisson draw gave
        if self.private is not None:
            global_count = self.global_batch * self.tokens_per_row
            if not micro:
                self.private.empty_step()
        else:
            global_count = scored
        # DDP averages gradients over ranks, so each rank scales by world / global count
        scale = self.env.world_size / global_count
        reg = cfg.regularization
        loss_sum_total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, idx in enumerate(micro):
            x, y = self._batch(self.data.train, idx)
            segments = segments_of(self.data.train, idx)
            if segments is not None:
                segments = segments.to(self.device, non_blocking=self.device.type == "cuda")
            y_mix, lam = None, 1.0
            if self.augmenter is not None:
                # keyed by step, micro-batch and rank: the same batches again on resume
                batch = self.augmenter(x, y, (cfg.seed, self.step, i, self.env.rank))
                x, y, y_mix, lam = batch.x, batch.y, batch.y_mix, batch.lam
            final = i == len(micro) - 1
            sync: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if self.fsdp:
                # reduce-scatter gradients only after the last micro-batch
                model.set_requires_gradient_sync(final)  # type: ignore[operator]
            elif self.env.enabled and not final:
                sync = model.no_sync()  # type: ignore[operator]
            with sync:
                with self._autocast():
                    # packed rows: attention and positions stay inside each example
                    out = model(x) if segments is None else model(x, segments=segments)
                    loss_sum, _ = self.loss_fn(out, y)
                    if y_mix is not None:  # mixup for classification: blend the two losses
                        loss_sum = lam * loss_sum + (1.0 - lam) * self.loss_fn(out, y_mix)[0]
                    if self.teacher is not None and self.distill is not None:
                        with torch.no_grad():
                            target = self.teacher(x)
                        loss_sum = distillation_loss(out, target, loss_sum, cfg.task, self.distill)
                loss = loss_sum.float() * scale
                if final and not self.fsdp:
                    extra = penalty(self.model, l1=reg.l1, l2=reg.l2, batch_size=len(rows))
                    if extra is not None:
                        loss = loss + extra
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            loss_sum_total += loss_sum.detach().double()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm: float | None = None
        if reg.grad_clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), reg.grad_clip_norm)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
            grad_norm = float(norm)
        elif self.private is not None:
            pass  # the un-noised gradient's norm is not private: not logged
        elif self.step % cfg.train.log_every == cfg.train.log_every - 1:
            grad_norm = float(global_grad_norm(self.model))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.private is not None:
            self.private.after_step()
        if self.memory is None:
            self.memory = state_bytes(self.model, self.optimizer)
        self.apply_masks()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        return loss_sum_total, grad_norm

    def _batch(self, dataset: Any, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = gather(dataset, idx)
        nb = self.device.type == "cuda"
        return x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _train_record(
        self, loss: float, grad_norm: float | None, rows: int, elapsed: float, steps: int
    ) -> dict[str, Any]:
        samples_per_s = rows / elapsed
        record: dict[str, Any] = {
            "kind": "train",
            "step": self.step,
            "epoch": self.epoch,
            "loss": loss,
            "lr": self.schedule.get_last_lr()[0],
            "grad_norm": grad_norm,
            "samples_per_s": samples_per_s,
            "steps_per_s": steps / elapsed,
            "time": time.time(),
        }
        if self.is_lm:
            tokens_per_s = samples_per_s * self.tokens_per_row
            record["tokens_per_s"] = tokens_per_s
            record["mfu"] = self._mfu(tokens_per_s)
        return record

    def _mfu(self, tokens_per_s: float) -> float | None:
        flops_fn = getattr(self.model, "flops_per_token", None)
        if flops_fn is None or not self.peak_flops:
            return None
        return float(flops_fn()) * tokens_per_s / self.peak_flops

    # ------------------------------------------------------------------ evaluation

    def evaluate_split(self, split: str) -> dict[str, Any]:
        """Metrics of the current weights on `split` ('val' or 'test'), all ranks combined."""
        return evaluate_model(
            self.model,
            self.data,
            split,
            self.config,
            loss_fn=self.loss_fn,
            device=self.device,
            env=self.env,
            autocast=self._autocast,
            lockstep=self.fsdp,
        )

    def _validate(self, log: JsonlLog) -> bool:
        """Validate, log, and update best/early-stopping state; True if this is the new best."""
        results = self.evaluate_split("val")
        if not results:
            return False
        self.last_val = results
        scalars = {k: v for k, v in results.items() if isinstance(v, int | float)}
        log.write({"kind": "val", "step": self.step, "epoch": self.epoch, **scalars})
        if self.watch_metric not in scalars:
            raise TrainError(
                f"metric {self.watch_metric!r} is not computed for task {self.config.task}; "
                f"choose one of {sorted(scalars)}"
            )
        self.schedule.observe(scalars)
        value = float(scalars[self.watch_metric])
        es = self.config.train.early_stopping
        min_delta = es.min_delta if es is not None else 0.0
        better = self.best_value is None or (
            value < self.best_value - min_delta
            if self.watch_mode == "min"
            else value > self.best_value + min_delta
        )
        if better:
            self.best_value, self.best_step, self.bad_evals = value, self.step, 0
        else:
            self.bad_evals += 1
            if es is not None and self.bad_evals >= es.patience:
                self.stopped_early = True
                _say(
                    f"early stopping at step {self.step}: val {self.watch_metric} has not improved "
                    f"for {self.bad_evals} evaluations (best {self.best_value:.4g} at step "
                    f"{self.best_step})",
                    self.env,
                )
        return better

    # ------------------------------------------------------------------ checkpoints

    def _resume_state(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "rng": ckpt.rng_state(),
            "best_value": self.best_value,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "stopped_early": self.stopped_early,
            **({"privacy": self.private.state_dict()} if self.private is not None else {}),
        }

    def _checkpoint_meta(self) -> dict[str, Any]:
        val = {k: v for k, v in self.last_val.items() if isinstance(v, int | float)}
        return {
            "epoch": self.epoch,
            "val": val,
            "config": self.config.model_dump(mode="json"),
            "strategy": self.config.train.strategy,
            "processes": self.env.world_size,
        }

    def _prune(self) -> None:
        keep = {self.best_step} if (self.best_step is not None) else set()
        if not self.config.train.checkpoint.keep_best and self.config.train.early_stopping is None:
            keep = set()
        ckpt.prune_checkpoints(
            self.ckpt_dir, keep_last=self.config.train.checkpoint.keep_last, keep=keep
        )

    def _save_sharded(self) -> None:
        """Every rank writes its shards through DCP; rank 0 adds the whole weights, the state
        and meta.json, then renames the directory into place."""
        weights = full_state_dict(self.model)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        tmp = Path(
            broadcast_text(
                str(ckpt.temp_checkpoint_dir(self.ckpt_dir, self.step)), self.env, self.device
            )
        )
        ckpt.write_sharded_part(tmp, {"model": model_sd, "optim": optim_sd["state"]})
        barrier(self.env)
        if self.env.is_main:
            state = {**self._resume_state(), "param_groups": optim_sd["param_groups"]}
            ckpt.finish_sharded_checkpoint(
                self.ckpt_dir,
                tmp,
                step=self.step,
                write_weights=lambda path: save_full_weights(weights, self.aliases, path),
                state=state,
                meta=self._checkpoint_meta(),
            )
            self._prune()
        barrier(self.env)

    def _save(self) -> None:
        if self.fsdp:
            self._save_sharded()
            return
        if self.env.is_main:
            ckpt.save_checkpoint(
                self.ckpt_dir,
                step=self.step,
                model=self.model,
                state={"optimizer": self.optimizer.state_dict(), **self._resume_state()},
                meta=self._checkpoint_meta(),
            )
            self._prune()
        barrier(self.env)

    def _restore(self, path: Path) -> None:
        info = ckpt.read_checkpoint(path)
        saved = info.meta.get("config")
        if saved is not None:
            diffs = config_differences(saved, self.config.model_dump(mode="json"))
            if diffs:
                raise TrainError(
                    f"cannot resume {path}: the config changes the model or data: "
                    + "; ".join(diffs)
                )
        written_by = info.meta.get("strategy", "ddp")
        if written_by != self.config.train.strategy:
            raise TrainError(
                f"cannot resume {path}: it was written with train.strategy {written_by}; set "
                f"train.strategy={written_by}"
            )
        state = ckpt.load_state(path)
        if self.fsdp:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            tree: dict[str, Any] = {"model": model_sd, "optim": optim_sd["state"]}
            ckpt.load_sharded_part(path, tree)
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=tree["model"],
                optim_state_dict={"state": tree["optim"], "param_groups": state["param_groups"]},
            )
        else:
            ckpt.load_weights(path, self.model)
            self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.resumed_step = self.step
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.best_value = state["best_value"]
        self.best_step = state["best_step"]
        self.bad_evals = int(state["bad_evals"])
        self.stopped_early = bool(state["stopped_early"])
        if self.private is not None:
            self.private.load_state_dict(state.get("privacy") or {})
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        if self.env.rank == 0:
            ckpt.set_rng_state(state["rng"])
        else:
            seed_everything(self.config.seed + self.env.rank + self.step)

    # ------------------------------------------------------------------ the end

    def _memory_summary(self) -> dict[str, Any]:
        """Every rank's memory (gathered, so not just rank 0's), the largest and its rank."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            reserved = torch.cuda.max_memory_reserved(self.device)
            out = summarize_ranks(
                all_gather_floats(peak, self.env, self.device), "cuda max_memory_allocated"
            )
            out["reserved_per_rank_bytes"] = [
                int(v) for v in all_gather_floats(reserved, self.env, self.device)
            ]
            return out
        mem = self.memory or state_bytes(self.model, self.optimizer)
        out = summarize_ranks(
            all_gather_floats(mem["total"], self.env, self.device),
            "parameter + gradient + optimizer-state bytes (local shards)",
        )
        for part in ("params", "grads", "optimizer"):
            out[f"{part}_per_rank_bytes"] = [
                int(v) for v in all_gather_floats(mem[part], self.env, self.device)
            ]
        return out

    def _write_package(self) -> None:
        """Package the best checkpoint into run_dir/package (rank 0); a failure only warns, since
        the run itself succeeded and `shipyard package RUN_DIR` can retry."""
        try:
            package_run(self.run_dir)
        except ShipyardError as exc:
            _warn(
                f"could not write the package ({exc}); retry: shipyard package {self.run_dir}",
                self.env,
            )

    def _finish(self, log: JsonlLog, started: float) -> RunResult:
        best = self.best_step
        if best is not None and best != self.step:
            best_path = self.ckpt_dir / ckpt.checkpoint_name(best)
            try:
                if self.fsdp:
                    load_full_weights(self.model, best_path / ckpt.WEIGHTS, self.aliases)
                else:
                    ckpt.load_weights(best_path, self.model)
            except CheckpointError as exc:
                _warn(f"could not restore the best weights ({exc}); keeping the last", self.env)
                best = self.step
        results = {"val": self.evaluate_split("val"), "test": self.evaluate_split("test")}
        results = {k: v for k, v in results.items() if v}
        elapsed = time.perf_counter() - started
        summary: dict[str, Any] = {
            "name": self.config.name,
            "task": self.config.task,
            "model": self.config.model.name,
            "parameters": self.n_params,
            "trainable_parameters": self.n_trainable,
            **(
                {"instruction_examples": asdict(self.data.instructions)}
                if self.data.instructions is not None
                else {}
            ),
            "steps": self.step,
            "epochs": self.epoch + (1 if self.step_in_epoch else 0),
            "best_step": best,
            "stopped_early": self.stopped_early,
            "elapsed_s": round(elapsed, 3),
            "device": str(self.device),
            "processes": self.env.world_size,
        }
        summary["strategy"] = self.config.train.strategy
        summary["memory"] = self._memory_summary()
        last_train = log.last.get("train", {})
        for key in ("samples_per_s", "tokens_per_s", "mfu"):
            if last_train.get(key) is not None:
                summary[key] = last_train[key]
        if self.is_lm:
            summary["unigram_loss"] = unigram_loss(self.data)
        if self.private is not None:
            # over every step taken (the packaged best checkpoint may come earlier: it spent less)
            summary["privacy"] = self.private.spent().to_dict()
        if self.env.is_main:
            log.write({"kind": "final", "step": self.step, **_scalars(results)})
            write_report(
                self.run_dir,
                results,
                history=read_history(self.run_dir / METRICS_FILE),
                title=f"{self.config.name} ({self.config.task})",
                extra={"run": summary},
            )
            self._write_package()
        log.close()
        barrier(self.env)
        return RunResult(
            run_dir=self.run_dir,
            steps=self.step,
            epochs=summary["epochs"],
            best_step=best,
            metrics=results,
            stopped_early=self.stopped_early,
            elapsed_s=elapsed,
            resumed_from=self.resumed_step,
            parameters=self.n_params,
            summary=summary,
        )


# ---------------------------------------------------------------------- helpers


def check_packing(model: nn.Module, teacher: nn.Module | None) -> None:
    """Packed rows (data.packing) need a model whose forward takes `segments=`, and no teacher,
    which would read whole rows across examples."""
    if "segments" not in inspect.signature(model.forward).parameters:
        raise TrainError(
            f"data.packing needs a model whose forward takes segments= (gpt, llama); "
            f"{type(model).__name__} does not: remove data.packing"
        )
    if teacher is not None:
        raise TrainError(
            "data.packing cannot be combined with distillation (the teacher reads whole rows "
            "across examples); remove data.packing"
        )


def _scalars(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {
        f"{split}_{k}": v
        for split, metrics in results.items()
        for k, v in metrics.items()
        if isinstance(v, int | float)
    }


def _say(message: str, env: DistEnv) -> None:
    if env.is_main:
        from rich.console import Console

        Console(stderr=True).print(message, highlight=False)


def _warn(message: str, env: DistEnv) -> None:
    _say(f"[yellow]warning:[/yellow] {message}", env)
