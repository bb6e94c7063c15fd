"""Which rounding of the one pass moves Llama-3.2-1B's tied embedding (seed 0, eager, the invariant's loop):
the loss's dh and dW replaced by torch emulations of each form's roundings (the real kernels still give the
loss), against stock's. Forms: stock (logits rounded to bf16), rc (the recompute path: g from fp32 logits,
rounded once), op (the one pass as 86a9e2c: p = bf16(e) with 0 at the label, h_r = bf16(r h), dW's GEMM part
rounded before the label terms join it), and op with one part changed: op_dh_rc / op_dw_rc (the other's dh or
dW from rc), op_hr32 (r h unrounded), op_once (dW rounded once, after the label terms), op_q (p holds
bf16(e_y - s) at the label, and the exact remainders of its terms join dh and dW before their one rounding;
op_q_post: dW's after its GEMM's rounding).
nat: the kernels' dh with op_once's dW; nat_mm32: the same with p W as an fp32 GEMM of the upcast operands;
op_K: op_once with p against the kernels' reference K (the sampled max, not the row's: the row's largest p is
then rounded too, alike in every row where the model predicts alike). A suffix _K takes that K for op_q or
op_q_post (op_q_post_K emulates bc8af7a's kernels); _top adds the exact remainder of the row's largest entry,
r (e_a - bf16(e_a)), to dh (before its rounding) and dW (with the label's). The kernels' K is now
spread over rows (REF_SPREAD); a suffix _nd sets that spread to 0 for the kernels and the emulation alike."""

import importlib
import sys
import time

import torch

bf = torch.bfloat16
lce = importlib.import_module("chronipatch.ops.linear_cross_entropy")
real = lce._fwd_bwd


@torch.autocast("cuda", enabled=False)  # the loss runs under the model's autocast: these GEMMs must not
def _grads(form, h, w, y, c, live):
    hf, wf = h.float(), w.float()
    yy = torch.where(live, y, 0)
    rows = torch.arange(h.shape[0], device=h.device)
    z = (h @ w.T).float() if form == "stock" else hf @ wf.T
    if form in ("stock", "rc"):
        g = torch.softmax(z, 1)
        g[rows, yy] -= 1
        g = (g * (c * live)[:, None]).to(bf)
        return (g @ w), (g.T @ h)
    # op_K: p against the kernels' own reference K per row (the sampled max, lowered by the rounding bound)
    ref = importlib.import_module("chronipatch.ops._lce_rows").row_references(h, w)[:, None]
    e = torch.exp(z - (ref if "_K" in form else z.amax(1, keepdim=True)))
    s = e.sum(1)
    r = c * live / s
    g_y = ((e[rows, yy] / s - 1) * c).to(bf).float() * live
    p = e.to(bf)
    h_r = r[:, None] * hf if form == "op_hr32" else (r[:, None] * hf).to(bf).float()
    if form.startswith("op_q"):  # p holds bf16(e_y - s) at the label; exact remainders join
        q = (e[rows, yy] - s).to(bf).float() * live
        p[rows, yy] = q.to(bf)
        dh = r[:, None] * (p.float() @ wf) + (g_y - r * q)[:, None] * wf[yy]
        dw = p.float().T @ h_r
        if form.startswith("op_q_post"):  # dW's remainders after its GEMM's rounding
            dw = dw.to(bf).float()
        dw = dw.index_add(0, yy, g_y[:, None] * hf - q[:, None] * h_r)
        if "_top" in form:  # the row's largest entry exact too, where it is not the label's
            a = z.argmax(1)
            share.append((a == a.mode().values).float().mean().item())
            d = torch.where(live & (a != yy), e[rows, a] - p[rows, a].float(), 0.0)  # e_a - bf16(e_a)
            dh += (r * d)[:, None] * wf[a]
            dw = dw.index_add(0, a, (r * d)[:, None] * hf)
        return dh.to(bf), dw.to(bf)
    p[rows, yy] = 0
    dh = (r[:, None] * (p.float() @ wf) + g_y[:, None] * wf[yy]).to(bf)
    dw = p.float().T @ h_r
    if form not in ("op_once", "op_K"):
        dw = dw.to(bf).float()
    dw = dw.index_add(0, yy, g_y[:, None] * hf).to(bf)
    return dh, dw


def emulated(hidden, weight, labels, divisor, ignore_index, token_stats, need_dh, need_dw, *a, **k):
    out = real(hidden, weight, labels, divisor, ignore_index, token_stats, need_dh, need_dw, *a, **k)
    live = labels != ignore_index
    c = 1.0 / torch.where(divisor != 0, divisor, 1.0).float()
    if form.startswith("nat"):  # the kernels' dh, dW rounded once (op_once's)
        return (*out[:4], _grads("op_once", hidden, weight, labels, c, live)[1] if need_dw else out[4])
    dh, dw = _grads("op" if form in ("op_dh_rc", "op_dw_rc") else form, hidden, weight, labels, c, live)
    if form in ("op_dh_rc", "op_dw_rc"):
        dh_rc, dw_rc = _grads("rc", hidden, weight, labels, c, live)
        dh, dw = (dh_rc, dw) if form == "op_dh_rc" else (dh, dw_rc)
    return (*out[:3], dh if need_dh else out[3], dw if need_dw else out[4])


from invariant_probe import compare, run_against_truth  # noqa: E402

rows_mod = importlib.import_module("chronipatch.ops._lce_rows")
mm_f32 = rows_mod.mm_f32


@torch.autocast("cuda", enabled=False)
def mm_fp32(a, b):
    return a.float() @ b.float()


share = []  # per step, the share of rows whose largest logit is at the batch's most common column
spread = rows_mod.REF_SPREAD
for form in sys.argv[1:]:
    share.clear()
    rows_mod.REF_SPREAD = 0.0 if form.endswith("_nd") else spread  # _nd: the references not spread over rows
    lce._fwd_bwd = real if form.startswith("native") else emulated
    rows_mod.mm_f32 = mm_fp32 if form == "nat_mm32" else mm_f32
    t = time.time()
    curve, names, errors = run_against_truth("llama-3.2-1b", 0, 50, ("eager",))
    med = compare(errors, "eager")["median paired"]
    top = med.argsort(descending=True)[:4].tolist()
    print(
        form,
        f"{time.time() - t:.0f}s embed",
        round(med[names.index("model.embed_tokens.weight")].item(), 4),
        [(names[i].replace("model.layers.", ""), round(med[i].item(), 3)) for i in top],
        flush=True,
    )
    if share:
        mid = sorted(share)[len(share) // 2]
        print("  rows at the common argmax, first/median/last step:", share[0], mid, share[-1])
