"""``ops.add_rms_norm_linear``, the residual form of ``rms_norm_linear``: s = r + x, then the projections of
rms_norm(s), against HF's add, norm and projections in fp32/fp64; its kernel path, one compiled graph, bad
input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from chronipatch import ops
from test_rms_norm_linear import EPS, _assert_kernels_match, _case, _force_kernels, _kernel_device, _stock


def _run_added(fn, r, x, nw, weights, douts, ds):
    """(s, outputs) and the gradients of r, x, nw and the weights, for upstream gradients ds (s's), douts."""
    leaves = [t.clone().requires_grad_() for t in (r, x, nw, *weights)]
    s, outs = fn(*leaves[:3], leaves[3:])
    grads = torch.autograd.grad([s, *outs], leaves, [ds, *douts])
    return [s, *outs], dict(zip(["r", "x", "nw", *(f"w{i}" for i in range(len(weights)))], grads))


def _ours_added(r, x, nw, weights):
    return ops.add_rms_norm_linear(r, x, nw, EPS, weights)


def _stock_added(r, x, nw, weights):
    s = r + x
    return s, _stock(s, nw, weights, [None] * len(weights))


@pytest.mark.parametrize("shape,outs", [((1, 64), [8]), ((2, 9, 96), [32, 24, 24]), ((4099, 64), [17])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_matches_stock(shape, outs, dtype):
    """s = r + x and the projections of rms_norm(s), with s also used on (its own upstream gradient): values
    and the gradients of r, x, the norm weight and the weights against HF's add, norm and projections."""
    x, nw, weights, _ = _case(shape, outs, False, seed=len(shape) + sum(outs))
    r = torch.randn(shape, dtype=torch.float64) * 2
    douts = [torch.randn(*shape[:-1], o, dtype=torch.float64) for o in outs]
    ds = torch.randn(shape, dtype=torch.float64)
    cast = lambda ts: [t.to(dtype) for t in ts]
    mine, g = _run_added(_ours_added, *cast([r, x, nw]), cast(weights), cast(douts), ds.to(dtype))
    ref, g_ref = _run_added(_stock_added, r, x, nw, weights, douts, ds)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for a, b in zip(mine, ref, strict=True):
        assert a.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a.double(), b, **tol)
    rows = x.numel() // shape[-1]
    for k in g:
        atol = tol["atol"] * (rows**0.5 if k not in ("r", "x") else 1)
        torch.testing.assert_close(g[k].double(), g_ref[k], rtol=tol["rtol"], atol=atol, msg=k)
    torch.testing.assert_close(g["r"], g["x"], rtol=0, atol=0)  # both get the sum's whole gradient


def test_add_is_the_composition_bit_for_bit():
    """The public op on this device's path is ``r + x``, then the projections of ``rms_norm(s)``, bit for bit
    in every dtype (the kernels' own rounding of s: ``test_kernels.test_rms_norm_add_kernels``)."""
    torch.manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        r, x = torch.randn(3, 5, 64, dtype=dtype), torch.randn(3, 5, 64, dtype=dtype)
        nw, w = torch.randn(64, dtype=dtype), torch.randn(16, 64, dtype=dtype)
        s, (y,) = ops.add_rms_norm_linear(r, x, nw, EPS, [w])
        torch.testing.assert_close(s, r + x, rtol=0, atol=0)
        torch.testing.assert_close(y, F.linear(ops.rms_norm(r + x, nw, EPS), w), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_kernel_path_matches_reference(dtype, monkeypatch):
    """The residual form's Triton path (interpreter on CPU, natively on CUDA): s bit for bit torch's add,
    the rest against the torch reference path, with x a strided view as HF's attention output may be."""
    device = _kernel_device()
    x, nw, weights, _ = _case((2, 5, 64), [24, 8], False, seed=4)
    r = torch.randn(2, 5, 64, dtype=torch.float64)
    douts = [torch.randn(2, 5, o, dtype=torch.float64) for o in (24, 8)]
    ds = torch.randn(2, 5, 64, dtype=torch.float64)
    to = lambda t: t.to(device=device, dtype=dtype)
    x = torch.cat([to(x), to(x)], -1)[..., :64]  # rows 128 apart
    args = (to(r), x, to(nw), [to(w) for w in weights], [to(d) for d in douts], to(ds))
    ref, g_ref = _run_added(_ours_added, *args)
    _force_kernels(monkeypatch)
    mine, g = _run_added(_ours_added, *args)
    torch.testing.assert_close(mine[0], args[0] + x, rtol=0, atol=0)
    _assert_kernels_match(mine, ref, g, g_ref, dtype)


def test_add_compiles_to_one_graph():
    """The residual form under ``torch.compile(fullgraph=True)``: one graph, the eager gradients (fp64, where
    Inductor's other order of summing stays far below the tolerance)."""
    torch.manual_seed(2)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    r, x = torch.randn(2, 7, 32, **f64), torch.randn(2, 7, 32, **f64)
    nw, w = torch.randn(32, **f64), torch.randn(16, 32, **f64)

    def fn(r, x, nw, w):
        s, (y,) = ops.add_rms_norm_linear(r, x, nw, EPS, [w])
        return (s * 3).sum() + y.square().sum()

    torch._dynamo.reset()
    counts = CompileCounterWithBackend("inductor")
    got = torch.autograd.grad(torch.compile(fn, fullgraph=True, backend=counts)(r, x, nw, w), (r, x, nw, w))
    want = torch.autograd.grad(fn(r, x, nw, w), (r, x, nw, w))
    assert counts.frame_count == 1
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "residual,match",
    [
        (torch.randn(3, 8), r"residual \(3, 8\) does not match x \(3, 16\)"),
        (torch.randn(3, 16).double(), "residual has dtype torch.float64"),
        (torch.randn(3, 16).numpy(), "residual must be a torch.Tensor"),
    ],
)
def test_add_bad_input(residual, match):
    x, nw, w = torch.randn(3, 16), torch.randn(16), torch.randn(4, 16)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.add_rms_norm_linear(residual, x, nw, EPS, [w])


def test_add_refuses_a_broadcast_residual_under_autocast():
    """Under autocast the op is the composition, whose add would broadcast: s must still have x's shape."""
    x, nw, w = torch.randn(3, 16), torch.randn(16), torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match=r"residual \(16,\)"):
        ops.add_rms_norm_linear(torch.randn(16), x, nw, EPS, [w])
