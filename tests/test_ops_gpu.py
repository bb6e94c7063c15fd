"""GPU: each op in bf16/fp16/fp32 is no less accurate than the stock HF module in that dtype,
measured against the fp64 truth computed from the same inputs."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from chronipatch import ops
from helpers import assert_no_worse_than_stock, hf_view

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _check(ours, stock, truth, dtype, what):
    for i, (a, b, t) in enumerate(zip(ours, stock, truth)):
        assert_no_worse_than_stock(a, b, t, dtype, what=f"{what}[{i}]")


def _run(fn, inputs, grads):
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    return [*outs, *torch.autograd.grad(outs, inputs, grads[: len(outs)])]


@pytest.mark.parametrize("rows,n", [(1, 64), (127, 128), (4099, 896), (8192, 4096), (7, 8192)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_gpu(rows, n, dtype):
    torch.manual_seed(rows)
    x, w = torch.randn(rows, n, device="cuda") * 2, 1 + 0.1 * torch.randn(n, device="cuda")
    dy = torch.randn(rows, n, device="cuda")

    def hf(x, w):
        if x.dtype == torch.float64:  # the module computes in fp32; its math in fp64 is the truth
            return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        norm = LlamaRMSNorm(n, 1e-6).to(device="cuda", dtype=w.dtype)
        return torch.func.functional_call(norm, {"weight": w}, (x,))

    low = [t.to(dtype) for t in (x, w)]
    truth = _run(hf, [t.double() for t in low], [dy.double()])
    _check(
        _run(lambda a, b: ops.rms_norm(a, b, 1e-6), low, [dy.to(dtype)]),
        _run(hf, low, [dy.to(dtype)]),
        truth,
        dtype,
        "rms_norm",
    )


@pytest.mark.parametrize("shape", [(1, 7), (8192, 4864), (3, 1001)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_gpu(shape, dtype):
    g, u, do = (torch.randn(shape, device="cuda") * s for s in (3, 1, 1))
    hf = lambda g, u: F.silu(g) * u
    low = [g.to(dtype), u.to(dtype)]
    truth = _run(hf, [t.double() for t in low], [do.double()])
    _check(_run(ops.swiglu, low, [do.to(dtype)]), _run(hf, low, [do.to(dtype)]), truth, dtype, "swiglu")


@pytest.mark.parametrize("rows,inner,out", [(8192, 4864, 896), (7, 1001, 64), (4099, 8192, 2048)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_linear_gpu(rows, inner, out, dtype):
    """Against stock's ``down_proj(act(gate) * up)``: the output and the gate, up and weight gradients."""
    torch.manual_seed(rows)
    g, u, do = (torch.randn(rows, n, device="cuda") * s for n, s in ((inner, 3), (inner, 1), (out, 1)))
    w = torch.randn(out, inner, device="cuda") / inner**0.5
    hf = lambda g, u, w: F.linear(F.silu(g) * u, w)
    low = [t.to(dtype) for t in (g, u, w)]
    truth = _run(hf, [t.double() for t in low], [do.double()])
    ours = _run(ops.swiglu_linear, low, [do.to(dtype)])
    _check(ours, _run(hf, low, [do.to(dtype)]), truth, dtype, "swiglu_linear")


