"""The paths a patched tiny model takes, each against stock: varlen and masked attention, the compiled
forward's masks, the head under autocast or LoRA, the Triton kernels and the fused eager functions."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

import chronipatch
from helpers import INTERPRET, dynamo_graphs
from tiny import FAMILIES, assert_same, batch, loss_and_grads, tiny_model

FAMS = list(FAMILIES)


def test_varlen_attention_switch_and_revert():
    from chronipatch import attention
    from chronipatch.packing import PackingCollator

    stock = tiny_model("llama", dtype=torch.float64)
    patched = copy.deepcopy(stock)
    report = chronipatch.apply(patched, varlen_attention=True)
    chronipatch.apply(stock)  # same fused ops (HF's own norm rounds through fp32), stock sdpa attention
    assert patched.config._attn_implementation == attention.NAME
    assert "attention sdpa -> chronipatch_varlen" in str(report)
    docs = [torch.randint(0, 211, (n,)) for n in (5, 9, 3)]
    packed = PackingCollator(max_length=32)([{"input_ids": d} for d in docs])
    packed.pop("labels")
    logits = patched(**packed, use_cache=False).logits[0]
    start = 0
    for d in sorted(docs, key=len, reverse=True):  # BFD lays documents out longest first
        torch.testing.assert_close(
            logits[start : start + len(d)], stock(d[None]).logits[0], rtol=1e-9, atol=1e-9
        )
        start += len(d)
    chronipatch.apply(patched)  # varlen_attention=None: the earlier choice kept
    assert patched.config._attn_implementation == attention.NAME
    with pytest.raises(ValueError, match="varlen_attention=False does not undo"):
        chronipatch.apply(patched, varlen_attention=False)
    chronipatch.revert(patched)
    assert patched.config._attn_implementation == "sdpa"
    chronipatch.apply(patched, varlen_attention=False)  # after revert: nothing to undo
    chosen = tiny_model("llama")
    chosen.set_attn_implementation(attention.NAME)  # the user's own choice, no apply's: nothing to undo
    chronipatch.apply(chosen, varlen_attention=False)
    assert chosen.config._attn_implementation == attention.NAME


def test_packed_rows_with_cache_under_sdpa_is_an_error():
    from chronipatch.packing import PackingCollator

    model = tiny_model("llama")
    chronipatch.apply(model)
    packed = PackingCollator(max_length=32)([{"input_ids": torch.arange(1, n)} for n in (6, 9)])
    packed.pop("labels")
    model.eval()
    with pytest.raises(ValueError, match="attend across documents"):
        model(**packed, use_cache=True)
    model(**packed, use_cache=False)  # the packed path without a cache is fine


def test_training_forward_keeps_packed_documents_apart_by_default():
    """In training the CausalLM forward turns the cache off by itself (stock's default cache hides packed rows
    from HF's mask logic): packed documents give the logits they give alone, with no use_cache passed."""
    from chronipatch.packing import PackingCollator

    model = tiny_model("llama", dtype=torch.float64)
    chronipatch.apply(model)
    model.train()
    docs = [torch.randint(0, 211, (n,)) for n in (5, 9, 3)]
    packed = PackingCollator(max_length=32)([{"input_ids": d} for d in docs])
    packed.pop("labels")
    logits = model(**packed).logits[0]
    start = 0
    for d in sorted(docs, key=len, reverse=True):  # BFD lays documents out longest first
        alone = model(input_ids=d[None]).logits[0]
        torch.testing.assert_close(logits[start : start + len(d)], alone, rtol=1e-9, atol=1e-9)
        start += len(d)


def test_autocast_casts_the_head_like_stock():
    """fp32 weights under bf16 autocast (Trainer's bf16=True): the fused loss sees the bf16 lm_head inputs
    that F.linear would (the same loss as called with them outside autocast); gradients reach the fp32
    weights."""
    stock = tiny_model("llama")
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched)
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = loss_and_grads(stock, ids, labels)
        ours = loss_and_grads(patched, ids, labels)
        h = torch.randn(5, 64, requires_grad=True)
        fused = chronipatch.ops.linear_cross_entropy(h, stock.lm_head.weight, labels[0, :5], shift=False)
    explicit = chronipatch.ops.linear_cross_entropy(
        h.bfloat16(), stock.lm_head.weight.bfloat16(), labels[0, :5], shift=False
    )
    assert torch.equal(fused, explicit)
    assert ours[1]["lm_head.weight"].dtype == torch.float32
    assert_same(ours, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours[0], ref[0], rtol=2e-3, atol=0)


@pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernels on CPU tensors through TRITON_INTERPRET=1")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_patched_model_through_the_kernels_matches_stock(family, monkeypatch):
    """The model-level check run through the Triton kernels (interpreter) instead of the torch reference,
    which is made to fail if anything still reaches it: logits, loss and every gradient against stock."""
    import importlib

    from chronipatch.ops import reference

    ops = ("_utils", "rms_norm", "rms_norm_linear", "swiglu", "swiglu_linear", "rope", "linear_cross_entropy")
    for name in ops:
        mod = importlib.import_module(f"chronipatch.ops.{name}")
        monkeypatch.setattr(mod, "on_gpu", lambda t: t.dtype != torch.float64)  # CPU tensors "on a GPU"
        if hasattr(mod, "sms_for"):
            monkeypatch.setattr(mod, "sms_for", lambda t: 4)

    def unreachable(*args, **kwargs):
        raise AssertionError("the torch reference ran instead of a kernel")

    for name in ("rms_norm_fwd", "rms_norm_bwd", "swiglu_fwd", "swiglu_bwd", "rope_fwd", "rope_bwd"):
        monkeypatch.setattr(reference, name, unreachable)
    monkeypatch.setattr(reference, "lce_fwd", unreachable)
    monkeypatch.setattr(reference, "lce_bwd", unreachable)
    stock = tiny_model(family)
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched)
    ids, labels = batch()
    torch.testing.assert_close(patched(ids).logits, stock(ids).logits, rtol=1e-5, atol=1e-5)
    assert_same(loss_and_grads(patched, ids, labels), loss_and_grads(stock, ids, labels))


def test_lora_on_the_head_keeps_the_stock_head():
    """LoRA adapters on lm_head change its output, which a fused loss reading ``lm_head.weight`` would miss:
    apply leaves that CausalLM forward alone (and says so), and loss and gradients stay stock's."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"], init_lora_weights=False)
    stock = peft.get_peft_model(tiny_model("llama"), lora)
    patched = copy.deepcopy(stock)
    report = chronipatch.apply(patched)
    assert "linear_cross_entropy" not in report.ops() and any("lm_head" in why for _, _, why in report.left)
    ids, labels = batch()
    assert_same(loss_and_grads(patched, ids, labels), loss_and_grads(stock, ids, labels))
    # The fused losses' shared head accessor refuses such a head outright (the TRL path reads it too).
    from chronipatch.head import head_weight

    with pytest.raises(ValueError, match="lm_head carries unmerged LoRA adapters"):
        head_weight(patched.base_model.model.lm_head)


def _compiled_sdpa_masks(model, **kw) -> list[bool]:
    """Whether each SDPA call of the compiled training forward gets a mask (dynamo's graph, labels given)."""
    ids, labels = batch()
    graphs = dynamo_graphs(model, input_ids=ids, labels=labels, **kw)
    calls = [
        n
        for gm in graphs
        for n in gm.graph.nodes
        if n.op == "call_function" and "scaled_dot_product_attention" in str(n.target)
    ]
    assert calls, "no SDPA call in the graph"
    return [n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None) is not None for n in calls]


@pytest.mark.parametrize("family", FAMS)
def test_compiled_training_forward_runs_causal_sdpa_without_a_mask(family, monkeypatch):
    """No padding mask, no positions, no cache: every layer runs SDPA's is_causal kernel with no mask, as
    stock eager does, not the dense [B, 1, T, T] mask that transformers builds while compiling a forward
    without a cache (it cannot read the default positions to rule out packed rows)."""
    from chronipatch import causal_lm

    model = tiny_model(family).train()
    chronipatch.apply(model)
    assert _compiled_sdpa_masks(model) == [False, False]
    monkeypatch.setattr(causal_lm, "_causal_only", lambda *args: False)
    assert _compiled_sdpa_masks(model) == [True, True]  # what the forward avoids


