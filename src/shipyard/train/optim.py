"""Optimizers from config: each config name maps to one `torch.optim` class.

Weight decay (and the explicit L1/L2 penalties in `shipyard.train.regularization`) applies to
weights only. `split_decay_params` is the one place that decides what a "weight" is.
"""

from __future__ import annotations

from torch import nn
from torch.optim import SGD, Adagrad, Adam, AdamW, Optimizer, RMSprop

from shipyard.config import (
    AdagradConfig,
    AdamConfig,
    AdamWConfig,
    GDConfig,
    OptimConfig,
    RMSpropConfig,
    SGDConfig,
)
from shipyard.errors import ConfigError

# Modules whose parameters are never decayed: scales/shifts of norms and embedding tables.
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)
_EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


def split_decay_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split the trainable parameters into (decay, no_decay).

    Decay: weight matrices and kernels (ndim >= 2) of Linear, Conv and other layers.
    No decay: biases and other vectors (ndim < 2), every parameter of a norm layer (LayerNorm,
    BatchNorm, GroupNorm, RMSNorm, ...) and embedding tables. The decision is made by module type,
    not by name. A tied parameter appears once; if any module sharing it is an embedding or a norm
    (e.g. an LM head tied to the token embedding), it is not decayed. Frozen parameters
    (requires_grad=False) are left out.
    """
    exempt: set[int] = set()
    for module in model.modules():
        if isinstance(module, _NORM_TYPES + _EMBEDDING_TYPES):
            exempt.update(id(p) for p in module.parameters(recurse=False))
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():  # de-duplicates tied parameters
        if not param.requires_grad:
            continue
        if id(param) in exempt or param.ndim < 2:
            no_decay.append(param)
        else:
            decay.append(param)
    return decay, no_decay


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> Optimizer:
    """Build the `torch.optim` optimizer named by `cfg` over the trainable parameters of `model`.

    With `decay_exclude="auto"` there are two parameter groups, "decay" (weight_decay=cfg value)
    and "no_decay" (weight_decay=0), split by `split_decay_params`; with "none" a single "all"
    group decays everything. Empty groups are dropped. `gd` is plain SGD without momentum: the
    trainer makes it full-batch by stepping once per pass over the train split.
    """
    groups = _param_groups(cfg, model)
    opt: Optimizer
    if isinstance(cfg, GDConfig):
        opt = SGD(groups, lr=cfg.lr, momentum=0.0, weight_decay=cfg.weight_decay)
    elif isinstance(cfg, SGDConfig):
        opt = SGD(
            groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            dampening=cfg.dampening,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    elif isinstance(cfg, AdagradConfig):
        opt = Adagrad(
            groups,
            lr=cfg.lr,
            lr_decay=cfg.lr_decay,
            initial_accumulator_value=cfg.initial_accumulator_value,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )
    elif isinstance(cfg, RMSpropConfig):
        opt = RMSprop(
            groups,
            lr=cfg.lr,
            alpha=cfg.alpha,
            eps=cfg.eps,
            momentum=cfg.momentum,
            centered=cfg.centered,
            weight_decay=cfg.weight_decay,
        )
    elif isinstance(cfg, AdamConfig | AdamWConfig):
        cls = AdamW if isinstance(cfg, AdamWConfig) else Adam
        opt = cls(
            groups,
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            amsgrad=cfg.amsgrad,
            weight_decay=cfg.weight_decay,
        )
    else:  # pragma: no cover - the config union is exhaustive
        raise ConfigError(f"optim.name {cfg.name!r} is not supported")
    opt.defaults["shipyard_name"] = cfg.name  # for optimizer_summary: gd and sgd are both SGD
    return opt


def _param_groups(cfg: OptimConfig, model: nn.Module) -> list[dict[str, object]]:
    if cfg.decay_exclude == "auto":
        decay, no_decay = split_decay_params(model)
        groups: list[dict[str, object]] = [
            {"params": decay, "weight_decay": cfg.weight_decay, "group": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
        ]
    else:
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": trainable, "weight_decay": cfg.weight_decay, "group": "all"}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError(
            "the model has no trainable parameters (all have requires_grad=False); "
            "unfreeze some before training"
        )
    return groups


def optimizer_summary(opt: Optimizer) -> str:
    """One line describing the optimizer and its groups.

    e.g. "adamw lr=0.001 weight_decay=0.01 (decay: 12 tensors / 30,000 params,
    no decay: 8 tensors / 500 params)".
    """
    name = opt.defaults.get("shipyard_name", type(opt).__name__.lower())
    first = opt.param_groups[0]
    decays = {float(g.get("weight_decay", 0.0)) for g in opt.param_groups} - {0.0}
    head = f"{name} lr={first['lr']:g}"
    if decays:
        head += f" weight_decay={max(decays):g}"
    parts = []
    for i, group in enumerate(opt.param_groups):
        label = str(group.get("group", f"group {i}")).replace("_", " ")
        params = group["params"]
        numel = sum(p.numel() for p in params)
        parts.append(f"{label}: {len(params)} tensors / {numel:,} params")
    return f"{head} ({', '.join(parts)})"
