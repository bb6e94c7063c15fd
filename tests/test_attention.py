"""CPU: the varlen attention implementation against stock sdpa, run per document, padded and generating."""

from __future__ import annotations

import importlib
from itertools import pairwise

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from chronipatch import attention
from chronipatch.attention import NAME, varlen_attention_forward
from chronipatch.packing import PackingCollator
from tiny import tiny_model

PACK_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@pytest.fixture(autouse=True)
def registered():
    attention.register()
    attention.register()  # idempotent
    yield
    attention.unregister()


def _pair(family, dtype=torch.float64, **overrides):
    """(varlen model, stock sdpa model) with identical weights."""
    ours = tiny_model(family, dtype=dtype, **overrides)
    ours.set_attn_implementation(NAME)
    return ours, tiny_model(family, dtype=dtype, **overrides)


def _packed(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 211, (n,), generator=g) for n in lengths]
    return PackingCollator(max_length=sum(lengths))([{"input_ids": d} for d in docs])


def _segments(b):
    cu = b["cu_seq_lens_q"].tolist()
    return list(pairwise(cu))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_packed_matches_documents_alone(family):
    ours, stock = _pair(family)
    b = _packed([7, 13, 5])
    assert len(_segments(b)) == 3
    w = torch.randn(1, b["input_ids"].shape[1], ours.config.vocab_size, dtype=torch.float64)
    logits = ours(input_ids=b["input_ids"], **{k: b[k] for k in PACK_KEYS}).logits
    (logits * w).sum().backward()
    total = 0
    for lo, hi in _segments(b):
        alone = stock(input_ids=b["input_ids"][:, lo:hi]).logits
        torch.testing.assert_close(logits[:, lo:hi], alone, atol=1e-10, rtol=0)
        total = total + (alone * w[:, lo:hi]).sum()
    total.backward()
    theirs = _grads(stock)
    for name, grad in _grads(ours).items():
        torch.testing.assert_close(grad, theirs[name], atol=1e-10, rtol=0, msg=name)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_position_ids_only_equals_cu_seq_lens(family):
    # Eval with use_cache on (the default): stock sdpa then skips its packed-sequence detection and lets
    # documents see each other; boundaries here come from position_ids alone.
    ours, _ = _pair(family)
    b = _packed([9, 4, 11], seed=1)
    with torch.no_grad():
        by_cu = ours(input_ids=b["input_ids"], **{k: b[k] for k in PACK_KEYS}).logits
        by_pos = ours(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
    torch.testing.assert_close(by_pos, by_cu, atol=1e-12, rtol=0)


def test_sliding_window_packed_matches_documents_alone():
    ours, stock = _pair("mistral", sliding_window=4)
    b = _packed([10, 6, 8], seed=2)
    with torch.no_grad():
        logits = ours(input_ids=b["input_ids"], **{k: b[k] for k in PACK_KEYS}).logits
        for lo, hi in _segments(b):
            alone = stock(input_ids=b["input_ids"][:, lo:hi]).logits
            torch.testing.assert_close(logits[:, lo:hi], alone, atol=1e-10, rtol=0)


@pytest.mark.parametrize("packed", [False, True])
def test_autocast_casts_query_key_and_value_as_sdpa_does(packed):
    """fp32 weights under bf16 autocast: HF's RoPE leaves q/k in fp32 beside a bf16 v; the varlen attention
    runs all three in the autocast dtype, as SDPA's autocast rule does (packed rows: per document)."""
    ours, stock = _pair("llama", dtype=torch.float32)
    b = _packed([7, 13, 5], seed=4)
    ids = b["input_ids"]
    kw = {k: b[k] for k in PACK_KEYS} if packed else {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(input_ids=ids, labels=ids, **kw)
        got.loss.backward()
        spans = _segments(b) if packed else [(0, ids.shape[1])]
        want = [stock(input_ids=ids[:, lo:hi]).logits for lo, hi in spans]
    assert got.logits.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)
    for (lo, hi), theirs in zip(spans, want, strict=True):
        torch.testing.assert_close(got.logits[:, lo:hi], theirs, rtol=0, atol=0.05)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_sdpa(side):
    ours, stock = _pair("qwen3")
    ids = torch.randint(0, 211, (3, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    for row, n in enumerate((12, 8, 3)):
        if side == "right":
            mask[row, n:] = 0
        else:
            mask[row, : 12 - n] = 0
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        b = stock(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], atol=1e-10, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize(("family", "overrides"), [("llama", {}), ("mistral", {"sliding_window": 4})])
def test_generate_matches_sdpa(family, overrides, padded):
    ours, stock = _pair(family, **overrides)
    ids = torch.randint(0, 211, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4] = 0  # left padding, as generate expects
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    kw.update(output_logits=True, return_dict_in_generate=True)
    a, b = ours.generate(ids, **kw), stock.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), atol=1e-10, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("llama", {}),
        ("mistral", {"sliding_window": 4}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4}),
    ],
    ids=["llama", "mistral-window", "qwen2-window-layers"],
)
def test_static_cache_matches_sdpa(family, overrides, padded):
    """A static cache holds keys in the first slots of a longer buffer: a forward into it without a mask, and
    generation with it, equal stock SDPA (which masks the empty slots) and the forward without a cache."""
    from transformers import StaticCache

    ours, stock = _pair(family, **overrides)
    ids = torch.randint(0, 211, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = stock(input_ids=ids, use_cache=False).logits
        for model in (ours, stock):
            cache = StaticCache(config=model.config, max_cache_len=16)
            torch.testing.assert_close(
                model(input_ids=ids, past_key_values=cache).logits, plain, atol=1e-10, rtol=0
            )
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :2] = 0
    kw = dict(
        attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static"
    )
    kw.update(output_logits=True, return_dict_in_generate=True)
    a, b = ours.generate(ids, **kw), stock.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), atol=1e-10, rtol=0)


