"""``apply`` and ``revert``: one walk over ``named_modules()`` driven by ``mapping.SWAPS``.

Swaps are per instance (``module.forward`` in the instance dict), so other models in the process
are untouched, and ``revert`` deletes exactly what ``apply`` added.
"""

from __future__ import annotations

import copy
import functools
from collections import Counter
from dataclasses import dataclass, field

from torch import nn
from transformers import PreTrainedModel

from . import attention as varlen
from .layers import BOUND, bound_forward
from .mapping import FAMILIES, OUR_FORWARDS, SWAPS

_PREV_ATTN = "_chronipatch_prev_attn_implementation"
_OWN_CONFIG, _PREV_CONFIG = "_chronipatch_own_config", "_chronipatch_prev_config"
_SHARED_CONFIG = "_chronipatch_shared_config"  # the config object own_config copied
_REGISTERED = "_chronipatch_varlen_registered"  # registers the varlen attention again on unpickling
FUSED_HEAD = "_chronipatch_fused_head"  # True while chronipatch.trl's fused head is in place


class BoundForward(functools.partial):
    """``forward`` bound to one module instance, as ``types.MethodType`` binds it, but picklable: a bound
    method pickles as ``getattr(module, name)``, which unpickling cannot resolve; a partial pickles its
    function by name and the module by reference (``torch.save(model)`` of a patched model loads)."""

    @property
    def __func__(self):
        return self.func

    @property
    def __self__(self):
        return self.args[0]


