"""Pruning: global magnitude pruning (unstructured) and neuron/channel removal (structured).

Unstructured pruning zeroes the smallest weights across every Linear/Conv layer at once
(`torch.nn.utils.prune.global_unstructured`, then made permanent). The file and the dense
kernels stay the same size; the zeros compress well and are the starting point for sparse
kernels. Structured pruning removes whole hidden neurons of an MLP or channels (and hidden units)
of a CNN, and rebuilds the model with the smaller sizes written into its config, so the child
loads with the plain builder and really is smaller and faster.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from shipyard.compress.errors import CompressError
from shipyard.compress.measure import weight_layers
from shipyard.models import CNN, MLP, build_model
from shipyard.models.cnn import CNNConfig
from shipyard.models.gpt import GPT, GPTConfig
from shipyard.models.llama import Llama, LlamaConfig
from shipyard.models.mlp import MLPConfig


def check_sparsity(sparsity: float) -> None:
    """Refuse a sparsity outside (0, 1)."""
    if not 0.0 < sparsity < 1.0:
        raise CompressError(f"sparsity must be between 0 and 1 (exclusive), got {sparsity}")


def prune_unstructured(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Zero the `sparsity` fraction of smallest-magnitude weights over all Linear/Conv layers
    (one global threshold), in place; return {parameter name: 0/1 mask} for fine-tuning."""
    check_sparsity(sparsity)
    layers = weight_layers(model)
    if not layers:
        raise CompressError("the model has no Linear or Conv layers to prune")
    modules = [(model.get_submodule(name), "weight") for name, _ in layers]
    torch_prune.global_unstructured(
        modules, pruning_method=torch_prune.L1Unstructured, amount=float(sparsity)
    )
    masks = {}
    for (name, _), (module, attr) in zip(layers, modules, strict=True):
        mask: torch.Tensor = getattr(module, "weight_mask")  # noqa: B009 (set by torch prune)
        masks[f"{name}.weight" if name else "weight"] = mask.detach().clone()
        torch_prune.remove(module, attr)  # weight = weight_orig * mask, as a plain parameter
    return masks


