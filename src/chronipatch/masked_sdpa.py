"""Masked SDPA (padded batches) as transformers runs it, at a kernel cost that does not grow with new shapes.

With a mask, torch picks cuDNN's attention kernel first on Hopper, and cuDNN builds an execution plan for
every new shape: ~0.1-0.3 s of host time per padded length (forward and backward; H100/H200, torch 2.11).
Padded SFT batches bring a new length nearly every step, so a stock step waited on plans longer than its GPU
work (Qwen2.5-0.5B, 8 rows of up to 2048 tokens: 711 ms of attention per step against 36 ms without cuDNN,
``bench/padded_attention.py``). ``masked_sdpa`` holds the shapes steady instead:

- the length T is padded up to a multiple of ``BUCKET`` (zero q/k/v rows; mask columns False, so no real
  query sees a new key; each new query row sees its own key only, so no row is empty), and the output sliced
  back: the real rows are the same sum over the same unmasked keys;
- a padded shape met for the first time in a forward runs without cuDNN (the memory-efficient kernel, no
  plan); one met again in a later forward runs SDPA's own choice, whose plan is then built once and reused.

Other eager masked calls (a KV cache, float masks, fp32) run with cuDNN left out (``masked_sdpa_kernels``).

Compiled, the graph keeps the kernel SDPA chose at trace time, and with dynamic T one graph sees every
length: cuDNN then planned each new T (H100, 24 layers of 8 rows up to 2048: 144 ms a step against 38
bucketed, ``bench/padded_compile.py``). The padding to a bucket is traced into the graph instead, where the
trace found cuDNN first; the first-forward rule needs the eager flag and stays eager-only.
"""

from __future__ import annotations

import os
import threading
import weakref
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .ops._utils import capability, memoized

__all__ = ["BUCKET", "masked_sdpa", "masked_sdpa_kernels"]

BUCKET = 128
# Padded shape -> the first mask (or owner) it came with, weakly: a shape is "met again" once another forward
# brings it. Gradient checkpointing recomputes a layer with the same mask, so a recompute chooses as its
# forward did.
_first_mask: dict[tuple, weakref.ref] = {}
# Owner -> {shape: without cuDNN}: each owner's choice, kept while it lives, whatever ``_first_mask`` forgets
# between a forward and its recompute (a recompute must run the kernel its forward ran).
_chosen = WeakTensorKeyDictionary()


class _WithoutCudnnSdpa:
    """SDPA's cuDNN flag off while held. The flag is process-wide, as torch's own ``sdpa_kernel`` flags are:
    threads running model replicas (``nn.DataParallel``) share one count, the first holder turns it off and
    the last one out restores what the first found (off stays off)."""

    def __init__(self):
        self._lock, self._depth, self._saved = threading.Lock(), 0, True

    def __enter__(self):
        with self._lock:
            if self._depth == 0:
                self._saved = torch.backends.cuda.cudnn_sdp_enabled()
                torch.backends.cuda.enable_cudnn_sdp(False)
            self._depth += 1
        return self

    def cudnn_enabled(self) -> bool:
        """cuDNN's flag as the caller set it: while held, what the first holder found."""
        with self._lock:
            return self._saved if self._depth else torch.backends.cuda.cudnn_sdp_enabled()

    def __exit__(self, *exc) -> bool:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                torch.backends.cuda.enable_cudnn_sdp(self._saved)
        return False


_WITHOUT_CUDNN = _WithoutCudnnSdpa()


def masked_sdpa_kernels(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor):
    """The context of an eager SDPA call with ``mask`` on CUDA: cuDNN's kernel left out, where the
    memory-efficient one (the other that takes a mask) is enabled. A caller's own kernel choice stands
    (cuDNN alone stays cuDNN). Not while compiling: a compiled graph keeps the kernel SDPA chose when it
    was traced."""
    if mask is None or not query.is_cuda or torch.compiler.is_compiling():
        return nullcontext()
    if not torch.backends.cuda.mem_efficient_sdp_enabled():
        return nullcontext()
    # transformers passes grouped kv heads with a mask only when told to (TRANSFORMERS_SDPA_FORCE_GQA), and
    # the memory-efficient kernel of some torch versions refuses them: SDPA's choice then stands.
    if query.shape[1] != key.shape[1] and os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA") == "1":
        return nullcontext()
    return _WITHOUT_CUDNN


def _prefers_cudnn(device: torch.device) -> bool:
    """Whether SDPA tries cuDNN's kernel first on ``device`` (Hopper, datacenter Blackwell: sm_90, sm_100)."""
    return capability(device.index if device.index is not None else torch.cuda.current_device())[0] in (9, 10)


