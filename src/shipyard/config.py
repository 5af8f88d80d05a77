"""The typed run config: one YAML file drives a whole run.

Every section is a strict pydantic model, so a misspelt key is an error that names the key, the
allowed keys and the closest match. `load_config(path, overrides)` reads YAML, applies `a.b=c`
overrides and validates; `dump_config(config)` writes the resolved YAML with defaults filled in.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from shipyard.config_base import StrictModel, Task
from shipyard.data.config import DataConfig
from shipyard.errors import ConfigError
from shipyard.models import CAUSAL_MODELS, LANGUAGE_MODELS, TOKEN_MODELS, ArchitectureConfig
from shipyard.models.lora import LoRAConfig

# ----------------------------------------------------------------------------------------------
# optimizers (torch.optim), chosen by name; each carries only its own hyper-parameters


class _OptimBase(StrictModel):
    lr: float = Field(1e-3, gt=0, description="learning rate")
    weight_decay: float = Field(
        0.0, ge=0, description="decay in the optimizer (decoupled for adamw)"
    )
    decay_exclude: Literal["auto", "none"] = Field(
        "auto", description="auto: no weight decay on biases, norms and embeddings"
    )


class GDConfig(_OptimBase):
    """Full-batch gradient descent: one update per pass over the whole train split."""

    name: Literal["gd"] = "gd"
    lr: float = Field(0.1, gt=0)


class SGDConfig(_OptimBase):
    """Mini-batch stochastic gradient descent, optionally with (Nesterov) momentum."""

    name: Literal["sgd"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1, description="v = momentum*v + (1-dampening)*g")
    dampening: float = Field(0.0, ge=0, le=1, description="damps the new gradient in v")
    nesterov: bool = Field(False, description="Nesterov momentum (needs momentum > 0)")

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> SGDConfig:
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0")
        return self


class AdagradConfig(_OptimBase):
    """Adagrad: per-parameter learning rates from the sum of squared gradients."""

    name: Literal["adagrad"] = "adagrad"
    lr: float = Field(0.01, gt=0)
    lr_decay: float = Field(0.0, ge=0, description="lr / (1 + (t-1)*lr_decay)")
    initial_accumulator_value: float = Field(0.0, ge=0, description="start of the G sum")
    eps: float = Field(1e-10, gt=0, description="added to sqrt(G)")


class RMSpropConfig(_OptimBase):
    """RMSprop: divide by a moving average of squared gradients."""

    name: Literal["rmsprop"] = "rmsprop"
    lr: float = Field(0.01, gt=0)
    alpha: float = Field(0.99, gt=0, lt=1, description="smoothing of the squared-gradient average")
    eps: float = Field(1e-8, gt=0, description="added to the denominator")
    momentum: float = Field(0.0, ge=0, lt=1, description="momentum on the scaled step")
    centered: bool = Field(False, description="divide by the gradient's estimated variance")


class AdamConfig(_OptimBase):
    """Adam with L2-style weight decay (added to the gradient)."""

    name: Literal["adam"] = "adam"
    betas: tuple[float, float] = Field(
        (0.9, 0.999), description="decay of the first and second moment averages"
    )
    eps: float = Field(1e-8, gt=0, description="added to sqrt(v_hat)")
    amsgrad: bool = Field(False, description="use the running maximum of v_hat")


class AdamWConfig(_OptimBase):
    """AdamW: Adam with decoupled weight decay."""

    name: Literal["adamw"] = "adamw"
    betas: tuple[float, float] = Field(
        (0.9, 0.999), description="decay of the first and second moment averages"
    )
    eps: float = Field(1e-8, gt=0, description="added to sqrt(v_hat)")
    amsgrad: bool = Field(False, description="use the running maximum of v_hat")
    weight_decay: float = Field(0.01, ge=0)


OptimConfig = Annotated[
    GDConfig | SGDConfig | AdagradConfig | RMSpropConfig | AdamConfig | AdamWConfig,
    Field(discriminator="name"),
]

# ----------------------------------------------------------------------------------------------
# learning-rate schedules; `warmup_steps` of linear warmup can sit in front of any of them


class _ScheduleBase(StrictModel):
    warmup_steps: int = Field(0, ge=0, description="linear warmup from 0 to lr over N steps")


class ConstantSchedule(_ScheduleBase):
    name: Literal["constant"] = "constant"


class StepSchedule(_ScheduleBase):
    """Multiply the lr by `gamma` every `step_size` steps."""

    name: Literal["step"] = "step"
    step_size: int = Field(..., ge=1)
    gamma: float = Field(0.1, gt=0, le=1)


class ExponentialSchedule(_ScheduleBase):
    """Multiply the lr by `gamma` every step."""

    name: Literal["exponential"] = "exponential"
    gamma: float = Field(..., gt=0, le=1)


class CosineSchedule(_ScheduleBase):
    """Cosine decay from lr to `min_lr` over the run (after warmup)."""

    name: Literal["cosine"] = "cosine"
    min_lr: float = Field(0.0, ge=0)


class LinearSchedule(_ScheduleBase):
    """Linear decay from lr to lr * `end_factor` over the run (after warmup)."""

    name: Literal["linear"] = "linear"
    end_factor: float = Field(0.0, ge=0, le=1)


class PlateauSchedule(_ScheduleBase):
    """Reduce the lr by `factor` when a validation metric stops improving."""

    name: Literal["plateau"] = "plateau"
    metric: str = Field("loss", description="validation metric to watch, e.g. loss or accuracy")
    mode: Literal["min", "max"] = "min"
    factor: float = Field(0.1, gt=0, lt=1)
    patience: int = Field(2, ge=0, description="evaluations without improvement before reducing")
    threshold: float = Field(1e-4, ge=0)
    min_lr: float = Field(0.0, ge=0)


class OneCycleSchedule(StrictModel):
    """One-cycle: warm up to `max_lr` (default: optim.lr), then anneal (it has its own warmup)."""

    name: Literal["onecycle"] = "onecycle"
    max_lr: float | None = Field(None, gt=0)
    pct_start: float = Field(0.3, gt=0, lt=1)
    div_factor: float = Field(25.0, gt=0)
    final_div_factor: float = Field(1e4, gt=0)
    anneal_strategy: Literal["cos", "linear"] = "cos"


ScheduleConfig = Annotated[
    ConstantSchedule
    | StepSchedule
    | ExponentialSchedule
    | CosineSchedule
    | LinearSchedule
    | PlateauSchedule
    | OneCycleSchedule,
    Field(discriminator="name"),
]

# ----------------------------------------------------------------------------------------------


class RegularizationConfig(StrictModel):
    """Explicit penalties and other regularizers (dropout lives in the model section)."""

    l1: float = Field(
        0.0, ge=0, description="adds l1/m * sum|w| to the mean loss (m = examples per step)"
    )
    l2: float = Field(
        0.0, ge=0, description="adds l2/(2m) * sum w^2 to the mean loss (weights, not biases)"
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy only")
    grad_clip_norm: float | None = Field(None, gt=0, description="clip the global gradient norm")


class EarlyStoppingConfig(StrictModel):
    """Stop when a validation metric stops improving, and restore the best weights."""

    metric: str = "loss"
    mode: Literal["min", "max"] = "min"
    patience: int = Field(5, ge=1, description="evaluations without improvement before stopping")
    min_delta: float = Field(0.0, ge=0)


class CheckpointConfig(StrictModel):
    """When to write checkpoints and how many to keep."""

    every_steps: int | None = Field(
        None, ge=1, description="write every N optimizer steps (default: at each evaluation)"
    )
    keep_last: int = Field(2, ge=1)
    keep_best: bool = True


class FSDPConfig(StrictModel):
    """FSDP2 options (used when `train.strategy` is fsdp)."""

    cpu_offload: bool = Field(
        False, description="keep sharded parameters, gradients and optimizer state in CPU memory"
    )
    reshard_after_forward: bool = Field(
        True, description="free gathered block weights after forward (less memory, more traffic)"
    )


class PrivacyConfig(StrictModel):
    """Differentially private training (DP-SGD with Opacus: pip install shipyard[privacy]).

    Each example's gradient is clipped to `max_grad_norm`, Gaussian noise of standard deviation
    noise_multiplier x max_grad_norm is added to their sum, and batches are Poisson-sampled with
    rate batch_size / train rows. Opacus' accountant turns that into the spent (ε, δ).
    """

    noise_multiplier: float | None = Field(
        None, gt=0, description="noise std / max_grad_norm (give this or target_epsilon)"
    )
    target_epsilon: float | None = Field(
        None, gt=0, description="pick the noise so the whole run spends at most this ε"
    )
    max_grad_norm: float = Field(1.0, gt=0, description="per-example gradient clipping bound")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of (ε, δ); keep it below 1/train rows")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus privacy accountant")

    @model_validator(mode="after")
    def _one_noise_setting(self) -> PrivacyConfig:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "give exactly one of train.privacy.noise_multiplier or train.privacy.target_epsilon"
            )
        return self


class TrainConfig(StrictModel):
    """The training loop."""

    epochs: int | None = Field(10, ge=1, description="passes over the train split")
    max_steps: int | None = Field(None, ge=1, description="stop after N optimizer steps")
    batch_size: int = Field(
        64,
        ge=1,
        description="examples per optimizer step, all processes together (the global batch)",
    )
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        description="most examples per forward pass on one process (accumulates the rest)",
    )
    grad_accum: int = Field(
        1, ge=1, description="micro-batches each process cuts its share of a step into"
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="several processes: ddp (replicate) or fsdp (FSDP2, shard)"
    )
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)
    activation_checkpointing: bool = Field(
        False, description="recompute each transformer block's activations in backward"
    )
    loss: Literal["auto", "cross-entropy", "mse", "mae", "huber", "bce"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: fp32 on CPU, bf16 autocast on CUDA"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = Field(False, description="torch.compile the model")
    deterministic: bool = Field(False, description="torch deterministic algorithms")
    log_every: int = Field(10, ge=1, description="write a metrics.jsonl line every N steps")
    peak_tflops: float | None = Field(
        None, gt=0, description="device peak TFLOP/s for the MFU estimate (auto on known GPUs)"
    )
    tensorboard: bool = Field(
        False, description="also write TensorBoard event files (pip install shipyard[tensorboard])"
    )
    early_stopping: EarlyStoppingConfig | None = None
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    privacy: PrivacyConfig | None = Field(
        None, description="differentially private training (DP-SGD); see docs/privacy.md"
    )

    @model_validator(mode="after")
    def _has_a_length(self) -> TrainConfig:
        if self.epochs is None and self.max_steps is None:
            raise ValueError(
                "set train.epochs or train.max_steps (or both: the first reached wins)"
            )
        if self.micro_batch_size is not None and self.grad_accum > 1:
            raise ValueError(
                f"train.micro_batch_size ({self.micro_batch_size}) and train.grad_accum "
                f"({self.grad_accum}) both split a step; set only one"
            )
        if self.strategy != "fsdp" and self.fsdp != FSDPConfig():
            raise ValueError(
                "train.fsdp options need train.strategy: fsdp (it is ddp); set "
                "train.strategy=fsdp or remove the train.fsdp section"
            )
        if self.strategy == "fsdp" and self.compile:
            raise ValueError("train.compile is not supported with train.strategy: fsdp yet")
        if self.strategy == "fsdp" and self.precision == "fp16":
            raise ValueError(
                "train.precision fp16 is not supported with train.strategy: fsdp; use bf16"
            )
        return self


class EvalConfig(StrictModel):
    """Validation during training and the final evaluation."""

    every_steps: int | None = Field(
        None, ge=1, description="validate every N optimizer steps (default: each epoch)"
    )
    batch_size: int = Field(256, ge=1)
    max_batches: int | None = Field(None, ge=1, description="cap validation batches (LM runs)")
    top_k: int = Field(3, ge=1, description="classification: also report top-k accuracy")


class PretrainedConfig(StrictModel):
    """Start from a trained model: a shipyard package directory, or a Hugging Face checkpoint
    directory (config.json + safetensors). Its architecture, weights, tokenizer and chat
    template come with it (so `data.tokenizer` must not be set)."""

    name: Literal["pretrained"] = "pretrained"
    path: str = Field(
        ..., min_length=1, description="a shipyard package or a Hugging Face checkpoint directory"
    )


RunModelConfig = Annotated[ArchitectureConfig | PretrainedConfig, Field(discriminator="name")]


class FinetuneConfig(LoRAConfig):
    """How a pretrained model is fine-tuned: every weight (full) or low-rank adapters (lora)."""

    method: Literal["lora", "full"] = Field("lora", description="lora adapters or all weights")
    merge: bool = Field(
        False, description="lora: the package holds merged weights instead of base + adapter"
    )


class TuneParam(StrictModel):
    """One searched key: a range (`low`/`high`, optionally `log` or `step`) or a list of `choices`.

    A range of two integers samples integers. `when: {optim.name: sgd}` samples the key only when
    earlier searched keys have those values (a list means any of them).
    """

    low: int | float | None = Field(None, description="range: smallest value")
    high: int | float | None = Field(None, description="range: largest value")
    log: bool = Field(False, description="range: sample uniformly in log space (needs low > 0)")
    step: int | float | None = Field(None, gt=0, description="range: sample on a grid of this step")
    choices: list[Any] | None = Field(None, min_length=1, description="sample one of these values")
    when: dict[str, Any] | None = Field(
        None, description="sample only when these earlier searched keys have these values"
    )

    @model_validator(mode="after")
    def _range_or_choices(self) -> TuneParam:
        has_range = self.low is not None or self.high is not None
        if has_range == (self.choices is not None):
            raise ValueError("give either low and high (a range) or choices (a list)")
        if self.choices is not None:
            if self.log or self.step is not None:
                raise ValueError("log and step apply to ranges, not to choices")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs both low and high")
        if not self.low < self.high:
            raise ValueError(f"low must be below high, got low={self.low} high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log needs low > 0, got low={self.low}")
        if self.log and self.step is not None:
            raise ValueError("give log or step, not both")
        return self

    @property
    def is_int(self) -> bool:
        """True for a range of integers (and an integer step, if any)."""
        return (
            self.choices is None
            and isinstance(self.low, int)
            and isinstance(self.high, int)
            and (self.step is None or isinstance(self.step, int))
        )


class TuneConfig(StrictModel):
    """Hyperparameter search with `shipyard tune` (Optuna); ignored by `shipyard train`."""

    params: dict[str, TuneParam] = Field(
        ..., min_length=1, description="dotted config key (e.g. optim.lr) -> its search range"
    )
    metric: str | None = Field(
        None, description="validation metric to optimise (default: accuracy, or mse)"
    )
    direction: Literal["auto", "maximize", "minimize"] = Field(
        "auto", description="auto: maximize accuracy-like metrics, minimize losses and errors"
    )
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler")
    pruner: Literal["median", "hyperband", "none"] = Field(
        "median", description="stop hopeless trials early on intermediate validation metrics"
    )
    startup_trials: int = Field(
        4, ge=0, description="random trials before TPE models the space, and before pruning"
    )
    study: str | None = Field(None, description="study name in the database (default: run name)")
    cv_folds: int | None = Field(
        None, ge=2, description="objective = mean validation metric of k-fold cross-validation"
    )


class RunConfig(StrictModel):
    """A whole run: data → model → training → evaluation."""

    name: str = Field(
        ...,
        min_length=1,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="run name: runs/NAME/..., and the default package name",
    )
    seed: int = Field(0, description="seeds splits, initialisation, shuffling and dropout")
    task: Task = Field(..., description="what the model learns")
    data: DataConfig = Field(..., description="where the data comes from; see `data`")
    model: RunModelConfig = Field(
        ..., description="the architecture, chosen by `name` (or `pretrained` and a package path)"
    )
    finetune: FinetuneConfig | None = Field(
        None, description="fine-tuning of a pretrained model: LoRA adapters or full"
    )
    optim: OptimConfig = Field(
        default_factory=AdamWConfig, description="the optimizer, chosen by `name`"
    )
    schedule: ScheduleConfig = Field(
        default_factory=ConstantSchedule, description="the learning-rate schedule, by `name`"
    )
    regularization: RegularizationConfig = Field(
        default_factory=RegularizationConfig, description="penalties, smoothing, clipping"
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="the training loop")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="validation and testing")
    tune: TuneConfig | None = Field(
        None, description="search space for `shipyard tune` (ignored by `shipyard train`)"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_kinds(cls, data: Any) -> Any:
        # `optim: {lr: 0.01}` means the default optimizer with another lr
        if isinstance(data, dict):
            for section, default in (("optim", "adamw"), ("schedule", "constant")):
                value = data.get(section)
                if isinstance(value, dict) and "name" not in value:
                    data = {**data, section: {"name": default, **value}}
            model = data.get("model")
            # an rnn is a sequence model or a language model: its head follows the task
            if isinstance(model, dict) and model.get("name") == "rnn" and "head" not in model:
                head = "lm" if data.get("task") == "language-modeling" else "sequence"
                data = {**data, "model": {**model, "head": head}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if isinstance(self.model, PretrainedConfig):
            # the architecture's own needs are checked against the package when the run starts
            if self.data.tokenizer is not None:
                raise ValueError("model pretrained brings its own tokenizer: remove data.tokenizer")
        else:
            self._fits_architecture(self.model.name, getattr(self.model, "head", None))
            if self.finetune is not None:
                raise ValueError(
                    "finetune needs model: {name: pretrained, path: PACKAGE} (a model built "
                    "from scratch trains every weight already: remove finetune)"
                )
        if self.task == "language-modeling":
            if not (self.data.is_text_corpus or self.data.is_instructions):
                raise ValueError(
                    "task language-modeling needs a text corpus (data.source "
                    "builtin:python-stdlib or data.format: text) or instruction data "
                    "(data.format: chat | prompt-completion)"
                )
        else:
            if self.data.is_instructions:
                raise ValueError(
                    f"data.format {self.data.format} is instruction data for task "
                    f"language-modeling, not {self.task!r}"
                )
            if self.data.is_text_corpus:
                raise ValueError(
                    f"a text corpus source needs task language-modeling, not {self.task!r}"
                )
        if self.task == "regression" and self.train.loss in ("cross-entropy", "bce"):
            raise ValueError(f"train.loss {self.train.loss!r} does not fit task regression")
        if self.task != "regression" and self.train.loss in ("mse", "mae", "huber"):
            raise ValueError(f"train.loss {self.train.loss!r} needs task regression")
        if self.train.privacy is not None:
            _check_private_training(self)
        if isinstance(self.optim, GDConfig) and self.train.grad_accum != 1:
            raise ValueError(
                "optim gd already uses the whole train split per step: set grad_accum 1"
            )
        return self

    def _fits_architecture(self, model: str, head: str | None) -> None:
        """The checks of a model built from scratch: its name, head and inputs fit the task."""
        if self.data.block_size is not None:
            raise ValueError(
                "data.block_size is for a pretrained model; a model built from scratch takes "
                "model.block_size"
            )
        if self.task == "language-modeling":
            if model not in LANGUAGE_MODELS:
                raise ValueError(
                    "task language-modeling needs a causal model "
                    f"({', '.join(sorted(LANGUAGE_MODELS))}), got model.name={model!r}"
                )
            if self.data.tokenizer is None:
                raise ValueError(
                    "task language-modeling needs data.tokenizer (e.g. data.tokenizer.kind: byte)"
                )
        elif model in CAUSAL_MODELS:
            raise ValueError(
                f"model {model!r} is a language model; use task language-modeling "
                f"(task is {self.task!r})"
            )
        if head is not None and (head == "lm") != (self.task == "language-modeling"):
            want = "lm" if self.task == "language-modeling" else "sequence"
            raise ValueError(
                f"model.head {head!r} does not fit task {self.task!r}: use head {want!r} "
                "(or leave head out)"
            )
        if self.data.packing and model not in CAUSAL_MODELS:
            raise ValueError(
                f"data.packing needs a model that keeps packed examples apart "
                f"({', '.join(sorted(CAUSAL_MODELS))}), got model.name={model!r}; remove "
                "data.packing"
            )
        needs_text = model in TOKEN_MODELS and self.task != "language-modeling"
        if needs_text and (self.data.text_column is None or self.data.tokenizer is None):
            raise ValueError(
                f"model {model!r} reads token ids: set data.text_column and data.tokenizer"
            )


def _check_private_training(config: RunConfig) -> None:
    """What DP-SGD cannot combine with: anything that mixes examples before clipping."""
    reg, train = config.regularization, config.train
    clashes = []
    if reg.grad_clip_norm is not None:
        clashes.append("regularization.grad_clip_norm (DP clips each example's gradient itself)")
    if reg.l1 or reg.l2:
        clashes.append("regularization.l1/l2 (use optim.weight_decay instead)")
    if isinstance(config.optim, GDConfig):
        clashes.append("optim gd (DP-SGD samples mini-batches)")
    if train.compile:
        clashes.append("train.compile")
    if train.precision == "fp16":
        clashes.append("train.precision fp16")
    if train.strategy == "fsdp":
        clashes.append("train.strategy fsdp (DP-SGD runs in one process)")
    if config.data.packing:
        clashes.append("data.packing (DP-SGD protects one row, and a packed row holds several)")
    if clashes:
        raise ValueError("train.privacy cannot be combined with " + "; ".join(clashes))


# ----------------------------------------------------------------------------------------------
# loading, overrides, errors


def load_config(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run config from a YAML file (or a dict), apply `a.b=c` overrides, validate."""
    raw, where = load_raw_config(source, overrides)
    return validate_config(raw, where=where)


