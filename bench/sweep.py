"""Randomized accuracy sweep of chronipatch's four ops against the fp64 truth, by the error-versus-stock rule.

Every case builds one op's inputs (shapes with 1s and odd sizes, strided views as HF passes them, GQA ratios,
label sets with 0/50/100 % ignored, logits up to ±1e4, several vocabulary sizes), runs

- ours:  the public op (``impl="public"``) or its Triton launchers (``impl="kernel"``) in the case dtype,
- stock: the plain torch eager formula HF uses, in the same dtype,
- truth: the same formula in fp64 on the same (already rounded) inputs,

and compares the forward output and every input gradient: ours passes when
``err(ours) <= SLACK * err(stock) + ulp * max|truth|`` (``tests/helpers.assert_no_worse_than_stock``), with
``ulp = max(eps(dtype), FP32_ULPS * eps(fp32))``: every op computes in fp32, and between two tensors of a few
elements a difference of a few fp32 roundings is noise, not a finding (for bf16/fp16 this is one ulp of the
dtype, as in the helper). ``ratio`` is ``err(ours)`` over that bound: at most 1 passes.

    python bench/sweep.py --cases 500 [--ops rms_norm,swiglu,rope,linear_cross_entropy]
        [--dtypes bf16,fp16,fp32] [--impl public|kernel] [--size tiny|small|large] [--seed 0]
        [--out bench/out]

On a GPU the defaults are the public ops in bf16/fp16/fp32 with large shapes (vocabulary up to 256k, one
loss case with N·V above 2^31). Without one, ``--impl kernel`` runs the launchers through the Triton
interpreter on CPU tensors (fp32/fp16, tiny shapes). Writes ``<out>/sweep.json`` and ``<out>/sweep.md`` and
exits 1 when a case mismatches for a reason other than a known defect (``KNOWN_DEFECTS``; ``--strict``:
for any reason). ``tests/test_sweep.py`` runs the same generator under pytest.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from sweep_cases import DTYPES, EXTREME_LOGIT, IMPLS, OPS, SIZES, Case, make_cases
from sweep_report import Check, Result, compare, write_report
from sweep_stock import (
    _autograd,
    _gen,
    _grad_like,
    _lay,
    _lce_known,
    _lce_truth,
    _randn,
    _upcast,
    lce_entropy_stock,
    lce_logits,
    lce_rows_stock,
    lce_stock_chunked,
    rms_norm_stock,
    rope_stock,
    swiglu_stock,
)

STOCK_MAX_LOGITS = 1 << 31  # above this many logits the stock loss runs in row blocks (memory)

_KERNEL_MODULES = {
    "rms_norm": "chronipatch.ops.rms_norm",
    "swiglu": "chronipatch.ops.swiglu",
    "rope": "chronipatch.ops.rope",
    "linear_cross_entropy": "chronipatch.ops.linear_cross_entropy",
}


def _mod(name: str):
    # Imported on first use: the CLI must set TRITON_INTERPRET before triton.jit decorates the kernels.
    return importlib.import_module(name)


# ---------------------------------------------------------------- runners


def _checks(names, ours, stock, truth, dtype) -> list[Check]:
    return [compare(nm, o, s, t, dtype) for nm, o, s, t in zip(names, ours, stock, truth)]


def _run_rms_norm(case: Case) -> list[Check]:
    p, dt, g = case.p, case.torch_dtype, _gen(case)
    shape = (*p["lead"], p["n"])
    x = _randn(case, g, *shape, scale=p["scale"])
    if p["zero_row"]:
        x.reshape(-1, p["n"])[0] = 0
    w = 1 + 0.3 * _randn(case, g, p["n"])
    xl = x.to(dt)
    wl = w.to(torch.float32 if p["weight_fp32"] else dt)
    out_dtype = torch.promote_types(xl.dtype, wl.dtype)
    dy = _grad_like(case, g, torch.empty(shape, dtype=out_dtype, device=case.device), p["grad_layout"])
    x_in = _lay(xl, p["layout"])
    eps = p["eps"]
    stock = _autograd(lambda a, b: rms_norm_stock(a, b, eps), [xl, wl], [dy])
    truth = _autograd(lambda a, b: rms_norm_stock(a, b, eps), _upcast([xl, wl]), [dy.double()])
    if case.impl == "public":
        ops = _mod("chronipatch.ops")
        ours = _autograd(lambda a, b: ops.rms_norm(a, b, eps), [x_in, wl], [dy])
    else:
        k = _mod(_KERNEL_MODULES["rms_norm"])
        y, rstd = k.rms_norm_fwd_triton(x_in, wl, eps)
        ours = [y, *k.rms_norm_bwd_triton(dy, x_in, wl, rstd)]
    # dx = rstd * (dh - h * mean(dh * h)) cancels (to ~0 for n = 1): its ulp is that of rstd * dh.
    x64 = xl.double()
    rstd64 = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    dx_scale = (rstd64 * (dy.double() * wl.double())).abs().max().item() if x64.numel() else 0.0
    return [
        compare("y", ours[0], stock[0], truth[0], dt),
        compare("dx", ours[1], stock[1], truth[1], dt, scale=dx_scale),
        compare("dw", ours[2], stock[2], truth[2], dt),
    ]


def _run_swiglu(case: Case) -> list[Check]:
    p, dt, g = case.p, case.torch_dtype, _gen(case)
    shape = (*p["lead"], p["n"])
    gate = _randn(case, g, *shape, scale=p["gate_scale"]).to(dt)
    up = _randn(case, g, *shape).to(dt)
    if p["layout"] == "fused":  # gate_up_proj output chunked in two (Phi-3 style)
        buf = torch.cat([gate, up], -1)
        g_in, u_in = buf.chunk(2, -1)
    else:
        g_in, u_in = _lay(gate, p["layout"]), _lay(up, p["layout"])
    do = _grad_like(case, g, gate, p["grad_layout"])
    stock = _autograd(swiglu_stock, [gate, up], [do])
    truth = _autograd(swiglu_stock, _upcast([gate, up]), [do.double()])
    if case.impl == "public":
        ours = _autograd(_mod("chronipatch.ops").swiglu, [g_in, u_in], [do])
    else:
        k = _mod(_KERNEL_MODULES["swiglu"])
        ours = [k.swiglu_fwd_triton(g_in, u_in), *k.swiglu_bwd_triton(do, g_in, u_in)]
    return _checks(("out", "dgate", "dup"), ours, stock, truth, dt)


def _cos_sin(case: Case, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    p = case.p
    b, t, d = p["b"], p["t"], p["d"]
    cb = b if p["cos_batch"] == "batch" else 1
    if p["angles"] == "random":  # any cos/sin: the op is linear in q, k for every cos/sin
        cos, sin = _randn(case, g, cb, t, d), _randn(case, g, cb, t, d)
    else:  # HF rotary embedding: fp32 angles of (random) positions, cast to the model dtype
        inv = 1.0 / (p["theta"] ** (torch.arange(0, d, 2, device=case.device, dtype=torch.float32) / d))
        pos = torch.randint(0, max(p["max_pos"], t), (cb, t), generator=g, device=case.device)
        emb = torch.cat([pos[..., None].float() * inv, pos[..., None].float() * inv], -1)
        cos, sin = emb.cos(), emb.sin()
    cos, sin = cos.to(case.torch_dtype), sin.to(case.torch_dtype)
    if p["cos_batch"] == "expanded":
        cos, sin = cos.expand(b, t, d), sin.expand(b, t, d)
    return cos, sin


def _qk_layout(q: torch.Tensor, k: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    b, hq, t, d = q.shape
    hk = k.shape[1]
    if layout == "contiguous":
        return q.contiguous(), k.contiguous()
    if layout == "hf_view":  # [B, T, H, D] projections transposed, as HF attention passes them
        return q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "fused_qkv":  # slices of one [B, T, (Hq + 2 Hk) * D] qkv projection
        buf = q.new_zeros(b, t, (hq + 2 * hk) * d)
        buf[..., : hq * d] = q.transpose(1, 2).reshape(b, t, hq * d)
        buf[..., hq * d : (hq + hk) * d] = k.transpose(1, 2).reshape(b, t, hk * d)
        qv = buf[..., : hq * d].view(b, t, hq, d).transpose(1, 2)
        kv = buf[..., hq * d : (hq + hk) * d].view(b, t, hk, d).transpose(1, 2)
        return qv, kv
    return _lay(q, "last_strided"), _lay(k, "last_strided")


def _run_rope(case: Case) -> list[Check]:
    p, dt, g = case.p, case.torch_dtype, _gen(case)
    b, t, hq, hk, d = p["b"], p["t"], p["hq"], p["hk"], p["d"]
    q, k = _randn(case, g, b, hq, t, d).to(dt), _randn(case, g, b, hk, t, d).to(dt)
    cos, sin = _cos_sin(case, g)
    dq, dk = _grad_like(case, g, q, p["grad_layout"]), _grad_like(case, g, k, p["grad_layout"])
    q_in, k_in = _qk_layout(q, k, p["layout"])
    stock = _autograd(lambda a, c: rope_stock(a, c, cos, sin), [q, k], [dq, dk])
    c64, s64 = cos.double(), sin.double()
    truth = _autograd(lambda a, c: rope_stock(a, c, c64, s64), _upcast([q, k]), [dq.double(), dk.double()])
    if case.impl == "public":
        ops = _mod("chronipatch.ops")
        ours = _autograd(lambda a, c: ops.rope(a, c, cos, sin), [q_in, k_in], [dq, dk])
    else:
        km = _mod(_KERNEL_MODULES["rope"])
        ours = [*km.rope_triton(q_in, k_in, cos, sin), *km.rope_triton(dq, dk, cos, sin, backward=True)]
    return _checks(("q_out", "k_out", "dq", "dk"), ours, stock, truth, dt)


def _lce_inputs(case: Case, g: torch.Generator):
    """(hidden, weight, labels) in the case dtype; labels flat [N] (before any shift)."""
    p, dt = case.p, case.torch_dtype
    n, h, v = p["n"], p["h"], p["v"]
    hid, w = _randn(case, g, n, h), _randn(case, g, v, h, scale=h**-0.5)
    if p["logits"] == "extreme" and n > 0:
        peak = (hid @ w.T).abs().max().item()
        s = EXTREME_LOGIT / max(peak, 1e-30)
        hs = min(s, 2e4 / max(hid.abs().max().item(), 1e-30))  # keep hidden itself inside fp16 range
        hid, w = hid * hs, w * (s / hs)
    labels = torch.randint(0, v, (n,), generator=g, device=case.device)
    if p["edge_labels"] and n >= 2:
        labels[0], labels[-1] = 0, v - 1
    if p["ignore_frac"] >= 1.0:
        labels[:] = p["ignore_index"]
    elif p["ignore_frac"] > 0:
        drop = torch.rand(n, generator=g, device=case.device) < p["ignore_frac"]
        labels[drop] = p["ignore_index"]
    return hid.to(dt), w.to(dt), labels


def _chunk_rows(v: int) -> int:
    return max(1, (1 << 24) // max(v, 1))


class _ChunkBytes:
    """Temporarily set the loss's chunk sizes (None keeps the defaults): CHUNK_BYTES of fp32 logits, and
    G_CHUNK_BYTES of g in the tile kernels' backward."""

    def __init__(self, value: int | None):
        self.value, self.old = value, None
        self.mods = (_mod("chronipatch.ops._lce_chunks"), _mod("chronipatch.ops._lce_tiles_bwd"))

    def __enter__(self):
        self.old = (self.mods[0].CHUNK_BYTES, self.mods[1].G_CHUNK_BYTES)
        if self.value is not None:
            self.mods[0].CHUNK_BYTES = self.mods[1].G_CHUNK_BYTES = self.value

    def __exit__(self, *exc):
        self.mods[0].CHUNK_BYTES, self.mods[1].G_CHUNK_BYTES = self.old