def _bucketed(mask, query, key) -> bool:
    """A call whose cuDNN plans a new T rebuilds: SDPA would pick cuDNN (``_cudnn_first``) for a
    training-shaped call (T queries, T keys) with a 4-D bool mask."""
    if not _cudnn_first(mask, query, key):
        return False
    t = query.shape[2]
    return mask.dtype == torch.bool and mask.ndim == 4 and mask.shape[-2:] == (t, t) and key.shape[2] == t


def _cudnn_first(mask, query, key) -> bool:
    """Whether SDPA would try cuDNN first for this masked call: CUDA, fp16/bf16, cuDNN enabled by the
    caller, on Hopper or datacenter Blackwell. Eager, where ``masked_sdpa_kernels`` acts; compiled, as the
    trace finds the flags."""
    if query.dtype not in (torch.float16, torch.bfloat16):
        return False
    if torch.compiler.is_compiling():
        return mask is not None and query.is_cuda and _traced_cudnn_first(query.device.index)
    if masked_sdpa_kernels(mask, query, key) is not _WITHOUT_CUDNN:  # no mask or not CUDA
        return False
    # The caller's setting, not one a replica in another thread holds off for its own call.
    return _WITHOUT_CUDNN.cudnn_enabled() and _prefers_cudnn(query.device)


@torch.compiler.assume_constant_result  # dynamo cannot trace the flag read; the graph keeps the trace's
def _traced_cudnn_first(index: int) -> bool:
    return torch.backends.cuda.cudnn_sdp_enabled() and _prefers_cudnn(torch.device("cuda", index))


def _pad_mask(mask: torch.Tensor, pad: int) -> torch.Tensor:
    """``mask`` [.., T, T] -> [.., T + pad, T + pad]: new key columns False, new query row i sees key i."""
    t = mask.shape[-1]
    # An index comparison, not an eye written into a slice: nothing a graph must guard on pad's size.
    i = torch.arange(t + pad, device=mask.device)
    return F.pad(mask, (0, pad, 0, pad)) | ((i[:, None] == i) & (i >= t)[:, None])


def _padded(query, key, value, mask):
    """q, k, v [B, H, T, D] and ``mask`` [.., T, T] with T padded to a multiple of ``BUCKET`` (zero rows;
    ``_pad_mask``), the padded mask built once per forward (every layer shares the mask)."""
    pad = -query.shape[2] % BUCKET
    if not torch.compiler.is_compiling() and not pad:  # a graph pads by 0 too: no guard on T % BUCKET
        return query, key, value, mask
    mask = memoized(mask, ("bucket", pad), lambda: _pad_mask(mask, pad))
    return (*(F.pad(x, (0, 0, 0, pad)) for x in (query, key, value)), mask)


def masked_sdpa(module, query, key, value, attention_mask, *, mask_owner=None, **kwargs):
    """transformers' ``sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)`` ->
    (``[B, T, Hq, D]``, None), its length padded to a multiple of ``BUCKET`` and its kernel chosen as the
    module docstring says where ``_bucketed``; with cuDNN left out for other masked CUDA calls. A forward is
    told by ``mask_owner`` (default: the mask), the tensor its layers and their recomputes all get."""
    if not _bucketed(attention_mask, query, key):
        with masked_sdpa_kernels(attention_mask, query, key):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    t = query.shape[2]
    query, key, value, mask = _padded(query, key, value, attention_mask)
    owner = attention_mask if mask_owner is None else mask_owner
    with _kernel_choice(query, key, mask, owner):
        out, weights = sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    out = out[:, :t]
    # Contiguous, as stock's. A graph copies always: asking whether the slice is contiguous guards on pad.
    in_graph = torch.compiler.is_compiling()
    return (out.clone(memory_format=torch.contiguous_format) if in_graph else out.contiguous()), weights


def _kernel_choice(query, key, mask, owner):
    """Without cuDNN where this padded shape first came with ``owner``; SDPA's choice where another forward
    brought it, and always in a graph (it runs the kernel of its trace)."""
    if torch.compiler.is_compiling():
        return nullcontext()
    shape = (tuple(query.shape), tuple(key.shape), tuple(mask.shape), query.dtype, query.device)
    chosen = _chosen.setdefault(owner, {})
    if shape not in chosen:
        if len(_first_mask) > 256:  # bounded: batch sizes x buckets in practice
            _first_mask.clear()
        chosen[shape] = _first_mask.setdefault(shape, weakref.ref(owner))() is owner
    return _WITHOUT_CUDNN if chosen[shape] else nullcontext()
