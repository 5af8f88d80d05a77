"""LoRA: low-rank adapters on chosen Linear layers, swapped into the same model.

`apply_lora(model, LoRAConfig(targets=["q_proj", "v_proj"]))` replaces each matching `nn.Linear`
by a `LoRALinear` that keeps the frozen base weight under the *same* parameter names (`weight`,
`bias`, so Hugging Face names survive) and adds two trainable matrices:

    y = x W^T + b + (dropout(x) A^T) B^T * (alpha / rank)      A: (rank, in), B: (out, rank)

B starts at zero, so a fresh adapter leaves the model's outputs unchanged; A starts like
`nn.Linear`'s weight (Kaiming uniform), as in PEFT. `merge_lora` folds the adapters into plain
Linear layers (W + B A * scale). The adapter tensors map one to one onto PEFT's
`base_model.model.<path>.lora_A.weight` / `lora_B.weight`.

`with_adapter` serves several adapters on one base: each gets a view of the base model that
shares every base tensor and every module off the path to its adapted layers.

`LoRALinear` is deliberately not an `nn.Linear` subclass: code that swaps Linear layers
(int8 quantization, oneDNN packing) must not mistake it for one and drop the adapter.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from shipyard.config_base import StrictModel
from shipyard.errors import ModelError
from shipyard.models.quantized import replace_module, shared_parameters

LORA_A, LORA_B = "lora_A", "lora_B"


class LoRAConfig(StrictModel):
    """Where adapters go and how big they are (the `finetune:` section's LoRA part)."""

    rank: int = Field(8, gt=0, description="rank r of the update B A")
    alpha: float = Field(16.0, gt=0, description="scale: the update is multiplied by alpha / rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        description="Linear layers to adapt, by name: the last part of the module path "
        "(q_proj) or a full dotted path (model.layers.0.self_attn.q_proj)",
    )

    @field_validator("targets")
    @classmethod
    def _names(cls, targets: list[str]) -> list[str]:
        for t in targets:
            if not t or any(
                not part.isidentifier() and not part.isdigit() for part in t.split(".")
            ):
                raise ValueError(f"target {t!r} is not a module name or dotted module path")
        return targets

    @property
    def scale(self) -> float:
        """alpha / rank, the factor on B A."""
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen Linear (same `weight`/`bias` names) plus a trainable low-rank update."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=dtype), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
            if bias
            else None
        )
        self.lora_A = nn.Parameter(
            torch.empty(rank, in_features, device=device, dtype=dtype)
        )  # (r, in)
        self.lora_B = nn.Parameter(
            torch.zeros(out_features, rank, device=device, dtype=dtype)
        )  # (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: LoRAConfig) -> LoRALinear:
        """Wrap a trained Linear: its weight and bias are shared (not copied) and frozen."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank=config.rank,
            alpha=config.alpha,
            dropout=config.dropout,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        layer.weight = linear.weight  # type: ignore[assignment]  # shared, not copied
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            layer.bias = linear.bias
            linear.bias.requires_grad_(False)
        return layer

    def delta_weight(self) -> torch.Tensor:
        """The update B A * scale, shaped like the base weight (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (*, in_features) to (*, out_features)."""
        base = F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (*, out)
        return base + update * self.scale

    def merged(self) -> nn.Linear:
        """A plain Linear computing the same function (W + B A * scale)."""
        w = self.weight
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=w.device
        ).to(w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w + self.delta_weight().to(w.dtype))
            if self.bias is not None and linear.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, alpha={self.alpha}"
        )


def lora_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Module paths of the Linear layers `targets` names; ModelError if a target matches none.

    A Linear whose weight is shared (an LM head tied to the embedding) cannot be adapted alone.
    """
    shared = shared_parameters(model)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen: list[str] = []
    for target in targets:
        hits = [n for n in linears if n == target or n.endswith("." + target)]
        if not hits:
            names = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ModelError(
                f"LoRA target {target!r} matches no Linear layer of the model; its Linear layers "
                f"are named {', '.join(names)}"
            )
        for name in hits:
            if id(linears[name].weight) in shared:
                raise ModelError(
                    f"LoRA target {name!r} shares its weight with another layer (tied "
                    "embeddings); choose other targets"
                )
            if name not in chosen:
                chosen.append(name)
    return chosen


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model`, swap adapters onto the target Linears (in place), and
    return their module paths. Only the adapters' A and B are trainable afterwards."""
    names = lora_targets(model, config.targets)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        replace_module(model, name, LoRALinear.from_linear(linear, config))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Module path -> LoRALinear for every adapted layer of `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight (in place); return the merged module paths."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        replace_module(model, name, layer.merged())
    return list(layers)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Just the adapters: {"<path>.lora_A": (r, in), "<path>.lora_B": (out, r)}, detached."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.{LORA_A}"] = layer.lora_A.detach()
        out[f"{name}.{LORA_B}"] = layer.lora_B.detach()
    return out