def load_raw_config(
    source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()
) -> tuple[dict[str, Any], str]:
    """The config as plain data (no defaults filled in) with overrides applied, and its origin."""
    if isinstance(source, Mapping):
        raw: Any = json.loads(json.dumps(source))  # deep copy of plain data
        where = "config"
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {_one_line(str(exc))}") from None
        if raw is None:
            raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: the top level must be a mapping of sections, got {type(raw).__name__}"
        )
    for item in overrides:
        apply_override(raw, item)
    return raw, where


def validate_config(raw: Mapping[str, Any], *, where: str = "config") -> RunConfig:
    """Validate plain data as a RunConfig; raise ConfigError with one readable line per problem."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (numbers, lists)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"override {item!r} must look like section.key=value (e.g. train.epochs=5)"
        )
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    set_dotted(raw, key, value, label=f"override {item!r}")


def set_dotted(node: dict[str, Any], key: str, value: Any, *, label: str) -> None:
    """Set `a.b.c` in plain nested dicts, making missing sections; `label` starts the error
    when a part of the path is a value, not a section."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{label}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML, defaults filled in, in declaration order."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def config_sha256(config: RunConfig) -> str:
    """A stable hash of the resolved config (for lineage and resume checks)."""
    blob = json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def config_schema() -> dict[str, Any]:
    """JSON Schema of a run config, for editor autocompletion of YAML files."""
    schema = RunConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "shipyard run config"
    return schema


