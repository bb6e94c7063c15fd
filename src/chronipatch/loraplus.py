"""LoRA+ optimizer parameter groups (Hayou et al. 2024, arXiv:2402.12354).

LoRA+ trains each adapter's ``B`` matrix at ``lr * ratio`` (ratio ≈ 16) and ``A`` at ``lr``, which fixes
the inefficient feature learning of plain LoRA at width. Grouping follows
``peft.optimizers.create_loraplus_optimizer``, except that biases and other 1-D parameters outside
``lora_B`` (norm weights, DoRA magnitudes) train at ``lr`` without weight decay rather than at ``lr * ratio``.

:func:`install` hands the optimizer to a ``transformers.Trainer`` as an optimizer factory, so the groups are
built inside ``Trainer.create_optimizer`` — before a resumed checkpoint's optimizer state is loaded into them.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["LoraPlusFactory", "group_learning_rates", "has_lora", "install", "loraplus_param_groups"]

_B_KEYS = frozenset({"lora_B", "lora_embedding_B"})
_EMBEDDING_KEYS = frozenset({"lora_embedding_A", "lora_embedding_B"})


def _parts(name: str) -> set[str]:
    return set(name.split("."))


def has_lora(model: nn.Module) -> bool:
    """True if ``model`` holds a LoRA adapter (a ``lora_B`` or ``lora_embedding_B`` parameter)."""
    return any(_parts(name) & _B_KEYS for name, _ in model.named_parameters())


def _group_of(name: str, param: torch.Tensor) -> str:
    parts = _parts(name)
    if parts & _EMBEDDING_KEYS:
        return "embedding"
    if "lora_B" in parts:
        # lora_B's bias (peft ``lora_bias=True``) is part of the B update, so it keeps B's rate.
        return "lora_B_no_decay" if param.ndim <= 1 else "lora_B"
    if "lora_A" in parts:
        return "lora_A"
    # Decaying a norm weight (or DoRA magnitude) pulls it toward 0, not toward its identity value of 1.
    if param.ndim <= 1 or name.endswith("bias"):
        return "no_decay"
    return "other"


def check_settings(
    ratio, lr_embedding, names=("ratio", "lr_embedding"), where="chronipatch.loraplus"
) -> None:
    """LoRA+'s ratio (> 0: B's rate over A's) and the embedding adapters' rate (>= 0) as finite reals; a
    negative, nan or string one would train B uphill, fill it with nan or fail inside ``train()``."""
    for name, value, strict in ((names[0], ratio, True), (names[1], lr_embedding, False)):
        real = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        if not real or value < 0 or (value == 0 and strict):
            least = "> 0" if strict else ">= 0"
            raise ValueError(f"{where}: {name} must be a finite real number {least}, got {value!r:.40}")


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    ratio: float = 16.0,
    lr_embedding: float = 1e-6,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Named optimizer groups for LoRA+; each trainable parameter lands in exactly one.

    ``lora_A``: (lr, wd); ``lora_B``: (lr·ratio, wd); ``lora_B_no_decay`` (lora_B biases): (lr·ratio, 0);
    ``embedding`` (``lora_embedding_A/B``): (lr_embedding, wd); ``other``: (lr, wd); ``no_decay`` (biases
    and 1-D weights): (lr, 0). Frozen parameters are skipped and empty groups dropped. The ``name`` key is
    kept by torch optimizers through ``state_dict``/``load_state_dict``.

    Raises ``ValueError`` if the model carries no LoRA adapter.
    """
    check_settings(ratio, lr_embedding)
    if not has_lora(model):
        raise ValueError(
            "LoRA+ needs a LoRA model (no parameter named lora_B / lora_embedding_B found); "
            "wrap the model with peft first or use a plain optimizer."
        )
    settings = {
        "lora_A": (lr, weight_decay),
        "lora_B": (lr * ratio, weight_decay),
        "lora_B_no_decay": (lr * ratio, 0.0),
        "embedding": (lr_embedding, weight_decay),
        "other": (lr, weight_decay),
        "no_decay": (lr, 0.0),
    }
    params: dict[str, list[torch.Tensor]] = {key: [] for key in settings}
    for name, param in model.named_parameters():
        if param.requires_grad:
            params[_group_of(name, param)].append(param)
    return [
        {"name": key, "params": params[key], "lr": group_lr, "weight_decay": wd}
        for key, (group_lr, wd) in settings.items()
        if params[key]
    ]


