"""chronipatch: fused Triton kernels for HuggingFace causal LMs that keep torch.compile whole."""

try:  # every op module defines its kernels at import, CPU runs included (the reference path needs no GPU)
    import triton  # noqa: F401
except ImportError as e:  # triton ships for Linux only
    raise ImportError("chronipatch needs triton, which installs on Linux: pip install triton") from e

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
