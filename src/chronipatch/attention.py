"""Padding-free (varlen) causal attention registered as the transformers attention implementation ``NAME``.

After ``register()``, ``model.set_attn_implementation(NAME)`` makes every HF attention call go through
``varlen_attention_forward``. Packed rows (``cu_seq_lens_*`` from ``PackingCollator``, or ``position_ids``
restarting per document) run as one varlen kernel call on CUDA fp16/bf16 (``torch.nn.attention.varlen``) and
never attend across documents; padded batches and KV-cache decoding fall back to SDPA with an explicit mask.
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask, sdpa_mask

from ._reference_attention import reference_attention
from .masked_sdpa import masked_sdpa
from .ops._utils import autocast_dtype, autocast_like_linear, eager_cuda, last_dense, memoized

__all__ = ["NAME", "register", "unregister", "varlen_attention_forward"]

NAME = "chronipatch_varlen"

try:  # torch >= 2.10; the keywords changed between releases, so read them once here (not under compile)
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_PARAMS = frozenset(inspect.signature(_varlen_attn).parameters)
except ImportError:  # pragma: no cover - older torch: the SDPA reference path serves every call
    _varlen_attn, _VARLEN_PARAMS = None, frozenset()

_OUR_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def register() -> None:
    """Register ``NAME`` with transformers' attention and mask interfaces (idempotent); the mask function is
    ``varlen_mask``."""
    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, varlen_mask)


class Registered:
    """Kept by a model that selected ``NAME``: unpickling the model (``torch.load`` in a fresh process, a
    spawned worker) registers ``NAME`` again before its first forward looks it up."""

    def __reduce__(self):
        return (_registered, ())


def _registered() -> Registered:
    register()
    return Registered()


def varlen_mask(*args, **kwargs):
    """The mask for ``NAME``. Queries as many as keys (no cache, or an empty dynamic one): transformers'
    ``flash_attention_mask``, None (no padding) or the 2-D ``[B, S_k]`` bool padding mask, which the packed
    and padded paths read. Fewer queries than keys (a KV cache): the mask SDPA gets, as the attention then
    runs SDPA; only it knows which slots of a static cache hold no key yet."""
    q = kwargs.get("q_length")
    if q is None and isinstance(kwargs.get("cache_position"), torch.Tensor):  # transformers < 5.24
        q = kwargs["cache_position"].shape[0]
    if not args and q is not None and kwargs.get("kv_length", q) != q:
        return sdpa_mask(**kwargs)
    if torch.compiler.is_compiling():
        # flash_attention_mask drops a mask without padding by ``mask.all()``, a data-dependent branch that
        # breaks the graph; the graph keeps the mask, and the attention makes that choice in the graph.
        given = dict(zip(_FLASH_MASK_ARGS, args)) | kwargs
        mask = given.get("attention_mask")
        return None if mask is None else mask[:, -given["kv_length"] :]
    return flash_attention_mask(*args, **kwargs)


_FLASH_MASK_ARGS = (
    "batch_size",
    "q_length",
    "kv_length",
    "q_offset",
    "kv_offset",
    "mask_function",
    "attention_mask",
)


def unregister() -> None:
    """Remove ``NAME`` from both interfaces (``register`` writes their class-level ``_global_mapping``)."""
    ours = ((AttentionInterface, varlen_attention_forward), (AttentionMaskInterface, varlen_mask))
    for interface, fn in ours:
        if interface._global_mapping.get(NAME) is fn:
            interface._global_mapping.pop(NAME, None)


def _check_cu(cu: torch.Tensor, n: int, max_len: int, name: str) -> None:
    """Validate a cu_seq_lens tensor; value checks: one small sync per forward, skipped under compile."""
    if not isinstance(cu, torch.Tensor) or cu.ndim != 1 or cu.numel() < 2 or cu.is_floating_point():
        raise ValueError(f"{name} must be a 1-D integer tensor [num_docs + 1], got {cu!r:.80}")
    if torch.compiler.is_compiling() or cu.device.type == "meta":
        return

    def stats():
        lens = cu.diff()
        return torch.stack([cu[0], cu[-1], lens.min(), lens.max()]).tolist()

    first, last, shortest, longest = memoized(cu, (n, max_len), stats)
    if first != 0 or last != n:
        raise ValueError(f"{name} must run from 0 to the token count {n}, got {first} .. {last}")
    if shortest < 0 or longest > max_len:
        raise ValueError(f"{name} lengths must lie in [0, max_length={max_len}], got {shortest} .. {longest}")


def _packed_args(kwargs: dict, batch: int, t_q: int, t_k: int):
    """(cu_q, cu_k, max_q, max_k) from the packing kwargs, validated."""
    if batch != 1:
        raise ValueError(
            f"cu_seq_lens_q needs the padding-free layout with batch size 1, got batch size {batch}"
        )
    cu_q, max_q = kwargs["cu_seq_lens_q"], kwargs.get("max_length_q")
    cu_k, max_k = kwargs.get("cu_seq_lens_k"), kwargs.get("max_length_k")
    if cu_k is None:
        cu_k, max_k = cu_q, max_q if max_k is None else max_k
    elif cu_k.shape != cu_q.shape:
        raise ValueError(f"cu_seq_lens_q/k differ in document count: {cu_q.shape} vs {cu_k.shape}")
    for name, value in (("max_length_q", max_q), ("max_length_k", max_k)):
        if isinstance(value, bool) or not isinstance(value, int):
            # A tensor would need .item(), a host sync per layer and a graph break under compile.
            raise ValueError(
                f"{name} must be a Python int alongside cu_seq_lens_*, got {type(value).__name__}"
            )
    _check_cu(cu_q, t_q, max_q, "cu_seq_lens_q")
    _check_cu(cu_k, t_k, max_k, "cu_seq_lens_k")
    return cu_q, cu_k, max_q, max_k


def _cu_from_positions(position_ids: torch.Tensor):
    """(cu_seq_lens int32, max_len) of the flattened rows; a new document starts wherever positions do not
    step by one, and at every row start. Data-dependent size: one host sync per forward (eager only)."""
    pos = position_ids.reshape(-1)
    start = torch.ones_like(pos, dtype=torch.bool)
    start[1:] = pos[1:] != pos[:-1] + 1
    start[:: position_ids.shape[-1]] = True
    edges = torch.cat([start.nonzero().flatten(), pos.new_tensor([pos.numel()])])
    return edges.to(torch.int32), int(edges.diff().max())


def _doc_ids(cu: torch.Tensor, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Document index and position inside it of each of n tokens; searchsorted keeps it graph-safe."""
    t = torch.arange(n, device=device)
    doc = torch.searchsorted(cu.to(device=device, dtype=torch.long), t, right=True) - 1
    return doc, t - cu.to(device=device, dtype=torch.long)[doc]


