"""Cross-entropy of a linear head, ``CE(hidden @ weight.T, labels)``, without the [N, V] logits.

Per row i with logits z = h_i W^T, kept as the GEMM's fp32 accumulator (HF's lm_head rounds it to
the weight dtype first; where logits are large, as at 1e4, one ulp of a bf16 logit decides a whole
softmax row, and the unrounded logit is the nearer to the truth), m_i = max_v z_v and
s_i = sum_v exp(z_v - m_i) (fp32; over vocabulary chunks, or tiles merged at the end):
    loss_i = log s_i - (z_{y_i} - m_i)               (0 where y_i == ignore_index)
    H_i    = log s_i - sum_v softmax(z)_v (z_v - m_i) (entropy, for logging)
    hit_i  = [argmax_v z_v == y_i]                   (token accuracy, for logging)
The row statistics are kept as the pair (m, s), not as lse = m + log s, and the backward forms
softmax = exp(z - m) / s as stock does: one fp32 lse loses the probabilities' precision when
|lse| is large, and z - m keeps both sums free of cancellation.
Backward, with g_i = (softmax(z_i) - onehot(y_i)) * dloss_i rounded to the weight dtype:
    dh = g W,  dW = g^T h
bf16/fp16 inputs run ``_lce_tiles[_bwd]``, fp32 inputs ``_lce_chunks``. The tiles: each kernel computes [BM,
BN] tiles of the logits in registers and folds them at once (row statistics forward; g of one vocabulary
chunk backward, whose dh and dW[chunk] are cuBLAS GEMMs), so fp32 logits never reach memory; the chunks
are Vc fp32 logits from cuBLAS (IEEE fp32 GEMMs, as stock's; their module says how). Both accumulate
dh in fp32 and sum dW over all rows in one GEMM per chunk (fp32 accumulation, as the stock head). Peak
extra memory is one [N, Vc] chunk (of g, or of fp32 logits; 192 MiB), fp32 dh and a copy of h with
ignored rows zeroed, or in the tile forward its per-tile partials (8 bytes per row and tile of BN columns,
20 with token stats; at most ``_lce_tiles.PART_BYTES`` = 128 MiB per launch, rows walked in chunks); the
gradients are exact (no filtering of small probabilities). For fp32 inputs with TF32 off, on GPUs whose
fp64 GEMMs are as fast as their fp32 ones (``_utils.fast_fp64``), both backward GEMMs and the dh sum run
in fp64: chunked fp32 GEMMs sum in another order than stock's single GEMM and can land further from the
truth than it; fp64 sums land nearer. That path also holds fp64 copies of h, dh and half a chunk.

Training in bf16 (a mean or sum loss, a gradient needed) takes ``linear_cross_entropy_with_grad``: the
gradients of the loss come with it, from one pass over row chunks (``_lce_rows``: three GEMMs, where the
forward then the backward above take four; its module says how), and its backward only scales them by the
upstream gradient, in place where the graph is freed after it. It holds dh and dW from the forward to the
backward, and one [R, V] chunk of p (at most 512 MiB).

The ops are opaque ``custom_op``s: a chunk loop stays one node, so the compiler can neither unroll nor
reorder it into a larger memory peak.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from . import reference
from ._labels import (
    LabelCheck,
    check_arguments,
    check_values,
    label_counts_matching,
    mean_divisor,
    prefetch_label_check,
    supervised_positions,
    targets_of,
    unchecked_factor,
)
from ._lce_chunks import chunks_bwd, chunks_fwd
from ._lce_rows import RowsPrep, dw_rows, rows_fwd_bwd, rows_prep, scale_grad
from ._lce_tiles import tiles_fwd
from ._lce_tiles_bwd import tiles_bwd
from ._utils import (
    autocast_dtype,
    autocast_like_linear,
    check_same,
    check_tensors,
    device_of,
    eager_cuda,
    fast_fp64,
    last_use,
    on_gpu,
    once_differentiable,
    tf32_matmuls,
)


def _tiled(hidden: Tensor) -> bool:
    """Whether the loss runs the fused tile kernels (2-byte inputs, whose GEMMs run on tensor cores in the
    kernels); fp32 keeps cuBLAS's IEEE (or fp64) GEMMs and the chunk kernels."""
    return hidden.dtype in (torch.bfloat16, torch.float16)