def with_adapter(
    model: nn.Module, config: LoRAConfig, tensors: Mapping[str, torch.Tensor]
) -> nn.Module:
    """A model computing `model` plus one adapter, sharing `model`'s weights (nothing is copied).

    tensors: the adapter as `adapter_state_dict` gives it (`<path>.lora_A`, `<path>.lora_B`) for
        exactly the layers `config.targets` names.
    The result shares every parameter, buffer and module of `model` except the modules on the
    way from the root to an adapted layer (shallow copies) and the adapted layers themselves
    (`LoRALinear`s over the shared base weight and bias). `model` keeps computing without the
    adapter. Memory: the adapter's tensors and a few module objects. The adapter is frozen (for
    inference; train adapters with `apply_lora`).
    """
    names = lora_targets(model, config.targets)
    want = {f"{n}.{kind}" for n in names for kind in (LORA_A, LORA_B)}
    if set(tensors) != want:
        missing, extra = sorted(want - set(tensors)), sorted(set(tensors) - want)
        raise ModelError(
            f"adapter tensors do not match its layers (missing {missing or 'none'}, "
            f"unexpected {extra or 'none'})"
        )
    view = _copy_path(model, names, "")
    for name in names:
        linear = view.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        layer = _lora_over(linear, config)
        for kind in (LORA_A, LORA_B):
            param = getattr(layer, kind)
            given = tensors[f"{name}.{kind}"]
            if given.shape != param.shape:
                raise ModelError(
                    f"adapter tensor {name}.{kind} has shape {list(given.shape)}, the layer "
                    f"needs {list(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(given)
        replace_module(view, name, layer)
    return view


def _lora_over(linear: nn.Linear, config: LoRAConfig) -> LoRALinear:
    """A frozen LoRALinear on `linear`'s weight and bias (shared; `linear` is left as it is)."""
    layer = LoRALinear(
        linear.in_features,
        linear.out_features,
        rank=config.rank,
        alpha=config.alpha,
        dropout=config.dropout,
        bias=False,
        device="meta",  # no storage: the base weight is linear's own, A and B come next
    )
    w = linear.weight
    layer.weight = w  # type: ignore[assignment]  # shared, not copied
    layer.bias = linear.bias
    for kind, shape in (
        (LORA_A, (config.rank, layer.in_features)),
        (LORA_B, (layer.out_features, config.rank)),
    ):
        blank = torch.zeros(shape, dtype=w.dtype, device=w.device)
        setattr(layer, kind, nn.Parameter(blank, requires_grad=False))
    return layer.train(linear.training)


def _copy_path(module: nn.Module, names: list[str], prefix: str) -> nn.Module:
    """A shallow copy of `module` whose children on the way to `names` are copied in turn; every
    other child, parameter and buffer is the original object."""
    clone = copy.copy(module)
    # copy.copy shares the containers: give the clone its own, holding the same objects
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for child_name, child in module._modules.items():
        path = prefix + child_name
        if child is not None and any(n.startswith(path + ".") for n in names):
            clone._modules[child_name] = _copy_path(child, names, path + ".")
    return clone
