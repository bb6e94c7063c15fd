"""GPU: patched public-config models in bf16 against stock, and graph breaks under compile."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import chronipatch
from models import causal_lm
from tiny import FAMILIES, tiny_model

pytestmark = pytest.mark.gpu


def _step(model, ids, labels=None, **batch):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids if labels is None else labels, **batch).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    return loss.detach().float(), norm.float()


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "llama-3.2-1b", "qwen3-0.6b"])
def test_public_configs_bf16_match_stock(name):
    torch.manual_seed(0)
    # Four layers of the public config keep the test quick and the shapes real.
    stock = causal_lm(name, num_hidden_layers=4, attn_implementation="sdpa").to("cuda", torch.bfloat16)
    truth = copy.deepcopy(stock).float()
    patched = copy.deepcopy(stock)
    report = chronipatch.apply(patched)
    assert report.ops()["linear_cross_entropy"] == 1
    ids = torch.randint(0, stock.config.vocab_size, (2, 1024), device="cuda")
    (l_s, n_s), (l_p, n_p), (l_t, n_t) = _step(stock, ids), _step(patched, ids), _step(truth, ids)
    assert abs(l_p - l_t) <= 1.1 * abs(l_s - l_t) + 2e-3 * l_t, (l_p, l_s, l_t)
    assert abs(n_p - n_t) <= 1.1 * abs(n_s - n_t) + 2e-2 * n_t, (n_p, n_s, n_t)


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "llama-3.2-1b"])
def test_public_configs_compile_without_graph_breaks(name):
    model = causal_lm(name, attn_implementation="sdpa").to("cuda", torch.bfloat16)
    chronipatch.apply(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 256), device="cuda")
    torch._dynamo.reset()
    explain = torch._dynamo.explain(lambda: model(input_ids=ids, labels=ids).loss)()
    assert explain.graph_break_count == 0, explain.break_reasons
    # A full compiled training step on two layers of the same config, against eager.
    small = causal_lm(name, num_hidden_layers=2, attn_implementation="sdpa").to("cuda", torch.bfloat16)
    chronipatch.apply(small)
    eager = small(input_ids=ids, labels=ids).loss
    torch._dynamo.reset()
    loss = torch.compile(small, fullgraph=True)(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_families_fp32_cuda_match_stock(family):
    stock = tiny_model(family).cuda()
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched)
    ids = torch.randint(0, stock.config.vocab_size, (3, 33), device="cuda")
    (l_s, _), (l_p, _) = _step(stock, ids), _step(patched, ids)
    torch.testing.assert_close(l_p, l_s, rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(patched.named_parameters(), stock.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_device_moves_after_apply():
    """apply on CPU, then .cuda(), bf16, and back to the CPU: the patched model follows its weights (the
    kernels on CUDA, the reference on CPU) and matches stock moved alike at every stop."""
    stock = tiny_model("qwen3")
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched)
    ids = torch.randint(0, stock.config.vocab_size, (2, 33))
    for move, tol in (
        (lambda m: m.cuda(), 1e-4),
        (lambda m: m.bfloat16(), 3e-2),
        (lambda m: m.float().cpu(), 1e-5),
    ):
        stock, patched = move(stock), move(patched)
        x = ids.to(next(stock.parameters()).device)
        got, want = patched(input_ids=x, labels=x).loss, stock(input_ids=x, labels=x).loss
        torch.testing.assert_close(got, want.float(), rtol=tol, atol=tol)
    assert chronipatch.is_patched(patched)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "fp32_autocast"])
def test_fused_down_projection_changes_only_its_weight_gradient_gpu(autocast, monkeypatch):
    """``swiglu_linear`` against the unfused ``down_proj(swiglu(g, u))`` in one patched model, in bf16 and
    under autocast over fp32 weights: the same kernels and GEMMs, so loss and every gradient but down_proj's
    are bit-identical; down_proj's dW (the one GEMM written differently: dout.T @ h, where autograd computes
    (h.T @ dout).T) agrees to bf16 rounding. The norm recompute stays off: the unfused switch below
    (``plain_linear``) also turns it off, and its dy sum rounds differently from autograd's."""
    from chronipatch import layers

    torch.manual_seed(0)
    model = causal_lm("llama-3.2-1b", num_hidden_layers=4, attn_implementation="sdpa").to("cuda")
    if not autocast:
        model = model.to(torch.bfloat16)
    chronipatch.apply(model, norm_recompute=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 512), device="cuda")

    def run():
        model.zero_grad(set_to_none=True)
        # SDPA's math kernel: the flash/cuDNN backwards sum dq in a run-dependent order (atomics), which
        # alone moves the gradients below the attention by an ulp between two identical steps.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast), sdpa_kernel(SDPBackend.MATH):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fused = run()
    again = run()  # the step itself is deterministic, or bit-identity below could not hold
    assert torch.equal(fused[0], again[0]) and all(torch.equal(g, again[1][n]) for n, g in fused[1].items())
    monkeypatch.setattr(layers, "plain_linear", lambda m: False)
    unfused = run()
    assert torch.equal(fused[0], unfused[0])
    for name, grad in fused[1].items():
        if "down_proj" in name:
            torch.testing.assert_close(grad, unfused[1][name], rtol=1e-2, atol=1e-5, msg=name)
        else:
            assert torch.equal(grad, unfused[1][name]), name


