"""The loss's prefetched label check: used only for the labels it was taken of, same answers as the check at
the loss, and ``apply``'s CausalLM forward takes it before the backbone."""

from __future__ import annotations

import pytest
import torch

from chronipatch import ops
from chronipatch.ops import _labels

gpu = pytest.mark.gpu


class _Done:
    """A passed event (CPU tests: the matching logic without CUDA)."""

    def synchronize(self):
        pass


def _fake_check(labels, counts, key=(11, -100, True), num_items=None):
    version = -1 if num_items is None else num_items._version
    return _labels.LabelCheck(labels, labels._version, key, torch.tensor(counts), _Done(), num_items, version)


def _inputs(dev="cpu"):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 5, 8, generator=g), torch.randn(11, 8, generator=g)
    return h.to(dev), w.to(dev), torch.randint(0, 11, (2, 5), generator=g).to(dev)


def test_prefetched_counts_are_what_the_loss_reads():
    h, w, labels = _inputs()
    # Counts that claim a bad label 123: the loss raises with them, so it read them and not the data.
    with pytest.raises(ValueError, match="label 123 outside"):
        ops.linear_cross_entropy(h, w, labels, label_check=_fake_check(labels, [1, 8, 123, 0]))


@pytest.mark.parametrize("stale", ["other labels", "written since", "other vocab", "other shift"])
def test_a_check_of_other_labels_is_not_used(stale):
    h, w, labels = _inputs()
    key = (11, -100, True)
    if stale == "other labels":
        check = _fake_check(labels.clone(), [1, 8, 123, 0])
    elif stale == "other vocab":
        check = _fake_check(labels, [1, 8, 123, 0], key=(12, -100, True))
    elif stale == "other shift":
        check = _fake_check(labels, [1, 8, 123, 0], key=(11, -100, False))
    else:
        check = _fake_check(labels, [1, 8, 123, 0], key=key)
        labels[0, 1] = 3  # an in-place write after the check bumps the version
    want = ops.linear_cross_entropy(h, w, labels)
    got = ops.linear_cross_entropy(h, w, labels, label_check=check)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_prefetched_num_items_check_is_what_the_loss_reads():
    h, w, labels = _inputs()
    items = torch.tensor(8)
    # Counts that call these num_items unusable: the loss raises, naming them.
    with pytest.raises(ValueError, match="num_items_in_batch=8 cannot normalise"):
        ops.linear_cross_entropy(
            h,
            w,
            labels,
            num_items_in_batch=items,
            label_check=_fake_check(labels, [0, 8, 0, 1], num_items=items),
        )
    # Taken with other num_items (or none): not used, the loss checks itself and the 8 are fine.
    for other in (torch.tensor(8), None):
        check = _fake_check(labels, [0, 8, 0, 1], num_items=other)
        got = ops.linear_cross_entropy(h, w, labels, num_items_in_batch=items, label_check=check)
        torch.testing.assert_close(got, ops.linear_cross_entropy(h, w, labels, num_items_in_batch=8))


@pytest.mark.parametrize("items", [0, -3])
def test_num_items_tensor_on_the_labels_device_is_checked_there(items, monkeypatch):
    h, w, labels = _inputs()
    want = ops.linear_cross_entropy(h, w, labels, reduction="sum") / 4
    all_ignored = torch.full_like(labels, -100)

    def no_host_read(self):
        raise AssertionError("num_items read on the host")

    # On the passing paths the tensor is never read on the host (it would be a sync on a GPU).
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "__float__", no_host_read)
        ok = ops.linear_cross_entropy(h, w, labels, num_items_in_batch=torch.tensor(4.0))
        nothing = ops.linear_cross_entropy(h, w, all_ignored, num_items_in_batch=torch.tensor(0))
    torch.testing.assert_close(ok, want)
    assert nothing == 0  # 0 items with nothing supervised is fine
    with pytest.raises(ValueError, match=f"num_items_in_batch={items} cannot normalise"):
        ops.linear_cross_entropy(h, w, labels, num_items_in_batch=torch.tensor(items))


