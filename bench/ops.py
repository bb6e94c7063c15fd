"""Forward+backward benchmark of chronipatch's ops against HF eager, torch.compile, Liger and CCE.

For every case and implementation it records the median fwd+bwd time, a roofline floor, the extra
peak memory of one fwd+bwd call, and the max abs error of the output and of the input gradient(s)
against HF eager run in fp32 on upcast inputs.

    python bench/ops.py [--smoke] [--ops rms_norm,rope,swiglu,lce] [--impls ...] [--out bench/out]

``--smoke`` uses tiny shapes and a few reps and runs on CPU (perf_counter timing, no memory figures).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, apply_rotary_pos_emb

from common import env_info, kernel_ms, peak_extra_bytes, short_error, sync, timeit, write_results

# H100 SXM HBM3, rounded; on CUDA ``main`` replaces it with the card's measured copy rate.
HBM_BYTES_PER_S = 3.0e12
BF16_FLOP_PER_S = 790e12  # achievable dense bf16 matmul rate on H100 SXM
EPS = 1e-6
IGNORE = -100
IMPLS = (
    "hf_eager",
    "hf_compile",
    "liger",
    "cce",
    "chronipatch",
    "chronipatch_compile",
    "chronipatch_prefetched",
)
COMPILED = {"hf_compile": "hf_eager", "chronipatch_compile": "chronipatch"}
COLUMNS = (
    "op",
    "shape",
    "impl",
    "ms",
    "gpu_ms",
    "floor_ms",
    "pct_floor",
    "peak_extra_MiB",
    "grads_MiB",
    "fwd_err",
    "grad_err",
)
COLUMNS += ("first_call_s", "note")

NOTES = [
    "pct_floor = 100 · floor_ms / ms",
    "gpu_ms: device time of all kernels one fwd+bwd launches (torch.profiler, mean of 10 back-to-back calls,"
    " L2 warm): the call's cost inside a training step whose CPU runs ahead; ms also counts launch gaps and"
    " host overhead, which dominate the small ops at these sizes",
    "peak_extra_MiB: max_memory_allocated during one fwd+bwd minus what was allocated before it, with no"
    " gradients allocated before it: inputs and weights excluded, the input/weight gradients it allocates"
    " included (grads_MiB of them; peak_extra_MiB - grads_MiB is the call's scratch at its peak, at most)",
    "fwd_err / grad_err: max |out − ref| and max |d input − ref| (rope: dq and dk; swiglu: dgate and"
    " dup; else dx / dhidden), ref = HF eager in fp32 on the same inputs upcast, same upstream grad",
    "first_call_s: first fwd+bwd call, includes torch.compile and Triton autotuning",
    "each implementation gets fresh inputs with the same values. Liger as shipped: LigerRMSNorm in_place=True"
    " (writes dx into dy), liger rope rotates q/k in place, liger swiglu backward writes the grads into"
    " gate/up; cut-cross-entropy: impl named in the note (25.1.1 has no cce_exact; its default filters"
    " small gradient entries)",
    "chronipatch_prefetched (the loss): the eager op given a label check prefetched once before timing, as"
    " ``apply``'s CausalLM forward takes it before the backbone; chronipatch's own column runs the check at"
    " the call, whose host sync drains the GPU queue and leaves the launches after it exposed",
]


def _floor_note(measured: bool) -> str:
    source = "the card's read+write rate in a 1 GiB copy" if measured else "an H100's"
    return (
        f"floor: memory-bound ops = bytes moved / {HBM_BYTES_PER_S:.3g} B/s ({source}), counting rms_norm fwd"
        " x,w -> y,rstd(fp32) + bwd dy,x,w,rstd -> dx,dw; rope fwd q,k,cos,sin -> q',k' + bwd"
        " dq',dk',cos,sin -> dq,dk; swiglu fwd g,u -> h + bwd dh,g,u -> dg,du. Matmul-bound:"
        f" swiglu_mlp 18·M·H·I FLOPs, lce 6·N·H·V FLOPs, at {BF16_FLOP_PER_S:.3g} FLOP/s"
    )


def copy_bytes_per_s(dev: torch.device) -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy (median): the byte floor's rate."""
    src = torch.empty(1 << 29, dtype=torch.int16, device=dev)
    dst = torch.empty_like(src)
    ms = timeit(lambda: dst.copy_(src), device=dev)
    return 2 * src.nbytes / (ms * 1e-3)