def _run_lce_kernel(case: Case) -> list[Check]:
    p, dt, g = case.p, case.torch_dtype, _gen(case)
    ii = p["ignore_index"]
    hid, w, labels = _lce_inputs(case, g)
    n = hid.shape[0]
    if p["grad_rows"] == "ones":
        grad_rows = torch.ones(n, device=case.device)
    else:
        grad_rows = torch.rand(n, generator=g, device=case.device, dtype=torch.float64).float() - 0.3
    km = _mod(_KERNEL_MODULES["linear_cross_entropy"])
    with _ChunkBytes(p["chunk_bytes"]):
        loss, stats, entropy, _ = km.lce_fwd_triton(hid, w, labels, ii)
        dh, dw = km.lce_bwd_triton(grad_rows, hid, w, labels, stats, ii)
    lse = stats[:, 0] + stats[:, 1].log()  # the kernel keeps (max, sum exp(z - max)) apart
    stock = _autograd(lambda a, b: lce_rows_stock(a, b, labels, ii), [hid, w], [grad_rows])
    with torch.no_grad():
        stock_lse, stock_ent = torch.logsumexp(lce_logits(hid, w), -1), lce_entropy_stock(hid, w)
    h64, w64, rg = hid.double(), w.double(), grad_rows.double()
    t = _lce_truth(h64, w64, labels, ii, rg, _chunk_rows(p["v"]))
    known = _lce_known(t, h64, w64, labels, ii, rg)
    return [
        compare("loss_rows", loss, stock[0], t.rows, dt, known=known.get("loss")),
        compare("lse", lse, stock_lse, t.lse, dt),
        compare("entropy", entropy, stock_ent, t.entropy, dt, known=known.get("entropy")),
        compare("dh", dh, stock[1], t.dh, dt, known=known.get("dh")),
        compare("dw", dw, stock[2], t.dw, dt, known=known.get("dw")),
    ]