@dataclass
class PatchReport:
    """What ``apply`` swapped (path, class, op), and what it left alone and why."""

    model: str
    swapped: list[tuple[str, str, str]] = field(default_factory=list)
    already: list[tuple[str, str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)

    def ops(self) -> Counter:
        return Counter(op for _, _, op in self.swapped + self.already)

    def __str__(self) -> str:
        lines = [
            f"chronipatch on {self.model}: {len(self.swapped)} modules swapped"
            + (f", {len(self.already)} already patched" if self.already else "")
        ]
        by_op = Counter((cls, op) for _, cls, op in self.swapped + self.already)
        lines += [f"  {n:4d} x {cls:<28} -> {op}" for (cls, op), n in sorted(by_op.items())]
        if self.left:
            lines.append("  left alone:")
            lines += [f"    {path or '<root>'} ({cls}): {why}" for path, cls, why in self.left]
        return "\n".join(lines)


def _hf_class(module: nn.Module, by_class: dict) -> str | None:
    """The supported HF class this module is or subclasses (FSDP2's ``FSDP<cls>``, a user's class)."""
    return next((k.__name__ for k in type(module).__mro__ if k.__name__ in by_class), None)


def _own_forward(module: nn.Module, cls: str) -> bool:
    """Whether the module's class overrides the forward of the HF class ``cls`` it subclasses: a user's
    forward is not ours to swap (a wrapper without one, as FSDP2's ``FSDP<cls>``, is)."""
    klass = next(k for k in type(module).__mro__ if k.__name__ == cls)
    return _unwrapped_forward(type(module), klass) is not klass.forward


def _forward_owner(cls: type) -> str:
    """The name of the class whose forward ``cls`` runs, past transformers' checkpointing wrappers."""
    parts = _unwrapped_forward(cls).__qualname__.split(".")
    return parts[-2] if len(parts) > 1 else cls.__name__


def _unwrapped_forward(cls: type, klass: type | None = None):
    """``cls.forward`` less transformers' checkpointing wrappers (down to ``klass.forward`` if given):
    ``GradientCheckpointingLayer`` wraps the forward of every subclass again, FSDP2's ``FSDP<cls>``
    included, and only the outermost checkpoints."""
    forward = cls.forward
    # ``functools.wraps`` copies the name: the wrapper is known by its code's.
    while (klass is None or forward is not klass.forward) and getattr(forward, "__code__", None) is not None:
        if forward.__code__.co_name != "forward_with_checkpointing" or not hasattr(forward, "__wrapped__"):
            break
        forward = forward.__wrapped__
    return forward


def _compiled(model: nn.Module) -> bool:
    return (
        type(model).__name__ == "OptimizedModule" or getattr(model, "_compiled_call_impl", None) is not None
    )


def _hf_root(model: nn.Module) -> PreTrainedModel | None:
    """The outermost HF model, whose config the submodules share (a peft wrapper's base model)."""
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def own_config(model: nn.Module, **changes) -> None:
    """Set config attributes on ``model``'s own copy of its config (models built from one config object share
    it: a change here changes no other model), each old value kept for ``revert``."""
    root = _hf_root(model)
    if root is None:
        raise ValueError(f"chronipatch: no HF model in {type(model).__name__} whose config to set")
    old = root.config
    if getattr(root, _OWN_CONFIG, None) is not old:
        own = copy.deepcopy(old)
        _point_config(model, old, own)
        setattr(root, _OWN_CONFIG, own)
        root.__dict__.setdefault(_SHARED_CONFIG, old)
    prev = root.__dict__.setdefault(_PREV_CONFIG, {})
    for key, value in changes.items():
        prev.setdefault(key, getattr(root.config, key))
        setattr(root.config, key, value)


def _point_config(model: nn.Module, old, new) -> None:
    """Every module of ``model`` that holds the config object ``old`` holds ``new`` instead."""
    for m in model.modules():
        if getattr(m, "config", None) is old:
            m.config = new


def select_varlen(model: nn.Module, report: PatchReport | None = None) -> None:
    """Point the outermost HF model at the varlen attention, on its own copy of the config."""
    root = _hf_root(model)
    if root is None:
        if report is None:
            raise ValueError(f"chronipatch: no HF model in {type(model).__name__} to set the attention on")
        report.left.append(("", type(model).__name__, "no HF model to set the attention implementation on"))
        return
    current = root.config._attn_implementation
    if current != varlen.NAME:
        varlen.register()
        own_config(model)
        root.set_attn_implementation(varlen.NAME)
        setattr(root, _PREV_ATTN, current)
        root.__dict__[_REGISTERED] = varlen.Registered()
    if report is not None:
        report.swapped.append(("", type(root).__name__, f"attention {current} -> {varlen.NAME}"))


def apply(
    model: nn.Module,
    *,
    rms_norm: bool = True,
    swiglu: bool = True,
    rope: bool = True,
    fused_loss: bool = True,
    norm_recompute: bool = True,
    varlen_attention: bool | None = None,
) -> PatchReport:
    """Swap the forwards of supported HF modules inside ``model`` for fused-op versions.

    Works on ``XxxForCausalLM`` / ``XxxModel`` of Llama, Qwen2, Qwen3 and Mistral, also inside a
    peft wrapper. Idempotent. Call it before ``torch.compile``. Keywords turn single swaps off
    (``norm_recompute``: decoder layers run each RMSNorm inside the projections it feeds, which recompute
    its output in the backward); ``varlen_attention=True`` also selects the varlen attention for packed rows
    (``cu_seq_lens_*``), None keeps what an earlier apply chose (off on a fresh model).
    """
    _module(model, "apply")
    if _compiled(model):
        raise ValueError(
            "chronipatch.apply: the model is already compiled; call apply(model) before "
            "torch.compile(model) so the compiled graph contains the fused ops"
        )
    switches = {
        "rms_norm": rms_norm,
        "swiglu": swiglu,
        "rope": rope,
        "fused_loss": fused_loss,
        "norm_recompute": norm_recompute,
    }
    for name, value in {**switches, "varlen_attention": varlen_attention}.items():
        if not isinstance(value, bool) and not (name == "varlen_attention" and value is None):
            allowed = "True, False or None" if name == "varlen_attention" else "True or False"
            raise TypeError(f"chronipatch.apply: {name} must be {allowed}, got {value!r:.60}")
    by_class = {cls: swap for swap in SWAPS for cls in swap.classes}
    found = [(path, m, cls) for path, m in model.named_modules() if (cls := _hf_class(m, by_class))]
    # A switch turned off cannot unpatch what an earlier apply swapped: refuse before changing anything.
    root = _hf_root(model)
    if varlen_attention is False and root is not None and _PREV_ATTN in root.__dict__:
        raise ValueError(
            "chronipatch.apply: the model runs the varlen attention an earlier apply selected; "
            "varlen_attention=False does not undo that: call chronipatch.revert(model) first"
        )
    for path, module, cls in found:
        if not switches[by_class[cls].switch] and bound_forward(module) in OUR_FORWARDS:
            raise ValueError(
                f"chronipatch.apply: {path or '<root>'} ({cls}) was patched by an earlier apply; "
                f"{by_class[cls].switch}=False does not undo that: call chronipatch.revert(model) first"
            )
    report = PatchReport(type(model).__name__)
    # Children before their parents (a decoder layer's swap depends on what its children run); the report
    # keeps the modules' order.
    for path, module, cls in reversed(found):
        swap = by_class[cls]
        if not switches[swap.switch]:
            report.left.append((path, cls, f"{swap.switch}=False"))
            continue
        if bound_forward(module) is swap.forward or wrapped_ours(bound_forward(module)) is swap.forward:
            # Bound by hand without its mark, or under a wrapper a revert kept (accelerate's autocast): marked
            # again, our forward under the wrapper runs ours once more.
            setattr(module, BOUND, swap.forward)  # the layers read the mark
            report.already.append((path, cls, swap.op))
            continue
        if "forward" in module.__dict__:
            report.left.append((path, cls, "forward already replaced by someone else"))
            continue
        if _own_forward(module, cls):
            report.left.append((path, cls, f"{_forward_owner(type(module))} has a forward of its own"))
            continue
        why = swap.why_not(module)
        if why:
            report.left.append((path, cls, why))
            continue
        module.forward = BoundForward(swap.forward, module)
        setattr(module, BOUND, swap.forward)
        report.swapped.append((path, cls, swap.op))
    for entries in (report.swapped, report.already, report.left):
        entries.reverse()
    if varlen_attention and (report.swapped or report.already):
        select_varlen(model, report)
    if not report.swapped and not report.already:
        classes = sorted({cls for _, _, cls in found})
        raise ValueError(
            f"chronipatch.apply: nothing to patch in {type(model).__name__} "
            f"(supported families: {', '.join(FAMILIES)}; supported classes found: {classes or 'none'}"
            + (f"; left alone: {report.left}" if report.left else "")
            + ")"
        )
    return report


def _module(model, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"chronipatch.{fn} expects a torch.nn.Module, got {type(model).__name__}")


def revert(model: nn.Module) -> int:
    """Restore the stock forwards inside ``model``; returns how many modules were restored."""
    _module(model, "revert")
    restored = 0
    for module in model.modules():
        # module.__dict__, not hasattr: peft's wrappers forward attributes from the model inside.
        if _PREV_ATTN in module.__dict__:
            module.set_attn_implementation(module.__dict__.pop(_PREV_ATTN))
        module.__dict__.pop(_REGISTERED, None)
        for key, value in module.__dict__.pop(_PREV_CONFIG, {}).items():
            setattr(module.config, key, value)
        own, shared = module.__dict__.pop(_OWN_CONFIG, None), module.__dict__.pop(_SHARED_CONFIG, None)
        if shared is not None and own == shared:  # nothing else changed on the copy: share the original again
            _point_config(model, own, shared)
        fused_head = module.__dict__.pop(FUSED_HEAD, False)
        if bound_forward(module) in OUR_FORWARDS:
            del module.__dict__["forward"]
            restored += 1
        elif (wrapped := wrapped_ours(bound_forward(module), fused_head)) is not None and (
            wrapped not in OUR_FORWARDS or BOUND in module.__dict__  # not one a revert already counted
        ):
            # A wrapper bound over our forward (accelerate's mixed precision): kept, and our forward under it
            # runs the stock one (TRL's head) once its mark is gone.
            restored += 1
        elif hasattr(bound_forward(module), "_chronipatch_replaces"):  # chronipatch.trl's fused head: TRL's
            module.forward = bound_forward(module)._chronipatch_replaces
            restored += 1
        if BOUND in module.__dict__:
            delattr(module, BOUND)
    return restored


def wrapped_ours(fn, fused_head: bool = False):
    """Our forward (or, with ``fused_head``, chronipatch.trl's) under ``fn``, a chain of ``functools.wraps``
    wrappers; else None."""
    for _ in range(32):
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            return None
        if fn in OUR_FORWARDS or (fused_head and hasattr(fn, "_chronipatch_replaces")):
            return fn
    return None


def is_patched(model: nn.Module) -> bool:
    _module(model, "is_patched")
    ours = lambda m: bound_forward(m) in OUR_FORWARDS
    kept = lambda m: BOUND in m.__dict__ and wrapped_ours(bound_forward(m)) is not None
    return any(ours(m) or kept(m) for m in model.modules())
