"""CPU: masked SDPA (padded batches) as transformers runs it: cuDNN's flag handling, the padded-length buckets
and the kernel choice per shape, and the wiring from the patched attention."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from chronipatch import attention, masked_sdpa
from tiny import tiny_model


@pytest.fixture(autouse=True)
def registered():
    attention.register()
    yield
    attention.unregister()


def _sdpa_flags() -> tuple[bool, ...]:
    cuda = torch.backends.cuda
    flags = (cuda.flash_sdp_enabled, cuda.mem_efficient_sdp_enabled, cuda.math_sdp_enabled)
    return tuple(on() for on in (*flags, cuda.cudnn_sdp_enabled, torch._C._get_overrideable_sdp_enabled))


def _on_cuda(heads: int = 4):
    """A stand-in for a CUDA [B, H, T, D] tensor: the helper reads only ``is_cuda`` and the head count."""
    from types import SimpleNamespace

    return SimpleNamespace(is_cuda=True, shape=(1, heads, 2, 8))


def test_masked_sdpa_kernels_leave_out_only_cudnn_and_only_where_the_efficient_kernel_serves(monkeypatch):
    """A masked CUDA call runs without cuDNN's kernel, every other flag as it was and all restored after,
    also on an exception; no mask, the CPU, or a caller's choice without the memory-efficient kernel (flash
    takes no mask: flash + cuDNN, cuDNN + math, math alone, cuDNN alone) leave SDPA's choice as it is."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mask, q = torch.ones(1, 1, 2, 2, dtype=torch.bool), _on_cuda()
    before = _sdpa_flags()
    assert before == (True,) * 5, before
    with masked_sdpa.masked_sdpa_kernels(mask, q, q):
        assert _sdpa_flags() == (True, True, True, False, True)
    assert _sdpa_flags() == before
    with pytest.raises(RuntimeError), masked_sdpa.masked_sdpa_kernels(mask, q, q):
        raise RuntimeError
    assert _sdpa_flags() == before
    for args in ((None, q, q), (mask, torch.ones(1, 4, 2, 8), torch.ones(1, 4, 2, 8))):
        with masked_sdpa.masked_sdpa_kernels(*args):
            assert _sdpa_flags() == before
    B = SDPBackend
    for chosen in (
        [B.FLASH_ATTENTION, B.CUDNN_ATTENTION],
        [B.CUDNN_ATTENTION, B.MATH],
        [B.MATH],
        [B.CUDNN_ATTENTION],
    ):
        with sdpa_kernel(chosen):
            theirs = _sdpa_flags()
            with masked_sdpa.masked_sdpa_kernels(mask, q, q):
                assert _sdpa_flags() == theirs, chosen
    # Grouped kv heads reach SDPA with a mask only under TRANSFORMERS_SDPA_FORCE_GQA: then SDPA chooses.
    with masked_sdpa.masked_sdpa_kernels(mask, q, _on_cuda(heads=2)):
        assert not _sdpa_flags()[3]
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    with masked_sdpa.masked_sdpa_kernels(mask, q, _on_cuda(heads=2)):
        assert _sdpa_flags() == before
    with masked_sdpa.masked_sdpa_kernels(mask, q, q):
        assert not _sdpa_flags()[3]


def test_masked_sdpa_kernels_held_by_overlapping_callers_restore_once():
    """Replicas in threads (nn.DataParallel) overlap their calls: the flag stays off until the last leaves,
    also one that came while it was off already, then comes back as the first found it."""
    mask, q = torch.ones(1, 1, 2, 2, dtype=torch.bool), _on_cuda()
    a, b = masked_sdpa.masked_sdpa_kernels(mask, q, q), masked_sdpa.masked_sdpa_kernels(mask, q, q)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    with masked_sdpa.masked_sdpa_kernels(mask, q, q):  # a third holder, come while the flag was off
        pass
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    b.__exit__(None, None, None)
    assert _sdpa_flags() == (True,) * 5
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:  # a caller's own setting is what the helper finds and restores
        with masked_sdpa.masked_sdpa_kernels(mask, q, q):
            pass
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