def format_validation_error(exc: ValidationError, where: str = "config") -> str:
    """One line per problem: the dotted path, what is wrong, for unknown keys the allowed ones."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path, owner = _resolve_loc(loc)
        path = path.replace(".[", "[")  # tune.params['optim.lr'].low
        if err["type"] == "extra_forbidden":
            allowed = sorted(owner.model_fields) if owner is not None else []
            key = str(loc[-1])
            msg = f"unknown key {path!r}"
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            if close:
                msg += f": did you mean {close[0]!r}?"
            if allowed:
                msg += f" (allowed: {', '.join(allowed)})"
        elif err["type"] == "missing":
            msg = f"missing required key {path!r}"
        elif err["type"] == "union_tag_invalid":
            ctx = err.get("ctx") or {}
            msg = (
                f"{path + '.name' if path else 'name'}: unknown name {ctx.get('tag')!r}, "
                f"choose one of {ctx.get('expected_tags')}"
            )
        elif err["type"] == "union_tag_not_found":
            msg = f"{path}: missing 'name' (it selects the kind)"
        else:
            text = err["msg"].removeprefix("Value error, ")
            msg = f"{path}: {text}" if path else text
            if (
                "input" in err
                and err["type"] not in ("model_type",)
                and not isinstance(err["input"], dict)
            ):
                msg += f" (got {err['input']!r})"
        lines.append(msg)
    head = f"{where}: " if len(lines) == 1 else f"{where}: {len(lines)} problems:\n  "
    return head + "\n  ".join(lines)


def _resolve_loc(loc: tuple[Any, ...]) -> tuple[str, type[BaseModel] | None]:
    """Map a pydantic error location to a dotted user path and the model owning the last key.

    Discriminated unions put the tag (e.g. 'sgd') in the location; it is not a user key, so it is
    dropped from the path and used to pick the variant.
    """
    model: type[BaseModel] | None = RunConfig
    parts: list[str] = []
    i = 0
    while i < len(loc):
        part = loc[i]
        if model is None:
            parts.append(str(part))
            i += 1
            continue
        owner = model
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        if field is None:
            parts.append(str(part))
            if i == len(loc) - 1:
                return ".".join(parts), owner
            i += 1
            model = None
            continue
        parts.append(str(part))
        value_model = _dict_value_model(field.annotation)
        if value_model is not None and i + 1 < len(loc):
            parts.append(f"[{loc[i + 1]!r}]")
            if i + 1 == len(loc) - 1:
                return ".".join(parts), owner
            model = value_model
            i += 2
            continue
        model, skip = _submodel(field.annotation, loc[i + 1] if i + 1 < len(loc) else None)
        if i == len(loc) - 1:
            return ".".join(parts), owner
        i += 1 + skip
    return ".".join(parts), model


def _dict_value_model(annotation: Any) -> type[BaseModel] | None:
    """X for a `dict[str, X]` field whose X is a model (e.g. tune.params), else None."""
    for arg in _flatten(annotation):
        if typing.get_origin(arg) is dict:
            value = typing.get_args(arg)[1]
            if isinstance(value, type) and issubclass(value, BaseModel):
                return value
    return None


def _submodel(annotation: Any, next_part: Any) -> tuple[type[BaseModel] | None, int]:
    """The model class behind a field annotation; for tagged unions pick the variant by tag."""
    candidates = [
        a for a in _flatten(annotation) if isinstance(a, type) and issubclass(a, BaseModel)
    ]
    if len(candidates) == 1:
        return candidates[0], 0
    for cand in candidates:
        tag_field = cand.model_fields.get("name")
        if tag_field is not None and next_part is not None and tag_field.default == next_part:
            return cand, 1
    return None, 0


def _flatten(annotation: Any) -> Iterable[Any]:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        yield from _flatten(typing.get_args(annotation)[0])
    elif origin is Union or origin is types.UnionType:
        for arg in typing.get_args(annotation):
            yield from _flatten(arg)
    else:
        yield annotation


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------
# reference documentation, generated from the models so it cannot drift


def config_reference_markdown() -> str:
    """Markdown tables of every config section and field: type, default, description."""
    out = [
        "# Run config reference",
        "",
        "Generated by `shipyard config docs` from the config models; every key a run config "
        "accepts is listed here. Sections whose `name` selects a kind (model, optim, schedule) "
        "have one table per kind.",
        "",
    ]
    sections: list[tuple[str, type[BaseModel]]] = [("(top level)", RunConfig)]
    for field_name, info in RunConfig.model_fields.items():
        for cls in _flatten(info.annotation):
            if isinstance(cls, type) and issubclass(cls, BaseModel):
                title = field_name
                if "name" in cls.model_fields and field_name != "data":
                    title = f"{field_name} (name: {cls.model_fields['name'].default})"
                sections.append((title, cls))
                for sub_name, sub in cls.model_fields.items():
                    for sub_cls in _flatten(sub.annotation):
                        if isinstance(sub_cls, type) and issubclass(sub_cls, BaseModel):
                            sections.append((f"{field_name}.{sub_name}", sub_cls))
                    value_model = _dict_value_model(sub.annotation)
                    if value_model is not None:
                        sections.append((f"{field_name}.{sub_name}[KEY]", value_model))
    for title, cls in sections:
        out += [f"## `{title}`", ""]
        doc = (cls.__doc__ or "").strip().splitlines()
        if doc and cls is not RunConfig:
            out += [doc[0], ""]
        out += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        for key, info in cls.model_fields.items():
            default = "required" if info.is_required() else _default_text(info)
            type_text = _type_text(info.annotation).replace("|", "\\|")
            desc = (info.description or "").replace("|", "\\|")
            out.append(f"| `{key}` | {type_text} | {default} | {desc} |")
        out.append("")
    return "\n".join(out)


def _default_text(info: Any) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
        if isinstance(value, BaseModel):
            return "(section defaults)"
        return f"`{value!r}`"
    value = info.default
    return "`null`" if value is None else f"`{json.dumps(value)}`"


def _type_text(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " / ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin is Annotated:
        return _type_text(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        args = typing.get_args(annotation)
        kinds = [
            a.model_fields["name"].default
            for a in args
            if isinstance(a, type) and issubclass(a, BaseModel) and "name" in a.model_fields
        ]
        if len(kinds) > 1:
            return "section, `name` one of " + ", ".join(f"`{k}`" for k in kinds)
        return " or ".join(_type_text(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join(_type_text(a) for a in typing.get_args(annotation))
        return f"{origin.__name__}[{inner}]"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "section"
        return {"NoneType": "null"}.get(annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")
