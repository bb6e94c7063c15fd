"""chronipatch: fused Triton kernels for HuggingFace causal LMs that keep torch.compile whole."""

from . import ops
from .patch import PatchReport, apply, is_patched, revert

__version__ = "0.1.0"

__all__ = ["PatchReport", "__version__", "apply", "is_patched", "ops", "revert"]

# Imported on first use, so `import chronipatch` does not load TRL or transformers' Trainer.
_SUBMODULES = ("attention", "loraplus", "packing", "trl")


def __getattr__(name: str):
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