def prune_structured(
    model: nn.Module, config: Any, sparsity: float, input_shape: tuple[int, ...], outputs: int
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Remove the `sparsity` fraction of hidden neurons (MLP) or channels and hidden units (CNN)
    with the least weight, layer by layer. Returns (smaller model, its config, what changed)."""
    check_sparsity(sparsity)
    if isinstance(model, MLP) and isinstance(config, MLPConfig):
        return _prune_mlp(model, config, sparsity, input_shape, outputs)
    if isinstance(model, CNN) and isinstance(config, CNNConfig):
        return _prune_cnn(model, config, sparsity, input_shape, outputs)
    if isinstance(model, GPT) and isinstance(config, GPTConfig):
        return _prune_gpt(model, config, sparsity)
    if isinstance(model, Llama) and isinstance(config, LlamaConfig):
        return _prune_llama(model, config, sparsity)
    raise CompressError(
        f"structured pruning supports mlp, cnn, gpt and llama models, not {config.name!r}; use "
        "unstructured pruning (--prune without --structured) or --quantize int8-weight"
    )


def _keep(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Sorted indices of the units to keep: the highest scores, at least one."""
    n = max(1, round(scores.numel() * (1.0 - sparsity)))
    return torch.topk(scores, n).indices.sort().values


def _rows(sd: dict[str, torch.Tensor], prefix: str, keep: torch.Tensor) -> None:
    """Keep output units `keep` of a layer (Linear/Conv weight rows, bias, norm stats)."""
    for key in ("weight", "bias", "running_mean", "running_var"):
        name = f"{prefix}.{key}"
        if name in sd:
            sd[name] = sd[name][keep].clone()


def _columns(sd: dict[str, torch.Tensor], prefix: str, keep: torch.Tensor) -> None:
    sd[f"{prefix}.weight"] = sd[f"{prefix}.weight"][:, keep].clone()


def _unit_scores(w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """Importance of each hidden unit: norm of its incoming weights x norm of its outgoing ones."""
    incoming = w_in.reshape(w_in.size(0), -1).norm(dim=1)  # (units,)
    outgoing = w_out.transpose(0, 1).reshape(w_in.size(0), -1).norm(dim=1)  # (units,)
    return incoming * outgoing


def _rebuild(
    config: Any, sd: dict[str, torch.Tensor], input_shape: tuple[int, ...], outputs: int
) -> nn.Module:
    new = build_model(config, input_shape=input_shape, num_outputs=outputs)
    new.load_state_dict(sd, strict=True)
    return new.eval()


def _prune_mlp(
    model: MLP, config: MLPConfig, sparsity: float, input_shape: tuple[int, ...], outputs: int
) -> tuple[nn.Module, MLPConfig, dict[str, Any]]:
    if not config.hidden_sizes:
        raise CompressError("this mlp has no hidden layers to prune (hidden_sizes is [])")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    linear_idx = [i for i, m in enumerate(model.body) if isinstance(m, nn.Linear)]
    norm_idx = {
        i: i + 1
        for i in linear_idx
        if i + 1 < len(model.body) and isinstance(model.body[i + 1], nn.BatchNorm1d | nn.LayerNorm)
    }
    targets = [f"body.{i}" for i in linear_idx[1:]] + ["head"]
    sizes = []
    for i, nxt in zip(linear_idx, targets, strict=True):
        keep = _keep(_unit_scores(sd[f"body.{i}.weight"], sd[f"{nxt}.weight"]), sparsity)
        _rows(sd, f"body.{i}", keep)
        if i in norm_idx:
            _rows(sd, f"body.{norm_idx[i]}", keep)
        _columns(sd, nxt, keep)
        sizes.append(len(keep))
    new_config = config.model_copy(update={"hidden_sizes": sizes})
    changes = {"hidden_sizes": [list(config.hidden_sizes), sizes]}
    return _rebuild(new_config, sd, input_shape, outputs), new_config, changes


def _prune_gpt(
    model: GPT, config: GPTConfig, sparsity: float
) -> tuple[nn.Module, GPTConfig, dict[str, Any]]:
    """Drop the weakest MLP neurons of every block (the same number per block, so the config
    keeps one `mlp_hidden`); attention heads stay (the head size is fixed by n_embd / n_head)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hidden = config.mlp_hidden or 4 * config.n_embd
    for i in range(config.n_layer):
        prefix = f"transformer.h.{i}.mlp"
        scores = _unit_scores(sd[f"{prefix}.c_fc.weight"], sd[f"{prefix}.c_proj.weight"])
        keep = _keep(scores, sparsity)
        _rows(sd, f"{prefix}.c_fc", keep)
        _columns(sd, f"{prefix}.c_proj", keep)
        kept = len(keep)
    new_config = config.model_copy(update={"mlp_hidden": kept})
    new = GPT(new_config, vocab_size=model.lm_head.out_features)
    new.load_state_dict(sd, strict=True)
    return new.eval(), new_config, {"mlp_hidden": [hidden, kept]}


def _prune_llama(
    model: Llama, config: LlamaConfig, sparsity: float
) -> tuple[nn.Module, LlamaConfig, dict[str, Any]]:
    """Drop the weakest SwiGLU units of every layer (the same number per layer, so the config
    keeps one `intermediate_size`). A unit is a gate row, an up row and a down column; its
    score multiplies the gate and up row norms by the down column norm. The new model takes
    the tensors it does not narrow from `model` itself (no copy of an LLM's weights): give it a
    model you no longer need, as the compress pipeline does (its own copy of the parent)."""
    sd = dict(model.state_dict())  # _rows/_columns copy what they narrow
    H = config.intermediate_size
    kept = H
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp"
        down = sd[f"{prefix}.down_proj.weight"]  # (C, H)
        if config.model_type == "phi3":  # fused: rows [0, H) gate, [H, 2H) up
            gate_up = sd[f"{prefix}.gate_up_proj.weight"]  # (2H, C)
            gate, up = gate_up[:H], gate_up[H:]
        else:
            gate, up = sd[f"{prefix}.gate_proj.weight"], sd[f"{prefix}.up_proj.weight"]
        scores = gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)  # (H,)
        keep = _keep(scores, sparsity)
        if config.model_type == "phi3":
            _rows(sd, f"{prefix}.gate_up_proj", torch.cat([keep, keep + H]))
        else:
            _rows(sd, f"{prefix}.gate_proj", keep)
            _rows(sd, f"{prefix}.up_proj", keep)
        _columns(sd, f"{prefix}.down_proj", keep)
        kept = len(keep)
    new_config = config.model_copy(update={"intermediate_size": kept})
    with torch.device("meta"):
        new = Llama(new_config, vocab_size=model.vocab_size)
    new.load_state_dict(sd, strict=True, assign=True)
    new.tie_weights()
    return new.eval(), new_config, {"intermediate_size": [H, kept]}


def _prune_cnn(
    model: CNN, config: CNNConfig, sparsity: float, input_shape: tuple[int, ...], outputs: int
) -> tuple[nn.Module, CNNConfig, dict[str, Any]]:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    conv_idx = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    bn_idx = {
        i: i + 1
        for i in conv_idx
        if i + 1 < len(model.features) and isinstance(model.features[i + 1], nn.BatchNorm2d)
    }
    c_last = config.channels[-1]
    hw = model.flat_features // c_last  # spatial positions per channel after the last pool
    channels = []
    for n, i in enumerate(conv_idx):
        w = sd[f"features.{i}.weight"]  # (out, in, k, k)
        if n + 1 < len(conv_idx):
            nxt = f"features.{conv_idx[n + 1]}"
            keep = _keep(_unit_scores(w, sd[f"{nxt}.weight"]), sparsity)
            _columns(sd, nxt, keep)
        else:
            head = sd["classifier.1.weight"].reshape(-1, c_last, hw)  # (hidden, C, h*w)
            keep = _keep(_unit_scores(w, head.transpose(0, 1).reshape(c_last, -1).t()), sparsity)
            cols = (keep[:, None] * hw + torch.arange(hw)[None, :]).reshape(-1)
            sd["classifier.1.weight"] = sd["classifier.1.weight"][:, cols].clone()
        _rows(sd, f"features.{i}", keep)
        if i in bn_idx:
            _rows(sd, f"features.{bn_idx[i]}", keep)
        channels.append(len(keep))
    keep = _keep(_unit_scores(sd["classifier.1.weight"], sd["classifier.4.weight"]), sparsity)
    _rows(sd, "classifier.1", keep)
    _columns(sd, "classifier.4", keep)
    new_config = config.model_copy(update={"channels": channels, "hidden_size": len(keep)})
    changes = {
        "channels": [list(config.channels), channels],
        "hidden_size": [config.hidden_size, len(keep)],
    }
    return _rebuild(new_config, sd, input_shape, outputs), new_config, changes


def unstructured_copy(model: nn.Module, sparsity: float) -> tuple[nn.Module, dict[str, Any]]:
    """A pruned copy of `model` and its masks (the original is left alone)."""
    pruned = copy.deepcopy(model)
    masks = prune_unstructured(pruned, sparsity)
    return pruned, masks
