"""Fused ops, registered as ``chronipatch::`` torch.library ops: Triton on CUDA, torch elsewhere."""

from .linear_cross_entropy import TokenStats, linear_cross_entropy
from .rms_norm import rms_norm
from .rope import rope
from .swiglu import swiglu

__all__ = ["TokenStats", "linear_cross_entropy", "rms_norm", "rope", "swiglu"]