def test_compile_fullgraph_packed():
    ours, _ = _pair("llama", dtype=torch.float32)
    b = _packed([7, 13, 5])
    inputs = {"input_ids": b["input_ids"], **{k: b[k] for k in PACK_KEYS}}
    explained = torch._dynamo.explain(ours)(**inputs)
    assert explained.graph_break_count == 0, explained.break_reasons

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(ours, backend=counter, fullgraph=True)
    # 25 tokens each: new boundaries with the same document count reuse the graph (max_length_* is the
    # collator's bound); a new count recompiles once (cu_seq_lens' size turns dynamic), then never again.
    cases = ([7, 13, 5], 1), ([12, 3, 10], 1), ([4, 4, 9, 8], 2), ([5, 5, 6, 5, 4], 2), ([20, 5], 2)
    for lengths, frames in cases:
        b = _packed(lengths)
        inputs = {"input_ids": b["input_ids"], **{k: b[k] for k in PACK_KEYS}}
        with torch.no_grad():
            torch.testing.assert_close(compiled(**inputs).logits, ours(**inputs).logits)
        assert counter.frame_count <= frames, (lengths, counter.frame_count)
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_compile_fullgraph_with_a_padding_mask(family):
    """Compiled (fullgraph), a 2-D mask stays in the graph, and what eager decides by ``mask.all()`` the
    graph decides: padded rows (right, left) as stock sdpa's; a mask without padding as eager's (none), so
    position_ids split rows into documents. Packed rows with a mask check it as eager does (a graph
    break): without padding as without a mask, with padding eager's error."""
    ours, stock = _pair(family)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, 211, (2, 17))
    for left in (False, True):
        mask = torch.ones_like(ids)
        mask[1, 11:] = 0
        mask = mask.flip(-1) if left else mask
        keep = mask.bool()
        with torch.no_grad():
            ours_out = compiled(input_ids=ids, attention_mask=mask).logits
            theirs = stock(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(ours_out[keep], theirs[keep], rtol=1e-10, atol=1e-10)
    ones, pos = torch.ones_like(ids), torch.cat([torch.arange(7), torch.arange(10)]).expand(2, -1)
    with torch.no_grad():
        documents = compiled(input_ids=ids, attention_mask=ones, position_ids=pos).logits
        eager = ours(input_ids=ids, attention_mask=ones, position_ids=pos).logits
        causal = stock(input_ids=ids, attention_mask=ones, position_ids=pos).logits  # sdpa: no split
    torch.testing.assert_close(documents, eager, rtol=1e-10, atol=1e-10)
    assert (documents[:, 7:] - causal[:, 7:]).abs().max() > 1e-3  # the second document is on its own
    b = _packed([7, 13, 5])
    inputs = {"input_ids": b["input_ids"], **{k: b[k] for k in PACK_KEYS}}
    broken = torch.compile(ours, backend="aot_eager")
    with torch.no_grad():
        want = ours(**inputs).logits
        torch.testing.assert_close(broken(**inputs, attention_mask=torch.ones(1, 25)).logits, want)
        padded = torch.ones(1, 25)
        padded[0, -3:] = 0
        for model in (ours, broken):
            with pytest.raises(ValueError, match="padding attention_mask"):
                model(**inputs, attention_mask=padded)
    torch._dynamo.reset()


def test_compiled_mask_keeps_a_positional_padding_mask():
    """``varlen_mask`` in a graph reads its arguments by position too, as transformers' flash mask does."""
    from transformers.masking_utils import causal_mask_function

    padding = torch.tensor([[True, True, False]])
    mask = lambda m: attention.varlen_mask(1, 3, 3, 0, 0, causal_mask_function, m)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(mask, fullgraph=True, backend="eager")(padding), padding)
    assert torch.equal(mask(padding), padding)


