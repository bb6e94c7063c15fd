"""Fused ops, registered as ``chronipatch::`` torch.library ops: Triton on CUDA, torch elsewhere."""

from ._labels import LabelCheck, prefetch_label_check
from .linear_cross_entropy import TokenStats, linear_cross_entropy
from .rms_norm import rms_norm
from .rope import rope
from .swiglu import swiglu
from .swiglu_linear import swiglu_linear

__all__ = [
    "LabelCheck",
    "TokenStats",
    "linear_cross_entropy",
    "prefetch_label_check",
    "rms_norm",
    "rope",
    "swiglu",
    "swiglu_linear",
]
