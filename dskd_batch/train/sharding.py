"""`--parallel fsdp`: PyTorch's FSDP2 (``fully_shard``) over the student and projectors.

Each decoder layer of the student is its own shard group, the rest (embeddings, head, final norm,
projectors) the root's; parameters become DTensors sharded over the processes (gloo on CPU, NCCL
on GPUs). Gradients are reduce-scattered and averaged, as DDP averages them, so the training
loop's normalisation holds unchanged. Checkpoints and the exported student hold full
(unsharded) tensors in the same files as a one-process run: every process takes part in
gathering them and the first writes them; a resume loads them back into the shards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def fully_shard_module(module: nn.Module, device: torch.device, world: int) -> nn.Module:
    """Shard ``module`` (a DistillModule): each decoder layer of its student, then the root."""
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.5: FSDP2 before it became public
        from torch.distributed._composable.fsdp import fully_shard  # type: ignore[no-redef]

    from .student import _layer_list

    mesh = init_device_mesh(device.type, (world,))
    _, _, layers = _layer_list(module.student)  # type: ignore[attr-defined]
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(module: nn.Module, every_process: bool = False) -> dict[str, torch.Tensor]:
    """Full tensors of every parameter and buffer (a collective: every process calls it): on the
    CPU of the first process (the others get an empty dict), or with ``every_process`` on each
    process's own device."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(cpu_offload=not every_process))


def load_full_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state, options=_options(strict=False))


def full_optim_state(module: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, opt, options=_options(cpu_offload=True))


def load_full_optim_state(module: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, opt, state, options=_options())


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (e.g. the global gradient norm), a plain tensor as it is."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def gather_student(module: nn.Module, into: nn.Module) -> None:
    """Copy a sharded DistillModule's student, gathered whole, into the unsharded model ``into`` on
    every process (a collective: every process calls it at the same point)."""
    student, _ = split_state(full_state(module, every_process=True))
    into.load_state_dict(student, strict=False)


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A DistillModule's full state -> (student state, projector state), prefixes removed."""
    student = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    proj = {k[len("projectors."):]: v for k, v in state.items() if k.startswith("projectors.")}
    return student, proj