class LoraPlusFactory:
    """Builds ``optimizer_cls(loraplus_param_groups(model, lr, ...), **optimizer_kwargs)``.

    Matches transformers' optimizer-factory protocol: ``Trainer.create_optimizer`` sees a first element
    of ``optimizer_cls_and_kwargs`` that is not an ``Optimizer`` subclass and runs
    ``factory_cls()(model, **kwargs)`` — no arguments at construction, and ``args.learning_rate`` is not
    injected, so ``kwargs`` must carry ``lr``. Bind the LoRA+ settings with ``functools.partial``.
    """

    def __init__(
        self,
        ratio: float = 16.0,
        lr_embedding: float = 1e-6,
        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    ) -> None:
        check_settings(ratio, lr_embedding)
        self.ratio = ratio
        self.lr_embedding = lr_embedding
        self.optimizer_cls = optimizer_cls

    def __call__(
        self, model: nn.Module, *, lr: float, weight_decay: float = 0.0, **optimizer_kwargs: Any
    ) -> torch.optim.Optimizer:
        groups = loraplus_param_groups(model, lr, self.ratio, self.lr_embedding, weight_decay)
        return self.optimizer_cls(groups, lr=lr, **optimizer_kwargs)


def _is_loraplus(factory: Any) -> bool:
    return isinstance(factory, functools.partial) and factory.func is LoraPlusFactory


def install(
    trainer: Any,
    ratio: float = 16.0,
    lr_embedding: float = 1e-6,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
) -> bool:
    """Make ``trainer`` build a LoRA+ optimizer in ``create_optimizer``; False (no change) without LoRA.

    Takes lr, weight decay and the Adam betas/eps from ``trainer.args`` as they are when the optimizer is
    built; this replaces ``args.optim``.
    """
    check_settings(ratio, lr_embedding)
    if not has_lora(trainer.model):  # full fine-tuning: the trainer's optimizer, given or not, stays
        return False
    if trainer.optimizer is not None:
        raise RuntimeError(
            "trainer already has an optimizer (passed via `optimizers=`, or built by an earlier train()); it "
            "would silently win over LoRA+. Pass optimizers=(None, scheduler), integrate before training, or "
            "skip LoRA+ (loraplus_ratio=None)."
        )
    current = getattr(trainer, "optimizer_cls_and_kwargs", None)
    if current is not None and not _is_loraplus(current[0]):
        raise RuntimeError("trainer.optimizer_cls_and_kwargs is already set; LoRA+ would override it.")
    factory = functools.partial(
        LoraPlusFactory, ratio=ratio, lr_embedding=lr_embedding, optimizer_cls=optimizer_cls
    )
    adam = issubclass(optimizer_cls, (torch.optim.Adam, torch.optim.AdamW))
    trainer.optimizer_cls_and_kwargs = (factory, _ArgsAtBuild(trainer, adam))
    return True


class _ArgsAtBuild(Mapping):
    """The optimizer's lr and weight decay (Adam's betas and eps too) as ``trainer.args`` holds them when
    ``Trainer.create_optimizer`` unpacks this, not when :func:`install` ran: a hyperparameter search, or a
    user, may set them in between."""

    def __init__(self, trainer: Any, adam: bool) -> None:
        self._trainer, self._adam = trainer, adam

    def _values(self) -> dict[str, Any]:
        args = self._trainer.args
        values = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
        if self._adam:
            values.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        return values

    def __getitem__(self, key: str) -> Any:
        return self._values()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values())

    def __len__(self) -> int:
        return len(self._values())


def group_learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current learning rate per param group, keyed ``lr/<name>`` (``lr/group<i>`` for unnamed groups)."""
    return {
        f"lr/{group.get('name', f'group{i}')}": float(group["lr"])
        for i, group in enumerate(optimizer.param_groups)
    }
