"""Hostile arguments found by review: the loss's num_items_in_batch in every form, the checks under autocast,
a None residual, cos/sin of another dtype, inference tensors, rows of width 0 in the kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from chronipatch import ops
from helpers import KERNEL_DEVICE, hf_view, needs_kernels
from hostile import _randn, rms_k, rope_k


def _lce_case(dtype=torch.float32):
    h = _randn(2, 5, 16, seed=1).to(dtype).requires_grad_()
    w = _randn(8, 16, seed=2).to(dtype).requires_grad_()
    labels = torch.randint(0, 8, (2, 5), generator=torch.Generator().manual_seed(3))
    return h, w, labels


def _stock_lce(h, w, labels, n):
    logits = F.linear(h.double(), w.double())[:, :-1].reshape(-1, w.shape[0])
    return F.cross_entropy(logits, labels[:, 1:].reshape(-1), reduction="sum") / n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_lce_one_element_num_items_gives_a_scalar_in_the_inputs_precision(dtype):
    """A [1] tensor passes as one number: the loss is 0-dim, fp64 inputs keep an fp64 loss, and the
    compiled call (the with-grad op's fake is 0-dim) agrees."""
    h, w, labels = _lce_case(dtype)
    n = torch.tensor([7])
    loss = ops.linear_cross_entropy(h, w, labels, num_items_in_batch=n)
    assert loss.shape == () and loss.dtype == torch.promote_types(dtype, torch.float32)
    rtol = 2e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(loss.double(), _stock_lce(h, w, labels, 7), rtol=rtol, atol=0)

    def step(h, w, n):
        return ops.linear_cross_entropy(h, w, labels, num_items_in_batch=n)

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(h, w, n), loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lce_int_num_items_that_changes_between_calls_compiles_twice(dtype):
    """The second value makes dynamo trace num_items as a symbolic int: no check may read it eagerly, and the
    divisor may not bake it into the graph (one recompile per count, then the recompile limit: eager again,
    or under fullgraph an error). Ten counts, two compiles, as stock's sum / n."""
    h, w, labels = _lce_case(dtype)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(
        lambda h, w, n: ops.linear_cross_entropy(h, w, labels, num_items_in_batch=n),
        backend=counter,
        fullgraph=True,
    )
    rtol = 2e-2 if dtype == torch.bfloat16 else 1e-6
    for n in range(7, 17):
        loss = step(h, w, n)
        torch.testing.assert_close(loss.double(), _stock_lce(h, w, labels, n), rtol=rtol, atol=0)
    assert counter.frame_count == 2


@pytest.mark.parametrize("wrap", [float, torch.tensor])
def test_lce_nan_num_items_is_an_error(wrap):
    h, w, labels = _lce_case()
    with pytest.raises(ValueError, match=r"num_items_in_batch=nan cannot normalise"):
        ops.linear_cross_entropy(h, w, labels, num_items_in_batch=wrap(float("nan")))


def test_checks_hold_under_autocast():
    x, nw, W, b = torch.randn(3, 8), torch.randn(8), torch.randn(4, 8), torch.randn(4)
    cases = [
        (lambda: ops.rms_norm_linear(x, nw, 1e-6, W), "weights must be a list of .* got Tensor"),
        (lambda: ops.rms_norm_linear(x, nw, 1e-6, []), "needs at least one weight"),
        (lambda: ops.rms_norm_linear(x, nw, 1e-6, [W, W], [b]), "2 weights but 1 biases"),
        (lambda: ops.rms_norm_linear(x, nw, 1e-6, [W[:, :7]]), r"weights\[0\] \(4, 7\) does not match"),
        (lambda: ops.rms_norm_linear(x, nw[:7], 1e-6, [W]), r"norm_weight \(7,\) does not match"),
        (lambda: ops.add_rms_norm_linear(x[:2], x, nw, 1e-6, [W]), r"residual \(2, 8\) does not match"),
        (lambda: ops.swiglu_linear(x, x, W[0]), r"weight \(8,\) does not match gate"),
        (lambda: ops.swiglu_linear(x, x[:, :7], W), "differ in shape"),
        (lambda: ops.swiglu_linear(x, x, W, b[:3]), r"bias \(3,\) does not match"),
    ]
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for call, message in cases:
                with pytest.raises(ValueError, match=message):
                    call()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a good call still runs stock's composition
        (q,) = ops.rms_norm_linear(x, nw, 1e-6, [W], [b])
        assert q.dtype == torch.bfloat16 and q.shape == (3, 4)


def test_add_rms_norm_linear_needs_a_residual():
    x = torch.randn(3, 8)
    with pytest.raises(TypeError, match=r"residual must be a torch\.Tensor"):
        ops.add_rms_norm_linear(None, x, torch.ones(8), 1e-6, [torch.randn(4, 8)])


def test_rope_cos_sin_of_another_dtype():
    """Outside autocast HF's cos/sin have q's dtype: another is an error. Under autocast (fp32 cos/sin,
    bf16 q/k from autocast's projections) stock rotates in fp32 and attention rounds back to bf16: the op's
    bf16 outputs are those values."""
    q, k = hf_view(1, 5, 4, 8).bfloat16(), hf_view(1, 5, 2, 8).bfloat16()  # [B, H, T, D] views
    cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    with pytest.raises(ValueError, match=r"cos and sin must have q's dtype torch.bfloat16"):
        ops.rope(q, k, cos, sin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qo, ko = ops.rope(q, k, cos, sin)
    for out, x in ((qo, q), (ko, k)):
        half = torch.cat((-x[..., 4:], x[..., :4]), -1)  # rotate_half
        stock = x * cos[:, None] + half * sin[:, None]  # fp32, as HF's apply_rotary_pos_emb leaves it
        assert out.dtype == torch.bfloat16 and stock.dtype == torch.float32
        torch.testing.assert_close(out, stock.bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("op", ["rms_norm", "rms_norm_linear", "swiglu_linear"])
def test_inference_tensor_inputs_train_the_weights_as_stock(op):
    """Activations made under inference_mode (cached features) with trainable weights: stock saves only
    tensors computed from them and trains; the ops, which save their inputs, copy them first."""
    with torch.inference_mode():
        x = torch.randn(3, 8)
    nw = torch.randn(8, requires_grad=True)
    W = torch.randn(4, 8, requires_grad=True)

    def run(fused):
        y = nw * (x * torch.rsqrt(x.pow(2).mean(-1, True) + 1e-6))  # stock's RMSNorm in fp32
        if op == "rms_norm":
            out = ops.rms_norm(x, nw, 1e-6) if fused else y
        elif op == "rms_norm_linear":
            out = ops.rms_norm_linear(x, nw, 1e-6, [W])[0] if fused else F.linear(y, W)
        else:
            out = ops.swiglu_linear(x, x, W) if fused else F.linear(F.silu(x) * x, W)
        params = (W,) if op == "swiglu_linear" else (nw, W) if op == "rms_norm_linear" else (nw,)
        return torch.autograd.grad(out.square().sum(), params)

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_kernels_take_rows_of_width_zero():
    dev = KERNEL_DEVICE
    x, w = torch.randn(3, 0, device=dev), torch.randn(0, device=dev)
    y, rstd = rms_k.rms_norm_fwd_triton(x, w, 1e-6)
    assert y.shape == (3, 0) and rstd.isnan().all()  # the mean of no squares, as stock's
    dx, dw = rms_k.rms_norm_bwd_triton(x, x, w, rstd)
    assert dx.shape == (3, 0) and dw.shape == (0,)
    q = hf_view(1, 3, 2, 4).to(dev)  # [1, 2 heads, 3 tokens, 4]
    cos = torch.randn(1, 3, 4, device=dev)
    qo, ko = rope_k.rope_triton(q, q[:, :0], cos, cos)  # k of no heads
    assert ko.shape == (1, 0, 3, 4)
    torch.testing.assert_close(qo, rope_k.rope_triton(q, q[:, :1], cos, cos)[0])
    qo, ko = rope_k.rope_triton(q[..., :0], q[..., :0], cos[..., :0], cos[..., :0])  # head dim 0
    assert qo.shape == (1, 2, 3, 0) and ko.shape == (1, 2, 3, 0)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize(
    "case", ["rope-batch-0", "rope-tokens-0", "swiglu-out-0", "swiglu-inner-0", "norm-linear-out-0", "norm-0"]
)
def test_empty_batches_and_widths_run_both_ways_as_stock(case):
    """Zero rows or zero features: the stock composition's empty or zero results, forward and backward."""
    b, t = (0, 5) if case == "rope-batch-0" else (2, 0) if case == "rope-tokens-0" else (2, 5)
    if case.startswith("rope"):
        x, nw = torch.randn(b, t, 16), torch.ones(16)
        ws = _leaves(torch.randn(16, 16), torch.randn(8, 16), torch.randn(8, 16))
        cos, sin = torch.randn(1, t, 8), torch.randn(1, t, 8)
        outs = ops.rms_norm_linear_rope(x, nw, 1e-6, ws, None, 8, cos, sin)
        assert [tuple(o.shape) for o in outs] == [(b, 2, t, 8), (b, 1, t, 8), (b, 1, t, 8)]
        sum(o.sum() for o in outs).backward()
        assert all(w.grad is not None and not w.grad.any() for w in ws)
        return
    if case.startswith("swiglu"):
        inner, out = (0, 5) if case == "swiglu-inner-0" else (4, 0)
        g, u, w = _leaves(torch.randn(3, inner), torch.randn(3, inner), torch.randn(out, inner))
        gs, us, ws = _leaves(g, u, w)
        mine, stock = ops.swiglu_linear(g, u, w), F.linear(F.silu(gs) * us, ws)
        leaves, stock_leaves = (g, u, w), (gs, us, ws)
    elif case == "norm-linear-out-0":
        x, nw, w = _leaves(torch.randn(3, 8), torch.randn(8), torch.randn(0, 8))
        xs, nws, ws = _leaves(x, nw, w)
        mine, stock = ops.rms_norm_linear(x, nw, 1e-6, [w])[0], F.linear(F.rms_norm(xs, (8,), nws, 1e-6), ws)
        leaves, stock_leaves = (x, nw, w), (xs, nws, ws)
    else:
        x, nw = _leaves(torch.randn(3, 0), torch.randn(0))
        xs, nws = _leaves(x, nw)
        mine, stock = ops.rms_norm(x, nw), F.rms_norm(xs, (0,), nws)
        leaves, stock_leaves = (x, nw), (xs, nws)
    assert mine.shape == stock.shape
    mine.sum().backward()
    stock.sum().backward()
    for a, s in zip(leaves, stock_leaves):
        torch.testing.assert_close(a.grad, s.grad)


def test_strided_norm_weight_gives_the_contiguous_results():
    """A norm weight that is a strided or expanded view: the dense weight's outputs, and its gradient reaches
    the view's base (a copy autograd sees; the kernels index the weight densely)."""
    torch.manual_seed(0)
    x, r = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    ws = [torch.randn(16, 8), torch.randn(8, 8), torch.randn(8, 8)]
    cos, sin = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    calls = {
        "rms_norm": lambda nw: [ops.rms_norm(x, nw)],
        "rms_norm_linear": lambda nw: ops.rms_norm_linear(x, nw, 1e-6, ws[:2])[1],
        "add_rms_norm_linear": lambda nw: [*ops.add_rms_norm_linear(r, x, nw, 1e-6, ws[1:])[1]],
        "rms_norm_linear_rope": lambda nw: [*ops.rms_norm_linear_rope(x, nw, 1e-6, ws, None, 8, cos, sin)],
        "add_rms_norm_swiglu": lambda nw: [*ops.add_rms_norm_swiglu(r, x, nw, 1e-6, ws[1:], ws[2])],
    }
    for name, call in calls.items():
        for view in ("strided", "expanded"):
            base = torch.randn(16 if view == "strided" else 1, requires_grad=True)
            nw = base[::2] if view == "strided" else base.expand(8)
            dense = nw.detach().clone().requires_grad_()
            got, want = call(nw), call(dense)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} {view}")
            sum(o.sum() for o in got).backward()
            sum(o.sum() for o in want).backward()
            expect = torch.zeros_like(base)
            if view == "strided":
                expect[::2] = dense.grad
            else:
                expect[0] = dense.grad.sum()
            torch.testing.assert_close(base.grad, expect, msg=f"{name} {view}")


@pytest.mark.parametrize(
    "gate_up,down,match",
    [
        (
            [torch.randn(6, 8)] * 3,
            torch.randn(8, 6),
            "gate_up must be a list \\[W_gate, W_up\\], got 3 items",
        ),
        (
            [torch.randn(6, 8), torch.randn(5, 8)],
            torch.randn(8, 6),
            r"W_gate \(6, 8\) and W_up \(5, 8\) differ",
        ),
        ([torch.randn(6, 8)] * 2, torch.randn(8, 5), r"down \(8, 5\) is not \[H_out, 6\]"),
        ([torch.randn(6, 8), "up"], torch.randn(8, 6), "W_up must be a torch.Tensor, got str"),
    ],
)
def test_add_rms_norm_swiglu_names_its_own_arguments(gate_up, down, match):
    x = torch.randn(2, 8)
    with pytest.raises((ValueError, TypeError), match=f"chronipatch.ops.add_rms_norm_swiglu: {match}"):
        ops.add_rms_norm_swiglu(x, x, torch.ones(8), 1e-6, gate_up, down)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_items_in_batch="4"), "num_items_in_batch must be a real number, got '4'"),
        (dict(num_items_in_batch=True), "num_items_in_batch must be a real number, got True"),
        (dict(num_items_in_batch=4 + 0j), "num_items_in_batch must be a real number, got \\(4\\+0j\\)"),
        (dict(label_check="x"), "label_check must come from prefetch_label_check, got 'x'"),
    ],
)
def test_lce_odd_arguments_are_named(kwargs, match):
    h, w, labels = _lce_case()
    with pytest.raises(TypeError, match=f"chronipatch.ops.linear_cross_entropy: {match}"):
        ops.linear_cross_entropy(h, w, labels, **kwargs)


