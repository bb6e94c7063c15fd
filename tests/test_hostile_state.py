"""Hostile calls leave no state behind: rejected inputs, in-place edits and refused patches do not change
what the next call computes (see test_hostile.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import chronipatch
from chronipatch import attention
from chronipatch.ops import _utils
from chronipatch.packing import PackingCollator, PackingStats
from hostile import (
    _attn,
    _per_document,
    _qkv,
    _stock_model,
    cu10,
    sane_attention,
    sane_patch,
)
from tiny import batch

# ---------------------------------------------------------------- state left behind by hostile calls


def test_attention_in_place_edit_is_revalidated():
    q, k, v = _qkv()
    cu = cu10.clone()
    _attn(q, k, v, cu_seq_lens_q=cu, max_length_q=6)
    cu[1] = 1  # documents of 1 and 9 tokens: longer than max_length_q=6
    with pytest.raises(ValueError, match="lengths must lie in"):
        _attn(q, k, v, cu_seq_lens_q=cu, max_length_q=6)


def test_attention_fixed_in_place_is_accepted():
    q, k, v = _qkv()
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="token count 10"):
        _attn(q, k, v, cu_seq_lens_q=cu, max_length_q=6)
    cu[2] = 10
    out, _ = _attn(q, k, v, cu_seq_lens_q=cu, max_length_q=6)
    torch.testing.assert_close(out, _per_document(q, k, v, [0, 4, 10]))


def test_attention_many_hostile_calls_then_right_answer():
    """Memo entries of rejected tensors must not leak into other tensors' checks."""
    q, k, v = _qkv()
    for i in range(40):
        bad = torch.tensor([0, 4, 9 - i % 3], dtype=torch.int32)
        with pytest.raises(ValueError):
            _attn(q, k, v, cu_seq_lens_q=bad, max_length_q=6)
    assert len(_utils.memo) <= 17
    sane_attention()


def test_packing_rejected_batches_leave_no_trace():
    collator = PackingCollator(max_length=8)
    hostile = (
        [{"input_ids": [1, 2]}, {"input_ids": "ab"}],
        [{"input_ids": [1, 2]}, None],
        [{"input_ids": [1, 2], "completion_mask": [1]}],
        [{"input_ids": [[1], [2]]}],
    )
    for examples in hostile:
        with pytest.raises((ValueError, TypeError)):
            collator(examples)
        assert collator.stats == PackingStats() and collator.last_row_offsets == []
    out = collator([{"input_ids": [5, 6, 7]}, {"input_ids": [1, 2, 3, 4, 5]}])
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5, 5, 6, 7]]
    assert collator.stats.examples == 2 and collator.last_row_offsets == [0, 8]


def test_packing_does_not_alias_or_mutate_inputs():
    ids, labels = torch.tensor([1, 2, 3, 4]), torch.tensor([9, 9, 9, 9])
    example = {"input_ids": ids, "labels": labels, "completion_mask": torch.tensor([0, 1, 1, 1])}
    out = PackingCollator(max_length=8)([example])
    out["labels"][0, 1] = 77
    out["input_ids"][0, 1] = 77
    assert ids.tolist() == [1, 2, 3, 4] and labels.tolist() == [9, 9, 9, 9]


def test_apply_refusals_leave_the_model_untouched():
    stock, ref = _stock_model()
    model = copy.deepcopy(stock)
    with pytest.raises(ValueError, match="nothing to patch"):
        chronipatch.apply(model, rms_norm=False, swiglu=False, rope=False, fused_loss=False)
    for switch, value in (("rms_norm", "no"), ("fused_loss", None), ("varlen_attention", 1)):
        with pytest.raises(TypeError, match=f"{switch} must be True"):
            chronipatch.apply(model, **{switch: value})
    compiled = torch.compile(model)
    with pytest.raises(ValueError, match="already compiled"):
        chronipatch.apply(compiled)
    assert not chronipatch.is_patched(model) and chronipatch.revert(model) == 0
    assert all("forward" not in m.__dict__ for m in model.modules())
    ids, labels = batch()
    with torch.no_grad():
        assert torch.equal(model(ids, labels=labels).logits, ref.logits)
    sane_patch()


def test_foreign_forward_is_left_alone_by_apply_and_revert():
    model = copy.deepcopy(_stock_model()[0])
    norm = model.model.norm
    foreign = norm.forward  # a bound method of the class, put in the instance dict by "someone else"
    norm.forward = foreign
    report = chronipatch.apply(model)
    assert ("model.norm", "LlamaRMSNorm", "forward already replaced by someone else") in report.left
    chronipatch.revert(model)
    assert norm.__dict__["forward"] is foreign
    assert chronipatch.revert(model) == 0  # twice: nothing left to restore
    sane_patch()


def test_revert_restores_attention_implementation_once():
    model = copy.deepcopy(_stock_model()[0])
    chronipatch.apply(model, varlen_attention=True)
    chronipatch.apply(model, varlen_attention=True)  # idempotent: the saved "previous" stays sdpa
    assert model.config._attn_implementation == attention.NAME
    chronipatch.revert(model)
    assert model.config._attn_implementation == "sdpa"
    chronipatch.revert(model)
    assert model.config._attn_implementation == "sdpa"
    sane_patch()
