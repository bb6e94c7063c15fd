"""Invariants on CPU: apply/revert cycles leak nothing, gradient accumulation with ``num_items_in_batch``
equals one big batch, and repeated calls are bit-identical."""

from __future__ import annotations

import copy
import gc
import importlib

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import chronipatch
from chronipatch import attention, ops
from chronipatch.mapping import OUR_FORWARDS
from chronipatch.ops import _utils
from chronipatch.packing import PackingCollator
from chronipatch.patch import BoundForward
from helpers import KERNEL_DEVICE, hf_view, needs_kernels
from tiny import batch, tiny_model

CYCLES = 100


def _dict_sizes(model: torch.nn.Module) -> dict[str, int]:
    return {name: len(m.__dict__) for name, m in model.named_modules()}


def _our_bound_methods() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is BoundForward and o.__func__ in OUR_FORWARDS)


def _registry() -> tuple:
    ops_ = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("chronipatch::"))
    return (
        tuple(ops_),
        tuple(sorted(AttentionInterface._global_mapping)),
        tuple(sorted(AttentionMaskInterface._global_mapping)),
    )


def _object_count() -> int:
    gc.collect()
    gc.collect()
    return len(gc.get_objects())


def test_apply_revert_cycles_leak_nothing(op_calls):
    torch.manual_seed(0)
    stock = tiny_model("qwen3")
    model = copy.deepcopy(stock)
    ids, labels = batch()
    packed = PackingCollator(max_length=32)([{"input_ids": ids[0, :9]}, {"input_ids": ids[1, :12]}])
    packed.pop("labels")
    with torch.no_grad():
        ref = stock(ids, labels=labels)
        ref_packed = stock(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits

    def cycle(i: int) -> None:
        report = chronipatch.apply(model, varlen_attention=i % 2 == 1)
        if i % 25 == 0:  # run the patched model now and then: forwards must not leave state behind either
            with torch.no_grad():
                model(ids, labels=labels)
                model(**packed, use_cache=False)
        assert chronipatch.revert(model) == len(report.swapped) - (
            i % 2
        )  # the attention switch is no forward

    cycle(0)
    cycle(1)  # first registration of the varlen attention, first memo entries
    objects = _object_count()  # collects first: garbage of earlier tests must not count here
    sizes, registry, methods = _dict_sizes(model), _registry(), _our_bound_methods()
    for i in range(2, CYCLES):
        cycle(i)
        assert _dict_sizes(model) == sizes, f"cycle {i}: a module __dict__ changed size"
    assert _registry() == registry and attention.NAME in registry[1]
    gc.collect()
    assert _our_bound_methods() == methods  # none of this model's cycles left a bound forward alive
    assert model.config._attn_implementation == "sdpa"
    assert len(_utils.memo) <= 17
    assert all(ref() is not None for ref, _ in _utils.memo.values())  # dead tensors leave the memo
    grown = _object_count() - objects
    assert grown <= 50, f"{grown} more live objects after {CYCLES - 2} apply/revert cycles"
    op_calls.clear()
    with torch.no_grad():
        out = model(ids, labels=labels)
        out_packed = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
    assert not op_calls  # reverted after 100 cycles: stock forwards only
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
    assert torch.equal(out_packed, ref_packed)
    assert torch.equal(
        torch.cat([p.flatten() for p in model.parameters()]),
        torch.cat([p.flatten() for p in stock.parameters()]),
    )


def test_patched_output_is_the_same_after_many_cycles(op_calls):
    model = tiny_model("llama")
    ids, labels = batch()
    chronipatch.apply(model)
    with torch.no_grad():
        first = model(ids, labels=labels, return_logits=True)
    calls = dict(op_calls)
    for _ in range(20):
        chronipatch.revert(model)
        chronipatch.apply(model)
    op_calls.clear()
    with torch.no_grad():
        later = model(ids, labels=labels, return_logits=True)
    assert dict(op_calls) == calls and calls["linear_cross_entropy"] == 1  # still every fused op, once
    assert torch.equal(first.logits, later.logits) and torch.equal(first.loss, later.loss)


# ---------------------------------------------------------------- gradient accumulation


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gradient_accumulation_with_num_items_equals_one_big_batch(family):
    stock = tiny_model(family, dtype=torch.float64)
    model = copy.deepcopy(stock)
    chronipatch.apply(model)
    model.train()
    stock.train()
    micro = [batch(b=2, t=13, seed=1, ignore_frac=0.3), batch(b=3, t=13, seed=2, ignore_frac=0.6)]
    for _, labels in micro:
        labels[:, 0] = -100  # never predicted anyway (shift): the count is the same shifted or not
    micro[1][1][2] = -100  # one fully ignored row in the second micro-batch
    num_items = sum(int((labels[:, 1:] != -100).sum()) for _, labels in micro)

    model.zero_grad(set_to_none=True)
    losses = []
    for ids, labels in micro:
        loss = model(input_ids=ids, labels=labels, num_items_in_batch=num_items).loss
        loss.backward()
        losses.append(loss.detach())
    accumulated = _grads(model)

    big_ids, big_labels = (torch.cat(t) for t in zip(*micro))
    model.zero_grad(set_to_none=True)
    big = model(input_ids=big_ids, labels=big_labels).loss
    big.backward()
    reference = _grads(model)
    stock_big = stock(input_ids=big_ids, labels=big_labels).loss
    stock_big.backward()

    torch.testing.assert_close(sum(losses), big.detach(), rtol=1e-10, atol=0)
    assert accumulated.keys() == reference.keys() and len(reference) == len(list(model.parameters()))
    for name, grad in accumulated.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-10, atol=1e-14, msg=name)
    # and the big batch itself against stock HF (fp32 lm_head loss upcast: HF computes its loss in fp32)
    torch.testing.assert_close(big, stock_big.to(big.dtype), rtol=1e-6, atol=1e-7)