def _padded_models(layers: int):
    """(stock, its fp32 copy: the truth, patched): Qwen2.5-0.5B's config, ``layers`` layers, bf16 on CUDA."""
    torch.manual_seed(0)
    stock = causal_lm("qwen2.5-0.5b", num_hidden_layers=layers, attn_implementation="sdpa")
    stock = stock.to("cuda", torch.bfloat16)
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched)
    return stock, copy.deepcopy(stock).float(), patched


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batches_run_bucketed_masked_sdpa_and_match_stock(side):
    """Padded bf16 batches (``masked_sdpa``), right-padded as TRL's collator pads and left-padded as
    generation pads (a left pad's query rows see no key at all: fully masked rows, where the
    memory-efficient kernel once gave nan, torch#109517): the first step at a padded length (777 -> 896;
    left: 1001 -> 1024, a bucket of its own, as an earlier forward's bucket keeps its plan) runs the
    memory-efficient kernel, no cuDNN one; a later step at another length of that bucket (800; 1010) runs
    SDPA's own choice, as stock does; each step's loss and gradient norm stay as close to the fp32 truth as
    stock's. Skipped at the end where stock's SDPA does not pick cuDNN here (it prefers it on sm_90 and
    sm_100)."""
    from torch.profiler import ProfilerActivity, profile

    stock, truth, patched = _padded_models(4)

    def step(model, ids, mask):
        labels = ids.masked_fill(mask == 0, -100)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            loss, norm = _step(model, ids, labels, attention_mask=mask)
        kernels = {e.name.lower() for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
        return loss, norm, {k for k in kernels if "cudnn" in k}, kernels

    steps = ((777, (777, 512, 300, 41)), (800, (800, 640, 9, 333)))
    if side == "left":
        steps = ((1001, (1001, 512, 300, 41)), (1010, (1010, 640, 9, 333)))
    for i, (t, lengths) in enumerate(steps):
        ids = torch.randint(0, stock.config.vocab_size, (4, t), device="cuda")
        mask = torch.ones_like(ids)
        for row, n in enumerate(lengths):
            mask[row, n:] = 0
        if side == "left":
            mask = mask.flip(1)
        (l_p, n_p, ours, kernels), (l_s, n_s, theirs, _), (l_t, n_t, _, _) = (
            step(m, ids, mask) for m in (patched, stock, truth)
        )
        assert torch.isfinite(l_p) and torch.isfinite(n_p), (t, l_p, n_p)
        assert abs(l_p - l_t) <= 1.1 * abs(l_s - l_t) + 2e-3 * l_t, (t, l_p, l_s, l_t)
        assert abs(n_p - n_t) <= 1.1 * abs(n_s - n_t) + 2e-2 * n_t, (t, n_p, n_s, n_t)
        assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after every call
        if i == 0:
            assert not ours, sorted(ours)
            assert any("fmha" in k or "efficient" in k for k in kernels), sorted(kernels)[:40]
        else:
            assert bool(ours) == bool(theirs), (sorted(ours), sorted(theirs))
    if not theirs:
        pytest.skip("stock's masked SDPA ran no cuDNN kernel on this GPU and torch: nothing was left out")


def test_compiled_padded_batches_pad_to_the_bucket_in_the_graph():
    """A compiled padded bf16 model (fullgraph, dynamic T), where the trace finds cuDNN first: every graph's
    SDPA runs its symbolic length padded to a multiple of 128 inside the graph (896 at 777 and at 800), and
    each step's loss and gradient norm (right, then left padding) stay as close to the fp32 truth as eager
    stock's."""
    from torch._inductor.compile_fx import compile_fx

    from chronipatch import masked_sdpa

    stock, truth, patched = _padded_models(2)
    if not masked_sdpa._prefers_cudnn(torch.device("cuda")):
        pytest.skip("SDPA does not try cuDNN first on this GPU: nothing to bucket")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    lengths = []  # per graph, read before Inductor's passes rewrite it

    def backend(gm, example_inputs):
        lengths.append([n.meta["example_value"].shape[2] for n in gm.graph.nodes if n.target is sdpa])
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(patched, backend=backend, fullgraph=True, dynamic=True)
    traced = 0
    for t, flip in ((777, False), (800, True)):
        ids = torch.randint(0, stock.config.vocab_size, (4, t), device="cuda")
        mask = torch.ones_like(ids)
        for row, n in enumerate((t, 512, 300, 41)):
            mask[row, n:] = 0
        mask = mask.flip(1) if flip else mask
        labels = ids.masked_fill(mask == 0, -100)
        l_p, n_p = _step(compiled, ids, labels, attention_mask=mask)
        (l_s, n_s), (l_t, n_t) = (_step(m, ids, labels, attention_mask=mask) for m in (stock, truth))
        assert torch.isfinite(l_p) and torch.isfinite(n_p), (t, l_p, n_p)
        assert abs(l_p - l_t) <= 1.1 * abs(l_s - l_t) + 2e-3 * l_t, (t, l_p, l_s, l_t)
        assert abs(n_p - n_t) <= 1.1 * abs(n_s - n_t) + 2e-2 * n_t, (t, n_p, n_s, n_t)
        traced = len(lengths) if not flip else traced
    assert len(lengths) == traced, lengths  # 800, left-padded, runs 777's graph: no recompile
    # A restart for the float attributes (eps, scaling) traces twice: every trace's lengths are checked.
    assert lengths
    for graph in lengths:
        assert len(graph) == 2 and all(isinstance(n, torch.SymInt) for n in graph), graph
        assert [n.node.hint for n in graph] == [896, 896], graph  # the trace's T rounded up