def _run_lce_public(case: Case) -> list[Check]:
    p, dt, g = case.p, case.torch_dtype, _gen(case)
    ii, lead, red = p["ignore_index"], p["lead"], p["reduction"]
    hid, w, labels = _lce_inputs(case, g)
    hid, labels = hid.reshape(*lead, p["h"]), labels.reshape(lead)
    shifted = F.pad(labels, (0, 1), value=ii)[..., 1:] if p["shift"] else labels
    count = int((shifted != ii).sum())
    kwargs: dict[str, Any] = dict(ignore_index=ii, shift=p["shift"])
    if red == "items_int":
        divisor, kwargs["num_items_in_batch"] = count + 3, count + 3  # as if other micro-batches had more
    elif red == "items_tensor":
        divisor, kwargs["num_items_in_batch"] = count + 1, torch.tensor(count + 1, device=case.device)
    else:
        divisor = max(count, 1)
        kwargs["reduction"] = red
    if red == "none":
        go = _randn(case, g, *lead).float()
        row_grad = go.reshape(-1).double()
    else:
        go = (1 + torch.rand((), generator=g, device=case.device, dtype=torch.float64)).float()
        row_grad = go.double().expand(labels.numel()) / (1 if red == "sum" else divisor)

    def reduce(rows: torch.Tensor) -> torch.Tensor:
        if red == "none":
            return rows.reshape(lead)
        return rows.sum() if red == "sum" else rows.sum() / divisor

    flat = shifted.reshape(-1)
    if flat.numel() * p["v"] <= STOCK_MAX_LOGITS:
        stock = _autograd(lambda a, b: reduce(lce_rows_stock(a, b, flat, ii)), [hid, w], [go])
    else:
        chunk = max(1, STOCK_MAX_LOGITS // 8 // p["v"])
        rows, dh, dw = lce_stock_chunked(hid.reshape(-1, p["h"]), w, flat, ii, row_grad, chunk)
        stock = [reduce(rows), dh.reshape(hid.shape), dw]
    h64, w64 = hid.reshape(-1, p["h"]).double(), w.double()
    t = _lce_truth(h64, w64, flat, ii, row_grad, _chunk_rows(p["v"]))
    weight = None if red == "none" else torch.full_like(row_grad, 1.0 if red == "sum" else 1.0 / divisor)
    known = _lce_known(t, h64, w64, flat, ii, row_grad, weight)
    h_in = _lay(hid, p["hidden_layout"])
    w_in = w.T.contiguous().T if p["weight_layout"] == "transposed" else w
    ops = _mod("chronipatch.ops")
    ours = _autograd(lambda a, b: ops.linear_cross_entropy(a, b, labels, **kwargs), [h_in, w_in], [go])
    checks = [
        compare("loss", ours[0], stock[0], reduce(t.rows), dt, known=known.get("loss")),
        compare("dhidden", ours[1], stock[1], t.dh.reshape(hid.shape), dt, known=known.get("dh")),
        compare("dweight", ours[2], stock[2], t.dw, dt, known=known.get("dw")),
    ]
    if p["token_stats"]:
        with torch.no_grad():
            _, stats = ops.linear_cross_entropy(h_in, w_in, labels, return_token_stats=True, **kwargs)
        ent = stats.entropy.reshape(-1)
        checks.append(
            compare("entropy", ent, lce_entropy_stock(hid, w), t.entropy, dt, known=known.get("entropy"))
        )
    return checks


_RUNNERS: dict[tuple[str, str], Callable[[Case], list[Check]]] = {
    ("rms_norm", "public"): _run_rms_norm,
    ("rms_norm", "kernel"): _run_rms_norm,
    ("swiglu", "public"): _run_swiglu,
    ("swiglu", "kernel"): _run_swiglu,
    ("rope", "public"): _run_rope,
    ("rope", "kernel"): _run_rope,
    ("linear_cross_entropy", "public"): _run_lce_public,
    ("linear_cross_entropy", "kernel"): _run_lce_kernel,
}


def run_case(case: Case) -> Result:
    """Run one case; an exception is recorded as a mismatch, not raised."""
    t0 = time.perf_counter()
    result = Result(case)
    try:
        result.checks = _RUNNERS[case.op, case.impl](case)
    except Exception as e:  # a crash is a finding of the sweep like a wrong number
        result.error = f"{type(e).__name__}: {e}"
    result.seconds = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=500, help="cases per op (default 500)")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--dtypes", default=None, help="comma list of fp32, fp16, bf16")
    ap.add_argument("--impl", choices=IMPLS, default=None, help="public ops or Triton launchers")
    ap.add_argument("--size", choices=SIZES, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--strict", action="store_true", help="exit 1 on known-defect mismatches too")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = args.device or ("cuda" if cuda else "cpu")
    impl = args.impl or ("public" if device == "cuda" else "kernel")
    if impl == "kernel" and device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first chronipatch import
    default_dtypes = "bf16,fp16,fp32" if device == "cuda" else ("fp32,fp16" if impl == "kernel" else "fp32")
    dtypes = (args.dtypes or default_dtypes).split(",")
    size = args.size or ("large" if device == "cuda" else "tiny" if impl == "kernel" else "small")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    for name in (*ops, *dtypes):
        if name not in OPS and name not in DTYPES:
            ap.error(f"unknown op or dtype {name!r}")

    note = f"cases per op {args.cases}, impl {impl}, size {size}, dtypes {','.join(dtypes)}, seed {args.seed}"
    results: list[Result] = []
    for op in ops:
        cases = make_cases(op, args.cases, impl=impl, dtypes=dtypes, device=device, size=size, seed=args.seed)
        t0 = time.perf_counter()
        for i, case in enumerate(cases, 1):
            r = run_case(case)
            results.append(r)
            if r.known:
                print(f"{r.case}: known defect {r.known}", file=sys.stderr)
            elif not r.ok:
                print(r.describe(), file=sys.stderr)
            if i % 50 == 0:  # a run cut short keeps its counts so far
                write_report(results, args.out, [note, f"partial: {op} at case {i} of {len(cases)}"])
        mine = [r for r in results if r.case.op == op]
        bad, known = sum(not r.ok for r in mine), sum(bool(r.known) for r in mine)
        secs = time.perf_counter() - t0
        print(f"{op}: {len(cases)} cases, {bad} mismatches ({known} known defects), {secs:.1f} s", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    json_path, md_path = write_report(results, args.out, [note])
    print(f"wrote {json_path} and {md_path}")
    failed = [r for r in results if not r.ok and (args.strict or not r.known)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