def test_patched_attention_runs_masked_sdpa_for_stock_sdpa_only(monkeypatch):
    """The patched attention forward runs stock SDPA calls through ``masked_sdpa`` with their mask (a padded
    batch's, or None without one), and other implementations as they are; the varlen implementation's padded
    fallback to SDPA goes through it too."""
    import chronipatch
    from chronipatch import layers

    seen = []

    def spy(real):
        return lambda module, q, k, v, mask, **kw: seen.append(mask) or real(module, q, k, v, mask, **kw)

    monkeypatch.setattr(layers, "masked_sdpa", spy(layers.masked_sdpa))
    monkeypatch.setattr(attention, "masked_sdpa", spy(attention.masked_sdpa))
    model = tiny_model("qwen2", dtype=torch.float32)
    chronipatch.apply(model)
    ids = torch.randint(0, 211, (2, 9))
    padded = torch.ones(2, 9, dtype=torch.long)
    padded[1, 6:] = 0
    n = model.config.num_hidden_layers
    model(input_ids=ids, attention_mask=padded)
    assert len(seen) == n and all(isinstance(m, torch.Tensor) and m.dim() == 4 for m in seen), seen
    seen.clear()
    model(input_ids=ids)
    assert seen == [None] * n
    seen.clear()
    model.set_attn_implementation("eager")
    model(input_ids=ids, attention_mask=padded)
    assert seen == []
    model.set_attn_implementation(attention.NAME)
    model(input_ids=ids, attention_mask=padded)
    assert len(seen) == n and all(m.dim() == 4 for m in seen), seen


def _call(b=2, hq=4, hk=2, t=9, d=8, dtype=torch.bfloat16, mask_dtype=torch.bool, t_k=None):
    """Stand-ins for a CUDA call's q, k and mask (``_bucketed`` reads shapes, dtypes and the device)."""
    t_k = t if t_k is None else t_k
    q = SimpleNamespace(is_cuda=True, shape=(b, hq, t, d), dtype=dtype, device=torch.device("cuda", 0))
    k = SimpleNamespace(is_cuda=True, shape=(b, hk, t_k, d), dtype=dtype, device=torch.device("cuda", 0))
    return torch.ones(b, 1, t, t_k, dtype=mask_dtype), q, k