class Skip(Exception):
    """An implementation that cannot run here (package missing, needs CUDA, ...)."""


def _need(module: str, dev: torch.device):
    top = module.split(".")[0]
    if dev.type != "cuda" and top in ("liger_kernel", "cut_cross_entropy"):
        raise Skip(f"{top} needs CUDA")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise Skip(f"{module} not importable ({type(e).__name__}: {e})") from e


LIGER = "liger_kernel.transformers."
_OPS = []


def _cp():
    if not _OPS:
        try:
            _OPS.append(importlib.import_module("chronipatch.ops"))
        except ImportError as e:
            raise Skip(f"chronipatch.ops not importable ({e})") from e
    return _OPS[0]


def _module(ctor: Callable[[], nn.Module], **params: nn.Parameter) -> nn.Module:
    """Build a module without allocating its own weights, then point its parameters at ``params``."""
    with torch.device("meta"):
        mod = ctor()
    for name, p in params.items():
        owner, _, attr = name.rpartition(".")
        setattr(mod.get_submodule(owner), attr, p)
    return mod


# ---- implementations: maker(args, device) -> callable(*args) returning a tensor or a tuple ----------


def _norm(cls, a):
    m = _module(lambda: cls(a[1].shape[0], eps=EPS), weight=a[1])  # LigerRMSNorm: default in_place=True
    return lambda x, w: m(x)


def _mlp(cls, a):
    cfg = LlamaConfig(hidden_size=a[1].shape[1], intermediate_size=a[1].shape[0], hidden_act="silu")
    names = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
    m = _module(lambda: cls(cfg), **dict(zip(names, a[1:])))
    return lambda x, *_: m(x)


def _norm_qkv(cls, a):
    norm = _norm(cls, a)
    return lambda x, w, *ws: tuple(F.linear(norm(x, w), p) for p in ws)


def _add_norm_gate_up(cls, a):
    norm = _norm(cls, a[1:])

    def run(r, x, w, *ws):  # HF's decoder layer: the residual add, then the MLP's norm and gate/up
        s = r + x
        y = norm(s, w)
        return (s, *(F.linear(y, p) for p in ws))

    return run


def cp_add_norm_gate_up(a, dev):
    ops = _cp()  # as layers.mlp_forward runs the residual add, the MLP's norm and gate/up projections

    def run(r, x, w, *ws):
        s, outs = ops.add_rms_norm_linear(r, x, w, EPS, list(ws))
        return (s, *outs)

    return run


def cp_norm_qkv(a, dev):
    ops = _cp()  # as layers.attention_forward runs a decoder layer's input norm and q/k/v projections
    return lambda x, w, *ws: tuple(ops.rms_norm_linear(x, w, EPS, list(ws), stacked=True))


def cp_mlp(a, dev):
    ops = _cp()
    # as layers.mlp_forward runs an MLP whose down_proj is a plain nn.Linear
    return lambda x, wg, wu, wd: ops.swiglu_linear(F.linear(x, wg), F.linear(x, wu), wd)


# lm_head, then HF's causal-LM loss on already shifted labels (fp32 upcast + mean F.cross_entropy)
hf_lce = lambda h, w, y: ForCausalLMLoss(F.linear(h, w), None, w.shape[0], shift_labels=y)


def liger_lce(a, dev):
    mod = _need(LIGER + "fused_linear_cross_entropy", dev)
    loss = mod.LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
    return lambda h, w, y: loss(w, h, y)  # weight first; returns the loss tensor (no extra outputs asked)


def cce_lce(a, dev):
    lce = _need("cut_cross_entropy", dev).linear_cross_entropy
    try:
        presets = _need("cut_cross_entropy.cce_utils", dev).CCEPresets.names
    except (Skip, AttributeError):
        presets = ()
    kw = {"impl": "cce_exact"} if "cce_exact" in presets else {}
    fn = lambda h, w, y: lce(h, w, y, ignore_index=IGNORE, **kw)
    fn.note = "impl=cce_exact" if kw else "impl=default (cce, default filter_eps)"
    return fn


