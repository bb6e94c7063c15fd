"""Eager torch references of every op: the CPU path, the test oracle and the benchmark baseline.

Each forward returns exactly what its fused op returns, and each backward computes the same
analytic gradient, so the CPU path of a registered op is these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._utils import as_rows


def _f(x: Tensor) -> Tensor:
    """Upcast to at least fp32 (fp64 stays fp64, so the reference is also the fp64 truth)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# --- RMSNorm: y = w * cast(x * rsqrt(mean(x^2) + eps)), statistics in fp32 (LlamaRMSNorm) ---


def rms_norm_fwd(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    rstd = torch.rsqrt(_f(x).pow(2).mean(-1) + eps)
    return rms_norm_out(x, weight, rstd), rstd


def rms_norm_out(x: Tensor, weight: Tensor, rstd: Tensor, weight_last: bool = False) -> Tensor:
    """The forward's y from its rstd. ``weight_last`` multiplies in the other order (the same values): a
    backward's recompute then differs from the forward's graph, which a compiler would otherwise merge
    with it by common-subexpression elimination and keep y for the backward after all."""
    h = (_f(x) * rstd.unsqueeze(-1)).to(x.dtype)
    return h * weight if weight_last else weight * h


def rms_norm_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, dx_ext: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(dx, dweight); ``dx_ext`` (x's gradient from its other uses) is added to dx before its rounding."""
    xf, dyf, r = _f(x), _f(dy), rstd.unsqueeze(-1)
    h = xf * r
    dh = dyf * _f(weight)
    dx = r * (dh - h * (dh * h).mean(-1, keepdim=True))
    if dx_ext is not None:
        dx = dx + _f(dx_ext)
    dw = as_rows(dyf * _f(h.to(x.dtype))).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


# --- SwiGLU: out = silu(g) * u, in fp32 ---


def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    return (F.silu(_f(gate)) * _f(up)).to(gate.dtype)


def swiglu_bwd(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    g, u, do = _f(gate), _f(up), _f(dout)
    sig = torch.sigmoid(g)
    dg = do * u * sig * (1 + g * (1 - sig))
    du = do * g * sig
    return dg.to(gate.dtype), du.to(up.dtype)


# --- RoPE, HF split-half convention: out = x * cos + rotate_half(x) * sin ---


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_fwd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    c, s = _f(cos).unsqueeze(1), _f(sin).unsqueeze(1)
    qf, kf = _f(q), _f(k)
    return (qf * c + rotate_half(qf) * s).to(q.dtype), (kf * c + rotate_half(kf) * s).to(k.dtype)


def rope_bwd(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    # The transpose of x -> x*cos + rotate_half(x)*sin is y -> y*cos - rotate_half(y*sin).
    c, s = _f(cos).unsqueeze(1), _f(sin).unsqueeze(1)
    dqf, dkf = _f(dq), _f(dk)
    return (dqf * c - rotate_half(dqf * s)).to(dq.dtype), (dkf * c - rotate_half(dkf * s)).to(dk.dtype)


# --- linear cross-entropy per row, m = max z, s = sum exp(z - m): loss_i = log s - (z_y - m) ---


def centred(z: Tensor, m: Tensor) -> Tensor:
    """z - m, with 0 where a +inf logit meets its +inf row max (it holds the probability), as the kernels.
    Also used by the CUDA path for the label's logit."""
    return torch.where((z == m) & (z == torch.inf), 0.0, z - m)


def _fp32_logits(hidden: Tensor, weight: Tensor) -> Tensor:
    """hidden @ weight.T in at least fp32, as the kernels' GEMM accumulator: not in the autocast dtype, also
    when the op runs under autocast (its inputs are cast to that dtype before, as F.linear's would be)."""
    dev = hidden.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        with torch.autocast(dev, enabled=False):
            return _f(hidden) @ _f(weight).T
    return _f(hidden) @ _f(weight).T


def _in_range(labels: Tensor, vocab: int) -> Tensor:
    return (labels >= 0) & (labels < vocab)


def nan_out_of_range(loss: Tensor, labels: Tensor, vocab: int) -> Tensor:
    """nan rows for labels outside [0, V): compiled calls skip the label check (a host sync), and a loss of
    some other logit would train on it silently."""
    return torch.where(_in_range(labels, vocab), loss, float("nan"))


def lce_fwd(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, token_stats: bool = True
) -> tuple[Tensor, ...]:
    """Returns (loss_rows, stats [N, 2] = (m, s), entropy, correct) in fp32 (fp64 for fp64 input), the last
    two empty without ``token_stats``; logits stay in fp32 (HF's lm_head rounds them to the weight dtype
    before its fp32 softmax), as the kernels keep the GEMM's fp32 accumulator."""
    logits = _fp32_logits(hidden, weight)
    m = logits.max(-1).values
    m = torch.where(m == -torch.inf, 0.0, m)  # no finite logit: centre on 0, as torch.logsumexp does
    z = centred(logits, m.unsqueeze(1))  # <= 0: both sums below are free of cancellation
    s = torch.exp(z).sum(-1)
    logsum = torch.log(s)
    valid = labels != ignore_index
    safe = torch.where(valid & _in_range(labels, weight.shape[0]), labels, 0)
    loss = logsum - z.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = torch.where(valid, nan_out_of_range(loss, labels, weight.shape[0]), 0.0)
    if not token_stats:
        return loss, torch.stack([m, s], -1), loss.new_empty(0), loss.new_empty(0)
    p = torch.exp(z) / s.unsqueeze(1)
    entropy = logsum - torch.where(p > 0, p * z, 0.0).sum(-1)  # a -inf logit adds 0, not 0 * -inf
    correct = (logits.argmax(-1) == labels).to(loss.dtype)
    return loss, torch.stack([m, s], -1), entropy, correct


def lce_bwd(
    grad_rows: Tensor,
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    stats: Tensor,
    ignore_index: int,
    need_dh: bool = True,
    need_dw: bool = True,
) -> tuple[Tensor, Tensor]:
    logits = _fp32_logits(hidden, weight)
    valid = labels != ignore_index
    scale = torch.where(valid, _f(grad_rows), 0.0).unsqueeze(1)
    hit = valid & _in_range(labels, weight.shape[0])  # as the kernels: no one-hot for a label out of range
    safe = torch.where(hit, labels, 0).unsqueeze(1)
    p = torch.exp(centred(logits, stats[:, :1])) / stats[:, 1:]  # softmax as stock computes it
    g = p.scatter_add(1, safe, -hit.to(logits.dtype).unsqueeze(1))
    g = torch.where(valid.unsqueeze(1), g * scale, 0.0).to(hidden.dtype)  # ignored rows: exactly 0
    dh = g @ weight if need_dh else hidden.new_zeros(0)
    # No 0 * nan from ignored rows: their hidden states are zeroed.
    dw = g.T @ torch.where(valid.unsqueeze(1), hidden, 0.0) if need_dw else weight.new_zeros(0)
    return dh, dw