def lce_fwd_triton(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, token_stats: bool = True
) -> tuple[Tensor, ...]:
    """(loss rows, stats [N, 2] = (m, s), entropy, correct); the last two empty without ``token_stats``."""
    if _tiled(hidden):  # the tiles' merge kernel writes the loss rows
        m, s, e, arg, _, loss = tiles_fwd(hidden, weight, labels, ignore_index, token_stats)
    else:
        m, s, e, arg, zlab = chunks_fwd(hidden, weight, labels, ignore_index, token_stats)
        # The label's logit centred like the sums: 0 when it is the +inf that holds all the probability.
        loss = (torch.log(s) - reference.centred(zlab, m)).clamp_min(0.0)
        loss = torch.where(
            labels != ignore_index, reference.nan_out_of_range(loss, labels, weight.shape[0]), 0.0
        )
    return loss, torch.stack([m, s], -1), *_token_stats(s, e, arg, labels, token_stats)


def _token_stats(s: Tensor, e: Tensor, arg: Tensor, labels: Tensor, token_stats: bool) -> tuple[Tensor, ...]:
    """(entropy, correct) per row from the kernels' sum s, entropy sum e and argmax; empty without them."""
    if not token_stats:
        return s.new_empty(0), s.new_empty(0)
    return torch.log(s) - e / s, (arg == labels).float()


def _wide(hidden: Tensor) -> bool:
    """Whether the backward GEMMs run in fp64: fp32 inputs on a GPU where that costs no time. Not with TF32
    on: the user traded fp32 precision for speed, and stock's GEMMs run in TF32 then, as ours do."""
    return (
        hidden.dtype == torch.float32
        and hidden.is_cuda
        and not tf32_matmuls()
        and fast_fp64(hidden.device.index or 0)
    )


