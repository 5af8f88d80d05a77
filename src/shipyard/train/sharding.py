"""FSDP2 for the trainer: which blocks to shard, sharding, and moving whole weights in and out.

`fully_shard` goes on every repeated block (a model lists them with `shard_blocks()`, or the
largest `nn.ModuleList` of one block type is used), then on the root, so whatever is not in a
block (embeddings, the LM head and the final norm: tied weights stay together) is one group.
Ranks other than 0 build the model on the meta device; rank 0's freshly initialised weights are
then broadcast into everyone's shards, so the initialisation is the one a single process makes.
Activation checkpointing uses the composable `checkpoint`, which keeps parameter names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed._composable import checkpoint as checkpoint_activations
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from shipyard.errors import CheckpointError


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: `model.shard_blocks()` if the model says, else the
    largest `nn.ModuleList` whose items share one type (GPT's `transformer.h`, Llama's
    `model.layers`); empty for models without repeated blocks (they are sharded as one group)."""
    listed = getattr(model, "shard_blocks", None)
    if callable(listed):
        return list(listed())
    best: list[nn.Module] = []
    best_size = 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            if len({type(m) for m in module}) != 1:
                continue
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = list(module), size
    return best


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block's activations in backward; returns how many blocks are wrapped."""
    blocks = find_blocks(model)
    for block in blocks:
        checkpoint_activations(block)
    return len(blocks)


def tied_names(model: nn.Module) -> dict[str, str]:
    """{alias: first name} for parameters that share one tensor (e.g. a tied LM head)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def shard_model(
    model: nn.Module,
    *,
    device: torch.device,
    world_size: int,
    param_dtype: torch.dtype | None,
    cpu_offload: bool,
    reshard_after_forward: bool,
) -> nn.Module:
    """Apply `fully_shard` per block, then to the root (in place; returns the model).

    param_dtype: compute dtype of the gathered weights (bf16 on CUDA); gradients are reduced in
    fp32 and the sharded master weights stay fp32. None: everything fp32.
    """
    mesh = init_device_mesh(device.type, (world_size,))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=torch.float32
        )
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in find_blocks(model):
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, **kwargs)
    return model


def materialize_from_rank0(
    model: nn.Module,
    full_state: dict[str, Any],
    buffers: dict[str, torch.Tensor],
    *,
    device: torch.device,
    cpu_offload: bool,
) -> None:
    """Allocate every rank's shards and fill them with rank 0's weights (`full_state`, empty on
    the other ranks), then broadcast rank 0's buffers (non-persistent ones are not in the state
    dict, and meta ranks have none)."""
    model.to_empty(device="cpu" if cpu_offload else device)
    set_model_state_dict(
        model,
        full_state,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
    rank = dist.get_rank()
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is None:
                continue
            if buf.device != device:  # offloaded shards live on the CPU, buffers do not
                buf = module._buffers[key] = buf.to(device)
            name = next(n for n, b in model.named_buffers() if b is buf)
            if rank == 0:
                buf.copy_(buffers[name].to(device))
            dist.broadcast(buf, src=0)


def full_state_dict(model: nn.Module) -> dict[str, Any]:
    """The whole (unsharded) weights on rank 0's CPU; empty on other ranks. All ranks call it."""
    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def save_full_weights(state: dict[str, Any], aliases: dict[str, str], path: Path) -> None:
    """Write whole weights as safetensors, a tied tensor once (like `safetensors.save_model`)."""
    tensors = {k: v.contiguous() for k, v in state.items() if k not in aliases}
    metadata = {alias: kept for alias, kept in aliases.items() if alias in state}
    save_file(tensors, str(path), metadata=metadata or None)


def load_full_weights(model: nn.Module, path: Path, aliases: dict[str, str]) -> None:
    """Load a safetensors file of whole weights into a sharded model (read on rank 0 only, then
    broadcast). All ranks call it."""
    state: dict[str, Any] = {}
    if dist.get_rank() == 0:
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises several types for a bad header
            raise CheckpointError(f"{path}: cannot load weights ({exc})") from None
        for alias, kept in aliases.items():
            if kept in state and alias not in state:
                state[alias] = state[kept]
    set_model_state_dict(
        model,
        state,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a tensor (its shard for a DTensor, else the tensor)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def grad_norm(model: nn.Module) -> torch.Tensor:
    """The global L2 norm of all gradients, summing shards over ranks for sharded ones."""
    device = next(model.parameters()).device
    sq = torch.zeros((), dtype=torch.float64, device=device)
    sharded = False
    for p in model.parameters():
        if p.grad is not None:
            sharded = sharded or isinstance(p.grad, DTensor)
            sq += local(p.grad).detach().double().pow(2).sum().to(device)
    if sharded and dist.is_initialized():
        dist.all_reduce(sq)
    return sq.sqrt()