def test_bucketed_calls_are_training_shaped_half_precision_bool_masked_where_cudnn_comes_first(monkeypatch):
    """Only calls whose cuDNN plans a new length rebuilds take the buckets: fp16/bf16, a 4-D bool mask,
    as many keys as queries, on a device where SDPA tries cuDNN first, with cuDNN and the
    memory-efficient kernel both enabled."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    monkeypatch.setattr(masked_sdpa, "_prefers_cudnn", lambda device: True)
    assert masked_sdpa._bucketed(*_call())
    assert masked_sdpa._bucketed(*_call(dtype=torch.float16))
    assert not masked_sdpa._bucketed(*_call(dtype=torch.float32))
    assert not masked_sdpa._bucketed(*_call(mask_dtype=torch.float32))
    assert not masked_sdpa._bucketed(*_call(t=1, t_k=9))  # a KV cache
    assert not masked_sdpa._bucketed(None, *_call()[1:])
    for chosen in ([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], [SDPBackend.CUDNN_ATTENTION]):
        with sdpa_kernel(chosen):
            assert not masked_sdpa._bucketed(*_call()), chosen
    monkeypatch.setattr(masked_sdpa, "_prefers_cudnn", lambda device: False)  # before sm_90
    assert not masked_sdpa._bucketed(*_call())


def test_bucketed_call_pads_to_the_bucket_and_matches_the_unpadded_call(monkeypatch):
    """A bucketed call pads T to a multiple of ``BUCKET`` and slices back: output and q/k/v gradients as the
    unpadded call's (fp64), left and right padding, a length already on a bucket edge untouched."""
    monkeypatch.setattr(masked_sdpa, "_bucketed", lambda mask, q, k: True)
    calls = []
    real = masked_sdpa.sdpa_attention_forward
    monkeypatch.setattr(
        masked_sdpa,
        "sdpa_attention_forward",
        lambda m, q, *a, **kw: calls.append(q.shape[2]) or real(m, q, *a, **kw),
    )
    module = SimpleNamespace(is_causal=True, num_key_value_groups=2, training=True)
    g = torch.Generator().manual_seed(0)
    for t in (9, 128, 130):
        pad = torch.arange(t)[None, :] < torch.tensor([[t], [t - 4]])
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        masks = (pad[:, None, None, :] & causal, pad.flip(-1)[:, None, None, :] & causal)  # right, left
        for mask in masks:
            q, k, v = (torch.randn(2, h, t, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
            grads = []
            for fn in (masked_sdpa.masked_sdpa, real):
                x = [y.detach().requires_grad_() for y in (q, k, v)]
                out, _ = fn(module, *x, mask, scaling=0.3)
                out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
                grads.append((out.detach(), *(y.grad for y in x)))
            assert grads[0][0].shape == (2, t, 4, 8)
            keep = mask[:, 0].any(-1)[:, :, None, None]  # fully masked rows (left padding) are SDPA's own
            torch.testing.assert_close(grads[0][0] * keep, grads[1][0] * keep, rtol=1e-12, atol=1e-12)
            for ours, theirs in zip(grads[0][1:], grads[1][1:], strict=True):
                torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert calls == [128, 128, 128, 128, 256, 256], calls  # what SDPA ran: the padded lengths


def _flags_per_call(monkeypatch) -> list:
    """Bucket every training-shaped call (as on a Hopper GPU) and record cuDNN's flag at each SDPA call."""
    monkeypatch.setattr(masked_sdpa, "_cudnn_first", lambda mask, q, k: mask is not None)
    monkeypatch.setattr(masked_sdpa, "_first_mask", {})
    flags = []
    real = masked_sdpa.sdpa_attention_forward
    spy = lambda *a, **kw: flags.append(torch.backends.cuda.cudnn_sdp_enabled()) or real(*a, **kw)
    monkeypatch.setattr(masked_sdpa, "sdpa_attention_forward", spy)
    return flags


def test_bucketed_shape_runs_without_cudnn_until_another_forward_brings_it(monkeypatch):
    """A padded shape's first forward (its mask, also recomputed by gradient checkpointing) runs without
    cuDNN; another mask of the same padded shape (a later step) runs SDPA's choice; a new shape starts
    over."""
    flags = _flags_per_call(monkeypatch)
    module = SimpleNamespace(is_causal=True, num_key_value_groups=1, training=False)

    def run(t):
        mask = torch.ones(1, 1, t, t, dtype=torch.bool).tril()
        q = torch.randn(1, 2, t, 8)
        return mask, q

    first, q = run(9)
    masked_sdpa.masked_sdpa(module, q, q, q, first)
    masked_sdpa.masked_sdpa(module, q, q, q, first)  # the same forward's next layer
    later, q2 = run(100)  # another step, the same bucket
    masked_sdpa.masked_sdpa(module, q2, q2, q2, later)
    masked_sdpa.masked_sdpa(module, q, q, q, first)  # a recompute of the first forward
    other, q3 = run(200)
    masked_sdpa.masked_sdpa(module, q3, q3, q3, other)
    assert flags == [False, False, True, False, False], flags
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_a_recompute_keeps_its_forwards_choice_after_the_shape_table_is_cleared(monkeypatch):
    """A forward that met its shape already (SDPA's choice) recomputes with that choice even where the
    bounded table of first masks was cleared in between."""
    flags = _flags_per_call(monkeypatch)
    module = SimpleNamespace(is_causal=True, num_key_value_groups=1, training=False)
    q = torch.randn(1, 2, 9, 8)
    first, later = (torch.ones(1, 1, 9, 9, dtype=torch.bool).tril() for _ in range(2))
    masked_sdpa.masked_sdpa(module, q, q, q, first)
    masked_sdpa.masked_sdpa(module, q, q, q, later)  # another step: the shape met again
    for t in range(300):  # other shapes, until the table is cleared
        masked_sdpa._kernel_choice(torch.empty(1, 2, t, 8), torch.empty(1, 2, t, 8), first, torch.empty(0))
    assert len(masked_sdpa._first_mask) < 300
    masked_sdpa.masked_sdpa(module, q, q, q, later)  # its recompute
    assert flags == [False, True, True], flags


def test_bucketed_calls_read_the_callers_cudnn_flag_not_a_holders(monkeypatch):
    """While another caller (a replica in another thread) holds cuDNN off for its own call, a call is
    bucketed as the caller's own setting says: its forward and its recompute choose alike."""
    monkeypatch.setattr(masked_sdpa, "_prefers_cudnn", lambda device: True)
    with masked_sdpa._WITHOUT_CUDNN:
        assert masked_sdpa._bucketed(*_call())
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        with masked_sdpa._WITHOUT_CUDNN:
            assert not masked_sdpa._bucketed(*_call())
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


@pytest.mark.parametrize("implementation", ["sdpa", attention.NAME])
def test_a_forward_and_its_recompute_choose_alike_in_every_layer(monkeypatch, implementation):
    """Through a checkpointed model, stock SDPA and the varlen implementation's padded fallback alike: a
    step's forward and its recompute run every layer without cuDNN at a new padded shape, the next step's
    (another padding mask of the same bucket) with SDPA's choice; losses and gradients as unbucketed."""
    import chronipatch

    model = tiny_model("qwen2", dtype=torch.float64)
    chronipatch.apply(model, varlen_attention=implementation == attention.NAME)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 211, (2, 9))
    padded = torch.ones(2, 9, dtype=torch.long)
    padded[1, 6:] = 0
    n = model.config.num_hidden_layers

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=padded.clone(), labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = step()
    flags = _flags_per_call(monkeypatch)
    first, second = step(), step()
    assert flags == [False] * 2 * n + [True] * 2 * n, flags
    for ours in (first, second):
        torch.testing.assert_close(ours[0], plain[0], rtol=1e-12, atol=1e-12)
        for a, b in zip(ours[1], plain[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bucketed_calls_run_under_inference_mode(monkeypatch):
    """Inference tensors carry no version counter: the per-forward memo computes instead, and a padded
    batch's greedy generation gives the unbucketed tokens."""
    import chronipatch

    model = tiny_model("llama", dtype=torch.float64)
    chronipatch.apply(model)
    model.eval()
    ids = torch.randint(1, 211, (2, 7))
    left = torch.ones_like(ids)
    left[1, :3] = 0
    with torch.inference_mode():
        plain = model.generate(ids, attention_mask=left, max_new_tokens=4, do_sample=False)
        _flags_per_call(monkeypatch)
        ours = model.generate(ids, attention_mask=left, max_new_tokens=4, do_sample=False)
    assert torch.equal(ours, plain)


def _sdpa_lengths(gm) -> list:
    """The query length of every SDPA call in a traced graph."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return [n.meta["example_value"].shape[2] for n in gm.graph.nodes if n.target is sdpa]


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_padded_models_pad_to_the_bucket_inside_one_graph(monkeypatch, dynamic):
    """Compiled where the trace finds cuDNN first, the padding to a bucket is traced into the graph: SDPA
    runs a multiple of ``BUCKET`` in every layer, one graph (no break) serves every length under dynamic
    shapes (one on a bucket edge too), and loss and gradients are the unbucketed eager ones (fp64, right
    and left padding)."""
    import chronipatch

    model = tiny_model("qwen2", dtype=torch.float64)
    chronipatch.apply(model)
    batches = []
    for t, left in ((9, False), (13, True), (128, False)):  # 128: no padding to add, the same graph
        ids = torch.randint(1, 211, (2, t))
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        mask = mask.flip(-1) if left else mask
        batches.append(dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)))

    def step(fn, batch):
        model.zero_grad(set_to_none=True)
        loss = fn(**batch).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager = [step(model, batch) for batch in batches]  # on the CPU: no buckets
    monkeypatch.setattr(masked_sdpa, "_cudnn_first", lambda mask, q, k: mask is not None)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)
    for batch, (loss, grads) in zip(batches, eager, strict=True):
        ours = step(compiled, batch)
        torch.testing.assert_close(ours[0], loss, rtol=1e-12, atol=1e-12)
        for a, b in zip(ours[1], grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    n = model.config.num_hidden_layers
    lengths = [_sdpa_lengths(gm) for gm in graphs]
    if dynamic:
        assert len(graphs) == 1 and len(lengths[0]) == n, lengths
    else:
        assert lengths == [[128] * n] * 3, lengths


def test_compiled_calls_take_the_bucket_decision_of_the_trace(monkeypatch):
    """In a graph, whether cuDNN comes first is decided once, at trace time, without a graph break: cuDNN's
    flag as the trace found it; and never for CPU tensors."""
    monkeypatch.setattr(masked_sdpa, "_prefers_cudnn", lambda device: True)
    flag = lambda x: x + 1 if masked_sdpa._traced_cudnn_first(0) else x - 1
    on_cpu = lambda x, mask: x + 1 if masked_sdpa._cudnn_first(mask, x, x) else x - 1
    x, mask = torch.zeros(2, dtype=torch.bfloat16), torch.ones(1, 1, 2, 2, dtype=torch.bool)
    try:
        for enabled, want in ((True, 1), (False, -1)):
            torch.backends.cuda.enable_cudnn_sdp(enabled)
            torch._dynamo.reset()
            assert torch.compile(flag, fullgraph=True)(x).eq(want).all(), enabled
            assert torch.compile(on_cpu, fullgraph=True)(x, mask).eq(-1).all(), enabled
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
