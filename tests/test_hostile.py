"""Hostile inputs for every public entry point: each gives a clear ValueError/TypeError naming the problem, or
the mathematically right answer (finite, NaN or inf), and leaves no state behind that spoils the next call.

Entry points: ``ops.rms_norm``, ``ops.swiglu``, ``ops.rope``, ``ops.linear_cross_entropy`` (public op and,
through the interpreter or natively, its Triton launchers), ``chronipatch.apply`` / ``revert``,
``packing.PackingCollator`` and ``attention.varlen_attention_forward``. The basic bad-input cases of
test_ops.py / test_attention.py / test_packing.py are not repeated here. Cases marked xfail(strict) are
defects of the package, each reason says what it should do instead.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import chronipatch
from chronipatch import ops
from chronipatch.packing import PackingCollator
from hostile import (
    PACKED,
    SANE,
    _attn,
    _qkv,
    cu10,
)
from tiny import tiny_model


@pytest.mark.parametrize("entry", list(SANE))
def test_normal_calls_are_right(entry):
    SANE[entry]()


# ---------------------------------------------------------------- errors that must name the problem

x8, w8 = torch.randn(3, 8), torch.randn(8)
q4, k4, c4, s4 = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)
h48, W108 = torch.randn(4, 8), torch.randn(10, 8)
lab4 = torch.tensor([1, 2, 3, 4])


class _NotCausal:
    is_causal = False


ERRORS = [
    # --- rms_norm: dtypes, ranks, devices, shape of the weight
    ("rms_norm", lambda: ops.rms_norm(x8.bool(), w8), "x and weight must be floating point"),
    ("rms_norm", lambda: ops.rms_norm(x8, w8.long()), "x and weight must be floating point.*int64"),
    ("rms_norm", lambda: ops.rms_norm(x8.to(torch.complex64), w8), "floating point"),
    ("rms_norm", lambda: ops.rms_norm(torch.tensor(1.0), torch.ones(1)), "at least one dim"),
    ("rms_norm", lambda: ops.rms_norm(x8.to("meta"), w8), "weight is on cpu but x is on meta"),
    ("rms_norm", lambda: ops.rms_norm(x8, w8[None]), r"weight shape \(1, 8\)"),
    (
        "rms_norm",
        lambda: ops.rms_norm([[1.0, 2.0]], torch.ones(2)),
        "rms_norm: x must be a torch.Tensor, got list",
    ),
    # --- swiglu
    ("swiglu", lambda: ops.swiglu(lab4, lab4), "gate must be floating point, got torch.int64"),
    ("swiglu", lambda: ops.swiglu(lab4.bool(), lab4.bool()), "gate must be floating point, got torch.bool"),
    ("swiglu", lambda: ops.swiglu(h48, h48.long()), "up has dtype torch.int64"),
    ("swiglu", lambda: ops.swiglu(h48, h48.half()), "up has dtype torch.float16"),
    ("swiglu", lambda: ops.swiglu(h48, h48.to("meta")), "up is on meta but gate is on cpu"),
    ("swiglu", lambda: ops.swiglu(h48, h48[0]), r"gate \(4, 8\) and up \(8,\) differ in shape"),
    # --- rope
    ("rope", lambda: ops.rope(q4.long(), k4.long(), c4, s4), "q and k must share a float dtype"),
    ("rope", lambda: ops.rope(q4, k4.half(), c4, s4), "q and k must share a float dtype"),
    ("rope", lambda: ops.rope(q4, k4[..., :4], c4, s4), r"k \(1, 2, 3, 4\) does not match q"),
    (
        "rope",
        lambda: ops.rope(q4, k4[:, :, :2], c4, s4),
        r"k \(1, 2, 2, 8\) does not match q .* in batch, tokens",
    ),
    ("rope", lambda: ops.rope(q4, k4, c4, s4[:, :2]), "cos .* and sin .* differ"),
    ("rope", lambda: ops.rope(q4, k4, c4.expand(2, 3, 8), s4.expand(2, 3, 8)), r"do not match \[B=1"),
    ("rope", lambda: ops.rope(q4, k4, c4.to("meta"), s4.to("meta")), "cos is on meta but q is on cpu"),
    ("rope", lambda: ops.rope(q4, k4, c4.clone().requires_grad_(), s4), "cos and sin carry no gradient"),
    (
        "rope",
        lambda: ops.rope(q4, k4, c4.long(), s4.long()),
        "cos and sin must be floating point, got torch.int64",
    ),
    # --- linear_cross_entropy
    (
        "lce",
        lambda: ops.linear_cross_entropy(h48, W108, lab4.bool()),
        "labels must be integer, got torch.bool",
    ),
    ("lce", lambda: ops.linear_cross_entropy(h48.long(), W108.long(), lab4), "hidden must be floating point"),
    ("lce", lambda: ops.linear_cross_entropy(h48, W108[0], lab4), r"weight must be \[V, H\]"),
    ("lce", lambda: ops.linear_cross_entropy(h48, W108[None], lab4), r"weight must be \[V, H\]"),
    ("lce", lambda: ops.linear_cross_entropy(torch.tensor(1.0), W108, lab4[0]), "does not match weight"),
    ("lce", lambda: ops.linear_cross_entropy(h48, W108, lab4.to("meta")), "labels are on meta"),
    ("lce", lambda: ops.linear_cross_entropy(h48, W108.to("meta"), lab4), "weight is on meta"),
    ("lce", lambda: ops.linear_cross_entropy(h48, W108, lab4, reduction="avg"), "reduction must be"),
    (
        "lce",
        lambda: ops.linear_cross_entropy(h48, W108, lab4, reduction="sum", num_items_in_batch=4),
        "num_items_in_batch needs reduction='mean'",
    ),
    (
        "lce",
        lambda: ops.linear_cross_entropy(h48[0], W108, lab4[0]),
        "shift needs labels with a sequence dim",
    ),
    (
        "lce",
        lambda: ops.linear_cross_entropy(h48, W108, torch.tensor([0, 2**40, 1, 2]), shift=False),
        "label 1099511627776 outside",
    ),
    (  # labels padded with -100 while the caller's ignore_index is -1
        "lce",
        lambda: ops.linear_cross_entropy(
            h48, W108, torch.tensor([1, -100, 2, 3]), ignore_index=-1, shift=False
        ),
        "label -100 outside .*ignore_index=-1",
    ),
    (
        "lce",
        lambda: ops.linear_cross_entropy(
            h48, W108, lab4, shift=False, num_items_in_batch=torch.tensor([2, 3])
        ),
        "num_items_in_batch",
    ),
    (
        "lce",
        lambda: ops.linear_cross_entropy(h48, W108, lab4, shift=False, ignore_index=1.5),
        "ignore_index",
    ),
    (
        "lce",
        lambda: ops.linear_cross_entropy(h48, torch.randn(0, 8), torch.full((4,), -100), shift=False),
        "vocab|weight",
    ),
    # --- apply / revert
    ("patch", lambda: chronipatch.apply(None), r"expects a torch\.nn\.Module, got NoneType"),
    ("patch", lambda: chronipatch.apply(torch.nn.Linear), r"expects a torch\.nn\.Module, got type"),
    ("patch", lambda: chronipatch.apply(torch.nn.Linear(2, 2)), "nothing to patch in Linear"),
    (
        "patch",
        lambda: chronipatch.apply(
            tiny_model("llama"), rms_norm=False, swiglu=False, rope=False, fused_loss=False
        ),
        "nothing to patch in LlamaForCausalLM.*left alone",
    ),
    (
        "patch",
        lambda: chronipatch.revert(None),
        r"revert expects a torch\.nn\.Module, got NoneType",
    ),
    (
        "patch",
        lambda: chronipatch.is_patched("model"),
        r"is_patched expects a torch\.nn\.Module, got str",
    ),
    # --- PackingCollator
    ("packing", lambda: PackingCollator(max_length=8)(None), "takes a list of examples, got NoneType"),
    ("packing", lambda: PackingCollator(max_length=8)([{"input_ids": 5}]), "'input_ids' must be 1-D"),
    (
        "packing",
        lambda: PackingCollator(max_length=8)([{"input_ids": "abc"}]),
        "example 0: 'input_ids' is not a sequence of integers",
    ),
    (
        "packing",
        lambda: PackingCollator(max_length=8)([{"input_ids": [[1, 2], [3]]}]),
        "example 0: 'input_ids' is not a sequence of integers",
    ),
    ("packing", lambda: PackingCollator(max_length=True), "max_length must be an int >= 2"),
    (
        "packing",
        lambda: PackingCollator(max_length=8)([{"input_ids": [1.5, 2.7, 3.2]}]),
        "input_ids.*integer",
    ),
    (
        "packing",
        lambda: PackingCollator(max_length=8)([{"input_ids": [1, 2, 3], "labels": [0.5, 1.5, 2.5]}]),
        "labels.*integer",
    ),
    (
        "packing",
        lambda: PackingCollator(max_length=8)([{"input_ids": [True, False, True]}]),
        "input_ids.*integer",
    ),
    (
        "packing",
        lambda: PackingCollator(max_length=4.5),
        "max_length",
    ),
    ("packing", lambda: PackingCollator(8, window=2.5), r"window must be None or an int >= 1, got 2\.5"),
    ("packing", lambda: PackingCollator(8, window=True), "window must be None or an int >= 1, got True"),
    ("packing", lambda: PackingCollator(8, window="2"), "window must be None or an int >= 1, got '2'"),
    ("packing", lambda: PackingCollator(8, ignore_index=None), "ignore_index must be an int, got None"),
    # --- varlen attention
    ("attention", lambda: _attn(cu_seq_lens_q=cu10.float(), max_length_q=6), "1-D integer tensor"),
    ("attention", lambda: _attn(cu_seq_lens_q=cu10[None], max_length_q=6), "1-D integer tensor"),
    ("attention", lambda: _attn(cu_seq_lens_q=cu10[:1], max_length_q=6), "1-D integer tensor"),
    ("attention", lambda: _attn(cu_seq_lens_q=[0, 4, 10], max_length_q=6), "1-D integer tensor"),
    ("attention", lambda: _attn(cu_seq_lens_q=torch.tensor([1, 4, 10]), max_length_q=6), "must run from 0"),
    (
        "attention",
        lambda: _attn(cu_seq_lens_q=torch.tensor([0, 6, 4, 10]), max_length_q=6),
        "lengths must lie",
    ),
    (
        "attention",
        lambda: _attn(
            cu_seq_lens_q=cu10, cu_seq_lens_k=torch.tensor([0, 10]), max_length_q=6, max_length_k=10
        ),
        "differ in document count",
    ),
    (
        "attention",
        lambda: _attn(**{**PACKED, "cu_seq_lens_k": torch.tensor([0, 4, 9], dtype=torch.int32)}),
        "cu_seq_lens_k must run from 0 to the token count 10",
    ),
    ("attention", lambda: _attn(**{**PACKED, "max_length_k": True}), "max_length_k must be a Python int"),
    ("attention", lambda: _attn(mask=torch.ones(1, 10, dtype=torch.bool), **PACKED), "cannot be combined"),
    ("attention", lambda: _attn(softcap=30.0), "does not support softcap"),
    ("attention", lambda: _attn(module=_NotCausal()), "causal attention only"),
    ("attention", lambda: _attn(is_causal=False), "causal attention only"),
    (
        "attention",
        lambda: _attn(*(x.long() for x in _qkv())),
        "dtype|floating",
    ),
    (
        "attention",
        lambda: _attn(*(x[0] for x in _qkv())),
        r"query|\[B, H",
    ),
]


def _id(case) -> str:
    values = case.values if hasattr(case, "values") else case
    return f"{values[0]}-{values[2][:40] or 'error'}".replace(" ", "_")


@pytest.mark.parametrize("entry,call,match", ERRORS, ids=[_id(c) for c in ERRORS])
def test_hostile_input_raises_named_error(entry, call, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises((ValueError, TypeError), match=match or None):
            call()
    SANE[entry]()
