"""dW's label rows in the one pass, emulated in torch on the CPU (fp64 standing in for fp32 sums, bf16
roundings where the kernels round): rounded by dW's GEMM once per row chunk and then again with the label
remainders (the old form) against summed over chunks in fp32 and rounded once with them (``label_sums``), as
ratios of the relative error against the fp64 truth to stock's (bf16 logits, fp32 softmax, g rounded, one
GEMM). The inputs are ``bench/lce_grad_error.py``'s ``init`` and ``peaked`` regimes at a size the CPU runs in
seconds.

    python bench/results/2026-12-07-h100/scripts/label_rows_emulation.py
"""

import torch

SPREAD = 0.6931471805599453


def bf(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).double()


def run(n: int, h: int, v: int, regime: str, chunks: int) -> str:
    g = torch.Generator().manual_seed(0)
    hid = torch.randn(n, h, generator=g).bfloat16().double()
    std = {"init": None, "peaked": 3.0}[regime]
    w = (torch.randn(v, h, generator=g) * (0.02 if std is None else std / h**0.5)).bfloat16().double()
    if std is None:  # Zipf labels
        probs = (1.0 / torch.arange(1, v + 1, dtype=torch.float64)).expand(n, v)
    else:  # labels drawn from the model's softmax
        probs = torch.softmax(hid @ w.T, -1)
    y = torch.multinomial(probs.float(), 1, generator=g)[:, 0]
    c, rows = 1.0 / n, torch.arange(n)
    z = hid @ w.T
    gt = torch.softmax(z, 1)
    gt[rows, y] -= 1
    truth = gt.T @ hid * c
    gs = torch.softmax(bf(z), 1)
    gs[rows, y] -= 1
    stock = bf(bf(gs * c).T @ hid)
    # The one pass: K below the row's max, spread over a binade; p's label entry q = e_y - s_K.
    k = z.amax(1) - 0.5 - SPREAD * ((rows * 2654435769) & 0xFFFFFFFF).double() * 2.0**-32
    e = torch.exp(z - k[:, None])
    s_k = e.sum(1)
    r, e_y = c / s_k, e[rows, y]
    g_y, q = bf((e_y / s_k - 1) * c), bf(e_y - s_k)
    p = bf(e)
    p[rows, y] = q
    h_r = bf(r[:, None] * hid)
    rem = torch.zeros(v, h, dtype=torch.float64).index_add_(0, y, g_y[:, None] * hid - q[:, None] * h_r)
    step = n // chunks
    dw, sums = None, torch.zeros(v, h, dtype=torch.float64)
    for i in range(chunks):
        part = p[i * step : (i + 1) * step].T @ h_r[i * step : (i + 1) * step]
        dw = bf(part) if dw is None else bf(dw + part)
        sums += part
    labelled = torch.zeros(v, dtype=torch.bool)
    labelled[y] = True
    old, new = dw.clone(), dw.clone()
    old[labelled] = bf(dw[labelled] + rem[labelled])
    new[labelled] = bf(sums[labelled] + rem[labelled])
    err = [((a - truth).norm() / truth.norm()).item() for a in (stock, old, new)]
    ratios = f"old / stock {err[1] / err[0]:.3f}, new / stock {err[2] / err[0]:.3f}"
    return f"{n}x{h} V={v} {regime} chunks {chunks}: {ratios}"


if __name__ == "__main__":
    for regime in ("init", "peaked"):
        for chunks in (1, 5):
            print(run(2560, 128, 8192, regime, chunks), flush=True)
