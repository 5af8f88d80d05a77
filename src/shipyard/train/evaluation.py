"""Evaluating models and finished runs: streaming metrics over a split, per rank."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shipyard.config import RunConfig
from shipyard.config_base import LM_TASK
from shipyard.data import PreparedData, prepare_data
from shipyard.data.datasets import gather, segments_of
from shipyard.errors import TrainError
from shipyard.evaluate.metrics import build_metrics
from shipyard.models import TOKEN_MODELS, build_model
from shipyard.train import checkpoint as ckpt
from shipyard.train.distributed import DistEnv
from shipyard.train.finetune import load_base, prepare_for_finetune
from shipyard.train.losses import build_loss
from shipyard.train.rundir import best_checkpoint, load_run_config


@torch.inference_mode()
def evaluate_model(
    model: nn.Module,
    data: PreparedData,
    split: str,
    config: RunConfig,
    *,
    loss_fn: Any = None,
    device: torch.device | None = None,
    env: DistEnv | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    lockstep: bool = False,
) -> dict[str, Any]:
    """Streaming metrics of `model` on one split; each rank takes every world_size-th row.

    lockstep: every rank runs the same number of forward passes (a sharded model's forward is
    a collective); a rank with fewer batches repeats a row and discards the output.
    """
    dataset = getattr(data, split)
    if dataset is None or len(dataset) == 0:
        return {}
    env = env or DistEnv()
    device = device or next(model.parameters()).device
    info = data.info
    if loss_fn is None:
        loss_fn = build_loss(
            config.task,
            config.train.loss,
            label_smoothing=config.regularization.label_smoothing,
            num_classes=info.num_outputs,
        )
    metrics = build_metrics(
        config.task,
        num_classes=info.num_outputs if config.task == "classification" else None,
        top_k=config.eval.top_k,
        class_names=info.class_names,
    ).to(device)
    model.eval()
    mine = torch.arange(len(dataset))[env.rank :: env.world_size]
    batches = torch.split(mine, config.eval.batch_size)
    if lockstep:
        most = -(-len(dataset) // env.world_size)
        n_batches = -(-most // config.eval.batch_size)
        if config.eval.max_batches is not None:
            n_batches = min(n_batches, config.eval.max_batches)
        for _ in range(n_batches - min(len(batches), n_batches)):
            first = torch.zeros(1, dtype=torch.long)
            x, _y = gather(dataset, first)
            _forward(model, x.to(device), segments_of(dataset, first))
    if config.eval.max_batches is not None:
        batches = batches[: config.eval.max_batches]
    for idx in batches:
        x, y = gather(dataset, idx)
        x, y = x.to(device), y.to(device)
        with autocast() if autocast is not None else contextlib.nullcontext():
            out = _forward(model, x, segments_of(dataset, idx))
        out = out.float()
        loss_sum, scored = loss_fn(out, y)
        count = int(scored)
        if config.task == "regression" and data.preprocessor is not None:
            out = data.preprocessor.inverse_transform_target(out)
            y = data.preprocessor.inverse_transform_target(y)
        metrics.update(out, y, loss_sum=loss_sum, count=count)
    return metrics.compute()


def _forward(model: nn.Module, x: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
    """The model's outputs; packed rows (data.packing's train split) pass their segment ids."""
    if segments is None:
        return model(x)
    return model(x, segments=segments.to(x.device))


def evaluate_run(run_dir: str | Path, split: str = "test") -> dict[str, Any]:
    """Re-evaluate a run's best checkpoint on `split`, rebuilding data and model from its config."""
    run_dir = Path(run_dir)
    if split not in ("train", "val", "test"):
        raise TrainError(f"split must be train, val or test, got {split!r}")
    config = load_run_config(run_dir)
    path = best_checkpoint(run_dir)
    data, model = build_data_and_model(config)
    ckpt.load_weights(path, model)
    results = evaluate_model(model, data, split, config)
    if not results:
        raise TrainError(f"{run_dir}: the {split} split is empty")
    return {"checkpoint": str(path), "split": split, "metrics": results}


def build_data_and_model(
    config: RunConfig, *, meta_model: bool = False
) -> tuple[PreparedData, nn.Module]:
    """Prepare the data and build the model a config describes: untrained, or the pretrained
    package's (with its tokenizer), with LoRA adapters swapped in when `finetune` says so.

    meta_model: build an untrained model on the meta device (shapes only, no memory); a
    pretrained base is always loaded with its weights.
    """
    base = load_base(config)
    if base is not None:
        data = prepare_data(
            config.data,
            config.task,
            config.seed,
            block_size=base.block_size(config.data.block_size),
            tokenizer=base.tokenizer,
        )
        model = base.model
        vocab = getattr(model, "vocab_size", None)
        if config.task == LM_TASK and vocab is not None and vocab != data.info.num_outputs:
            # checkpoints may pad the embedding past the tokenizer (Qwen): the model's width counts
            data.info = replace(data.info, num_outputs=int(vocab), vocab_size=int(vocab))
    else:
        token_model = config.model.name in TOKEN_MODELS
        block_size = getattr(config.model, "block_size", None) if token_model else None
        data = prepare_data(config.data, config.task, config.seed, block_size=block_size)
        info = data.info
        with torch.device("meta") if meta_model else contextlib.nullcontext():
            model = build_model(
                config.model,
                input_shape=tuple(info.input_shape),
                num_outputs=info.num_outputs,
                vocab_size=info.vocab_size,
            )
    prepare_for_finetune(model, config)
    return data, model


def unigram_loss(data: PreparedData) -> float | None:
    """Cross-entropy of a unigram model fitted on train tokens, on val tokens (a baseline)."""
    train_tokens = getattr(data.train, "tokens", None)
    val_tokens = getattr(data.val, "tokens", None) if data.val is not None else None
    vocab = data.info.vocab_size
    if train_tokens is None or val_tokens is None or vocab is None:
        return None
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    val = np.asarray(val_tokens)
    return float(-logp[val].mean())
