"""The loss's inputs as Llama-3.2-1B's first bf16 step hands them over: one pass (new, old), recompute, stock,
each against the fp64 truth on the same inputs, dW by row class and dh."""

import importlib
import importlib.util

import torch
import torch.nn.functional as F

lce = importlib.import_module("chronipatch.ops.linear_cross_entropy")
spec = importlib.util.spec_from_file_location(
    "chronipatch.ops._lce_rows_old", "old/src/chronipatch/ops/_lce_rows.py"
)
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
got = []
real = lce.lce_fwd_bwd_triton


def spy(*a, **k):
    if not got:
        got.append([t.detach().clone() if torch.is_tensor(t) else t for t in a])
    return real(*a, **k)


lce.lce_fwd_bwd_triton = spy
from invariant_probe import run_against_truth  # noqa: E402

run_against_truth("llama-3.2-1b", 0, 1, ("eager",))
hid, w, labels, divisor, ii = got[0][:5]
print(
    "inputs",
    hid.shape,
    w.shape,
    hid.dtype,
    labels.shape,
    (labels == ii).sum().item(),
    divisor.item(),
    flush=True,
)
n = hid.shape[0]
new = real(hid, w, labels, divisor, ii, False, True, True)[3:]
old_out = old.rows_fwd_bwd(hid, w, labels, ii, False, divisor, True, True)[-2:]
re = lce._fwd_bwd(
    hid, w, labels, divisor, ii, False, True, True, lce.lce_fwd_triton, lce.lce_bwd_triton, one_pass=False
)[3:]


def grads(fn, a, b):
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    return torch.autograd.grad(fn(a, b), (a, b))


d = divisor.double()
truth = grads(
    lambda a, b: F.cross_entropy(a @ b.T, labels, ignore_index=ii, reduction="sum") / d,
    hid.double(),
    w.double(),
)
stock = grads(
    lambda a, b: F.cross_entropy((a @ b.T).float(), labels, ignore_index=ii, reduction="sum") / d.float(),
    hid,
    w,
)
p = torch.softmax(hid.double() @ w.double().T, -1)
print(
    "p max median",
    p.amax(-1).median().item(),
    "p label median",
    p.gather(1, labels.clamp_min(0)[:, None]).median().item(),
)
lab = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)
lab[labels[labels != ii]] = True
big = truth[1].norm(dim=1) > truth[1].norm(dim=1).quantile(0.999)


def rel(a, t, m=None):
    if m is not None:
        a, t = a[m], t[m]
    return ((a.double() - t).norm() / t.norm()).item()


for name, g in (("stock", stock), ("recompute", re), ("one pass new", new), ("one pass old", old_out)):
    err = g[1].double() - truth[1]
    signed = (err[lab] * truth[1][lab]).sum().item() / truth[1][lab].norm().item() ** 2
    print(
        f"{name:14s} dh {rel(g[0], truth[0]):.3e} dW {rel(g[1], truth[1]):.3e} "
        f"label rows {rel(g[1], truth[1], lab):.3e} "
        f"other rows {rel(g[1], truth[1], ~lab):.3e} top rows {rel(g[1], truth[1], big):.3e} "
        f"mean signed label-row err {signed:.3e}",
        flush=True,
    )
