"""The linear cross-entropy against stock's lm_head and ``F.cross_entropy`` (fp64 truth): reductions, label
shift, ``num_items_in_batch``, token statistics, ignored rows, autocast, a frozen head, its GEMM choices."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from chronipatch import ops


def _hf_lce(hidden, weight, labels, ignore_index=-100, num_items=None):
    """HF's lm_head + ForCausalLMLoss on already shifted labels."""
    logits = (hidden @ weight.T).float() if hidden.dtype != torch.float64 else hidden @ weight.T
    red = "mean" if num_items is None else "sum"
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=red)
    return loss if num_items is None else loss / num_items


@pytest.mark.parametrize("n,h,v", [(1, 64, 50), (7, 896, 1000), (127, 64, 3001), (4099, 64, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lce_matches_hf(n, h, v, dtype):
    torch.manual_seed(n + v)
    h64, w64 = torch.randn(n, h, dtype=torch.float64), torch.randn(v, h, dtype=torch.float64) / h**0.5
    labels = torch.randint(0, v, (n,))
    labels[torch.rand(n) < 0.3] = -100
    hid, w = h64.to(dtype).requires_grad_(), w64.to(dtype).requires_grad_()
    hr, wr = h64.clone().requires_grad_(), w64.clone().requires_grad_()
    loss = ops.linear_cross_entropy(hid, w, labels, shift=False)
    ref = _hf_lce(hr, wr, labels)
    if (labels == -100).all():
        ref = ref.nan_to_num(0.0)  # HF gives NaN; we give the finite 0
    grads, grads_ref = (
        torch.autograd.grad(loss, (hid, w)),
        torch.autograd.grad(ref, (hr, wr), allow_unused=True),
    )
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.double(), ref.double(), **tol)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a.double(), torch.zeros_like(a.double()) if b is None else b, **tol)


def test_lce_shift_sum_and_num_items():
    torch.manual_seed(1)
    hidden, w = torch.randn(2, 9, 16, dtype=torch.float64), torch.randn(40, 16, dtype=torch.float64)
    labels = torch.randint(0, 40, (2, 9))
    labels[0, :3] = -100
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    ref_sum = F.cross_entropy((hidden @ w.T).reshape(-1, 40), shifted.reshape(-1), reduction="sum")
    torch.testing.assert_close(ops.linear_cross_entropy(hidden, w, labels, reduction="sum"), ref_sum)
    got = ops.linear_cross_entropy(hidden, w, labels, num_items_in_batch=torch.tensor(11))
    torch.testing.assert_close(got, ref_sum / 11)
    rows = ops.linear_cross_entropy(hidden, w, labels, reduction="none")
    assert rows.shape == labels.shape and rows[:, -1].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("items", [11, torch.tensor(11)], ids=["int", "tensor"])
def test_lce_num_items_divides_the_training_loss_and_its_gradients(dtype, items):
    """num_items_in_batch (gradient accumulation) also where the gradients come with the loss (bf16 training,
    ``linear_cross_entropy_with_grad``): the loss and both gradients are the sum's over 11."""
    torch.manual_seed(1)
    hidden = torch.randn(2, 9, 16).to(dtype).requires_grad_()
    w = torch.randn(40, 16).to(dtype).requires_grad_()
    labels = torch.randint(0, 40, (2, 9))
    labels[0, :3] = -100
    total = ops.linear_cross_entropy(hidden, w, labels, reduction="sum")
    want = [g / 11 for g in torch.autograd.grad(total, (hidden, w))]
    loss = ops.linear_cross_entropy(hidden, w, labels, num_items_in_batch=items)
    torch.testing.assert_close(loss, total.detach() / 11)
    for got, expected in zip(torch.autograd.grad(loss, (hidden, w)), want):
        # bf16: 1/11 scales g before its rounding rather than after, so to a few ulps of the largest entry
        ulp = torch.finfo(dtype).eps * expected.float().abs().max()
        assert (got.float() - expected.float()).abs().max() <= 4 * ulp


def test_lce_token_stats():
    torch.manual_seed(2)
    hidden, w = torch.randn(13, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64)
    labels = torch.randint(0, 30, (13,))
    labels[:4] = (hidden[:4] @ w.T).argmax(-1)  # some hits for sure
    _, stats = ops.linear_cross_entropy(hidden, w, labels, shift=False, return_token_stats=True)
    logits = hidden @ w.T
    p = logits.softmax(-1)
    torch.testing.assert_close(stats.entropy.double(), -(p * p.log()).sum(-1), rtol=1e-6, atol=1e-6)
    assert torch.equal(stats.correct.bool(), logits.argmax(-1) == labels)


def test_lce_all_ignored_is_finite_zero():
    hidden = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    loss = ops.linear_cross_entropy(hidden, w, torch.full((5,), -100), shift=False)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0 and w.grad.abs().sum() == 0


def test_lce_ignore_index_custom():
    hidden, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(10, 8, dtype=torch.float64)
    labels = torch.tensor([3, 7, 7, 1])
    got = ops.linear_cross_entropy(hidden, w, labels, ignore_index=7, shift=False)
    torch.testing.assert_close(got, F.cross_entropy(hidden @ w.T, labels, ignore_index=7))


def test_lce_autocast_leaves_fp64_and_meta_alone():
    """Autocast casts like F.linear: fp64 stays fp64 (the reference truth); meta tensors need no autocast."""
    h, w = torch.randn(6, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    labels = torch.randint(0, 11, (6,))
    plain = ops.linear_cross_entropy(h, w, labels, shift=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = ops.linear_cross_entropy(h, w, labels, shift=False)
    assert torch.equal(plain, cast)
    meta = ops.linear_cross_entropy(h.to("meta"), w.to("meta"), labels.to("meta"), shift=False)
    assert meta.device.type == "meta" and meta.shape == ()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_lce_scores_only_supervised_rows_when_many_are_ignored(monkeypatch, reduction):
    """Eager calls with many ignored labels run the op on the supervised rows only; loss and gradients are
    those of the full computation (zeros for ignored rows)."""
    import importlib

    mod = importlib.import_module("chronipatch.ops.linear_cross_entropy")
    seen = []
    real = mod._lce
    monkeypatch.setattr(mod, "_lce", lambda h, *a: seen.append(h.shape[0]) or real(h, *a))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(40, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 40, (3, 11), generator=g)
    labels[torch.rand(3, 11, generator=g) < 0.6] = -100
    runs = []
    for compact in (0.25, 2.0):  # 2.0: never compact
        monkeypatch.setattr(mod, "COMPACT_IGNORED", compact)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = ops.linear_cross_entropy(h, w, labels, reduction=reduction)
        loss.backward(torch.randn_like(loss, generator=torch.Generator().manual_seed(1)))
        runs.append((loss.detach(), h.grad, w.grad))
    supervised = int((labels[:, 1:] != -100).sum())
    assert seen == [supervised, 33]
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert (runs[0][1][:, -1] == 0).all()  # the last position predicts nothing under shift


def test_lce_frozen_head_skips_the_weight_gradient(monkeypatch):
    """A head that does not require grad (LoRA) gets no dW: the backward op is asked for dh only, and that
    dh is bit for bit the one a trainable head gets. A frozen body likewise skips dh."""
    from chronipatch.ops import reference

    seen, real = [], reference.lce_bwd
    monkeypatch.setattr(reference, "lce_bwd", lambda *a: seen.append(a[-2:]) or real(*a))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 50, (2, 9), generator=g)
    grads = {}
    for need in ((True, True), (True, False), (False, True)):
        h, w = hidden.clone().requires_grad_(need[0]), weight.clone().requires_grad_(need[1])
        ops.linear_cross_entropy(h, w, labels).backward()
        assert (h.grad is not None, w.grad is not None) == need
        grads[need] = (h.grad, w.grad)
    assert seen == [(True, True), (True, False), (False, True)]
    assert torch.equal(grads[True, True][0], grads[True, False][0])
    assert torch.equal(grads[True, True][1], grads[False, True][1])


def test_tf32_matmuls_reads_every_precision_api():
    """The fp64 loss GEMMs are skipped under TF32, whichever API turned it on (legacy getters raise once
    the new one was used, so only the new one is read)."""
    from chronipatch.ops._utils import tf32_matmuls

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        assert tf32_matmuls() is (before == "tf32")
        for turn_on, turn_off in (
            (lambda: setattr(matmul, "allow_tf32", True), lambda: setattr(matmul, "allow_tf32", False)),
            (
                lambda: torch.set_float32_matmul_precision("high"),
                lambda: torch.set_float32_matmul_precision("highest"),
            ),
            (
                lambda: setattr(matmul, "fp32_precision", "tf32"),
                lambda: setattr(matmul, "fp32_precision", "none"),
            ),
        ):
            turn_on()
            assert tf32_matmuls()
            turn_off()
            assert not tf32_matmuls()
    finally:
        matmul.fp32_precision = before


def test_out_dtype_gemms_are_given_up_only_where_torch_lacks_them(monkeypatch):
    """cuBLAS GEMMs with ``out_dtype`` are used until torch says it has none for that op (no such argument,
    no kernel, an unsupported dtype), mm and addmm each on its own; any other error, such as an earlier
    kernel's reported late, is raised and decides nothing."""
    utils = importlib.import_module("chronipatch.ops._utils")
    out = torch.ones(2)

    def raising(error):
        def gemm():
            raise error

        return gemm

    for error in (RuntimeError("CUDA error: an illegal memory access was encountered"),
                  torch.OutOfMemoryError("CUDA out of memory")):  # fmt: skip
        monkeypatch.setattr(utils, "OUT_DTYPE_GEMMS", {"mm": None, "addmm": None})
        with pytest.raises(type(error)):
            utils._out_dtype_gemm("mm", raising(error))
        assert utils.OUT_DTYPE_GEMMS == {"mm": None, "addmm": None}
    for error in (TypeError("unexpected keyword out_dtype"), NotImplementedError("aten::mm.dtype"),
                  RuntimeError("out_dtype must be float32 for bf16 inputs")):  # fmt: skip
        monkeypatch.setattr(utils, "OUT_DTYPE_GEMMS", {"mm": None, "addmm": None})
        assert utils._out_dtype_gemm("addmm", raising(error)) is None
        assert utils._out_dtype_gemm("addmm", lambda: out) is None  # remembered: not tried again
        assert utils._out_dtype_gemm("mm", lambda: out) is out  # the other op still tried, and taken
        assert utils.OUT_DTYPE_GEMMS == {"mm": True, "addmm": False}
