"""The op benchmark's table: per op its inputs, the gradients checked, its roofline floor and one maker per
implementation (HF eager, Liger, cut-cross-entropy, chronipatch), and the shapes measured.

A maker takes the built inputs and the device and returns a callable on those inputs (a tensor or a tuple
out); an implementation that cannot run here raises ``Skip``. ``bench/ops.py`` runs the table.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, apply_rotary_pos_emb

# H100 SXM HBM3, rounded; on CUDA ``bench/ops.py`` replaces it with the card's measured copy rate.
HBM_BYTES_PER_S = 3.0e12
BF16_FLOP_PER_S = 790e12  # achievable dense bf16 matmul rate on H100 SXM
EPS = 1e-6
IGNORE = -100


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
