import atexit
import os
import shutil
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
# A fresh compile cache per session: a stale on-disk graph must never stand in for today's ops. It goes
# when the session ends, so runs do not pile caches up in the temporary directory.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="chronipatch-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects by marker
def pytest_collection_modifyitems(config, items):
    if _CUDA:
        # The tests of the Triton kernels themselves run them natively here: GPU tests, which ``-m gpu`` runs.
        from helpers import NEEDS_KERNELS

        for item in items:
            if any(m.kwargs.get("reason") == NEEDS_KERNELS for m in item.iter_markers("skipif")):
                item.add_marker(pytest.mark.gpu)
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls of the public ops (``chronipatch.ops.*``) from here on, by name.

    On CPU the ops run the torch reference, so a patched model's outputs equal stock's: these counts are
    what shows that a model actually runs (or, reverted, no longer runs) the fused ops."""
    from collections import Counter

    from chronipatch import ops

    counts = Counter()
    names = ("rms_norm", "rms_norm_linear", "add_rms_norm_linear", "swiglu", "swiglu_linear", "rope")
    # Ops that run others' registered ops (or, eager CUDA, their kernels) count as those too.
    runs = {
        "add_rms_norm_linear": ("rms_norm_linear",),
        "rms_norm_linear_rope": ("rms_norm_linear", "rope"),
        "add_rms_norm_swiglu": ("add_rms_norm_linear", "rms_norm_linear", "swiglu_linear"),
    }
    for name in (*names, *list(runs)[1:], "linear_cross_entropy"):
        real = getattr(ops, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            for other in runs.get(_name, ()):
                counts[other] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, counted)
    return counts


@pytest.fixture
def cpu_prefetch(monkeypatch):
    """``_labels._start`` with CPU stand-ins for pinned memory and the CUDA event, so a CPU run reads every
    line the GPU runs; the streams the event was recorded on are listed in ``.recorded``."""
    recorded = []

    class Event:
        def record(self, stream):
            recorded.append(stream)

        def synchronize(self):
            pass

    real_empty = torch.empty
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: ("stream of", device))
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: real_empty(*a, **k))
    from chronipatch.ops import _labels

    def start(*args):
        return _labels._start(*args)

    start.recorded = recorded  # on this wrapper: nothing is left on the module's function
    return start