@pytest.mark.parametrize(
    "rows,n,outs,bias",
    [
        (8192, 2048, (2048, 512, 512), False),
        (4099, 896, (896, 128, 128), True),
        (8192, 896, (4864,) * 2, False),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_linear_gpu(rows, n, outs, bias, dtype):
    """Against stock's norm then projections (Llama's q/k/v, Qwen2's with biases, an MLP's gate/up): the
    outputs and the gradients of x, the norm weight, the weights and the biases."""
    torch.manual_seed(rows)
    x, nw = torch.randn(rows, n, device="cuda") * 2, 1 + 0.1 * torch.randn(n, device="cuda")
    ws = [torch.randn(o, n, device="cuda") / n**0.5 for o in outs]
    bs = [torch.randn(o, device="cuda") for o in outs] if bias else []
    dos = [torch.randn(rows, o, device="cuda") for o in outs]
    k = len(outs)

    def hf(x, nw, *params):
        if x.dtype == torch.float64:
            y = nw * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        else:
            norm = LlamaRMSNorm(n, 1e-6).to(device="cuda", dtype=nw.dtype)
            y = torch.func.functional_call(norm, {"weight": nw}, (x,))
        return tuple(F.linear(y, w, b) for w, b in zip(params[:k], params[k:] or [None] * k))

    def ours(x, nw, *params):
        return tuple(ops.rms_norm_linear(x, nw, 1e-6, list(params[:k]), list(params[k:]) or None))

    low = [t.to(dtype) for t in (x, nw, *ws, *bs)]
    truth = _run(hf, [t.double() for t in low], [d.double() for d in dos])
    grads = [d.to(dtype) for d in dos]
    _check(_run(ours, low, grads), _run(hf, low, grads), truth, dtype, "rms_norm_linear")


@pytest.mark.parametrize("rows,n,outs", [(8192, 896, (4864,) * 2), (4099, 2048, (8192,) * 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_linear_gpu(rows, n, outs, dtype):
    """Against stock's residual add, norm and gate/up projections, with the sum also used on: the sum, the
    outputs, and the gradients of the residual, x, the norm weight and the weights."""
    torch.manual_seed(rows)
    r, x = torch.randn(rows, n, device="cuda") * 4, torch.randn(rows, n, device="cuda")
    nw = 1 + 0.1 * torch.randn(n, device="cuda")
    ws = [torch.randn(o, n, device="cuda") / n**0.5 for o in outs]
    grads = [torch.randn(rows, o, device="cuda") for o in (n, *outs)]

    def hf(r, x, nw, *ws):
        s = r + x
        if s.dtype == torch.float64:
            y = nw * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6))
        else:
            norm = LlamaRMSNorm(n, 1e-6).to(device="cuda", dtype=nw.dtype)
            y = torch.func.functional_call(norm, {"weight": nw}, (s,))
        return (s, *(F.linear(y, w) for w in ws))

    def ours(r, x, nw, *ws):
        s, projections = ops.add_rms_norm_linear(r, x, nw, 1e-6, list(ws))
        return (s, *projections)

    low = [t.to(dtype) for t in (r, x, nw, *ws)]
    truth = _run(hf, [t.double() for t in low], [g.double() for g in grads])
    grads = [g.to(dtype) for g in grads]
    _check(_run(ours, low, grads), _run(hf, low, grads), truth, dtype, "add_rms_norm_linear")


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "registered-op"])
def test_swiglu_linear_backward_scratch_gpu(eager, monkeypatch):
    """The backward's peak holds three [N, I] buffers (dg written over dh, du, the recomputed h) and dW; the
    stock MLP tail's backward holds four (dh, dg, du and the saved h). Memory, not time: deterministic."""
    if not eager:  # the registered op, as compiled graphs and functorch run it
        monkeypatch.setattr(
            importlib.import_module("chronipatch.ops.swiglu_linear"), "eager_cuda", lambda *t: False
        )
    rows, inner, out = 4096, 2048, 512
    g, u = (torch.randn(rows, inner, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "gu")
    w = torch.randn(out, inner, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(rows, out, device="cuda", dtype=torch.bfloat16)
    # A first backward gives autograd's device thread its cuBLAS handle, whose workspace (32 MiB on the H200)
    # the caching allocator holds: not the op's scratch, and there only if no earlier test ran a backward.
    warm = [t.detach().requires_grad_() for t in (g[:8], u[:8], w)]
    ops.swiglu_linear(*warm).backward(do[:8])
    y = ops.swiglu_linear(g, u, w)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y.backward(do)
    torch.cuda.synchronize()
    buf = rows * inner * 2
    assert torch.cuda.max_memory_allocated() - base <= 3 * buf + w.nbytes + (1 << 20)


@pytest.mark.parametrize(
    "b,t,hq,hk,d", [(4, 2048, 14, 2, 64), (4, 2048, 16, 8, 128), (1, 7, 32, 8, 128), (2, 33, 12, 4, 80)]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_gpu(b, t, hq, hk, d, dtype):
    q, k = hf_view(b, t, hq, d, device="cuda"), hf_view(b, t, hk, d, device="cuda")
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device="cuda") / d))
    emb = torch.arange(t, device="cuda")[None, :, None] * torch.cat([inv, inv])
    cos, sin = emb.cos(), emb.sin()
    gq, gk = hf_view(b, t, hq, d, device="cuda"), hf_view(b, t, hk, d, device="cuda")

    def run(fn, dt):
        return _run(
            lambda q, k: fn(q, k, cos.to(dt), sin.to(dt)), [q.to(dt), k.to(dt)], [gq.to(dt), gk.to(dt)]
        )

    truth = run(apply_rotary_pos_emb, torch.float64)
    _check(run(ops.rope, dtype), run(apply_rotary_pos_emb, dtype), truth, dtype, "rope")


@pytest.mark.parametrize(
    "n,h,v,loads",  # loads: the tile kernels' (2-byte inputs) TMA loads, or pointers (also for rows that
    # are not 16-byte aligned: 900 columns)
    [
        (1, 896, 151936, "tma"),
        (4099, 896, 151936, "tma"),
        (4099, 896, 151936, "pointers"),
        (8192, 2048, 128256, "tma"),
        (127, 64, 1000, "tma"),
        (300, 900, 5003, "tma"),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lce_gpu(n, h, v, loads, dtype, monkeypatch):
    monkeypatch.setattr(importlib.import_module("chronipatch.ops._lce_tiles"), "TMA_LOADS", loads == "tma")
    torch.manual_seed(n)
    hid, w = torch.randn(n, h, device="cuda"), torch.randn(v, h, device="cuda") * h**-0.5
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[torch.rand(n, device="cuda") < 0.2] = -100

    def hf(hid, w):  # lm_head in the model dtype, loss in fp32, as LlamaForCausalLM does
        logits = hid @ w.T
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels)

    def ours(hid, w):
        return ops.linear_cross_entropy(hid, w, labels, shift=False)

    low = [hid.to(dtype), w.to(dtype)]
    one = torch.ones((), device="cuda")
    truth = _run(hf, [t.double() for t in low], [one.double()])
    _check(_run(ours, low, [one]), _run(hf, low, [one]), truth, dtype, "lce")


def test_lce_int64_indexing_gpu():
    # N * V above 2^31: 16400 rows x 131072 vocabulary.
    n, h, v = 16400, 64, 131072
    hid = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(v, h, device="cuda", dtype=torch.bfloat16) * 0.1
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[-1] = v - 1
    loss = ops.linear_cross_entropy(hid, w, labels, shift=False, reduction="none")
    # The op's softmax is over the fp32 GEMM accumulator: bf16 products are exact in an fp32 matmul.
    ref = F.cross_entropy(hid[-64:].float() @ w.float().T, labels[-64:], reduction="none")
    torch.testing.assert_close(loss[-64:], ref, rtol=1e-4, atol=1e-4)


def test_ops_deterministic_gpu():
    torch.manual_seed(0)
    x = torch.randn(4099, 896, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(896, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    wv = torch.randn(32000, 896, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 32000, (4099,), device="cuda")

    def once():
        loss = ops.linear_cross_entropy(ops.rms_norm(x, w), wv, labels, shift=False)
        return [loss, *torch.autograd.grad(loss, (x, w, wv))]

    first, second = once(), once()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_lce_supervised_rows_only_matches_full_computation_gpu(monkeypatch):
    """CUDA: scoring only the supervised rows (many labels ignored) gives the full computation's loss and
    gradients, up to the GEMMs' own shape-dependent rounding."""
    mod = importlib.import_module("chronipatch.ops.linear_cross_entropy")
    torch.manual_seed(0)
    hidden = torch.randn(4, 512, 896, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(151936, 896, device="cuda") * 896**-0.5).bfloat16()
    labels = torch.randint(0, 151936, (4, 512), device="cuda")
    labels[torch.rand(4, 512, device="cuda") < 0.5] = -100
    # One chunk of rows in bf16's one-pass path: dW is then one GEMM in both runs, as in the recompute path
    # (chunks of other rows would round dW's partial sums elsewhere; test_kernels bounds that).
    monkeypatch.setattr(importlib.import_module("chronipatch.ops._lce_rows"), "P_BYTES", 1 << 30)
    runs = []
    for compact in (0.25, 2.0):  # 2.0: never compact
        monkeypatch.setattr(mod, "COMPACT_IGNORED", compact)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = ops.linear_cross_entropy(h, w, labels)
        loss.backward()
        runs.append((loss.detach(), h.grad.float(), w.grad.float()))
    (l_c, dh_c, dw_c), (l_f, dh_f, dw_f) = runs
    torch.testing.assert_close(l_c, l_f, rtol=1e-5, atol=1e-5)
    for got, full in ((dh_c, dh_f), (dw_c, dw_f)):  # one bf16 rounding apart at most, at the tensor's scale
        torch.testing.assert_close(got, full, rtol=2e-2, atol=1e-3 * full.abs().max().item())


def test_lce_tile_kernels_load_by_tma_on_hopper_gpu():
    """On sm_90 and newer the loss's tile kernels take the TMA path wherever rows are 16-byte aligned."""
    tiles = importlib.import_module("chronipatch.ops._lce_tiles")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs sm_90")
    h = torch.randn(64, 896, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1000, 896, device="cuda", dtype=torch.bfloat16)
    assert tiles._tma(h, w)
    odd = torch.randn(64, 781, device="cuda", dtype=torch.bfloat16)  # rows 1562 bytes apart
    assert not tiles._tma(odd, w[:, :781])