def test_compiled_lce_gives_nan_rows_for_labels_out_of_range():
    """Compiled, the label check (a host sync) is skipped: a label outside [0, V) gives a nan loss row,
    not an indexing error or the loss of some other logit; the other rows are stock's."""
    h, w, _ = _lce_case()
    labels = torch.tensor([[0, 1, 8, 2, -100], [3, -5, 5, 6, 7]])
    fn = torch.compile(lambda h, w, y: ops.linear_cross_entropy(h, w, y, shift=False, reduction="none"))
    rows = fn(h, w, labels)
    bad = (labels == 8) | (labels == -5)
    assert rows[bad].isnan().all() and not rows[~bad].isnan().any()
    logits = F.linear(h.double(), w.double())
    want = F.cross_entropy(logits[~bad], labels[~bad], reduction="none")
    torch.testing.assert_close(rows[~bad].double(), want, rtol=1e-5, atol=1e-6)
    assert torch.compile(lambda h, w, y: ops.linear_cross_entropy(h, w, y))(h, w, labels).isnan()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the one pass's gradients
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_lce_label_out_of_range_makes_its_gradients_nan(dtype, reduction):
    """The kernels give an out-of-range row the softmax's gradient without its one-hot term; compiled,
    with no check to raise, the row's NaN loss takes its gradients to NaN, rather than train on them."""
    h, w, _ = _lce_case(dtype)
    labels = torch.tensor([[0, 1, 8, 2, -100], [3, 4, 5, 6, 7]])
    fn = torch.compile(lambda h, w, y: ops.linear_cross_entropy(h, w, y, shift=False, reduction=reduction))
    loss = fn(h, w, labels)
    dh, dw = torch.autograd.grad(loss.sum(), (h, w))
    assert dh[0, 2].isnan().all() and dw.isnan().all()
    if reduction == "none":  # the other rows' own gradients stay finite
        assert loss[0, 2].isnan() and not loss.flatten()[torch.arange(10) != 2].isnan().any()
        assert not dh.flatten(0, 1)[torch.arange(10) != 2].isnan().any()
    fine = labels.clone()
    fine[0, 2] = 7
    dh, dw = torch.autograd.grad(fn(h, w, fine).sum(), (h, w))
    assert dh.isfinite().all() and dw.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("items", [0, torch.tensor(0)])
