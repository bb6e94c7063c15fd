# ruff: noqa: B023, E501  (as run on the GPU: closures run within their loop iteration)
"""dW's label sums (``label_sums``) over one chunk by pointer loads (the form before) and by TMA, at several
tiles: do_bench medians, ms; sums from zeros against the pointer form at the default tile (max |diff|)."""

import importlib

import torch
from triton.testing import do_bench

lr = importlib.import_module("chronipatch.ops._lce_label_rows")
tiles = importlib.import_module("chronipatch.ops._lce_tiles")
dev = "cuda"
# (TMA, (BJ, BH, BR, warps, stages))
CONFIGS = [
    (False, (128, 128, 64, 8, 4)),  # the form before
    (True, (128, 128, 64, 8, 4)),
    (True, (128, 128, 64, 8, 5)),
    (True, (128, 256, 64, 8, 3)),
    (True, (128, 256, 64, 8, 4)),
    (True, (256, 128, 64, 8, 3)),
    (True, (128, 128, 64, 4, 4)),
    (True, (64, 128, 64, 4, 4)),
    (True, (128, 64, 64, 4, 4)),
]
# (N, H, chunk rows, distinct labels: uniform, Zipf-like)
SHAPES = [(8192, 896, 1664, (7975, 2552)), (8192, 2048, 2048, (7159, 2500)), (8192, 4096, 2048, (7159, 2500))]

for n, h, k, counts in SHAPES:
    g = torch.Generator(device=dev).manual_seed(0)
    lp_cols = (k + 127) // 128 * 128
    lp = tiles.row_aligned(n, lp_cols, torch.bfloat16, dev)
    lp.copy_(torch.rand(n, lp_cols, device=dev, generator=g).bfloat16())
    lp = lp[:, :k]
    h_r = (torch.randn(k, h, device=dev, generator=g) * 0.01).bfloat16()
    for count in counts:
        cnt = torch.tensor([count], device=dev)
        base = None
        for tma, cfg in CONFIGS:
            tiles.TMA_LOADS, lr.SUMS_TILE = tma, cfg
            try:
                sums = torch.zeros(n, h, device=dev)
                lr.label_sums(sums, lp, h_r, cnt)
                base = sums if base is None else base
                diff = (sums - base).abs().max().item()
                t = do_bench(
                    lambda: lr.label_sums(sums, lp, h_r, cnt), warmup=10, rep=100, return_mode="median"
                )
                print(
                    f"{n}x{h} chunk {k} count {count} {'TMA' if tma else 'ptr'} {cfg}: {t:.4f} ms, diff {diff:.2e}",
                    flush=True,
                )
            except Exception as e:
                print(f"{n}x{h} {cfg} tma={tma}: error {type(e).__name__}: {str(e)[:150]}", flush=True)
tiles.TMA_LOADS = True