def cp_lce_prefetched(a, dev):
    """The eager loss with its label check started ahead (``prefetch_label_check``) on these very labels:
    each timed call finds the counts on the host already, as in a patched model's forward."""
    cp = _cp()
    check = cp.prefetch_label_check(a[2], a[1].shape[0], IGNORE, shift=False)
    kw = dict(ignore_index=IGNORE, shift=False, label_check=check)
    return lambda h, w, y: cp.linear_cross_entropy(h, w, y, **kw)


def cp_op(name: str, *extra, **kw):
    def maker(a, dev):
        op = getattr(_cp(), name)
        return lambda *args: op(*args, *extra, **kw)

    return maker


# ---- ops: input builder, checked input gradients, floor, implementations ----------------------------


def _x(*shape, dev, dt):
    return torch.randn(*shape, device=dev, dtype=dt, requires_grad=True)


def _w(*shape, dev, dt, scale=1.0, shift=0.0):
    return nn.Parameter(shift + scale * torch.randn(*shape, device=dev, dtype=dt))


def build_rope(dims, dev, dt):
    b, t, hq, hk, d = dims
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
    emb = torch.cat([torch.outer(torch.arange(t, device=dev, dtype=torch.float32), inv)] * 2, -1)
    qk = [torch.randn(b, t, h, d, device=dev, dtype=dt).transpose(1, 2).requires_grad_() for h in (hq, hk)]
    return [*qk, *(f(emb)[None].expand(b, t, d).to(dt).contiguous() for f in (torch.cos, torch.sin))]


def build_lce(dims, dev, dt):
    n, h, v = dims
    y = torch.randint(0, v, (n,), device=dev)
    y[torch.rand(n, device=dev) < 0.1] = IGNORE
    return [_x(n, h, dev=dev, dt=dt), _w(v, h, dev=dev, dt=dt, scale=h**-0.5), y]


@dataclass
class Op:
    group: str  # name used by --ops
    label: str  # shape label, formatted with the dims
    build: Callable  # (dims, device, dtype) -> list of args
    grad_idx: tuple[int, ...]  # args whose gradients are checked
    floor: Callable  # (dims, element bytes) -> seconds
    makers: dict  # impl name -> maker(args, device)