def test_compiled_lce_mean_by_zero_items_is_stock_inf(dtype, items):
    """Compiled, a mean over supervised labels by ``num_items_in_batch`` 0 is stock's sum / 0 (inf), not
    the sum; with every label ignored it stays a finite 0 with zero gradients."""
    h, w, labels = _lce_case(dtype)
    fn = torch.compile(lambda h, w, y, n: ops.linear_cross_entropy(h, w, y, num_items_in_batch=n))
    loss = fn(h, w, labels, items)
    assert loss.isinf() and loss > 0
    dh, dw = torch.autograd.grad(loss, (h, w))
    assert not dh[:, :-1].isfinite().any() and not dw.isfinite().any()  # the last position: ignored
    ignored = torch.full_like(labels, -100)
    loss = fn(h, w, ignored, items)
    dh, dw = torch.autograd.grad(loss, (h, w))
    assert loss == 0 and not dh.any() and not dw.any()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_lce_of_a_data_dependent_row_count_compiles(reduction):
    """Rows kept by a mask inside the compiled function have a count dynamo cannot guard on: the loss
    must not branch on it (``fullgraph``), and gives stock's answer."""
    h, w, labels = _lce_case()
    labels[:, ::2] = -100

    def kept(h, w, y):
        keep = y != -100
        return ops.linear_cross_entropy(h[keep], w, y[keep], shift=False, reduction=reduction)

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got = torch.compile(kept, fullgraph=True)(h, w, labels)
    torch.testing.assert_close(got, kept(h, w, labels))