def test_complex_num_items_are_read_on_the_host():
    h, w, labels = _inputs()
    got = ops.linear_cross_entropy(h, w, labels, num_items_in_batch=torch.tensor(4 + 0j))
    torch.testing.assert_close(got, ops.linear_cross_entropy(h, w, labels, reduction="sum") / 4)


def test_prefetch_steps_with_cpu_stand_ins(cpu_prefetch):
    """The prefetch's own steps (counts, pinned copy, event on the labels' stream); then the loss uses it."""
    h, w, labels = _inputs()
    items = torch.tensor(0)
    check = cpu_prefetch(labels, 11, -100, True, items)
    assert cpu_prefetch.recorded == [("stream of", labels.device)]
    assert check.counts.tolist() == [0, int((_labels.targets_of(labels, -100, True) != -100).sum()), 0, 1]
    with pytest.raises(ValueError, match="num_items_in_batch=0 cannot normalise"):
        ops.linear_cross_entropy(h, w, labels, num_items_in_batch=items, label_check=check)
    check = cpu_prefetch(labels, 11, -100, True, None)
    got = ops.linear_cross_entropy(h, w, labels, label_check=check)
    torch.testing.assert_close(got, ops.linear_cross_entropy(h, w, labels), rtol=0, atol=0)


@pytest.mark.parametrize("shift", [True, False])
def test_select_supervised_from_the_prefetched_count(cpu_prefetch, monkeypatch, shift):
    """The supervised positions in order (as a boolean mask selects them), and a check of the selection that
    the loss takes as its own: its answers are the data's."""
    h, w, labels = _inputs()
    labels[0, 1:3] = labels[1, 4] = -100
    targets = labels[:, 1:] if shift else labels  # TRL's shift, without the ignored last column
    mask = targets != -100
    prefetched = cpu_prefetch(labels, 11, -100, shift, None)
    keep, selected, check = ops.select_supervised(prefetched, labels, targets)
    assert torch.equal(keep, mask.reshape(-1).nonzero().squeeze(1)) and torch.equal(selected, targets[mask])
    assert check.labels is selected and check.key == (11, -100, False)
    rows = h[:, :-1] if shift else h
    rows = rows.reshape(-1, 8).index_select(0, keep)
    want = ops.linear_cross_entropy(rows, w, selected, shift=False, reduction="none")
    with monkeypatch.context() as m:  # the selection's check is read, not counted again
        m.setattr(_labels, "label_counts", lambda *a: pytest.fail("the loss counted the labels again"))
        got = ops.linear_cross_entropy(rows, w, selected, shift=False, reduction="none", label_check=check)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # A label out of range is named from the counts, as the check at the loss names it.
    labels[1, 2] = 40
    prefetched = cpu_prefetch(labels, 11, -100, shift, None)
    keep, selected, check = ops.select_supervised(prefetched, labels, targets)
    with pytest.raises(ValueError, match="label 40 outside"):
        ops.linear_cross_entropy(rows, w, selected, shift=False, label_check=check)


def test_select_supervised_refuses_a_stale_check(cpu_prefetch):
    _, _, labels = _inputs()
    check = cpu_prefetch(labels, 11, -100, False, None)
    assert ops.select_supervised(None, labels, labels) is None
    assert ops.select_supervised(check, labels.clone(), labels) is None  # of other labels
    labels[0, 0] = -100  # written since: its count no longer holds
    assert ops.select_supervised(check, labels, labels) is None


def test_prefetch_reads_nothing_of_the_labels_while_compiling(monkeypatch):
    """Inside torch.compile the prefetch returns before asking the labels anything: dynamo (torch 2.11) cannot
    trace ``is_inference()``, and a graph break there would split every compiled training step."""

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"labels.{name} read while compiling")

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert ops.prefetch_label_check(Untouchable(), 11) is None


def test_nothing_to_prefetch_on_cpu():
    assert ops.prefetch_label_check(torch.tensor([[1, 2]]), 11) is None