class _FlashVarlen(torch.autograd.Function):
    """The flash kernels behind ``varlen_attn``, called straight for eager CUDA calls (``eager_cuda``).

    ``varlen_attn``'s custom-op dispatch costs about 0.3 ms of host time per call in torch 2.11, paid twice
    per layer under gradient checkpointing and once more in the backward; and the kernels take k/v with fewer
    heads (GQA) as they are, where torch 2.11's ``varlen_attn`` wants them repeated. The arguments mirror
    ``varlen_attn``'s (causal: window ``(left, 0)``, ``is_causal`` when ``left == -1``; no dropout).
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale, left):
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, left == -1, False,
            scale=scale, window_size_left=left, window_size_right=0,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, scale, left)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, scale, left = ctx.args
        rng = torch.zeros(2, dtype=torch.uint64, device=q.device)  # no dropout: as varlen_attn passes it
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, left == -1, rng,
            torch.empty(0, device=q.device), scale=scale, window_size_left=left, window_size_right=0,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None, None


def _varlen(q, k, v, cu_q, cu_k, max_q, max_k, scaling, sliding_window):
    """One varlen kernel call over the flattened tokens; returns [B, T, Hq, D]."""
    b, hq, t, d = q.shape
    hk = k.shape[1]
    q3 = q.transpose(1, 2).reshape(b * t, hq, d)
    k3 = k.transpose(1, 2).reshape(-1, hk, d)
    v3 = v.transpose(1, 2).reshape(-1, hk, d)
    cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    left = -1 if sliding_window is None else sliding_window - 1
    if "window_size" in _VARLEN_PARAMS and eager_cuda(q3, k3, v3):
        scale = d**-0.5 if scaling is None else scaling
        # The flash kernels read rows by stride but need a unit stride along the head dim.
        q3, k3, v3 = last_dense(q3), last_dense(k3), last_dense(v3)
        out = _FlashVarlen.apply(q3, k3, v3, cu_q, cu_k, max_q, max_k, scale, left)
        return out.view(b, t, hq, d)
    kw = {"scale": scaling}
    if "window_size" in _VARLEN_PARAMS:
        kw["window_size"] = (left, 0)
    elif sliding_window is None:  # torch 2.10: causal flag only, no windows
        kw["is_causal"] = True
    else:
        raise ValueError("sliding_window needs a torch whose varlen_attn takes window_size (>= 2.11)")
    if hq != hk and "enable_gqa" in _VARLEN_PARAMS:
        kw["enable_gqa"] = True
    elif hq != hk:
        k3, v3 = k3.repeat_interleave(hq // hk, dim=1), v3.repeat_interleave(hq // hk, dim=1)
    out = _varlen_attn(q3, k3, v3, cu_q, cu_k, max_q, max_k, **kw)
    return out.view(b, t, hq, d)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention, q ``[B, Hq, Tq, D]``, k/v ``[B, Hk, Tk, D]`` -> (``[B, Tq, Hq, D]``, None).

    1. ``cu_seq_lens_q/k`` + Python-int ``max_length_q/k`` (B must be 1): block-diagonal causal per document.
    2. No mask, no cache, 2-D ``position_ids``: documents start wherever positions do not step by one (as HF's
       sdpa mask does); on the varlen path this costs one host sync per forward to size ``cu_seq_lens``.
    3. No mask, no cache, no ``position_ids``: each row is one causal sequence.
    4. A 2-D padding mask (no cache): transformers' SDPA with an explicit 4-D bool mask (causal, AND padding,
       AND window).
    5. A KV cache (Tq != Tk): transformers' SDPA with the mask built for it (``varlen_mask``), or none where
       SDPA's own causal flag serves, as stock SDPA runs it (a static cache's empty slots masked out).

    Cases 1-3 use ``torch.nn.attention.varlen.varlen_attn`` on CUDA fp16/bf16 and SDPA with an explicit
    block-causal mask otherwise. ``sliding_window=w`` keeps keys with ``kv > q - w`` (HF's
    ``sliding_window_overlay``), i.e. varlen ``window_size=(w - 1, 0)``.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{NAME} does not support softcap")
    if kwargs.get("output_attentions") and not torch.compiler.is_compiling():  # as stock SDPA: no weights
        warnings.warn(f"{NAME} returns no attention weights (output_attentions=True)", stacklevel=2)
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{NAME}: {name} must be a floating [B, H, T, D] tensor, got {got}")
    # As SDPA under autocast: q, k, v in its dtype, fp64 kept (HF RoPE leaves q/k in fp32 beside a bf16 v).
    query, key, value = autocast_like_linear(autocast_dtype(query), query, key, value)
    if not query.dtype == key.dtype == value.dtype:
        raise ValueError(
            f"{NAME}: query, key and value must have the same dtype, got "
            f"{query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not kwargs.get("is_causal", getattr(module, "is_causal", True)):
        raise ValueError(f"{NAME} implements causal attention only")
    b, _, t_q, _ = query.shape
    t_k = key.shape[2]
    packed = kwargs.get("cu_seq_lens_q") is not None
    if dropout > 0:  # on every path, whatever the mask: the packed kernels have none
        raise ValueError(f"{NAME} has no attention dropout; got dropout={dropout} (set attention_dropout=0)")
    in_graph = torch.compiler.is_compiling() and isinstance(attention_mask, torch.Tensor)
    if in_graph and attention_mask.ndim == 2 and packed and attention_mask.all():
        # Eager, ``varlen_mask`` drops a mask without padding; compiled, this test breaks the graph instead.
        attention_mask = None
    if attention_mask is not None and packed:
        raise ValueError(
            "cu_seq_lens_q (padding-free packing) cannot be combined with a padding attention_mask"
        )
    given = pos = kwargs.get("position_ids")
    by_positions = not packed and isinstance(pos, torch.Tensor) and pos.ndim == 2 and pos.shape[-1] == t_q
    if by_positions:
        pos = pos.expand(b, -1)
    if not packed and (attention_mask is not None or t_q != t_k):
        if attention_mask is None or attention_mask.ndim == 4:  # a cache: SDPA's mask (``varlen_mask``)
            mask = attention_mask
        else:
            # Once per forward (every layer shares the padding mask), and one 4-D mask for all of them.
            key_ = ("decode", b, t_q, t_k, sliding_window, query.device)
            decode = lambda: _decode_mask(attention_mask, b, t_q, t_k, sliding_window, query.device)
            mask = memoized(attention_mask, key_, decode)
            if in_graph and t_q == t_k and by_positions:
                # A mask without padding is one eager drops (``varlen_mask``): its rows then split into
                # documents where positions do not step by one (case 2), decided in the graph.
                mask = mask & (_same_document(pos) | ~attention_mask.all())[:, None]
        return masked_sdpa(
            module,
            query,
            key,
            value,
            mask,
            mask_owner=attention_mask,  # what a layer's recompute gets again (the 4-D mask may be rebuilt)
            dropout=dropout,
            scaling=scaling,
            **{k: v for k, v in kwargs.items() if k not in _OUR_KWARGS},
        )
    fast = _varlen_attn is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
    if fast:
        if packed:
            cu_q, cu_k, max_q, max_k = _packed_args(kwargs, b, t_q, t_k)
        elif by_positions:
            # Once per forward: every layer gets the same position_ids, so one host sync sizes cu_seq_lens.
            cu_q, max_q = memoized(given, (b,), lambda: _cu_from_positions(pos))  # given: not a new view
            cu_k, max_k = cu_q, max_q
        else:
            cu_q = torch.arange(0, b * t_q + 1, t_q, device=query.device, dtype=torch.int32)
            cu_k, max_q, max_k = cu_q, t_q, t_k
        return _varlen(query, key, value, cu_q, cu_k, max_q, max_k, scaling, sliding_window), None

    # Reference mask [B or 1, 1, Tq, Tk]: same document, causal aligned to each document's last query.
    device = query.device
    if packed:
        cu_q, cu_k, _, _ = _packed_args(kwargs, b, t_q, t_k)
        doc_q, i_q = _doc_ids(cu_q, t_q, device)
        doc_k, i_k = _doc_ids(cu_k, t_k, device)
        offset = (cu_k.diff() - cu_q.diff()).to(device=device, dtype=torch.long)[doc_q]
        delta = (i_q + offset)[:, None] - i_k[None, :]
        mask = (doc_q[:, None] == doc_k[None, :]) & (delta >= 0)
    else:
        idx = torch.arange(t_q, device=device)
        delta = idx[:, None] - idx[None, :]
        mask = delta >= 0
        if by_positions:
            mask = mask & _same_document(pos)
    if sliding_window is not None:
        mask = mask & (delta < sliding_window)
    mask = mask.view(-1, 1, t_q, t_k) if mask.ndim == 3 else mask[None, None]
    return reference_attention(query, key, value, mask, scaling), None


def _same_document(pos: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` position_ids -> ``[B, T, T]`` bool: both tokens in one document, a document starting
    wherever positions do not step by one."""
    # Each token against the one before it, rolled (no slices of T - 1, which would guard T >= 3 in a dynamic
    # graph); the first token's flag shifts every count alike, which the comparison below ignores.
    doc = (pos != pos.roll(1, -1) + 1).cumsum(-1)
    return doc[:, :, None] == doc[:, None, :]


def _decode_mask(padding, b, t_q, t_k, sliding_window, device):
    """4-D bool mask for padded batches / KV caches: query i sits at key index L - Tq + i, L being the padding
    mask's length (== Tk, except for a static cache whose unused tail the mask leaves out)."""
    if padding is None:
        padding = torch.ones(b, t_k, dtype=torch.bool, device=device)
    padding = padding.to(device=device, dtype=torch.bool)
    length = padding.shape[1]
    if length < t_k:
        padding = F.pad(padding, (0, t_k - length), value=False)
    q_idx = torch.arange(t_q, device=device)[:, None] + (length - t_q)
    delta = q_idx - torch.arange(t_k, device=device)[None, :]
    mask = delta >= 0
    if sliding_window is not None:
        mask = mask & (delta < sliding_window)
    return mask[None, None] & padding[:, None, None, :]
