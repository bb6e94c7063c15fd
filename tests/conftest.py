import os
import tempfile

import pytest

# Without a GPU the Triton kernels are tested through the interpreter; it must be chosen before
# triton.jit decorates them, i.e. before chronipatch is imported.
try:
    import torch

    _CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _CUDA = False
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A fresh compile cache per session: a stale on-disk graph must never stand in for today's ops.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="chronipatch-inductor-"))


def pytest_collection_modifyitems(config, items):
    if _CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