def _qkv(t=10, hq=4, hk=2, d=8, b=1):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(b, h, t, d, generator=g, dtype=torch.float64) for h in (hq, hk, hk)]


class _Module:
    is_causal, num_key_value_groups, training = True, 2, False


def test_bad_inputs_raise():
    q, k, v = _qkv()
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    ok = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6, max_length_k=6)
    varlen_attention_forward(_Module(), q, k, v, None, **ok)
    with pytest.raises(ValueError, match="batch size 1"):
        varlen_attention_forward(_Module(), *_qkv(b=2), None, **ok)
    with pytest.raises(ValueError, match="max_length_q"):
        varlen_attention_forward(_Module(), q, k, v, None, cu_seq_lens_q=cu)
    with pytest.raises(ValueError, match="max_length_q must be a Python int"):
        varlen_attention_forward(_Module(), q, k, v, None, **{**ok, "max_length_q": torch.tensor(6)})
    with pytest.raises(ValueError, match="token count 10"):
        bad = torch.tensor([0, 4, 9], dtype=torch.int32)
        varlen_attention_forward(_Module(), q, k, v, None, **{**ok, "cu_seq_lens_q": bad})
    with pytest.raises(ValueError, match="max_length"):
        varlen_attention_forward(_Module(), q, k, v, None, **{**ok, "max_length_q": 5})
    with pytest.raises(ValueError, match="dropout"):
        varlen_attention_forward(_Module(), q, k, v, None, dropout=0.1, **ok)


def test_dropout_in_training_raises():
    """Whatever the rows: packed, padded, or without padding, eager and compiled alike."""
    ours, _ = _pair("llama", attention_dropout=0.1)
    ours.train()
    b = _packed([7, 5])
    with pytest.raises(ValueError, match="dropout"):
        ours(input_ids=b["input_ids"], **{k: b[k] for k in PACK_KEYS})
    ids = torch.randint(0, 211, (2, 9))
    padded = torch.ones_like(ids)
    padded[1, 5:] = 0
    torch._dynamo.reset()
    for model in (ours, torch.compile(ours, backend="eager")):
        for mask in (padded, torch.ones_like(ids)):
            with pytest.raises(ValueError, match="dropout"):
                model(input_ids=ids, attention_mask=mask)
    torch._dynamo.reset()


def test_unregister_removes_name():
    assert NAME in AttentionInterface() and NAME in AttentionMaskInterface()
    attention.unregister()
    assert NAME not in AttentionInterface() and NAME not in AttentionMaskInterface()
    attention.unregister()  # idempotent