def test_num_items_as_tensor_and_int_agree():
    model = tiny_model("qwen2", dtype=torch.float64)
    chronipatch.apply(model)
    ids, labels = batch(seed=3)
    a = model(input_ids=ids, labels=labels, num_items_in_batch=17).loss
    b = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(17)).loss
    assert torch.equal(a, b)
    total = model(input_ids=ids, labels=labels, num_items_in_batch=1).loss  # the plain sum
    torch.testing.assert_close(a * 17, total, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- determinism


def _op_calls(device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x, w = r(37, 96, scale=2), 1 + r(96, scale=0.1)
    gate, up = r(5, 7, 130, scale=3), r(5, 7, 130)
    q = hf_view(2, 9, 6, 16).to(device=device, dtype=dtype)
    k = hf_view(2, 9, 2, 16).to(device=device, dtype=dtype)
    cos, sin = r(1, 9, 16), r(1, 9, 16)
    hid, wv = r(2, 21, 32), r(300, 32, scale=0.2)
    labels = torch.randint(0, 300, (2, 21), generator=g).to(device)
    labels[0, ::4] = -100
    return {
        "rms_norm": (lambda x, w: ops.rms_norm(x, w, 1e-6), (x, w)),
        "swiglu": (ops.swiglu, (gate, up)),
        "swiglu_linear": (ops.swiglu_linear, (gate, up, r(48, 130, scale=0.1))),
        "rope": (lambda q, k: ops.rope(q, k, cos, sin), (q, k)),
        "lce": (lambda h, w: ops.linear_cross_entropy(h, w, labels), (hid, wv)),
    }


def _fwd_bwd(fn, inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    seeds = [torch.ones_like(o) * 0.5 + torch.arange(o.numel()).reshape(o.shape).to(o) * 1e-3 for o in outs]
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, inputs, seeds))


@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "swiglu_linear", "rope", "lce"])
def test_public_ops_are_bit_deterministic_on_cpu(op):
    fn, inputs = _op_calls("cpu", torch.float32)[op]
    first = _fwd_bwd(fn, inputs)
    for _ in range(3):
        again = _fwd_bwd(fn, inputs)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@needs_kernels
def test_kernels_are_bit_deterministic():
    rms = importlib.import_module("chronipatch.ops.rms_norm")
    lce = importlib.import_module("chronipatch.ops.linear_cross_entropy")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 96, generator=g).to(KERNEL_DEVICE)
    w = torch.randn(96, generator=g).to(KERNEL_DEVICE)
    dy = torch.randn(37, 96, generator=g).to(KERNEL_DEVICE)
    hid = torch.randn(9, 16, generator=g).to(KERNEL_DEVICE)
    wv = torch.randn(700, 16, generator=g).to(KERNEL_DEVICE)
    labels = torch.randint(0, 700, (9,), generator=g).to(KERNEL_DEVICE)

    def once():
        y, rstd = rms.rms_norm_fwd_triton(x, w, 1e-6)
        dx, dw = rms.rms_norm_bwd_triton(dy, x, w, rstd)
        loss, lse, ent, cor = lce.lce_fwd_triton(hid, wv, labels, -100)
        dh, dwv = lce.lce_bwd_triton(torch.ones_like(loss), hid, wv, labels, lse, -100)
        return [y, rstd, dx, dw, loss, lse, ent, cor, dh, dwv]

    first = once()
    assert all(torch.equal(a, b) for a, b in zip(first, once()))


def test_patched_model_is_bit_deterministic():
    model = tiny_model("qwen3")
    chronipatch.apply(model)
    ids, labels = batch(seed=4)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        return [out.loss.detach()] + [p.grad.clone() for p in model.parameters()]

    first = step()
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(first, step()))


def test_reference_loss_matches_torch_in_fp64():
    """The CPU path is the oracle of the kernels: in fp64 it is HF's loss to rounding."""
    g = torch.Generator().manual_seed(5)
    h, w = (
        torch.randn(40, 24, generator=g, dtype=torch.float64),
        torch.randn(97, 24, generator=g, dtype=torch.float64),
    )
    labels = torch.randint(0, 97, (40,), generator=g)
    labels[::3] = -100
    ours = ops.linear_cross_entropy(h, w, labels, shift=False)
    torch.testing.assert_close(ours, F.cross_entropy(h @ w.T, labels), rtol=1e-13, atol=0)
