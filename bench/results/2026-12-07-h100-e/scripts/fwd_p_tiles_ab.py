# ruff: noqa: B023, E501  (each closure runs within its loop iteration)
"""The one pass's tile forward (storing p, capturing label columns) at other tiles and pipeline stages, and
the whole op (eager, label check prefetched) at each: do_bench medians, ms. m and s against the default
config's (max |dm|, max relative ds)."""

import sys

import torch
from triton.testing import do_bench

from chronipatch import ops as cp
from chronipatch.ops import _lce_rows as rows_mod
from chronipatch.ops import _lce_tiles as tiles

dev = "cuda"
# ((BM, BN, BK, warps, stages, per SM), stages of the p-storing forward)
CONFIGS = [
    ((128, 256, 64, 8, 4, 1), 3),  # default
    ((128, 256, 32, 8, 4, 1), 5),
    ((128, 256, 32, 8, 4, 1), 6),
    ((128, 128, 64, 8, 4, 1), 4),
    ((128, 128, 64, 8, 4, 1), 5),
    ((128, 128, 64, 4, 4, 1), 4),
    ((256, 128, 64, 8, 4, 1), 3),
]
SHAPES = [(8192, 896, 151936), (8192, 4096, 128256)]
if len(sys.argv) > 1:
    SHAPES = SHAPES[: int(sys.argv[1])]


def ms(fn):
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


for n, hd, v in SHAPES:
    g = torch.Generator(device=dev).manual_seed(0)
    h = (torch.randn(n, hd, device=dev, generator=g)).bfloat16()
    w = (torch.randn(v, hd, device=dev, generator=g) * hd**-0.5).bfloat16()
    y = torch.randint(0, v, (n,), device=dev, generator=g)
    prep = rows_mod.rows_prep(h, w, y, -100, True)
    p_rows = rows_mod.P_BYTES // (2 * v)
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    check = cp.prefetch_label_check(y, v, -100, shift=False)

    def op():
        cp.linear_cross_entropy(hg, wg, y, shift=False, label_check=check).backward()
        hg.grad = wg.grad = None

    base = None
    default = tiles.TILE, tiles.P_STAGES
    for cfg, ps in CONFIGS:
        tiles.TILE, tiles.P_STAGES = cfg, ps
        try:
            fwd_p = lambda: tiles.tiles_fwd(
                h, w, y, -100, False, lambda *a: None, p_rows, prep.ref, prep.slots
            )
            m, s, *_ = fwd_p()
            if base is None:
                base = m, s
            dm = (m - base[0]).abs().max().item()
            ds = ((s - base[1]).abs() / base[1]).max().item()
            t_fwd = ms(fwd_p)
            t_op = ms(op)
            print(
                f"{n}x{hd} V={v} {cfg} p_stages={ps}: fwd_p {t_fwd:.3f} op {t_op:.3f} dm {dm:.2e} ds {ds:.2e}",
                flush=True,
            )
        except Exception as e:
            print(f"{n}x{hd} {cfg} p_stages={ps}: error {type(e).__name__}: {str(e)[:150]}", flush=True)
    tiles.TILE, tiles.P_STAGES = default
    # the default again: drift over the run
    print(f"{n}x{hd} default again: fwd_p {ms(fwd_p):.3f} op {ms(op):.3f}", flush=True)