@pytest.mark.parametrize("batch", [1, 2])
def test_eager_reference_runs_in_blocks_of_query_rows_with_the_same_results(monkeypatch, batch):
    """Off the flash kernels, eager calls compute the masked softmax over blocks of query rows (memory of one
    block's scores): outputs and gradients as the one-block form a graph keeps, a NaN key of one document
    kept out of the others' outputs."""
    ref = importlib.import_module("chronipatch._reference_attention")

    g = torch.Generator().manual_seed(5)
    t, hq, hk, d = 23, 4, 2, 8
    q, k, v = (torch.randn(batch, h, t, d, generator=g, dtype=torch.float64) for h in (hq, hk, hk))
    i = torch.arange(t)
    mask = ((i[:, None] >= i) & ((i[:, None] < 9) == (i < 9)))[None, None]  # documents [0, 9), [9, 23)
    grad = torch.randn(batch, t, hq, d, generator=g, dtype=torch.float64)
    k[0, 0, 3, 1] = float("nan")  # in document 0

    def run(compiling):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = ref.reference_attention(*leaves, mask, 0.3)
        out.backward(grad)
        return [out.detach()] + [x.grad for x in leaves]

    monkeypatch.setattr(ref, "_BLOCK_SCORES", 4 * batch * hq * t)  # blocks of 4 rows
    blocks, block = [], ref._block
    monkeypatch.setattr(ref, "_block", lambda *a: blocks.append(a[4]) or block(*a))
    blocked = run(False)
    assert blocks == [*range(0, t, 4)] * 2  # forward, then the backward's recompute
    monkeypatch.setattr(ref, "_block", block)
    whole = run(True)
    for ours, theirs in zip(blocked, whole, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert blocked[0][:, 9:].isfinite().all() and blocked[0][1:].isfinite().all()
    assert blocked[0][0, 3:9, :2].isnan().all()  # q heads 0 and 1 from key 3 on


def test_same_document_splits_where_positions_do_not_step_by_one_in_one_dynamic_graph():
    from chronipatch.attention import _same_document

    def reference(pos):
        doc = torch.zeros_like(pos)
        for t in range(1, pos.shape[1]):
            doc[:, t] = doc[:, t - 1] + (pos[:, t] != pos[:, t - 1] + 1)
        return doc[:, :, None] == doc[:, None, :]

    # Batch 2 throughout, T >= 2: sizes 0 and 1 are the compiler's own specialisations.
    cases = [
        [[0, 1, 2, 0, 1], [3, 4, 5, 6, 7]],
        [[1, 0], [0, 1]],
        [[5, 6, 7, 3, 4, 0, 3], [0] * 7],
        [[0, 1], [0, 0]],
    ]
    graphs = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(_same_document, backend=graphs, fullgraph=True, dynamic=True)
    for case in cases:
        pos = torch.tensor(case)
        assert torch.equal(_same_document(pos), reference(pos)), case
        assert torch.equal(compiled(pos), reference(pos)), case
    assert graphs.frame_count == 1  # T = 5, 2, 7, 2: one graph


class _Attn(torch.nn.Module):
    is_causal, num_key_value_groups = True, 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exact_math_path_computes_half_precision_in_fp32(dtype):
    """Off CUDA, 2-byte q/k/v are computed in fp32: raw q.k of 1.4e5 (past fp16's 65504, the scale bringing
    them back in range) give stock SDPA's result, not inf scores and nan rows; the output's and every
    gradient's error against fp64 within 1.5x stock SDPA's in that dtype (plus 1e-3)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q = torch.randn(1, 2, 8, 128, dtype=torch.float64) * 30
    k = q + 3 * torch.randn(1, 2, 8, 128, dtype=torch.float64)  # aligned with the queries: large logits
    v = torch.randn(1, 2, 8, 128, dtype=torch.float64)
    assert (q @ k.transpose(-1, -2)).max() > 65504
    grad = torch.randn(1, 8, 2, 128, dtype=torch.float64)
    results = []
    for fn, dt in ((sdpa_attention_forward, torch.float64), (sdpa_attention_forward, dtype), (None, dtype)):
        leaves = [x.detach().to(dt, copy=True).requires_grad_() for x in (q, k, v)]
        out = (fn or varlen_attention_forward)(_Attn(), *leaves, None, scaling=128**-0.5)[0]
        out.backward(grad.to(dt))
        results.append([out.double()] + [x.grad.double() for x in leaves])
    truth, stock, ours = results
    for i, (t, s, o) in enumerate(zip(truth, stock, ours, strict=True)):
        assert o.isfinite().all(), i
        assert (o - t).abs().max() <= 1.5 * (s - t).abs().max() + 1e-3, i


def test_output_attentions_warns_that_no_weights_come_back():
    """As stock SDPA: ``output_attentions=True`` gets a warning, not a silent empty tuple of weights."""
    q = torch.randn(1, 2, 4, 8)
    with pytest.warns(UserWarning, match="no attention weights"):
        _, weights = varlen_attention_forward(_Attn(), q, q, q, None, output_attentions=True)
    assert weights is None