# fmt: off
OPS = {
    "rms_norm": Op(
        "rms_norm", "{0}x{1}",
        lambda d, dev, dt: [_x(*d, dev=dev, dt=dt), _w(d[1], dev=dev, dt=dt, scale=0.1, shift=1.0)],
        (0,), lambda d, e: (5 * d[0] * d[1] * e + 3 * d[1] * e + 8 * d[0]) / HBM_BYTES_PER_S,
        {"hf_eager": lambda a, dev: _norm(LlamaRMSNorm, a),
         "liger": lambda a, dev: _norm(_need(LIGER + "rms_norm", dev).LigerRMSNorm, a),
         "chronipatch": cp_op("rms_norm", EPS)},
    ),
    "rms_norm_qkv": Op(
        "rms_norm_linear", "{0}x{1} -> q{2} k/v{3}",
        lambda d, dev, dt: [_x(d[0], d[1], dev=dev, dt=dt), _w(d[1], dev=dev, dt=dt, scale=0.1, shift=1.0)]
        + [_w(o, d[1], dev=dev, dt=dt, scale=d[1] ** -0.5) for o in (d[2], d[3], d[3])],
        (0,), lambda d, e: 6 * d[0] * d[1] * (d[2] + 2 * d[3]) / BF16_FLOP_PER_S,
        {"hf_eager": lambda a, dev: _norm_qkv(LlamaRMSNorm, a),
         "liger": lambda a, dev: _norm_qkv(_need(LIGER + "rms_norm", dev).LigerRMSNorm, a),
         "chronipatch": cp_norm_qkv},
    ),
    "add_rms_norm_gate_up": Op(
        "rms_norm_linear", "r + x {0}x{1} -> gate/up {2}",
        lambda d, dev, dt: [_x(d[0], d[1], dev=dev, dt=dt), _x(d[0], d[1], dev=dev, dt=dt),
                            _w(d[1], dev=dev, dt=dt, scale=0.1, shift=1.0)]
        + [_w(d[2], d[1], dev=dev, dt=dt, scale=d[1] ** -0.5) for _ in range(2)],
        (0, 1), lambda d, e: 12 * d[0] * d[1] * d[2] / BF16_FLOP_PER_S,
        {"hf_eager": lambda a, dev: _add_norm_gate_up(LlamaRMSNorm, a),
         "liger": lambda a, dev: _add_norm_gate_up(_need(LIGER + "rms_norm", dev).LigerRMSNorm, a),
         "chronipatch": cp_add_norm_gate_up},
    ),
    "rope": Op(
        "rope", "B{0} T{1} q{2}/k{3} d{4}", build_rope, (0, 1),
        lambda d, e: 4 * d[0] * d[1] * d[4] * (d[2] + d[3] + 1) * e / HBM_BYTES_PER_S,
        {"hf_eager": lambda a, dev: apply_rotary_pos_emb,
         "liger": lambda a, dev: _need(LIGER + "rope", dev).liger_rotary_pos_emb,
         "chronipatch": cp_op("rope")},
    ),
    "swiglu_mlp": Op(
        "swiglu", "{0} tok {1}->{2}",
        lambda d, dev, dt: [_x(d[0], d[1], dev=dev, dt=dt)]
        + [_w(o, k, dev=dev, dt=dt, scale=k**-0.5) for o, k in ((d[2], d[1]), (d[2], d[1]), (d[1], d[2]))],
        (0,), lambda d, e: 18 * d[0] * d[1] * d[2] / BF16_FLOP_PER_S,
        {"hf_eager": lambda a, dev: _mlp(LlamaMLP, a),
         "liger": lambda a, dev: _mlp(_need(LIGER + "swiglu", dev).LigerSwiGLUMLP, a),
         "chronipatch": cp_mlp},
    ),
    "swiglu": Op(
        "swiglu", "{0}x{1}", lambda d, dev, dt: [_x(*d, dev=dev, dt=dt), _x(*d, dev=dev, dt=dt)],
        (0, 1), lambda d, e: 8 * d[0] * d[1] * e / HBM_BYTES_PER_S,
        {"hf_eager": lambda a, dev: lambda g, u: ACT2FN["silu"](g) * u,
         "liger": lambda a, dev: _need("liger_kernel.ops.swiglu", dev).LigerSiLUMulFunction.apply,
         "chronipatch": cp_op("swiglu")},
    ),
    "lce": Op(
        "lce", "{0}x{1} V={2}", build_lce, (0,), lambda d, e: 6 * d[0] * d[1] * d[2] / BF16_FLOP_PER_S,
        {"hf_eager": lambda a, dev: hf_lce,
         "liger": liger_lce, "cce": cce_lce,
         "chronipatch": cp_op("linear_cross_entropy", ignore_index=IGNORE, shift=False),
         "chronipatch_prefetched": cp_lce_prefetched},
    ),
}

# rms_norm: Qwen2.5-0.5B's, Llama-3.2-1B's and the 7-8B models' hidden sizes, and Qwen3's q_norm (16 heads of
# 128 per token).
CASES = [("rms_norm", (8192, 896)), ("rms_norm", (8192, 2048)), ("rms_norm", (8192, 4096)),
         ("rms_norm", (131072, 128)), ("rms_norm_qkv", (8192, 2048, 2048, 512)),
         ("rms_norm_qkv", (8192, 896, 896, 128)), ("add_rms_norm_gate_up", (8192, 896, 4864)),
         ("add_rms_norm_gate_up", (8192, 2048, 8192)), ("rope", (4, 2048, 14, 2, 64)),
         ("rope", (4, 2048, 16, 8, 128)), ("swiglu_mlp", (8192, 896, 4864)), ("swiglu", (8192, 4864)),
         ("lce", (8192, 896, 151936)), ("lce", (8192, 2048, 128256)), ("lce", (8192, 4096, 128256))]
SMOKE_CASES = [("rms_norm", (64, 96)), ("rms_norm", (64, 256)), ("rms_norm_qkv", (64, 96, 96, 32)),
               ("add_rms_norm_gate_up", (64, 96, 128)),
               ("rope", (1, 16, 14, 2, 64)),
               ("rope", (1, 16, 16, 8, 128)), ("swiglu_mlp", (64, 32, 96)), ("swiglu", (64, 96)),
               ("lce", (64, 32, 1000)), ("lce", (64, 48, 777))]
