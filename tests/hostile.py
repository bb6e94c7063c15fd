"""Shared pieces of the hostile-input tests: the "still right" calls of every entry point (run after each
hostile call, so nothing a rejected call did can spoil the next one) and small input builders."""

from __future__ import annotations

import copy
import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import chronipatch
from chronipatch import ops
from chronipatch.attention import varlen_attention_forward
from chronipatch.packing import PackingCollator
from helpers import hf_view
from tiny import batch, tiny_model

rms_k = importlib.import_module("chronipatch.ops.rms_norm")
swi_k = importlib.import_module("chronipatch.ops.swiglu")
rope_k = importlib.import_module("chronipatch.ops.rope")
lce_k = importlib.import_module("chronipatch.ops.linear_cross_entropy")
NAN, INF = float("nan"), float("inf")
LONG = torch.long


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float64, scale=1.0):
    return torch.randn(*shape, generator=_g(seed), dtype=dtype) * scale


def defect(reason: str):
    """A case the package gets wrong today; strict, so the fix turns it into a failure to remove."""
    return pytest.mark.xfail(strict=True, reason=reason)


# ---------------------------------------------------------------- normal calls (the "still right" check)


def _hf_rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def sane_rms_norm():
    x, w = _randn(5, 16, seed=1), 1 + _randn(16, seed=2, scale=0.2)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), _hf_rms(x, w, 1e-6), rtol=1e-12, atol=1e-12)


def sane_swiglu():
    g, u = _randn(4, 9, seed=3), _randn(4, 9, seed=4)
    torch.testing.assert_close(ops.swiglu(g, u), F.silu(g) * u, rtol=1e-12, atol=1e-12)


def _cos_sin(b, t, d, dtype=torch.float64):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    emb = torch.arange(t, dtype=torch.float64)[:, None] * inv
    emb = torch.cat([emb, emb], -1)[None].expand(b, t, d)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def sane_rope():
    q, k = hf_view(2, 5, 4, 8, dtype=torch.float64), hf_view(2, 5, 2, 8, dtype=torch.float64)
    cos, sin = _cos_sin(2, 5, 8)
    for a, b in zip(ops.rope(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def sane_lce():
    h, w = _randn(2, 6, 8, seed=5), _randn(11, 8, seed=6)
    labels = torch.randint(0, 11, (2, 6), generator=_g(7))
    labels[0, 2] = -100
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    ref = F.cross_entropy((h @ w.T).reshape(-1, 11), shifted.reshape(-1))
    torch.testing.assert_close(ops.linear_cross_entropy(h, w, labels), ref, rtol=1e-12, atol=1e-12)


def sane_packing():
    out = PackingCollator(max_length=8)([{"input_ids": [5, 6, 7]}, {"input_ids": [1, 2, 3, 4, 5]}])
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5, 5, 6, 7]]
    assert out["labels"].tolist() == [[-100, 2, 3, 4, 5, -100, 6, 7]]
    assert out["cu_seq_lens_q"].tolist() == [0, 5, 8] and out["max_length_q"] == 8


class _Attn:
    is_causal, num_key_value_groups, training = True, 2, False


def _qkv(t=10, b=1, hq=4, hk=2, d=8, seed=8, dtype=torch.float64):
    g = _g(seed)
    return [torch.randn(b, h, t, d, generator=g, dtype=dtype) for h in (hq, hk, hk)]


def _per_document(q, k, v, bounds):
    """Causal SDPA of each document alone, concatenated: [1, T, Hq, D]."""
    groups = q.shape[1] // k.shape[1]
    outs = []
    for lo, hi in itertools.pairwise(bounds):
        kk, vv = (x[:, :, lo:hi].repeat_interleave(groups, 1) for x in (k, v))
        outs.append(F.scaled_dot_product_attention(q[:, :, lo:hi], kk, vv, is_causal=True))
    return torch.cat(outs, 2).transpose(1, 2)


def sane_attention():
    q, k, v = _qkv()
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    out, _ = varlen_attention_forward(_Attn(), q, k, v, None, cu_seq_lens_q=cu, max_length_q=7)
    torch.testing.assert_close(out, _per_document(q, k, v, [0, 3, 10]), rtol=1e-12, atol=1e-12)


_STOCK = {}


def _stock_model():
    if "llama" not in _STOCK:
        model = tiny_model("llama")
        ids, labels = batch()
        with torch.no_grad():
            _STOCK["llama"] = (model, model(ids, labels=labels))
    return _STOCK["llama"]


def sane_patch():
    stock, ref = _stock_model()
    model = copy.deepcopy(stock)
    ids, labels = batch()
    report = chronipatch.apply(model)
    with torch.no_grad():
        out = model(ids, labels=labels, return_logits=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert chronipatch.revert(model) == len(report.swapped)
    with torch.no_grad():
        assert torch.equal(model(ids, labels=labels).logits, ref.logits)


SANE = {
    "rms_norm": sane_rms_norm,
    "swiglu": sane_swiglu,
    "rope": sane_rope,
    "lce": sane_lce,
    "packing": sane_packing,
    "attention": sane_attention,
    "patch": sane_patch,
}


cu10 = torch.tensor([0, 4, 10], dtype=torch.int32)
PACKED = dict(cu_seq_lens_q=cu10, cu_seq_lens_k=cu10, max_length_q=6, max_length_k=6)


def _attn(*qkv, mask=None, module=None, **kw):
    q, k, v = qkv or _qkv()
    return varlen_attention_forward(module or _Attn(), q, k, v, mask, **kw)
