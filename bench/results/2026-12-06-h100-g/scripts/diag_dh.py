"""The loss's own dh and dW errors inside Llama-3.2-1B's invariant loop (seed 0, eager, 50 steps): at each
step the kernels' gradients and torch emulations of stock's, the recompute path's and the one pass's
roundings (diag_forms.py) on the same bf16 inputs, against their fp64 truth. Prints per form the median over
steps of the relative error and of the ratio to stock's, and the kernels' distance from the emulated one
pass."""

import importlib
import sys

import torch

sys.path[:0] = ["../bench/results/2026-12-06-h100-g/scripts"]
import diag_forms  # noqa: E402

lce = importlib.import_module("chronipatch.ops.linear_cross_entropy")
real = diag_forms.real
FORMS = ("stock", "rc", "op", "op_q_post")
record = {k: [] for k in ("native_dh", "native_dw", "native_hs", "native_vs_op_dh", "native_vs_op_dw")}
record |= {f"{f}_{g}": [] for f in FORMS for g in ("dh", "dw", "hs")}


@torch.autocast("cuda", enabled=False)
def _truth(h, w, y, c, live):
    hd, wd = h.double(), w.double()
    g = torch.softmax(hd @ wd.T, 1)
    rows = torch.arange(h.shape[0], device=h.device)
    g[rows, torch.where(live, y, 0)] -= 1
    g *= (c.double() * live)[:, None]
    return g @ wd, g.T @ hd


def rel(a, t):
    return ((a.double() - t).norm() / t.norm()).item()


def spy(hidden, weight, labels, divisor, ignore_index, token_stats, need_dh, need_dw, *a, **k):
    out = real(hidden, weight, labels, divisor, ignore_index, token_stats, need_dh, need_dw, *a, **k)
    if need_dh and need_dw:
        live = labels != ignore_index
        c = 1.0 / torch.where(divisor != 0, divisor, 1.0).float()
        th, tw = _truth(hidden, weight, labels, c, live)
        record["native_dh"].append(rel(out[3], th))
        record["native_dw"].append(rel(out[4], tw))
        # sum_i dh_i h_i per feature, as a norm weight before the head sums it: errors alike in rows add up
        ths = (th * hidden.double()).sum(0)
        record["native_hs"].append(rel((out[3].double() * hidden.double()).sum(0), ths))
        for f in FORMS:
            dh, dw = diag_forms._grads(f, hidden, weight, labels, c, live)
            record[f"{f}_dh"].append(rel(dh, th))
            record[f"{f}_dw"].append(rel(dw, tw))
            record[f"{f}_hs"].append(rel((dh.double() * hidden.double()).sum(0), ths))
            if f == "op":
                record["native_vs_op_dh"].append(rel(out[3], dh.double()))
                record["native_vs_op_dw"].append(rel(out[4], dw.double()))
    return out


lce._fwd_bwd = spy
from invariant_probe import run_against_truth  # noqa: E402

run_against_truth("llama-3.2-1b", 0, 50, ("eager",))
stock = {g: torch.tensor(record[f"stock_{g}"]) for g in ("dh", "dw", "hs")}
for key, vals in record.items():
    v = torch.tensor(vals)
    g = key.rsplit("_", 1)[1]
    ratio = (v / stock[g]).median().item() if not key.startswith("native_vs") else float("nan")
    print(f"{key:18s} median {v.median().item():.3e}  / stock {ratio:.3f}  first {v[0]:.3e} last {v[-1]:.3e}")
