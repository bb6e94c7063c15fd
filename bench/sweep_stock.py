"""Inputs, the stock HF formulas and the fp64 truths of the randomized op sweep (``bench/sweep.py``)."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sweep_cases import Case

# ---------------------------------------------------------------- input builders


def _gen(case: Case) -> torch.Generator:
    return torch.Generator(device=case.device).manual_seed(case.seed)


def _randn(case: Case, g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """fp64 normal values on the case device."""
    return torch.randn(*shape, generator=g, device=case.device, dtype=torch.float64) * scale


def _lay(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` in another memory layout (what HF hands the op)."""
    if layout == "contiguous" or x.dim() == 0:
        return x.contiguous()
    if layout == "row_strided":  # slice of a wider last dim: rows are not adjacent, last dim dense
        buf = x.new_zeros(*x.shape[:-1], x.shape[-1] + 3)
        buf[..., : x.shape[-1]] = x
        return buf[..., : x.shape[-1]]
    if layout == "permuted":  # a transposed view, e.g. [B, T, H, D] read as [B, H, T, D]
        if x.dim() < 3:
            return _lay(x, "row_strided")
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "last_strided":  # last dim not dense
        buf = x.new_zeros(*x.shape[:-1], 2 * x.shape[-1])
        buf[..., ::2] = x
        return buf[..., ::2]
    raise ValueError(layout)


def _grad_like(case: Case, g: torch.Generator, out: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "expanded":  # what the backward of .sum() hands over: every stride 0
        return _randn(case, g, 1).to(out.dtype).reshape([1] * out.dim()).expand(out.shape)
    dy = _randn(case, g, *out.shape).to(out.dtype)
    if layout == "hf_view" and dy.dim() == 4:
        return dy.transpose(1, 2).contiguous().transpose(1, 2)
    return dy


def _autograd(fn: Callable, inputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> list:
    """[outputs..., d inputs...] of fn at inputs for upstream grads."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, inputs, grads[: len(outs)]))


def _upcast(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().double() for t in ts]


# ---------------------------------------------------------------- stock formulas (HF eager)


def rms_norm_stock(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward; in fp64 the same math without the fp32 round trip (the truth)."""
    if x.dtype == torch.float64:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    xf = x.to(torch.float32)
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def swiglu_stock(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rope_stock(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb with unsqueeze_dim=1."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def lce_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """lm_head in the model dtype, then ``.float()`` as ForCausalLMLoss does (fp64 stays fp64)."""
    logits = hidden @ weight.T
    return logits if logits.dtype == torch.float64 else logits.float()


def lce_rows_stock(hidden, weight, labels, ignore_index):
    """Per-row cross-entropy of flattened, already shifted labels (0 where ignored)."""
    logits = lce_logits(hidden.reshape(-1, hidden.shape[-1]), weight)
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction="none")


def lce_stock_chunked(hidden, weight, labels, ignore_index, row_grad, rows_per_chunk):
    """(rows, dhidden, dweight) of the stock formula one block of rows at a time, for N * V too big to hold
    [N, V] fp32 logits and their gradient: per row the same math as ``lce_rows_stock`` under autograd
    (lm_head in the model dtype, fp32 cross-entropy, the logits' gradient cast back to the model dtype),
    and dweight accumulated in fp32 over the blocks as the one [V, N] x [N, H] GEMM accumulates."""
    n = hidden.shape[0]
    rows, dh = [], torch.empty_like(hidden)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for r0 in range(0, n, rows_per_chunk):
        sl = slice(r0, r0 + rows_per_chunk)
        hc = hidden[sl]
        logits = lce_logits(hc, weight).detach().requires_grad_()
        r = F.cross_entropy(logits, labels[sl], ignore_index=ignore_index, reduction="none")
        (g,) = torch.autograd.grad(r, logits, row_grad[sl].to(r.dtype))
        g = g.to(hidden.dtype)
        dh[sl] = g @ weight
        dw += g.float().T @ hc.float()
        rows.append(r.detach())
    out = torch.cat(rows) if rows else hidden.new_zeros(0, dtype=torch.float32)
    return out, dh, dw.to(weight.dtype)


def lce_entropy_stock(hidden, weight):
    logits = lce_logits(hidden.reshape(-1, hidden.shape[-1]), weight)
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


@dataclass
class _LceTruth:
    rows: torch.Tensor  # per-row loss, 0 where ignored
    entropy: torch.Tensor
    lse: torch.Tensor
    zmax: torch.Tensor  # max |logit| per row
    dh: torch.Tensor
    dw: torch.Tensor


def _lce_truth(h64, w64, labels, ignore_index, row_grad, rows_per_chunk) -> _LceTruth:
    """HF's formula in fp64, in row chunks (bounded memory); row_grad = d(final loss) / d(row loss)."""
    n = h64.shape[0]
    rows, ent, lses, zmax = [], [], [], []
    dh = torch.zeros_like(h64)
    wg = w64.detach().clone().requires_grad_()
    for r0 in range(0, n, rows_per_chunk):
        sl = slice(r0, r0 + rows_per_chunk)
        hc = h64[sl].detach().requires_grad_()
        logits = hc @ wg.T
        r = F.cross_entropy(logits, labels[sl], ignore_index=ignore_index, reduction="none")
        (r * row_grad[sl]).sum().backward()
        dh[sl] = hc.grad
        with torch.no_grad():
            logp = torch.log_softmax(logits, -1)
            ent.append(-(logp.exp() * logp).sum(-1))
            lses.append(torch.logsumexp(logits, -1))
            zmax.append(logits.abs().amax(-1) if logits.shape[-1] else logits.new_zeros(logits.shape[0]))
        rows.append(r.detach())
    cat = lambda xs: torch.cat(xs) if xs else h64.new_zeros(0)
    dw = wg.grad if wg.grad is not None else torch.zeros_like(w64)
    return _LceTruth(cat(rows), cat(ent), cat(lses), cat(zmax), dh, dw)


def _lce_known(t: _LceTruth, h64, w64, labels, ignore_index, row_grad, loss_weight=None):
    """Error bounds of the known loss defect (KNOWN_DEFECTS), per output, 4x their first-order size.

    ``loss_weight`` (per row) reduces the per-row loss bound like the op reduces the rows; None: max."""
    e32 = torch.finfo(torch.float32).eps
    valid = (labels != ignore_index).double()
    if valid.numel() == 0:
        return {}
    lse = t.lse.abs().clamp_min(1)
    a = lse * row_grad.abs() * valid  # |dp / p| * |upstream| per row
    dh = 4 * e32 * a.max().item() * (w64.abs().max().item() if w64.numel() else 0.0)
    dw = 4 * e32 * (a * h64.abs().amax(-1)).sum().item() if h64.shape[-1] else 0.0
    rows = 4 * e32 * (lse + t.zmax) * valid
    loss = rows.max().item() if loss_weight is None else (rows * loss_weight).sum().item()
    return dict(
        loss=("lce-lse-fp32", loss),
        dh=("lce-lse-fp32", dh),
        dw=("lce-lse-fp32", dw),
    )
