"""GPU: the varlen kernel path in bf16 against per-document stock sdpa, an fp32 truth as yardstick."""

from __future__ import annotations

from itertools import pairwise
from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from chronipatch import attention
from chronipatch.attention import varlen_attention_forward

pytestmark = pytest.mark.gpu

HQ, HK, D = 14, 2, 64  # Qwen2.5-0.5B
LENGTHS = [300, 1000, 57, 1, 700]
BF16_EPS = torch.finfo(torch.bfloat16).eps


def _module():
    # The attributes HF attention functions read from the attention module.
    return SimpleNamespace(is_causal=True, num_key_value_groups=HQ // HK, training=False, layer_idx=0)


def _inputs(lengths=LENGTHS, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = sum(lengths)
    q, k, v = (torch.randn(1, h, t, D, device="cuda", generator=g) for h in (HQ, HK, HK))
    grad = torch.randn(1, t, HQ, D, device="cuda", generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return [x.bfloat16() for x in (q, k, v)], grad.bfloat16(), cu


def _run(fn, qkv, grad, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in qkv]
    out = fn(*leaves)
    out.backward(grad.to(dtype))
    return [out.detach().float()] + [x.grad.float() for x in leaves]


def _per_document(cu, **kw):
    bounds = cu.tolist()

    def fn(q, k, v):
        outs = [
            sdpa_attention_forward(
                _module(), q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, scaling=D**-0.5, **kw
            )[0]
            for a, b in pairwise(bounds)
        ]
        return torch.cat(outs, dim=1)

    return fn


def _ours(**kw):
    module = _module()  # built outside, so a compiled call traces only the attention function
    return lambda q, k, v: varlen_attention_forward(module, q, k, v, None, scaling=D**-0.5, **kw)[0]


def _assert_within_bf16_noise(ours, stock, truth):
    for name, o, s, t in zip(("out", "dq", "dk", "dv"), ours, stock, truth):
        err_o, err_s = (o - t).abs().max().item(), (s - t).abs().max().item()
        ulp = BF16_EPS * t.abs().max().item()
        assert err_o <= 1.1 * err_s + ulp, (name, err_o, err_s, ulp)


def test_packed_varlen_matches_per_document_sdpa():
    qkv, grad, cu = _inputs()
    packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))
    ours = _run(_ours(**packed), qkv, grad, torch.bfloat16)
    stock = _run(_per_document(cu), qkv, grad, torch.bfloat16)
    truth = _run(_per_document(cu), qkv, grad, torch.float32)
    _assert_within_bf16_noise(ours, stock, truth)


def test_position_ids_and_rows_match_cu_seq_lens():
    qkv, grad, cu = _inputs()
    packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))
    pos = torch.cat([torch.arange(n, device="cuda") for n in LENGTHS])[None]
    by_cu = _run(_ours(**packed), qkv, grad, torch.bfloat16)
    by_pos = _run(_ours(position_ids=pos), qkv, grad, torch.bfloat16)
    torch.testing.assert_close(by_pos[0], by_cu[0], atol=0, rtol=0)  # same kernel call
    for a, b in zip(by_pos[1:], by_cu[1:]):  # the flash backward accumulates dq with atomics
        torch.testing.assert_close(a, b, atol=BF16_EPS * b.abs().max().item(), rtol=0)
    # Case 3: a batch of rows with no mask is one causal sequence per row.
    qkv, grad, _ = _inputs([512, 512])
    rows = [x.view(x.shape[1], 2, 512, D).transpose(0, 1) for x in qkv]
    grad_rows = grad.view(2, 512, HQ, D)
    ours = _run(_ours(), rows, grad_rows, torch.bfloat16)
    stock = _run(
        lambda q, k, v: sdpa_attention_forward(_module(), q, k, v, None)[0], rows, grad_rows, torch.bfloat16
    )
    truth = _run(
        lambda q, k, v: sdpa_attention_forward(_module(), q, k, v, None)[0], rows, grad_rows, torch.float32
    )
    _assert_within_bf16_noise(ours, stock, truth)


