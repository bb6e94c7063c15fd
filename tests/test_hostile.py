"""Hostile inputs for every public entry point: each gives a clear ValueError/TypeError naming the problem, or
the mathematically right answer (finite, NaN or inf), and leaves no state behind that spoils the next call.

Entry points: ``ops.rms_norm``, ``ops.swiglu``, ``ops.rope``, ``ops.linear_cross_entropy`` (public op and,
through the interpreter or natively, its Triton launchers), ``chronipatch.apply`` / ``revert``,
``packing.PackingCollator`` and ``attention.varlen_attention_forward``. The basic bad-input cases of
test_ops.py / test_attention.py / test_packing.py are not repeated here. Cases marked xfail(strict) are
defects of the package, each reason says what it should do instead.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import chronipatch
from chronipatch import attention, ops
from chronipatch.attention import varlen_attention_forward
from chronipatch.packing import PackingCollator, PackingStats
from helpers import INTERPRET, KERNEL_DEVICE, hf_view
from tiny import batch, tiny_model

KERNELS = INTERPRET or torch.cuda.is_available()
needs_kernels = pytest.mark.skipif(not KERNELS, reason="needs CUDA or TRITON_INTERPRET=1")
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
    assert out["cu_seq_lens_q"].tolist() == [0, 5, 8] and out["max_length_q"] == 5


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


@pytest.mark.parametrize("entry", list(SANE))
def test_normal_calls_are_right(entry):
    SANE[entry]()


# ---------------------------------------------------------------- errors that must name the problem

x8, w8 = torch.randn(3, 8), torch.randn(8)
q4, k4, c4, s4 = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)
h48, W108 = torch.randn(4, 8), torch.randn(10, 8)
lab4 = torch.tensor([1, 2, 3, 4])
cu10 = torch.tensor([0, 4, 10], dtype=torch.int32)
PACKED = dict(cu_seq_lens_q=cu10, cu_seq_lens_k=cu10, max_length_q=6, max_length_k=6)


def _attn(*qkv, mask=None, module=None, **kw):
    q, k, v = qkv or _qkv()
    return varlen_attention_forward(module or _Attn(), q, k, v, mask, **kw)


class _NotCausal:
    is_causal = False


ERRORS = [
    # --- rms_norm: dtypes, ranks, devices, layout of the weight
    ("rms_norm", lambda: ops.rms_norm(x8.bool(), w8), "x and weight must be floating point"),
    ("rms_norm", lambda: ops.rms_norm(x8, w8.long()), "x and weight must be floating point.*int64"),
    ("rms_norm", lambda: ops.rms_norm(x8.to(torch.complex64), w8), "floating point"),
    ("rms_norm", lambda: ops.rms_norm(torch.tensor(1.0), torch.ones(1)), "at least one dim"),
    ("rms_norm", lambda: ops.rms_norm(x8.to("meta"), w8), "weight is on cpu but x is on meta"),
    ("rms_norm", lambda: ops.rms_norm(x8, torch.randn(16)[::2]), "weight must be contiguous"),
    ("rms_norm", lambda: ops.rms_norm(x8, w8[None]), r"weight shape \(1, 8\)"),
    (
        "rms_norm",
        lambda: ops.rms_norm([[1.0, 2.0]], torch.ones(2)),
        "x",
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
        "cos",
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
        "nn.Module",
    ),
    (
        "patch",
        lambda: chronipatch.is_patched("model"),
        "nn.Module",
    ),
    # --- PackingCollator
    ("packing", lambda: PackingCollator(max_length=8)(None), ""),
    ("packing", lambda: PackingCollator(max_length=8)([{"input_ids": 5}]), "'input_ids' must be 1-D"),
    ("packing", lambda: PackingCollator(max_length=8)([{"input_ids": "abc"}]), ""),
    ("packing", lambda: PackingCollator(max_length=8)([{"input_ids": [[1, 2], [3]]}]), ""),
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


# ---------------------------------------------------------------- NaN / inf: the math, nothing more


def _rms_call(impl, x, w, dy):
    if impl == "kernel":
        y, rstd = rms_k.rms_norm_fwd_triton(x, w, 1e-6)
        return (y, *rms_k.rms_norm_bwd_triton(dy, x, w, rstd))
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = ops.rms_norm(xg, wg, 1e-6)
    return (y.detach(), *torch.autograd.grad(y, (xg, wg), dy))


IMPLS = ["public", pytest.param("kernel", marks=needs_kernels)]


@pytest.mark.parametrize("impl", IMPLS)
def test_rms_norm_nan_row_stays_in_its_row(impl):
    dev = KERNEL_DEVICE if impl == "kernel" else "cpu"
    x, w = torch.randn(6, 40, generator=_g(1)), 1 + 0.1 * torch.randn(40, generator=_g(2))
    dy = torch.randn(6, 40, generator=_g(3))
    bad = x.clone()
    bad[2, 7] = NAN
    bad[4, 0] = INF
    x, bad, w, dy = (t.to(dev) for t in (x, bad, w, dy))
    y, dx, dw = _rms_call(impl, bad, w, dy)
    y_ok, dx_ok, _ = _rms_call(impl, x, w, dy)
    assert y[2].isnan().all() and dx[2].isnan().all()  # rstd of the row is NaN: the whole row is
    assert y[4, 0].isnan() and (y[4, 1:] == 0).all()  # x * rsqrt(inf) = inf * 0 at the inf, 0 elsewhere
    fine = [0, 1, 3, 5]
    assert torch.equal(y[fine], y_ok[fine]) and torch.equal(dx[fine], dx_ok[fine])
    assert dw.isnan().all()  # dw sums over every row, the NaN row included
    sane_rms_norm()


@pytest.mark.parametrize("impl", IMPLS)
def test_swiglu_non_finite_gate_matches_ieee_stock(impl):
    dev = KERNEL_DEVICE if impl == "kernel" else "cpu"
    g = torch.tensor([-INF, INF, NAN, -1e30, 1e30, -100.0, 0.0, 3.0], device=dev)
    u = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0, 5.0, NAN, -INF], device=dev)
    do = torch.ones(8, device=dev)
    stock = [F.silu(g) * u, *torch.autograd.grad(F.silu(gg := g.clone().requires_grad_()) * u, gg, do)]
    if impl == "kernel":
        out, (dg, du) = swi_k.swiglu_fwd_triton(g, u), swi_k.swiglu_bwd_triton(do, g, u)
    else:
        gg, uu = g.clone().requires_grad_(), u.clone().requires_grad_()
        out = ops.swiglu(gg, uu)
        dg, du = torch.autograd.grad(out, (gg, uu), do)
    torch.testing.assert_close(out, stock[0], equal_nan=True)
    torch.testing.assert_close(dg, stock[1], equal_nan=True)
    # finite, saturated gates stay finite: silu(-1e30) = -0, silu(1e30) * 1 = 1e30, silu(-100) ~ -4e-42
    assert out[3:6].isfinite().all() and dg[3:6].isfinite().all() and du[3:6].isfinite().all()
    assert out[1] == INF and out[2].isnan() and out[6].isnan() and out[7] == -INF
    sane_swiglu()


@pytest.mark.parametrize("impl", IMPLS)
def test_rope_nan_reaches_only_its_token_and_dim(impl):
    dev = KERNEL_DEVICE if impl == "kernel" else "cpu"
    q, k = hf_view(2, 5, 4, 8).to(dev), hf_view(2, 5, 2, 8).to(dev)
    cos, sin = (t.float().to(dev) for t in _cos_sin(2, 5, 8))
    q[1, 2, 3, 1] = NAN  # batch 1, head 2, token 3, dim 1 (first half)
    cos = cos.clone()
    cos[0, 4, 6] = NAN  # batch 0, token 4, dim 6 (second half)
    if impl == "kernel":
        qo, ko = rope_k.rope_triton(q, k, cos, sin)
    else:
        qo, ko = ops.rope(q, k, cos, sin)
    expect_q = torch.zeros_like(qo, dtype=torch.bool)
    expect_q[1, 2, 3, [1, 5]] = True  # the pair (1, 1 + D/2) rotates together
    expect_q[0, :, 4, 6] = True  # cos[..., 6] multiplies x[..., 6] only
    expect_k = torch.zeros_like(ko, dtype=torch.bool)
    expect_k[0, :, 4, 6] = True
    assert torch.equal(qo.isnan(), expect_q) and torch.equal(ko.isnan(), expect_k)
    sane_rope()


def _lce_rows(impl, h, w, labels):
    if impl == "kernel":
        return lce_k.lce_fwd_triton(h, w, labels, -100)
    loss, stats = ops.linear_cross_entropy(
        h, w, labels, shift=False, reduction="none", return_token_stats=True
    )
    return loss, None, stats.entropy, stats.correct


@pytest.mark.parametrize("impl", IMPLS)
def test_lce_nan_hidden_row(impl):
    dev = KERNEL_DEVICE if impl == "kernel" else "cpu"
    h, w = torch.randn(5, 8, generator=_g(1)).to(dev), torch.randn(11, 8, generator=_g(2)).to(dev)
    labels = torch.tensor([1, 2, 3, -100, 5], device=dev)
    h[2, 4] = NAN  # a supervised row
    h[3, 0] = NAN  # an ignored row: contributes exactly 0
    rows = _lce_rows(impl, h, w, labels)[0]
    ref = F.cross_entropy(h @ w.T, labels, reduction="none")
    assert rows[2].isnan() and rows[3] == 0
    torch.testing.assert_close(rows[[0, 1, 4]], ref[[0, 1, 4]])
    if impl == "public":
        keep = torch.tensor([True, True, False, True, True])
        mean = ops.linear_cross_entropy(h[keep], w, labels[keep], shift=False)  # ignored NaN row: finite
        torch.testing.assert_close(mean, F.cross_entropy(h[keep] @ w.T, labels[keep]))
        assert ops.linear_cross_entropy(h, w, labels, shift=False).isnan()
    sane_lce()


def _overflow_case(sign: float):
    """fp16 hidden/weight whose logit [1, 2] overflows to sign*inf; every other logit finite."""
    h = (torch.randn(3, 4, generator=_g(4)) * 0.5).half()
    w = (torch.randn(5, 4, generator=_g(5)) * 0.1).half()
    h[1, 0], w[2, 0], w[3, 0] = 300.0, sign * 300.0, -sign * 50.0
    logits = h @ w.T
    assert (
        logits[1, 2] == sign * INF
        and logits[[0, 2]].isfinite().all()
        and logits[1, [0, 1, 3, 4]].isfinite().all()
    )
    return h, w


def test_lce_plus_inf_logit_public():
    """A +inf logit takes all probability: label elsewhere -> loss +inf (p_y = 0); other rows untouched."""
    h, w = _overflow_case(+1.0)
    labels = torch.tensor([0, 1, 3])
    rows = ops.linear_cross_entropy(h, w, labels, shift=False, reduction="none")
    stock = F.cross_entropy((h @ w.T).float(), labels, reduction="none")
    assert rows[1] == INF
    torch.testing.assert_close(rows[[0, 2]], stock[[0, 2]])
    assert not ops.linear_cross_entropy(h, w, labels, shift=False).isfinite()
    sane_lce()


@needs_kernels
def test_lce_plus_inf_logit_kernel():
    """The kernels meet the +inf logit as the math does: the row's loss is +inf (label elsewhere) or nan
    (label on it, inf - inf), its entropy 0, other rows match stock; the backward stays finite."""
    h, w = (t.to(KERNEL_DEVICE) for t in _overflow_case(+1.0))
    labels = torch.tensor([0, 1, 3], device=KERNEL_DEVICE)
    rows, stats, entropy, _ = lce_k.lce_fwd_triton(h, w, labels, -100)
    stock = F.cross_entropy((h @ w.T).float(), labels, reduction="none")
    torch.testing.assert_close(rows[[0, 2]], stock[[0, 2]])
    assert rows[1] == INF and entropy[1] == 0 and entropy.isfinite().all()
    on_it = lce_k.lce_fwd_triton(h, w, torch.tensor([0, 2, 3], device=KERNEL_DEVICE), -100)[0]
    assert on_it[1].isnan() and on_it[[0, 2]].isfinite().all()
    dh, dw = lce_k.lce_bwd_triton(
        torch.tensor([1.0, 0.0, 1.0], device=KERNEL_DEVICE), h, w, labels, stats, -100
    )
    assert dh.isfinite().all() and dw.isfinite().all()


@pytest.mark.parametrize("impl", IMPLS)
def test_lce_minus_inf_logit_is_harmless(impl):
    """A -inf logit has probability 0: the loss is finite unless it is the label (then +inf), grads finite."""
    dev = KERNEL_DEVICE if impl == "kernel" else "cpu"
    h, w = (t.to(dev) for t in _overflow_case(-1.0))
    labels = torch.tensor([0, 1, 3], device=dev)
    rows = _lce_rows(impl, h, w, labels)[0]
    stock = F.cross_entropy((h @ w.T).float(), labels, reduction="none")
    torch.testing.assert_close(rows, stock)
    on_it = _lce_rows(impl, h, w, torch.tensor([0, 2, 3], device=dev))[0]
    assert on_it[1] == INF and on_it[[0, 2]].isfinite().all()
    if impl == "public":
        hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
        ops.linear_cross_entropy(hg, wg, labels, shift=False).backward()
        assert hg.grad.isfinite().all() and wg.grad.isfinite().all()
    else:
        lse = lce_k.lce_fwd_triton(h, w, labels, -100)[1]
        dh, dw = lce_k.lce_bwd_triton(torch.ones(3, device=dev), h, w, labels, lse, -100)
        assert dh.isfinite().all() and dw.isfinite().all()


@pytest.mark.parametrize("impl", IMPLS)
def test_lce_minus_inf_logit_entropy_is_finite(impl):
    dev = KERNEL_DEVICE if impl == "kernel" else "cpu"
    h, w = (t.to(dev) for t in _overflow_case(-1.0))
    entropy = _lce_rows(impl, h, w, torch.tensor([0, 1, 3], device=dev))[2]
    assert entropy.isfinite().all()


def test_attention_nan_query_stays_in_its_token():
    q, k, v = _qkv()
    q[0, 1, 5, 0] = NAN
    out, _ = _attn(q, k, v, **PACKED)
    bad = out.isnan().any(-1).any(-1)[0]  # per token
    assert bad.tolist() == [i == 5 for i in range(10)]
    assert out[0, 5, 1].isnan().all() and not out[0, 5, [0, 2, 3]].isnan().any()
    sane_attention()


def test_attention_mixed_dtypes_name_the_problem():
    q = _qkv(dtype=torch.float32)[0]
    with pytest.raises((ValueError, TypeError, RuntimeError), match="same dtype"):  # SDPA's own message
        _attn(q, *_qkv()[1:])
    sane_attention()


def test_attention_nan_key_stays_in_its_document():
    q, k, v = _qkv()
    k[0, 0, 2, 3] = NAN  # key 2 of document [0, 4), kv head 0 -> q heads 0 and 1
    out, _ = _attn(q, k, v, **PACKED)
    bad = out.isnan().any(-1)[0]  # [T, Hq]
    expect = torch.zeros(10, 4, dtype=torch.bool)
    expect[2:4, :2] = True  # queries 2 and 3 see key 2 (causal), the next document never does
    assert torch.equal(bad, expect)
    sane_attention()


# ---------------------------------------------------------------- empty batches and degenerate sizes


def test_zero_rows_forward_and_backward_every_op():
    x, w = torch.randn(0, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    ops.rms_norm(x, w).sum().backward()
    assert x.grad.shape == (0, 16) and torch.equal(w.grad, torch.zeros(16))
    g, u = torch.randn(2, 0, 8, requires_grad=True), torch.randn(2, 0, 8, requires_grad=True)
    ops.swiglu(g, u).sum().backward()
    assert g.grad.shape == (2, 0, 8) and u.grad.shape == (2, 0, 8)
    for b, t in ((0, 3), (2, 0)):
        q, k = hf_view(b, t, 4, 8).requires_grad_(), hf_view(b, t, 2, 8).requires_grad_()
        cos, sin = torch.randn(1, t, 8), torch.randn(1, t, 8)
        qo, ko = ops.rope(q, k, cos, sin)
        (qo.sum() + ko.sum()).backward()
        assert qo.shape == q.shape and q.grad.shape == q.shape and k.grad.shape == k.shape
    hw = torch.randn(10, 8, requires_grad=True)
    for shape in ((0, 5), (3, 0), (0,)):
        hid = torch.randn(*shape, 8, requires_grad=True)
        labels = torch.zeros(shape, dtype=LONG)
        loss = ops.linear_cross_entropy(hid, hw, labels, shift=len(shape) > 1)
        loss.backward()
        assert loss.item() == 0.0 and hid.grad.shape == hid.shape and not hw.grad.any()
    for entry in ("rms_norm", "swiglu", "rope", "lce"):
        SANE[entry]()


@needs_kernels
def test_zero_rows_kernels():
    dev = KERNEL_DEVICE
    x, w = torch.randn(0, 16, device=dev), torch.randn(16, device=dev)
    y, rstd = rms_k.rms_norm_fwd_triton(x, w, 1e-6)
    dx, dw = rms_k.rms_norm_bwd_triton(x, x, w, rstd)
    assert y.shape == (0, 16) and dx.shape == (0, 16) and torch.equal(dw, torch.zeros_like(w))
    e = torch.randn(0, 8, device=dev)
    assert swi_k.swiglu_fwd_triton(e, e).shape == (0, 8) and swi_k.swiglu_bwd_triton(e, e, e)[0].shape == (
        0,
        8,
    )
    q = hf_view(2, 0, 4, 8).to(dev)
    assert rope_k.rope_triton(
        q, q[:, :2], torch.randn(1, 0, 8, device=dev), torch.randn(1, 0, 8, device=dev)
    )[0].shape == (2, 4, 0, 8)
    h, wv, labels = torch.randn(0, 8, device=dev), torch.randn(10, 8, device=dev), torch.zeros(0, dtype=LONG)
    loss, lse, _, _ = lce_k.lce_fwd_triton(h, wv, labels.to(dev), -100)
    dh, dwv = lce_k.lce_bwd_triton(loss, h, wv, labels.to(dev), lse, -100)
    assert loss.shape == (0,) and dh.shape == (0, 8) and not dwv.any()


def test_lce_all_ignored_with_num_items_and_every_reduction():
    h, w = torch.randn(2, 5, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    labels = torch.full((2, 5), -100)
    for kw in (
        dict(),
        dict(reduction="sum"),
        dict(num_items_in_batch=7),
        dict(num_items_in_batch=torch.tensor(7)),
    ):
        loss = ops.linear_cross_entropy(h, w, labels, **kw)
        assert loss.item() == 0.0
        (gh, gw) = torch.autograd.grad(loss, (h, w))
        assert not gh.any() and not gw.any()
    rows = ops.linear_cross_entropy(h, w, labels, reduction="none")
    assert rows.shape == (2, 5) and not rows.any()


def test_lce_first_label_is_never_predicted_under_shift():
    """Under shift no position predicts labels[..., 0]: any value there, even out of range, is unused."""
    h, w = _randn(2, 6, 8, seed=9), _randn(10, 8, seed=10)
    labels = torch.randint(0, 10, (2, 6), generator=_g(11))
    hostile = labels.clone()
    hostile[:, 0] = 10**6
    ref = labels.clone()
    ref[:, 0] = -100
    torch.testing.assert_close(ops.linear_cross_entropy(h, w, hostile), ops.linear_cross_entropy(h, w, ref))
    sane_lce()


@pytest.mark.parametrize("items", [0, -2])
def test_lce_non_positive_num_items(items):
    h, w, labels = _randn(4, 8, seed=12), _randn(10, 8, seed=13), torch.tensor([1, 2, 3, 4])
    try:
        loss = ops.linear_cross_entropy(h, w, labels, shift=False, num_items_in_batch=items)
    except ValueError as e:
        assert "num_items_in_batch" in str(e)
    else:
        assert not loss.isfinite() or loss.item() < 0


def test_lce_zero_hidden_size():
    """H = 0 has no meaningful head: a ValueError naming the empty dimension."""
    with pytest.raises(ValueError, match="empty V or H"):
        ops.linear_cross_entropy(torch.randn(4, 0), torch.randn(10, 0), lab4, shift=False)
    sane_lce()


def test_rms_norm_zero_width_and_one_width():
    assert ops.rms_norm(torch.randn(3, 0), torch.randn(0)).shape == (3, 0)
    x = torch.tensor([[-2.0], [0.5], [0.0]], dtype=torch.float64)
    w = torch.tensor([3.0], dtype=torch.float64)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-12), _hf_rms(x, w, 1e-12))  # w * sign(x), 0 for 0


def test_attention_empty_and_zero_length_documents():
    q, k, v = _qkv(t=0)
    out, _ = _attn(q, k, v)
    assert out.shape == (1, 0, 4, 8)
    out, _ = _attn(q, k, v, cu_seq_lens_q=torch.tensor([0, 0]), max_length_q=0)
    assert out.shape == (1, 0, 4, 8)
    q, k, v = _qkv()
    cu = torch.tensor([0, 4, 4, 10, 10], dtype=torch.int32)  # empty documents in the middle and at the end
    out, _ = _attn(q, k, v, cu_seq_lens_q=cu, max_length_q=6)
    torch.testing.assert_close(out, _per_document(q, k, v, [0, 4, 10]), rtol=1e-12, atol=1e-12)
    sane_attention()


def test_attention_on_meta_without_packing():
    q, k, v = (t.to("meta") for t in _qkv())
    assert _attn(q, k, v)[0].shape == (1, 10, 4, 8)


def test_attention_on_meta_with_packing():
    q, k, v = (t.to("meta") for t in _qkv())
    meta = {**PACKED, "cu_seq_lens_q": cu10.to("meta"), "cu_seq_lens_k": cu10.to("meta")}
    assert _attn(q, k, v, **meta)[0].shape == (1, 10, 4, 8)


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
    assert len(attention._memo) <= 17
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
