"""The loss's arguments and labels: the checks of their metadata, the range check that needs one host sync in
eager mode, its prefetch, and the mean's divisor."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._utils import check, device_of, eager_cuda

COUNT_BLOCK = 4096  # labels per step of the count kernel's one program


def targets_of(labels: Tensor, ignore_index: int, shift: bool) -> Tensor:
    """The label each position is scored against: ``labels[..., t + 1]`` under ``shift``."""
    labels = labels.long()
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:] if shift else labels


def on_device_items(num_items, labels: Tensor) -> bool:
    """Whether ``num_items`` is one number in a tensor on the labels' device, checked there (reading it on
    the host would be a sync of its own: Trainer hands it over on the model's device)."""
    return (
        isinstance(num_items, Tensor)
        and num_items.numel() == 1
        and num_items.device == labels.device
        and not num_items.is_complex()  # float() takes a zero imaginary part; the device compare cannot
    )


@triton.jit
def _label_counts_kernel(
    Y, ITEMS, OUT, n, vocab, ignore_index, HAS_ITEMS: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    """OUT = [any label out of range, supervised count, the first such label (0 if none), num_items unusable]
    of the flat targets Y, in one program: the check's counts in one launch where torch's took about 15, each
    waited for by the host's sync that follows. Each lane keeps its own count and first bad index, reduced
    once after the loop (no barrier per step)."""
    count = tl.zeros((BLOCK,), dtype=tl.int32)  # per lane: at most n / BLOCK
    first = tl.zeros((BLOCK,), dtype=tl.int64) + n  # per lane, the index of its first bad label; n if none
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        in_range = offs < n
        y = tl.load(Y + offs, mask=in_range, other=ignore_index)
        valid = in_range & (y != ignore_index)
        count += valid.to(tl.int32)
        bad = valid & ((y < 0) | (y >= vocab))
        first = tl.minimum(first, tl.where(bad, offs, n))
    count = tl.sum(count.to(tl.int64), axis=0)
    first = tl.min(first, axis=0)
    any_bad = first < n
    bad_items = tl.zeros((), dtype=tl.int64)
    if HAS_ITEMS:
        items = tl.load(ITEMS)
        # ~(n >= 0): negative or NaN
        bad_items = ((~(items >= 0)) | ((items == 0) & (count > 0))).to(tl.int64)
    tl.store(OUT, any_bad.to(tl.int64))
    tl.store(OUT + 1, count)
    tl.store(OUT + 2, tl.load(Y + first, mask=any_bad, other=0).to(tl.int64))
    tl.store(OUT + 3, bad_items)


def label_counts(targets: Tensor, vocab: int, ignore_index: int, num_items: Tensor | None = None) -> Tensor:
    """[any label out of range, supervised count, the first such label, num_items unusable] on the labels'
    device; num_items is unusable when negative or NaN, or 0 with labels to normalise. On CUDA one kernel."""
    flat = targets.reshape(-1)
    if eager_cuda(flat):
        return _counts_by_kernel(flat.contiguous(), vocab, ignore_index, num_items)
    return _counts_by_torch(flat, vocab, ignore_index, num_items)


def _supervised_and_bad(flat: Tensor, vocab: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """The masks of the labels not ignored, and of those among them outside [0, V)."""
    valid = flat != ignore_index
    return valid, valid & ((flat < 0) | (flat >= vocab))


def _counts_by_torch(flat: Tensor, vocab: int, ignore_index: int, num_items: Tensor | None) -> Tensor:
    valid, bad = _supervised_and_bad(flat, vocab, ignore_index)
    # gather, not flat[i]: indexing by a 0-dim device tensor reads it on the host (a sync).
    first = flat.gather(0, bad.int().argmax().view(1)).squeeze(0)
    n_valid = valid.sum()
    if num_items is None:
        bad_items = torch.zeros_like(n_valid)
    else:
        n = num_items.reshape(())
        bad_items = (~(n >= 0) | ((n == 0) & (n_valid > 0))).long()  # ~(n >= 0): negative or NaN
    return torch.stack([bad.any().long(), n_valid, first, bad_items])


def _counts_by_kernel(flat: Tensor, vocab: int, ignore_index: int, num_items: Tensor | None) -> Tensor:
    out = torch.empty(4, dtype=torch.int64, device=flat.device)
    with device_of(flat):
        _label_counts_kernel[(1,)](
            flat, flat if num_items is None else num_items, out, flat.numel(), vocab, ignore_index,
            HAS_ITEMS=num_items is not None, BLOCK=COUNT_BLOCK, num_warps=8,
        )  # fmt: skip
    return out


def mean_divisor(
    labels: Tensor, ignore_index: int, num_items_in_batch: int | Tensor | None, n_valid: int | None
) -> Tensor:
    """The mean's divisor (fp32, on the labels' device): ``num_items_in_batch``, else the supervised count
    (``n_valid`` where the label check has counted it on the host: one launch, not three)."""
    if num_items_in_batch is None:
        if n_valid is not None:
            return torch.full((), n_valid, device=labels.device, dtype=torch.float32)
        return (labels != ignore_index).sum().float()
    if isinstance(num_items_in_batch, Tensor):
        return num_items_in_batch.to(labels.device, torch.float32).reshape(())
    # full, not as_tensor, which bakes the number into a compiled graph (one recompile per count)
    return torch.full((), num_items_in_batch, device=labels.device, dtype=torch.float32)


class LabelCheck(NamedTuple):
    """The label counts of ``prefetch_label_check``, on their way to the host."""

    labels: Tensor
    version: int
    key: tuple  # (vocab, ignore_index, shift)
    counts: Tensor  # pinned host memory, filled once ``done`` has passed
    done: torch.cuda.Event
    num_items: Tensor | None = None  # the on-device num_items_in_batch checked with them, if any
    items_version: int = -1


def prefetch_label_check(
    labels: Tensor, vocab: int, ignore_index: int = -100, shift: bool = True, num_items=None
) -> LabelCheck | None:
    """Start the loss's label check on the GPU and its copy to the host, without waiting for either.

    Taken before the backbone's forward (as ``apply``'s CausalLM forward does), the loss that receives it
    as ``label_check`` reads counts that arrived long before: the one host sync of the eager check then
    no longer drains the GPU queue at the loss. ``num_items`` (``num_items_in_batch``), when one number in
    a tensor on the labels' device, is checked with them. None where there is nothing to prefetch (not
    CUDA, empty or inference-mode labels, inside ``torch.compile``). A write through ``.data`` escapes the
    version counter that tells a check of since-changed labels apart: don't write labels that way in
    between."""
    if (
        torch.compiler.is_compiling()  # first: dynamo cannot trace is_inference()
        or not labels.is_cuda
        or labels.numel() == 0
        or labels.is_inference()  # no version counter
    ):
        return None
    return _start(labels, vocab, ignore_index, shift, num_items)


def _start(labels: Tensor, vocab: int, ignore_index: int, shift: bool, num_items) -> LabelCheck:
    items = num_items if on_device_items(num_items, labels) and not num_items.is_inference() else None
    counts = label_counts(targets_of(labels, ignore_index, shift), vocab, ignore_index, items)
    host = torch.empty(4, dtype=torch.int64, pin_memory=True)
    host.copy_(counts, non_blocking=True)
    done = torch.cuda.Event()
    # On the labels' stream, where the counts and their copy were queued (not the current device's).
    done.record(torch.cuda.current_stream(labels.device))
    items_version = -1 if items is None else items._version
    return LabelCheck(labels, labels._version, (vocab, ignore_index, shift), host, done, items, items_version)


def _check_types(op: str, num_items, label_check) -> None:
    """``num_items_in_batch`` a real number (complex tensors are read on the host by ``check_values``) and
    ``label_check`` one of ``prefetch_label_check``'s: a TypeError naming the op otherwise."""
    if isinstance(num_items, (str, bytes, complex, bool)) or (
        isinstance(num_items, Tensor) and num_items.dtype == torch.bool
    ):
        raise TypeError(
            f"chronipatch.ops.{op}: num_items_in_batch must be a real number, got {num_items!r:.60}"
        )
    if label_check is not None and not isinstance(label_check, LabelCheck):
        raise TypeError(
            f"chronipatch.ops.{op}: label_check must come from prefetch_label_check, got {label_check!r:.60}"
        )


def check_arguments(
    op: str, hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index, num_items_in_batch, shift: bool,
    reduction: str, label_check,
) -> None:  # fmt: skip
    """The loss's arguments by their metadata alone (no sync): shapes, devices, dtypes, the reduction and
    the types of ``ignore_index``, ``num_items_in_batch`` and ``label_check``; an error naming the op."""
    # Messages as functions, formatted only on failure: also under torch.compile, where sizes are symbolic.
    check(weight.dim() == 2, op, lambda: f"weight must be [V, H], got {tuple(weight.shape)}")
    check(
        weight.shape[0] > 0 and weight.shape[1] > 0,
        op,
        lambda: f"weight {tuple(weight.shape)} has an empty V or H",
    )
    check(
        hidden.dim() >= 1 and hidden.shape[-1] == weight.shape[1],
        op,
        lambda: f"hidden {tuple(hidden.shape)} does not match weight {tuple(weight.shape)} in H",
    )
    check(
        labels.device == hidden.device,
        op,
        lambda: f"labels are on {labels.device}, hidden on {hidden.device}",
    )
    check(
        not labels.is_floating_point() and not labels.is_complex() and labels.dtype != torch.bool,
        op,
        lambda: f"labels must be integer, got {labels.dtype}",
    )
    check(
        tuple(labels.shape) == tuple(hidden.shape[:-1]),
        op,
        lambda: f"labels {tuple(labels.shape)} must match hidden {tuple(hidden.shape)} without its last dim",
    )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"chronipatch.ops.{op}: ignore_index must be an int, got {ignore_index!r}")
    check(reduction in ("mean", "sum", "none"), op, f"reduction must be mean, sum or none, got {reduction!r}")
    check(num_items_in_batch is None or reduction == "mean", op, "num_items_in_batch needs reduction='mean'")
    _check_types(op, num_items_in_batch, label_check)
    check(
        not isinstance(num_items_in_batch, torch.Tensor) or num_items_in_batch.numel() == 1,
        op,
        lambda: f"num_items_in_batch must be one number, got shape {tuple(num_items_in_batch.shape)}",
    )
    check(not shift or labels.dim() >= 1, op, "shift needs labels with a sequence dim")


def check_values(
    op: str, labels: Tensor, vocab: int, ignore_index: int, num_items, prefetched: Tensor | None = None
) -> int | None:
    """Checks that read the data: one host sync, in eager mode only (compiled runs give NaN rows for
    out-of-range labels instead), or none with ``prefetched`` counts. Returns the count of supervised labels
    (None when not checked)."""
    if torch.compiler.is_compiling() or labels.numel() == 0 or labels.device.type == "meta":
        return None
    device_items = on_device_items(num_items, labels)
    if prefetched is None:
        prefetched = label_counts(labels, vocab, ignore_index, num_items if device_items else None)
    any_bad, n_valid, first_bad, bad_items = prefetched.tolist()
    if any_bad:
        raise ValueError(
            f"chronipatch.ops.{op}: label {first_bad} outside [0, {vocab}) "
            f"and not ignore_index={ignore_index}"
        )
    if num_items is not None:
        if not device_items:
            try:
                n = float(num_items)
            except (RuntimeError, TypeError, ValueError) as e:  # e.g. a complex tensor off the real line
                raise ValueError(
                    f"chronipatch.ops.{op}: num_items_in_batch={num_items!r:.40} is no real number"
                ) from e
            bad_items = not n >= 0 or (n == 0 and n_valid > 0)  # negative or NaN
        if bad_items:
            raise ValueError(  # an on-device num_items is read on the host only here, to name it
                f"chronipatch.ops.{op}: num_items_in_batch={float(num_items):g} cannot normalise a loss over "
                "supervised labels"
            )
    return n_valid


def unchecked_factor(
    flat: Tensor, vocab: int, ignore_index: int, items: Tensor | None, reduction: str
) -> Tensor:
    """Where ``check_values`` could not run (compiled calls), stock's answer for what it would raise, as a
    fp32 factor of the loss (one per row with ``reduction="none"``): NaN for a label out of range, whose loss
    row is NaN already (the factor takes its gradients along: the kernels leave out the missing one-hot term,
    and an optimizer would apply the rest); +-inf for a mean over supervised labels by ``items``, the
    divisor ``num_items_in_batch`` gives (None without one), of 0 (stock's sum / 0; the loss divides such a
    sum by 1); else 1."""
    supervised, bad = _supervised_and_bad(flat, vocab, ignore_index)
    nan = torch.full((), float("nan"), device=flat.device, dtype=torch.float32)
    if reduction == "none":
        return torch.where(bad, nan, 1.0)
    factor = torch.ones((), device=flat.device, dtype=torch.float32)
    if items is not None:
        inf = torch.copysign(torch.full_like(factor, float("inf")), items.float())  # sum / -0.0 is -inf
        factor = torch.where((items == 0) & supervised.any(), inf, factor)
    return torch.where(bad.any(), nan, factor)  # last: NaN wins over inf


def label_counts_matching(
    check: LabelCheck | None, labels: Tensor, key: tuple, num_items=None
) -> Tensor | None:
    """The prefetched counts when ``check`` was taken of these very labels (unwritten since) with the same
    vocabulary, ignore_index and shift, and of this on-device num_items if there is one; None otherwise (the
    check then runs at the loss)."""
    if (
        check is None
        or torch.compiler.is_compiling()
        or check.labels is not labels
        or check.version != labels._version
        or check.key != key
    ):
        return None
    if on_device_items(num_items, labels) and (
        check.num_items is not num_items or check.items_version != num_items._version
    ):
        return None
    check.done.synchronize()
    return check.counts


def select_supervised(
    check: LabelCheck | None, labels: Tensor, targets: Tensor
) -> tuple[Tensor, Tensor, LabelCheck] | None:
    """(keep, targets[keep], the check of targets[keep]): the flat positions of ``targets`` whose label is
    not ignored, in order, found from ``check``'s prefetched count without a host sync (a stable sort of
    the mask). ``targets`` are ``labels`` as the check's key shifts them (a shift's ignored last column may
    be left off). The selection's check carries the same counts, which hold for it: the same supervised
    labels, the same first out of range. None where ``check`` is not of ``labels`` as they are now."""
    counts = None if check is None else label_counts_matching(check, labels, check.key)
    if counts is None:
        return None
    vocab, ignore_index, _ = check.key
    flat = targets.reshape(-1)
    keep = supervised_positions(flat, ignore_index, int(counts[1]))
    selected = flat.index_select(0, keep)
    key = (vocab, ignore_index, False)
    return keep, selected, LabelCheck(selected, selected._version, key, counts, check.done)


def supervised_positions(flat: Tensor, ignore_index: int, n_valid: int) -> Tensor:
    """The positions of the ``n_valid`` labels of ``flat`` that are not ignored, in order, without a host
    sync: a stable sort of the mask puts them first."""
    return torch.argsort((flat != ignore_index).to(torch.int8), descending=True, stable=True)[:n_valid]
