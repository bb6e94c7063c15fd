"""How far the loss's bf16 gradients land from the fp64 truth, against stock's, by how peaked the softmax is.

    python bench/lce_grad_error.py [--out DIR] [--smoke]

Per shape and regime, bf16 hidden states and weight: the relative (Frobenius) error of dh and dW against
the fp64 truth for stock (the lm_head GEMM in bf16, cross-entropy of its logits in fp32, as HF's
``ForCausalLMLoss``), chronipatch's loss as training takes it (the one-pass gradients, ``_lce_rows``) and the
same loss through ``reduction="none"`` (the recompute backward, g rounded once). Regimes: ``init``, a
random-init head (weight std 0.02, unit-RMS hidden states, Zipf labels: a nearly uniform softmax, where
stock's g of a label entry, -(1 - p)/n with p ~ 1/V, is almost exactly -1/n); ``peaked``, ``confident`` and
``certain``, logits of std 3, 6 and 15 with labels drawn from the model's own softmax (trained-like rows; at
std 15 most labels take nearly all of their row's probability). At 510 rows (Llama's bf16 invariant scores
2 x 255 tokens) c = 1/510 is not a power of 2: stock's label entries, -(1 - p) c rounded to bf16, all carry
bf16(c)'s rounding (+0.39%), and so, on purpose, do the one pass's. ``--smoke``: tiny shapes on CPU (the
torch reference, not the kernels).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from common import env_info, smoke_args, write_results

ops = importlib.import_module("chronipatch.ops")
REGIMES = {
    "init": None,
    "peaked": 3.0,
    "confident": 6.0,
    "certain": 15.0,
}  # logit std (None: weight std 0.02)


def inputs(n: int, h: int, v: int, regime: str, dev: str):
    g = torch.Generator(device=dev).manual_seed(0)
    std = REGIMES[regime]
    hid = torch.randn(n, h, device=dev, generator=g).bfloat16()
    w = (torch.randn(v, h, device=dev, generator=g) * (0.02 if std is None else std / h**0.5)).bfloat16()
    if std is None:  # Zipf-distributed tokens, as a corpus's
        probs = (1.0 / torch.arange(1, v + 1, device=dev, dtype=torch.float32)).expand(n, v)
    else:  # labels the model itself finds likely
        probs = torch.softmax(hid.float() @ w.float().T, -1)
    labels = torch.multinomial(probs, 1, generator=g)[:, 0]
    return hid, w, labels


def grads(fn, hid, w):
    hid, w = hid.detach().requires_grad_(), w.detach().requires_grad_()
    return torch.autograd.grad(fn(hid, w), (hid, w))


def rel(a: torch.Tensor, truth: torch.Tensor) -> float:
    return ((a.double() - truth).norm() / truth.norm()).item()


def row(n: int, h: int, v: int, regime: str, dev: str) -> dict:
    hid, w, labels = inputs(n, h, v, regime, dev)
    truth = grads(lambda a, b: F.cross_entropy(a @ b.T, labels), hid.double(), w.double())
    stock = grads(lambda a, b: F.cross_entropy((a @ b.T).float(), labels), hid, w)
    ours = grads(lambda a, b: ops.linear_cross_entropy(a, b, labels, shift=False), hid, w)
    once = grads(
        lambda a, b: ops.linear_cross_entropy(a, b, labels, shift=False, reduction="none").mean(), hid, w
    )
    p = torch.softmax((hid.double() @ w.double().T), -1).gather(1, labels[:, None])
    out = {"shape": f"{n}x{h} V={v}", "regime": regime, "median p(label)": p.median().item()}
    for i, name in enumerate(("dh", "dW")):
        e_stock = rel(stock[i], truth[i])
        out[f"{name} stock"] = e_stock
        out[f"{name} one pass / stock"] = rel(ours[i], truth[i]) / e_stock
        out[f"{name} recompute / stock"] = rel(once[i], truth[i]) / e_stock
    return out


def main() -> None:
    args, dev = smoke_args(__doc__)
    shapes = (
        [(64, 32, 1000)]
        if args.smoke
        else [(512, 896, 151936), (512, 2048, 128256), (510, 2048, 128256), (8192, 896, 151936)]
    )
    rows = []
    for n, h, v in shapes:
        for regime in REGIMES:
            rows.append(row(n, h, v, regime, dev))
            print(rows[-1], flush=True)
            if dev == "cuda":
                torch.cuda.empty_cache()
    write_results("lce_grad_error", rows, env_info(dev), args.out)


if __name__ == "__main__":
    main()