# fmt: on


# ---- running ------------------------------------------------------------------------------------------


def _outs(o) -> list[torch.Tensor]:
    return list(o) if isinstance(o, (tuple, list)) else [o]


def _to32(a: torch.Tensor) -> torch.Tensor:
    if not a.is_floating_point():
        return a
    t = a.detach().float()
    return nn.Parameter(t) if isinstance(a, nn.Parameter) else t.requires_grad_(a.requires_grad)


def _maxerr(xs, refs) -> float:
    return max(float((x.detach().float() - r).abs().max()) for x, r in zip(xs, refs))


def _inputs(op: Op, dims, dev, dtype) -> list:
    torch.manual_seed(0)  # same values for every implementation
    return op.build(dims, dev, dtype)


def run_case(name: str, dims: tuple, dev, dtype, impls, warmup, rep) -> list[dict]:
    op = OPS[name]
    args32 = [_to32(a) for a in _inputs(op, dims, dev, dtype)]
    ref = _outs(op.makers["hf_eager"](args32, dev)(*args32))
    g32 = [torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in ref]
    torch.autograd.backward(ref, g32)
    ref, ref_grads = [o.detach() for o in ref], [args32[i].grad for i in op.grad_idx]
    del args32
    floor_ms = op.floor(dims, torch.finfo(dtype).bits // 8) * 1e3
    rows = []
    for impl in impls:
        row = dict.fromkeys(COLUMNS)
        row.update(op=name, shape=op.label.format(*dims), impl=impl, floor_ms=floor_ms, note="")
        rows.append(row)
        maker = op.makers.get(COMPILED.get(impl, impl))
        if maker is None:
            row["note"] = "n/a"
            continue
        # Fresh inputs per implementation: Liger writes into its inputs (rope: q/k, swiglu bwd: gate/up).
        fn = step = outs = None
        args = _inputs(op, dims, dev, dtype)
        leaves = [a for a in args if a.requires_grad]
        try:
            fn = maker(args, dev)
            row["note"] = getattr(fn, "note", "")
            if impl in COMPILED:
                torch._dynamo.reset()
                fn = torch.compile(fn, dynamic=False)
            t0 = time.perf_counter()
            outs = _outs(fn(*args))
            grads = [g.to(o.dtype) for g, o in zip(g32, outs)]
            torch.autograd.backward(outs, [g.clone() for g in grads])  # clone: Liger may write into dy
            sync(dev)
            row["first_call_s"] = time.perf_counter() - t0
            row["fwd_err"] = _maxerr(outs, ref)
            row["grad_err"] = _maxerr([args[i].grad for i in op.grad_idx], ref_grads)

            def step(fn=fn, grads=grads, args=args, leaves=leaves):
                for a in leaves:
                    a.grad = None
                torch.autograd.backward(_outs(fn(*args)), grads)

            # The first call's gradients go first: a step frees them before allocating its own, which would
            # net the gradients out of the peak (the peers' figures in notes/measured.md count them).
            row["grads_MiB"] = sum(a.grad.nbytes for a in leaves if a.grad is not None) / 2**20
            for a in leaves:
                a.grad = None
            mem = peak_extra_bytes(step, dev)
            row["peak_extra_MiB"] = None if mem is None else mem / 2**20
            row["ms"] = timeit(step, warmup, rep, dev)
            try:
                row["gpu_ms"] = kernel_ms(step, dev)
            except Exception as e:  # the timing above stands without it
                row["note"] = f"gpu_ms: {short_error(e)}"
            row["pct_floor"] = 100 * floor_ms / row["ms"]
        except Skip as e:
            row["note"] = f"skipped: {e}"
        except Exception as e:
            msg = (str(e).strip().splitlines() or [""])[0][:200]
            row["note"] = f"error: {type(e).__name__}: {msg}"
        del fn, step, outs, args, leaves
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  {name:10s} {row['shape']:24s} {impl:20s} ms={row['ms']} {row['note']}", flush=True)
    torch._dynamo.reset()
    return rows


def dispatch_overhead(dev, dtype, n=1000) -> list[dict]:
    """µs per eager call of ops.rms_norm on a tiny tensor vs a trivial torch op (best of 5 loops)."""
    x, w = torch.randn(8, 64, device=dev, dtype=dtype), torch.ones(64, device=dev, dtype=dtype)
    xg, ops = x.clone().requires_grad_(), _cp()
    registered = importlib.import_module("chronipatch.ops.rms_norm")._rms_norm  # the custom op itself
    calls = {
        "x * 1.0": lambda: x * 1.0,
        "ops.rms_norm(x, w, 1e-6)": lambda: ops.rms_norm(x, w, EPS),
        "ops.rms_norm(x, w, 1e-6), x requires grad": lambda: ops.rms_norm(xg, w, EPS),
        "the registered op, x requires grad (custom-op dispatch)": lambda: registered(xg, w, EPS),
    }
    rows = []
    for label, f in calls.items():
        best = float("inf")
        for _ in range(5):
            f()
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            sync(dev)
            best = min(best, (time.perf_counter() - t0) / n * 1e6)
        rows.append({"call": label, "shape": "[8, 64]", "device": str(dev), "us_per_call": best})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, few reps, runs on CPU")
    ap.add_argument("--ops", default="rms_norm,rms_norm_linear,rope,swiglu,lce", help="comma list of groups")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma list: {','.join(IMPLS)}")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16
    warmup, rep = (2, 10) if args.smoke else (25, 100)
    groups, impls = set(args.ops.split(",")), [i for i in IMPLS if i in args.impls.split(",")]
    timer = "triton do_bench (L2 flushed)" if dev.type == "cuda" else "time.perf_counter, 1 CPU thread"
    if dev.type == "cpu":
        torch.set_num_threads(1)  # tiny CPU shapes: thread wake-ups would dominate and swing the medians
    meta = env_info(dev)
    if dev.type == "cuda":
        global HBM_BYTES_PER_S
        HBM_BYTES_PER_S = copy_bytes_per_s(dev)
    meta.update(
        dtype=str(dtype), smoke=args.smoke, warmup_ms=warmup, rep_ms=rep, floor_bytes_per_s=HBM_BYTES_PER_S
    )
    meta["notes"] = [
        f"{dtype}; ms = median of one forward + backward (fixed random upstream grad, ones for the loss),"
        f" timed with {timer}, warmup {warmup} ms, rep {rep} ms",
        _floor_note(measured=dev.type == "cuda"),
        *NOTES,
    ]
    extra = []
    if "rms_norm" in groups and "chronipatch" in impls:
        title = "chronipatch eager dispatch overhead (µs per call, 1000 calls, best of 5)"
        try:
            extra.append((title, dispatch_overhead(dev, dtype), None))
        except Skip as e:
            print(f"dispatch overhead skipped: {e}")
    rows = []
    for name, dims in SMOKE_CASES if args.smoke else CASES:
        if OPS[name].group in groups:
            rows += run_case(name, dims, dev, dtype, impls, warmup, rep)
            # Written after every case: a run cut short keeps what it measured.
            sections = _pivots(rows, impls, gpu=dev.type == "cuda") + extra
            json_path, md_path = write_results(
                "ops", rows, meta, args.out, columns=COLUMNS, sections=sections
            )
    print(Path(md_path).read_text())
    print(f"wrote {json_path} and {md_path}")


def _pivots(rows: list[dict], impls: list[str], gpu: bool) -> list:
    """A table per timing (median ms; on CUDA also kernel GPU time): a row per case, a column per impl."""
    sections = []
    for key, title in (("ms", "median fwd+bwd ms"), ("gpu_ms", "GPU time per fwd+bwd, ms (kernels only)")):
        if key == "gpu_ms" and not gpu:
            continue
        wide: dict[tuple[str, str], dict] = {}
        for r in rows:
            w = wide.setdefault((r["op"], r["shape"]), {k: r[k] for k in ("op", "shape", "floor_ms")})
            w[r["impl"]] = r[key] if r[key] is not None else r["note"].split(":")[0]
        sections.append((title, list(wide.values()), ["op", "shape", "floor_ms", *impls]))
    return sections


if __name__ == "__main__":
    main()
