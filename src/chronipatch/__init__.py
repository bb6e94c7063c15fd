"""chronipatch: fused Triton kernels for HuggingFace causal LMs that keep torch.compile whole."""

from . import ops

__version__ = "0.1.0"

__all__ = ["__version__", "ops"]