def test_sliding_window_matches_masked_sdpa():
    window = 128
    qkv, grad, cu = _inputs()
    packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))

    def per_document(q, k, v):
        outs = []
        for a, b in pairwise(cu.tolist()):
            i = torch.arange(b - a, device="cuda")
            delta = i[:, None] - i[None, :]
            mask = ((delta >= 0) & (delta < window))[None, None]  # HF: kv_idx > q_idx - sliding_window
            outs.append(sdpa_attention_forward(_module(), q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], mask)[0])
        return torch.cat(outs, dim=1)

    ours = _run(_ours(sliding_window=window, **packed), qkv, grad, torch.bfloat16)
    stock = _run(per_document, qkv, grad, torch.bfloat16)
    truth = _run(per_document, qkv, grad, torch.float32)
    _assert_within_bf16_noise(ours, stock, truth)


@pytest.mark.parametrize("window", [None, 128])
def test_eager_calls_go_straight_to_the_flash_kernels(monkeypatch, window):
    """Eager CUDA calls skip varlen_attn's custom op (and, GQA, its repeated k/v); same results."""
    qkv, grad, cu = _inputs()
    packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))
    calls = []
    apply = attention._FlashVarlen.apply
    monkeypatch.setattr(attention._FlashVarlen, "apply", lambda *a: calls.append(a[2].shape[1]) or apply(*a))
    direct = _run(_ours(sliding_window=window, **packed), qkv, grad, torch.bfloat16)
    assert calls == [HK]  # k reaches the kernel with its own head count
    monkeypatch.setattr(attention, "eager_cuda", lambda *t: False)
    via_op = _run(_ours(sliding_window=window, **packed), qkv, grad, torch.bfloat16)
    assert len(calls) == 1
    for a, b in zip(direct, via_op):  # dq/dk/dv: atomics and the order of the GQA head sums
        torch.testing.assert_close(a, b, atol=BF16_EPS * b.abs().max().item(), rtol=0)


def test_direct_flash_path_on_projection_layout_rows(monkeypatch):
    """Unpacked rows (B=2, no cu_seq_lens) with q/k/v laid out as HF's projections leave them: the direct
    path matches the custom op's; under a dispatch mode (the flop counter) the custom op runs instead."""
    from torch.utils.flop_counter import FlopCounterMode  # a submodule ``import torch`` does not load

    g = torch.Generator(device="cuda").manual_seed(1)
    b, t = 2, 512
    qkv = [torch.randn(b, t, h, D, device="cuda", generator=g).bfloat16() for h in (HQ, HK, HK)]
    qkv = [x.transpose(1, 2) for x in qkv]  # [B, H, T, D] views of [B, T, H, D]
    grad = torch.randn(b, t, HQ, D, device="cuda", generator=g).bfloat16()
    calls = []
    apply = attention._FlashVarlen.apply
    monkeypatch.setattr(attention._FlashVarlen, "apply", lambda *a: calls.append(1) or apply(*a))
    direct = _run(_ours(), qkv, grad, torch.bfloat16)
    assert calls == [1]
    with FlopCounterMode(display=False):
        _ours()(*qkv)
    assert calls == [1]
    monkeypatch.setattr(attention, "eager_cuda", lambda *t: False)
    via_op = _run(_ours(), qkv, grad, torch.bfloat16)
    for a, c in zip(direct, via_op):
        torch.testing.assert_close(a, c, atol=BF16_EPS * c.abs().max().item(), rtol=0)


def test_compile_fullgraph_varlen():
    qkv, grad, cu = _inputs()
    packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))
    explained = torch._dynamo.explain(_ours(**packed))(*qkv)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(_ours(**packed), fullgraph=True)
    got = _run(compiled, qkv, grad, torch.bfloat16)
    want = _run(_ours(**packed), qkv, grad, torch.bfloat16)
    for a, b in zip(got, want):  # dq differs by atomics order only
        torch.testing.assert_close(a, b, atol=BF16_EPS * b.abs().max().item(), rtol=0)
    torch._dynamo.reset()


def test_position_split_is_found_once_per_forward(monkeypatch):
    """Every layer gets the same ``position_ids``: their document split (a host sync) is found once."""
    found = []
    real = attention._cu_from_positions
    monkeypatch.setattr(attention, "_cu_from_positions", lambda pos: found.append(1) or real(pos))
    (q, k, v), _, cu = _inputs()
    pos = torch.cat([torch.arange(b - a) for a, b in pairwise(cu.tolist())])[None].cuda()
    outs = [_ours(position_ids=pos)(q, k, v) for _ in range(4)]  # four layers of one forward
    assert len(found) == 1
    want = _ours(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=1000, max_length_k=1000)(q, k, v)
    for out in outs:
        torch.testing.assert_close(out, want, rtol=0, atol=0)
