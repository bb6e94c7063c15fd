"""Which HF classes chronipatch swaps, and with what: one row per swap, one entry per family.
A new family that shares these forwards is a class name added to each row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn
from transformers import activations

from . import causal_lm, layers

FAMILIES = ("Llama", "Qwen2", "Qwen3", "Mistral")


@dataclass(frozen=True)
class Swap:
    switch: str  # the apply() keyword that turns this swap on or off
    op: str  # what the report says the module now runs
    suffix: str  # HF class name = family + suffix
    forward: Callable
    why_not: Callable[[nn.Module], str | None]  # a reason to leave this instance alone, or None

    @property
    def classes(self) -> frozenset[str]:
        return frozenset(f + self.suffix for f in FAMILIES)


def _norm_why_not(m: nn.Module) -> str | None:
    w = getattr(m, "weight", None)
    if w is None or w.dim() != 1 or not hasattr(m, "variance_epsilon"):
        return "no 1-D weight / variance_epsilon"
    return None


# The activations transformers builds for hidden_act "silu" and "swish" (exact types: a subclass may compute
# something else).
_SILU = frozenset({nn.SiLU, getattr(activations, "SiLUActivation", nn.SiLU)})


def _mlp_why_not(m: nn.Module) -> str | None:
    if not all(hasattr(m, p) for p in ("gate_proj", "up_proj", "down_proj")):
        return "no gate_proj/up_proj/down_proj"
    # The module's own activation, which its forward calls, not the config's name for it (either may have
    # been changed after the model was built).
    act = getattr(m, "act_fn", None)
    if not (act is F.silu or (type(act) in _SILU and not any(layers.own_hooks(act)))):
        name = type(act).__name__ if isinstance(act, nn.Module) else repr(act)
        hidden_act = getattr(getattr(m, "config", None), "hidden_act", None)
        return f"act_fn {name} is not SiLU (hidden_act={hidden_act!r}): not SwiGLU"
    return None


def _attention_why_not(m: nn.Module) -> str | None:
    cfg = getattr(m, "config", None)
    if not all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
        return "no q/k/v/o projections"
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) not in (None, 1.0):
        return "partial rotary embedding"
    return None


def _decoder_why_not(m: nn.Module) -> str | None:
    # ``apply`` visits a layer after its children: whether they run our forwards is known here.
    parts = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
    if not all(hasattr(m, p) for p in parts):
        return "no input_layernorm/post_attention_layernorm/self_attn/mlp"
    ours = layers.bound_forward
    if not (
        ours(m.input_layernorm) is layers.rms_norm_forward and ours(m.self_attn) is layers.attention_forward
    ) and not (
        ours(m.post_attention_layernorm) is layers.rms_norm_forward and ours(m.mlp) is layers.mlp_forward
    ):
        return "no RMSNorm of ours before an attention or MLP of ours (rms_norm, rope or swiglu off or left)"
    return None


def _head_why_not(m: nn.Module) -> str | None:
    head = getattr(m, "lm_head", None)
    if type(head) is not nn.Linear:
        return f"lm_head is {type(head).__name__}, not a plain nn.Linear (e.g. an adapter on the head)"
    if head.bias is not None:
        return "lm_head has a bias"
    if not hasattr(m, "model"):
        return "no backbone at .model"
    return None


SWAPS: tuple[Swap, ...] = (
    Swap("rms_norm", "rms_norm", "RMSNorm", layers.rms_norm_forward, _norm_why_not),
    Swap("swiglu", "swiglu", "MLP", layers.mlp_forward, _mlp_why_not),
    Swap("rope", "rope", "Attention", layers.attention_forward, _attention_why_not),
    Swap("norm_recompute", "rms_norm_linear", "DecoderLayer", layers.decoder_layer_forward, _decoder_why_not),
    Swap("fused_loss", "linear_cross_entropy", "ForCausalLM", causal_lm.causal_lm_forward, _head_why_not),
)
OUR_FORWARDS = frozenset(s.forward for s in SWAPS)