def lce_bwd_triton(
    grad_rows: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, stats: Tensor, ignore_index: int,
    need_dh: bool = True, need_dw: bool = True,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(dh, dw); one that is not needed is skipped (its GEMMs too) and returned empty."""
    n = hidden.shape[0]
    wide = _wide(hidden)
    acc = torch.float64 if wide else torch.float32
    dh = torch.zeros(hidden.shape if need_dh else (0,), dtype=acc, device=hidden.device)
    # Every row of dW is written, chunk by chunk (zeros only when there are no rows to sum).
    dw = (torch.empty_like(weight) if n > 0 else torch.zeros_like(weight)) if need_dw else weight.new_zeros(0)
    if n > 0 and (need_dh or need_dw):
        grad_rows = grad_rows.float().contiguous()
        h_w = dw_rows(hidden, labels, ignore_index) if need_dw else None
        if _tiled(hidden):
            tiles_bwd(grad_rows, hidden, weight, labels, stats, ignore_index, dh, dw, h_w)
        else:
            chunks_bwd(grad_rows, hidden, weight, labels, stats, ignore_index, dh, dw, h_w, wide)
    return dh.to(hidden.dtype), dw


def lce_fwd_bwd_triton(
    hidden: Tensor, weight: Tensor, labels: Tensor, divisor: Tensor, ignore_index: int, token_stats: bool,
    need_dh: bool, need_dw: bool, prep: RowsPrep | None = None,
) -> tuple[Tensor, ...]:  # fmt: skip
    """(loss = sum of the rows' losses / divisor, entropy, correct, dh, dw): bf16 in one pass (``_lce_rows``,
    given its ``rows_prep`` where that is queued already), other dtypes by the forward, then the backward."""
    args = (hidden, weight, labels, divisor, ignore_index, token_stats, need_dh, need_dw)
    one_pass = hidden.dtype == torch.bfloat16
    return _fwd_bwd(*args, lce_fwd_triton, lce_bwd_triton, one_pass=one_pass, prep=prep)


def _fwd_bwd(
    hidden: Tensor, weight: Tensor, labels: Tensor, divisor: Tensor, ignore_index: int, token_stats: bool,
    need_dh: bool, need_dw: bool, fwd: Callable, bwd: Callable, one_pass: bool = False,
    prep: RowsPrep | None = None,
) -> tuple[Tensor, ...]:  # fmt: skip
    """The loss / divisor and its gradients: by ``rows_fwd_bwd`` with ``one_pass``, else by ``fwd`` then
    ``bwd`` with every row's dloss = 1 / divisor."""
    if one_pass:  # the kernels take 1 / divisor themselves: no launches before the first tile
        _, s, e, arg, _, rows, dh, dw = rows_fwd_bwd(
            hidden, weight, labels, ignore_index, token_stats, divisor, need_dh, need_dw, prep
        )
        entropy, correct = _token_stats(s, e, arg, labels, token_stats)
    divisor = torch.where(divisor != 0, divisor, 1.0).float()  # nothing supervised: a finite 0
    if not one_pass:
        rows, stats, entropy, correct = fwd(hidden, weight, labels, ignore_index, token_stats)
        grad_rows = (1.0 / divisor).reshape(1).expand(hidden.shape[0])
        dh, dw = bwd(grad_rows, hidden, weight, labels, stats, ignore_index, need_dh, need_dw)
    return rows.sum() / divisor, entropy, correct, dh, dw


# ---------------------------------------------------------------- registration


@torch.library.custom_op("chronipatch::linear_cross_entropy", mutates_args=())
def _lce(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, token_stats: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss rows, (m, s) per row, entropy, correct); the last two are empty without ``token_stats``."""
    if on_gpu(hidden):
        with device_of(hidden):  # Triton launches on the current device; models may span GPUs
            return lce_fwd_triton(hidden, weight, labels, ignore_index, token_stats)
    return reference.lce_fwd(hidden, weight, labels, ignore_index, token_stats)


@_lce.register_fake
def _(hidden, weight, labels, ignore_index, token_stats):
    rows = hidden.new_empty(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32))
    stats = rows.new_empty(hidden.shape[0], 2)  # (row max m, sum exp(z - m))
    per_token = rows.shape[0] if token_stats else 0
    return rows, stats, rows.new_empty(per_token), rows.new_empty(per_token)


@torch.library.custom_op("chronipatch::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd(
    grad_rows: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, stats: Tensor, ignore_index: int,
    need_dh: bool, need_dw: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    args = (grad_rows, hidden, weight, labels, stats, ignore_index, need_dh, need_dw)
    if on_gpu(hidden):
        with device_of(hidden):
            return lce_bwd_triton(*args)
    return reference.lce_bwd(*args)


@_lce_bwd.register_fake
def _(grad_rows, hidden, weight, labels, stats, ignore_index, need_dh, need_dw):
    dense = torch.contiguous_format
    dh = torch.empty_like(hidden, memory_format=dense) if need_dh else hidden.new_empty(0)
    return dh, torch.empty_like(weight, memory_format=dense) if need_dw else weight.new_empty(0)


def _setup(ctx, inputs, output):
    hidden, weight, labels, ignore_index, _ = inputs
    ctx.save_for_backward(hidden, weight, labels, output[1])
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_rows, *_):
    hidden, weight, labels, stats = ctx.saved_tensors
    # A frozen head (LoRA) needs no dW: its GEMM, a quarter of the loss's work, is skipped.
    need_dh, need_dw = ctx.needs_input_grad[:2]
    dh, dw = _lce_bwd(grad_rows, hidden, weight, labels, stats, ctx.ignore_index, need_dh, need_dw)
    return dh if need_dh else None, dw if need_dw else None, None, None, None


_lce.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("chronipatch::linear_cross_entropy_with_grad", mutates_args=())
def _lce_with_grad(
    hidden: Tensor, weight: Tensor, labels: Tensor, divisor: Tensor, ignore_index: int, token_stats: bool,
    need_dh: bool, need_dw: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(loss = sum_i l_i / divisor, entropy, correct, dloss/dhidden, dloss/dweight): the gradients come with
    the loss (empty where not needed), and the backward scales them by the loss's upstream gradient."""
    args = (hidden, weight, labels, divisor, ignore_index, token_stats, need_dh, need_dw)
    if on_gpu(hidden):
        with device_of(hidden):
            return lce_fwd_bwd_triton(*args)
    return _fwd_bwd(*args, reference.lce_fwd, reference.lce_bwd)


@_lce_with_grad.register_fake
def _(hidden, weight, labels, divisor, ignore_index, token_stats, need_dh, need_dw):
    loss = hidden.new_empty((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    per_token = hidden.shape[0] if token_stats else 0
    dense = torch.contiguous_format
    dh = torch.empty_like(hidden, memory_format=dense) if need_dh else hidden.new_empty(0)
    dw = torch.empty_like(weight, memory_format=dense) if need_dw else weight.new_empty(0)
    return loss, loss.new_empty(per_token), loss.new_empty(per_token), dh, dw


def _setup_with_grad(ctx, inputs, output):
    ctx.save_for_backward(output[3], output[4])
    ctx.mark_non_differentiable(*output[1:])
    # Otherwise eager autograd hands the backward a zero tensor per other output: [V, H] of zeros for dW's.
    ctx.set_materialize_grads(False)


def _backward_with_grad(ctx, grad_loss, *_):
    if grad_loss is None:
        return (None,) * 8
    dh, dw = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[:2]
    # In the gradients' dtype, the product rounded once: exact for an upstream 1 (or a power of 2). Scaled in
    # place where nothing can read the kept gradients again: an eager backward that frees the graph after it
    # (no retain_graph; create_graph retains it unless told not to). A second [V, H] for dW otherwise: the
    # step's memory peak where the backward starts, with every activation alive.
    in_place = last_use(grad_loss, dh, dw)
    dh = scale_grad(dh, grad_loss, in_place) if need_dh else None
    return dh, scale_grad(dw, grad_loss, in_place) if need_dw else None, *[None] * 6


# The gradients were computed in the forward, outside any graph: a second derivative through them
# (create_graph with an upstream gradient that has a graph) raises, as for the other ops, instead of silently
# holding only the upstream gradient's part.
_lce_with_grad.register_autograd(
    torch.autograd.function.once_differentiable(_backward_with_grad), setup_context=_setup_with_grad
)


class _LceWithGradEager(torch.autograd.Function):
    """``linear_cross_entropy_with_grad``'s launchers without custom-op dispatch (~80 us of host time after
    the label check's sync, where the GPU has only the work queued before it), for eager CUDA calls
    (``eager_cuda``)."""

    @staticmethod
    def forward(ctx, *args):  # the op's eight arguments, then the one pass's ``RowsPrep`` (or None)
        with device_of(args[0]):
            out = lce_fwd_bwd_triton(*args)
        _setup_with_grad(ctx, args, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_):
        return *_backward_with_grad(ctx, grad_loss), None


# ---------------------------------------------------------------- public


# Ignored positions carry no loss: when at least this fraction of them is ignored, eager calls score only the
# supervised rows (4 GEMMs over fewer rows), found without a second host sync.
COMPACT_IGNORED = 0.25


class TokenStats(NamedTuple):
    """Per-position statistics, shaped like ``labels``: softmax entropy and argmax == label."""

    entropy: Tensor
    correct: Tensor


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    num_items_in_batch: int | Tensor | None = None,
    shift: bool = True,
    reduction: str = "mean",
    return_token_stats: bool = False,
    label_check: LabelCheck | None = None,
) -> Tensor | tuple[Tensor, TokenStats]:
    """Fused ``cross_entropy(hidden @ weight.T, labels)`` with HF ``ForCausalLMLoss`` semantics.

    hidden ``[..., H]``, weight ``[V, H]``, labels ``[...]``. With ``shift`` the position t predicts
    ``labels[..., t + 1]`` (labels as HF's CausalLM takes them). ``reduction="mean"`` divides the sum by
    ``num_items_in_batch`` when given, else by the count of non-ignored labels; all ignored gives 0.
    The loss is fp32; ``return_token_stats`` also returns a :class:`TokenStats` for logging. In eager mode,
    with at least ``COMPACT_IGNORED`` of the labels ignored, only the supervised rows are computed.
    Under autocast, hidden and weight are cast to the autocast dtype first, as ``F.linear`` would be.
    ``label_check`` from :func:`prefetch_label_check` on these labels spares the check's wait for the GPU.
    """
    op = "linear_cross_entropy"
    check_tensors(op, hidden=hidden, weight=weight)
    # As the stock lm_head (F.linear) under autocast: floating inputs other than fp64 are cast.
    hidden, weight = autocast_like_linear(autocast_dtype(hidden), hidden, weight)
    check_same(op, hidden=hidden, weight=weight)
    check_tensors(op, labels=labels)
    check_arguments(
        op, hidden, weight, labels, ignore_index, num_items_in_batch, shift, reduction, label_check
    )
    h = hidden.reshape(-1, hidden.shape[-1])
    h = h if h.stride(-1) == 1 else h.contiguous()
    w = weight.contiguous()
    need_dh = torch.is_grad_enabled() and hidden.requires_grad
    need_dw = torch.is_grad_enabled() and weight.requires_grad
    # Training in bf16: the gradients come with the loss (``_lce_rows``: three GEMMs, not four).
    one_pass = reduction != "none" and h.dtype == torch.bfloat16 and (need_dh or need_dw)
    vocab = weight.shape[0]
    prefetched = label_counts_matching(label_check, labels, (vocab, ignore_index, shift), num_items_in_batch)
    labels = targets_of(labels, ignore_index, shift)
    flat = labels.reshape(-1).contiguous()  # once, for the check's kernel and the loss's
    prep = None
    if prefetched is None and one_pass and eager_cuda(h, w) and h.shape[0] > 0:
        # The check at the call: its counts start for the host, the one pass's first launches (the rows'
        # references, the labels' order; no count) are queued behind them, and only then does the host wait,
        # instead of launching them while the GPU, drained by the sync, waits on it.
        now = prefetch_label_check(flat, vocab, ignore_index, False, num_items_in_batch)
        with device_of(h), torch.no_grad():
            prep = rows_prep(h, w, flat, ignore_index, need_dw)
        prefetched = label_counts_matching(now, flat, (vocab, ignore_index, False), num_items_in_batch)
    n_valid = check_values(op, flat, vocab, ignore_index, num_items_in_batch, prefetched)
    keep = None
    if n_valid is not None and not return_token_stats and n_valid <= (1 - COMPACT_IGNORED) * flat.numel():
        keep = supervised_positions(flat, ignore_index, n_valid)  # no second sync
        h, flat = h.index_select(0, keep), flat.index_select(0, keep)
        prep = None  # the selected rows' own, as the registered op computes them (the same bits)
    if one_pass:
        divisor = (
            torch.ones((), device=h.device, dtype=torch.float32)
            if reduction == "sum"
            else mean_divisor(labels, ignore_index, num_items_in_batch, n_valid)
        )
        args = (h, w, flat, divisor, int(ignore_index), bool(return_token_stats), need_dh, need_dw)
        if eager_cuda(h, w, flat, divisor):
            loss, entropy, correct, _, _ = _LceWithGradEager.apply(*args, prep)
        else:
            loss, entropy, correct, _, _ = _lce_with_grad(*args)
    else:
        args = (h, w, flat, int(ignore_index), bool(return_token_stats))
        if not (need_dh or need_dw) and eager_cuda(h, w, flat):  # no graph to record: the launchers directly
            with device_of(h):
                rows, _, entropy, correct = lce_fwd_triton(*args)
        else:
            rows, _, entropy, correct = _lce(*args)
        if keep is not None:
            rows = rows.new_zeros(labels.numel()).index_copy(0, keep, rows)
        if reduction == "none":
            loss = rows.reshape(labels.shape)
        elif reduction == "sum":
            loss = rows.sum()
        else:
            divisor = mean_divisor(labels, ignore_index, num_items_in_batch, n_valid)
            loss = rows.sum() / torch.where(divisor != 0, divisor, 1.0)  # nothing supervised: a finite 0
    if n_valid is None and (torch.compiler.is_compiling() or flat.numel()):
        items = divisor if num_items_in_batch is not None else None  # a mean's (check_arguments)
        loss = loss * unchecked_factor(flat, vocab, ignore_index, items, reduction).reshape(loss.shape)
    if return_token_stats:
        return loss, TokenStats(entropy.reshape(labels.shape), correct.reshape(labels.shape))
    return loss