def test_compiled_lce_loss_stays_fp32_under_an_fp64_default_dtype():
    h, w, labels = _lce_case()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        loss = torch.compile(lambda h, w, y: ops.linear_cross_entropy(h, w, y))(h, w, labels)
    finally:
        torch.set_default_dtype(old)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("items", [0.0, torch.tensor(-0.0)])  # a float's guard takes -0.0 for 0.0
def test_compiled_lce_nan_wins_over_a_zero_items_inf(items):
    """A label out of range makes the loss and every gradient NaN, also with ``num_items_in_batch`` 0 (whose
    inf alone would make them +-inf); without the bad label, -0.0 gives stock's sum / -0.0, -inf."""
    h, w, labels = _lce_case(torch.bfloat16)
    fn = torch.compile(lambda h, w, y, n: ops.linear_cross_entropy(h, w, y, num_items_in_batch=n))
    bad = labels.clone()
    bad[0, 2] = 8
    dh, dw = torch.autograd.grad(loss := fn(h, w, bad, items), (h, w))
    assert loss.isnan() and dh[0, 1].isnan().all() and dw.isnan().all()
    assert fn(h, w, labels, items) == (float("-inf") if torch.is_tensor(items) else float("inf"))


def test_lce_complex_num_items_off_the_real_line_is_named():
    h, w, labels = _lce_case()
    with pytest.raises(
        ValueError, match=r"linear_cross_entropy: num_items_in_batch=tensor.* is no real number"
    ):
        ops.linear_cross_entropy(h, w, labels, num_items_in_batch=torch.tensor(4 + 1j))
