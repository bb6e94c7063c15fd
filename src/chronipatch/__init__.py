"""chronipatch: fused Triton kernels for HuggingFace causal LMs that keep torch.compile whole."""

from . import ops
from .patch import PatchReport, apply, is_patched, revert

__version__ = "0.1.0"

__all__ = ["PatchReport", "__version__", "apply", "is_patched", "ops", "revert"]