@pytest.mark.parametrize(
    "case", ["padding", "position_ids", "eval", "sliding_window"], ids=lambda c: c.replace("_", "-")
)
def test_compiled_forward_keeps_the_mask_where_it_is_more_than_causal(case, monkeypatch):
    """A padding mask, positions (which may restart: packed rows), a cache (eval: the config's use_cache), or
    a sliding window shorter than the rows: the attention gets what transformers built, a mask where it
    built one."""
    from chronipatch import causal_lm

    model = tiny_model("mistral", sliding_window=8 if case == "sliding_window" else None).train()
    chronipatch.apply(model)
    ids, _ = batch()
    kw = {}
    if case == "padding":
        kw["attention_mask"] = torch.ones_like(ids).index_fill_(1, torch.tensor([0]), 0)
    elif case == "position_ids":
        kw["position_ids"] = torch.arange(ids.shape[1]).expand_as(ids)
    elif case == "eval":
        model.eval()
    decided = []
    causal_only = causal_lm._causal_only
    monkeypatch.setattr(causal_lm, "_causal_only", lambda *a: decided.append(causal_only(*a)) or decided[-1])
    got = _compiled_sdpa_masks(model, **kw)
    # A window is checked per layer; every other case is refused for the whole call.
    assert decided == [case == "sliding_window"]
    if case != "eval":  # with a cache, transformers itself may skip the mask while compiling
        assert got == [True, True]
    with monkeypatch.context() as m:
        m.setattr(causal_lm, "_causal_only", lambda *args: False)
        assert _compiled_sdpa_masks(model, **kw) == got
    if case == "sliding_window":  # a window that covers the rows is causal alone
        for layer in model.model.layers:
            layer.self_attn.config.sliding_window = 64
        assert _compiled_sdpa_masks(model) == [False, False]


@pytest.mark.parametrize("window", [16, 17, 18])
def test_sliding_window_at_the_row_length(window):
    """Rows of 17 tokens: a window of 17 or more covers them (SDPA's causal kernel alone, compiled too), 16
    does not (the mask transformers built). Eager losses equal stock's either way."""
    stock = tiny_model("mistral", sliding_window=window).train()
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched)
    ids, labels = batch()
    assert ids.shape[1] == 17
    assert _compiled_sdpa_masks(patched) == [window < 17] * 2
    torch.testing.assert_close(patched(ids, labels=labels).loss, stock(ids, labels=labels).loss)


@pytest.mark.parametrize(
    ("op", "function", "family"),
    [
        ("rms_norm_linear_rope", "_RMSNormLinearRoPEEager", "llama"),  # the attention's half of a layer
        ("rms_norm_linear_rope", "_RMSNormLinearRoPEEager", "qwen2"),
        ("add_rms_norm_swiglu", "_AddRMSNormSwiGLUEager", "llama"),  # the MLP's half
        ("add_rms_norm_swiglu", "_AddRMSNormSwiGLUEager", "qwen3"),
    ],
)
def test_patched_model_through_a_fused_eager_function_matches_stock(monkeypatch, op, function, family):
    """A patched model whose layers take a fused op's eager Function (forced here on CPU tensors), once per
    layer: loss and every gradient equal stock's, and equal the composition's bit for bit."""
    mod = importlib.import_module(f"chronipatch.ops.{op}")
    stock = tiny_model(family)
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched)
    ids, labels = batch()
    composed = loss_and_grads(patched, ids, labels)
    calls = []
    monkeypatch.setattr(mod, "eager_cuda", lambda *t: True)
    real = getattr(mod, function).apply
    monkeypatch.setattr(getattr(mod, function), "apply", lambda *a: calls.append(1) or real(*a))
    fused = loss_and_grads(patched, ids, labels)
    assert len(calls) == patched.config.num_hidden_layers
    assert_same(fused, loss_and_grads(stock, ids, labels))
    assert_same(fused, composed, rtol=0, atol=0)
