"""The lm_head's weight as the fused loss reads it, bypassing ``head.__call__``: gathered by FSDP2 where the
head is its own unit (and resharded where no backward follows), refused under unmerged adapters."""

from __future__ import annotations

import sys

import torch

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed: nothing can be sharded
    FSDPModule = DTensor = ()


def head_weight(head: torch.nn.Module) -> torch.Tensor:
    """The full lm_head weight for a loss that bypasses ``head.__call__``.

    Under FSDP2 a head that is its own ``fully_shard`` unit is only gathered by its own forward, which
    the fused loss never runs: ``unshard()`` it through FSDP, whose post-backward hook then
    reduce-scatters the gradient as for a normal call (``DTensor.full_tensor()`` would not).
    """
    check_head_adapters(head)
    if isinstance(head, FSDPModule):
        head.unshard()
    weight = head.weight
    if isinstance(weight, DTensor):
        raise ValueError(
            "chronipatch: lm_head.weight is a sharded DTensor outside an FSDP2 unit; the fused loss needs "
            "the whole head (fully_shard the head or the model root, or apply(model, fused_loss=False))"
        )
    return weight


def peft_types(module: str, *names: str) -> tuple[type, ...]:
    """peft's classes ``names`` of ``module``, or none: looked up where peft is already imported, since a
    model holds peft's layers only once whoever wrapped it imported peft (``import chronipatch`` stays
    light)."""
    found = sys.modules.get(module)
    return tuple(getattr(found, n) for n in names if hasattr(found, n)) if found is not None else ()


def tuner_layer(head: torch.nn.Module) -> bool:
    """Whether ``head`` is a peft tuner layer (LoRA, trainable tokens, ...)."""
    return isinstance(head, peft_types("peft.tuners.tuners_utils", "BaseTunerLayer"))


def weight_wrapper(head: torch.nn.Module) -> bool:
    """Whether ``head`` is a peft wrapper whose ``weight`` is the one its call multiplies by (the active copy
    of ``modules_to_save``, the merged trainable tokens)."""
    return isinstance(head, peft_types("peft.utils.other", "ModulesToSaveWrapper", "TrainableTokensWrapper"))


def active_adapters(head: torch.nn.Module) -> bool:
    """Whether ``head`` is a peft tuner layer whose adapters change its output (merged or disabled ones
    change nothing)."""
    return tuner_layer(head) and not head.merged and not head.disable_adapters


def check_head_adapters(head: torch.nn.Module) -> None:
    """Refuse a peft tuner layer (LoRA, ...) as the head while its adapters change its output: a loss that
    reads ``head.weight`` gets only the base weight then."""
    if active_adapters(head):
        raise ValueError(
            "chronipatch: lm_head carries unmerged LoRA adapters; the fused loss reads the head's weight and "
            "would leave them untrained. Leave lm_head out of the LoRA target_modules, or apply(model, "
            "fused_loss=False)"
        )


def reshard_if_idle(head: torch.nn.Module, loss: torch.Tensor | None = None) -> None:
    """After the fused loss read a head unsharded by ``head_weight``: where no backward will run through the
    loss, no post-backward hook will reshard the head, so reshard it now. Where one will, the loss keeps the
    gathered weight for it; a call of the head in between (a second forward, logits) reshards it and frees
    that storage, so the backward gathers the head again first (into the same storage)."""
    if not isinstance(head, FSDPModule):
        return
    if loss is None or not loss.requires_grad:
        head.reshard()
    else:
        loss.register_hook(lambda grad: head.unshard())