@gpu
@pytest.mark.parametrize("shift", [True, False])
def test_prefetch_on_cuda_matches_the_check_at_the_loss(shift):
    h, w, labels = _inputs("cuda")
    labels[0, :2] = -100
    check = ops.prefetch_label_check(labels, 11, shift=shift)
    assert check is not None
    got = ops.linear_cross_entropy(h, w, labels, shift=shift, label_check=check)
    torch.testing.assert_close(got, ops.linear_cross_entropy(h, w, labels, shift=shift), rtol=0, atol=0)
    n_valid = int((_labels.targets_of(labels, -100, shift) != -100).sum())
    assert check.counts.tolist()[:2] == [0, n_valid]
    bad = labels.clone()
    bad[1, 3] = 11
    with pytest.raises(ValueError, match="label 11 outside"):
        ops.linear_cross_entropy(
            h, w, bad, shift=False, label_check=ops.prefetch_label_check(bad, 11, shift=False)
        )
    clean = ops.prefetch_label_check(labels, 11, shift=False)
    labels[1, 4] = -7  # written after the prefetch: the loss checks again and finds it
    with pytest.raises(ValueError, match="label -7 outside"):
        ops.linear_cross_entropy(h, w, labels, shift=False, label_check=clean)


@gpu
@pytest.mark.parametrize("ignored", [1, 8], ids=["all-rows", "supervised-rows"])
def test_bf16_training_check_at_the_call_matches_the_prefetched_one(ignored):
    """bf16 training with the check at the call (its references queued before the wait) gives the loss and
    gradients of the prefetched check's call bit for bit, scoring all rows or only the supervised ones."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 9, 64, generator=g).cuda().bfloat16()
    w = (torch.randn(300, 64, generator=g) / 8).cuda().bfloat16()
    labels = torch.randint(0, 300, (4, 9), generator=g).cuda()
    labels.view(-1)[torch.randperm(36, generator=g)[: ignored * 4]] = -100
    got = []
    for check in (None, ops.prefetch_label_check(labels, 300)):
        x, wt = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = ops.linear_cross_entropy(x, wt, labels, label_check=check)
        loss.backward()
        got.append((loss, x.grad, wt.grad))
    for a, b in zip(*got):
        assert torch.equal(a, b)


@gpu
def test_select_supervised_never_waits_for_the_gpu():
    _, _, labels = _inputs("cuda")
    labels[0, :2] = -100
    check = ops.prefetch_label_check(labels, 11, shift=False)
    check.done.synchronize()  # as the backbone's forward would have let it pass
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        keep, selected, _ = ops.select_supervised(check, labels, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(selected, labels[labels != -100]) and keep.numel() == 8


@gpu
def test_prefetch_never_waits_for_the_gpu():
    _, _, labels = _inputs("cuda")
    items = torch.tensor(9, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        check = ops.prefetch_label_check(labels, 11, num_items=items)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert check is not None


def test_no_prefetch_of_inference_labels():
    with torch.inference_mode():
        labels = torch.tensor([[1, 2, 3]])
    assert ops.prefetch_label_check(labels, 11) is None
    h, w, _ = _inputs()
    ops.linear_cross_entropy(h[:1, :3], w, labels)  # and the loss takes them as before


def test_causal_lm_forward_prefetches_the_check(monkeypatch):
    import chronipatch
    from tiny import tiny_model

    model = tiny_model("llama")
    chronipatch.apply(model)
    seen = []
    real = ops.prefetch_label_check

    def spy(labels, vocab, ignore_index=-100, shift=True, num_items=None):
        seen.append((labels, vocab, shift, num_items))
        return real(labels, vocab, ignore_index, shift, num_items)

    monkeypatch.setattr(ops, "prefetch_label_check", spy)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    model(input_ids=ids, labels=ids)
    assert len(seen) == 1 and seen[0][0] is ids and seen[0][1:] == (model.config.vocab_size, True, None)
    shifted = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    model(input_ids=ids, labels=ids, shift_labels=shifted)  # already shifted: the check takes them as is
    assert len(seen) == 2 and seen[1][0] is shifted and seen[1][2] is False
    items = torch.tensor(9)
    model(input_ids=ids, labels=ids, num_items_in_batch=items)  # checked with the labels
    assert len(seen) == 3 and seen[2][3] is items
