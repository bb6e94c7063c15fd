"""Fused ops, registered as ``chronipatch::`` torch.library ops: Triton on CUDA, torch elsewhere."""

from ._labels import LabelCheck, prefetch_label_check, select_supervised
from .add_rms_norm_swiglu import add_rms_norm_swiglu
from .linear_cross_entropy import TokenStats, linear_cross_entropy
from .rms_norm import rms_norm
from .rms_norm_linear import add_rms_norm_linear, rms_norm_linear
from .rms_norm_linear_rope import rms_norm_linear_rope
from .rope import rope
from .swiglu import swiglu
from .swiglu_linear import swiglu_linear

__all__ = [
    "LabelCheck",
    "TokenStats",
    "add_rms_norm_linear",
    "add_rms_norm_swiglu",
    "linear_cross_entropy",
    "prefetch_label_check",
    "rms_norm",
    "rms_norm_linear",
    "rms_norm_linear_rope",
    "rope",
    "select_supervised",
    "swiglu",
    "swiglu_linear",
]
