"""apply/revert on tiny models of every family: same logits, loss and gradients as stock."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
import transformers

import chronipatch
from tiny import FAMILIES, assert_same, batch, loss_and_grads, tiny_model

FAMS = list(FAMILIES)


@pytest.mark.parametrize("family", FAMS)
def test_patched_matches_stock(family, op_calls):
    stock = tiny_model(family)
    patched = copy.deepcopy(stock)
    report = chronipatch.apply(patched)
    qk_norms = 4 if family == "qwen3" else 0
    n_norms = 2 * 2 + 1 + qk_norms
    assert report.ops() == {
        "rms_norm": n_norms,
        "swiglu": 2,
        "rope": 2,
        "rms_norm_linear": 2,
        "linear_cross_entropy": 1,
    }
    ids, labels = batch()
    stock_logits = stock(ids).logits
    assert not op_calls  # the stock model runs none of the fused ops
    torch.testing.assert_close(patched(ids).logits, stock_logits, rtol=1e-5, atol=1e-5)
    # no labels: the stock head; each MLP's plain down_proj runs inside swiglu_linear, and each decoder
    # layer's two norms inside the projections they feed (the final norm, and Qwen3's q/k norms, alone), the
    # MLP's with the residual add before it
    calls = {"rms_norm": 1 + qk_norms, "rms_norm_linear": 4, "add_rms_norm_linear": 2, "swiglu_linear": 2}
    calls["rope"] = 2
    if family != "qwen3":  # q/k/v stacked and rotated in one op, counted as the two it runs too
        calls["rms_norm_linear_rope"] = 2
    calls["add_rms_norm_swiglu"] = 2  # likewise the MLP's half: add_rms_norm_linear, then swiglu_linear
    assert op_calls == calls
    op_calls.clear()
    assert_same(loss_and_grads(patched, ids, labels), loss_and_grads(stock, ids, labels))
    assert op_calls == {**calls, "linear_cross_entropy": 1}


@pytest.mark.parametrize("varlen", [False, True], ids=["sdpa", "chronipatch_varlen"])
def test_padded_batch_matches_stock_with_dense_rope(monkeypatch, varlen):
    """A padding mask reaching SDPA (directly, or as the varlen attention's padded fallback): RoPE hands it
    contiguous q/k, as stock's does; results equal stock's."""
    from chronipatch import layers

    stock = tiny_model("qwen3")
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched, varlen_attention=varlen)
    ids, labels = batch()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding in the first row
    labels[0, :5] = -100
    seen = []
    rope = layers.ops.rope
    monkeypatch.setattr(layers.ops, "rope", lambda *a, dense: seen.append(dense) or rope(*a, dense=dense))
    kw = dict(attention_mask=mask)
    assert_same(loss_and_grads(patched, ids, labels, **kw), loss_and_grads(stock, ids, labels, **kw))
    assert seen == [True, True]
    seen.clear()
    patched(ids)  # no mask: SDPA's causal flash path, which reads the projections' layout as it is
    assert seen == [False, False]


# qwen2: q/k/v stacked with their biases; llama: stacked without; qwen3: separate under q_norm/k_norm.
@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2"])
def test_compiled_training_step_one_graph(family):
    stock = tiny_model(family)
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched)
    ids, labels = batch()

    def step(model):
        out = model(input_ids=ids, labels=labels)
        return out.loss

    torch._dynamo.reset()
    explain = torch._dynamo.explain(lambda: step(patched))()
    assert explain.graph_break_count == 0, explain.break_reasons
    # The one graph holds the fused ops as opaque custom-op nodes (dynamo did not trace into stock math).
    ops_in_graph = {
        str(node.target).split(".")[1]
        for graph in explain.graphs
        for node in graph.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("chronipatch.")
    }
    assert ops_in_graph == {"rms_norm", "rms_norm_linear", "swiglu_linear", "rope", "linear_cross_entropy"}
    torch._dynamo.reset()
    compiled = torch.compile(patched, fullgraph=True)
    assert_same(loss_and_grads(compiled, ids, labels), loss_and_grads(stock, ids, labels))


def test_revert_is_bit_identical_and_local(op_calls):
    model, other = tiny_model("qwen2"), tiny_model("qwen2")
    ids, labels = batch()
    before = model(ids, labels=labels)
    other_before = other(ids).logits
    report = chronipatch.apply(model)
    assert not chronipatch.is_patched(other)
    assert torch.equal(other(ids).logits, other_before)
    assert not op_calls  # the model not passed to apply runs stock code, in the same process
    model(ids, labels=labels)
    assert op_calls["rms_norm"] and op_calls["linear_cross_entropy"] == 1
    assert chronipatch.revert(model) == len(report.swapped)
    assert not chronipatch.is_patched(model)
    op_calls.clear()
    after = model(ids, labels=labels)
    assert not op_calls  # reverted: stock forwards again
    assert torch.equal(after.logits, before.logits) and torch.equal(after.loss, before.loss)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_apply_twice_is_noop_and_switches():
    model = tiny_model("llama")
    first = chronipatch.apply(model, rope=False, fused_loss=False)
    assert set(first.ops()) == {"rms_norm", "rms_norm_linear", "swiglu"}
    assert {why for _, _, why in first.left} == {"rope=False", "fused_loss=False"}
    second = chronipatch.apply(model, rope=False, fused_loss=False)
    assert not second.swapped and second.ops() == first.ops()
    assert "already patched" in str(second)
    ids, _ = batch()
    assert model(ids, labels=ids).logits is not None  # stock head kept


def test_subclass_with_a_forward_of_its_own_is_left_alone(op_calls):
    """A user's subclass of a supported class that overrides forward (also one level up, past transformers'
    checkpointing wrapper) keeps its forward, and the report names the class whose forward it is; the model
    equals stock's."""
    stock = tiny_model("llama")

    class ScaledNorm(type(stock.model.norm)):
        def forward(self, hidden_states):
            return super().forward(hidden_states) * 2

    class LoggedLayer(type(stock.model.layers[1])):  # transformers wraps its forward for checkpointing
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    class LoggedLayerAgain(LoggedLayer):  # no forward of its own: LoggedLayer's runs
        pass

    for layer in (stock.model.norm, stock.model.layers[0].input_layernorm):
        layer.__class__ = ScaledNorm
    stock.model.layers[1].__class__ = LoggedLayerAgain
    patched = copy.deepcopy(stock)
    report = chronipatch.apply(patched)
    own = "ScaledNorm has a forward of its own"
    assert {(path, why) for path, _, why in report.left} == {
        ("model.norm", own),
        ("model.layers.0.input_layernorm", own),
        ("model.layers.1", "LoggedLayer has a forward of its own"),
    }
    assert "forward" not in patched.model.norm.__dict__ and "ScaledNorm" in str(report)
    assert report.ops()["rms_norm"] == 2 * 2 + 1 - 2
    ids, labels = batch()
    op_calls.clear()
    assert_same(loss_and_grads(patched, ids, labels), loss_and_grads(stock, ids, labels))
    assert op_calls["linear_cross_entropy"] == 1


def test_unsupported_models_error():
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    )
    with pytest.raises(ValueError, match=r"nothing to patch in GPT2LMHeadModel.*Llama, Qwen2, Qwen3"):
        chronipatch.apply(gpt2)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        chronipatch.apply("model")
    with pytest.raises(ValueError, match="already compiled"):
        chronipatch.apply(torch.compile(tiny_model("llama")))
    in_place = tiny_model("llama")
    in_place.compile()  # nn.Module.compile: the module itself, not a wrapper
    with pytest.raises(ValueError, match="already compiled"):
        chronipatch.apply(in_place)
    assert not chronipatch.is_patched(in_place)


def test_report_is_readable():
    text = str(chronipatch.apply(tiny_model("qwen3")))
    assert "Qwen3ForCausalLM" in text and "9 x Qwen3RMSNorm" in text and "-> linear_cross_entropy" in text


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_peft_before_and_after_apply(family):
    peft = pytest.importorskip("peft")
    lora = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    stock = peft.get_peft_model(tiny_model(family), peft.LoraConfig(**lora))
    before = copy.deepcopy(stock)
    chronipatch.apply(before)
    after = tiny_model(family)
    chronipatch.apply(after)
    torch.manual_seed(0)
    after = peft.get_peft_model(after, peft.LoraConfig(**lora))
    after.load_state_dict(stock.state_dict())
    ids, labels = batch()
    ref = loss_and_grads(stock, ids, labels)
    assert_same(loss_and_grads(before, ids, labels), ref)
    assert_same(loss_and_grads(after, ids, labels), ref)


@pytest.mark.parametrize("case", ["lora_down", "lora_attention_only", "hooked_down", "global_hook"])
def test_mlp_fuses_the_down_projection_only_when_it_is_a_plain_linear(case, op_calls):
    """``swiglu_linear`` stands in for ``down_proj(h)`` only where that call is ``F.linear``: a LoRA-wrapped
    or hooked down_proj keeps its own call (its adapter trains, its hook fires). A frozen plain down_proj
    (LoRA elsewhere) is fused and gets no gradient. Loss and gradients equal stock's in every case."""
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    calls = []
    if case == "hooked_down":
        for layer in model.model.layers:
            layer.mlp.down_proj.register_forward_hook(lambda m, a, out: calls.append(out.shape))
    elif case == "global_hook":
        downs = {layer.mlp.down_proj for layer in model.model.layers}
        hook = torch.nn.modules.module.register_module_forward_hook(
            lambda m, a, out: calls.append(out.shape) if m in downs else None
        )
    else:
        targets = "all-linear" if case == "lora_down" else ["q_proj", "k_proj", "v_proj", "o_proj"]
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        model = peft.get_peft_model(model, lora)
    patched = copy.deepcopy(model)
    chronipatch.apply(patched)
    if case == "global_hook":
        downs |= {layer.mlp.down_proj for layer in patched.model.layers}
    ids, labels = batch()
    try:
        ref = loss_and_grads(model, ids, labels)
        op_calls.clear()
        calls.clear()
        assert_same(loss_and_grads(patched, ids, labels), ref)
    finally:
        if case == "global_hook":
            hook.remove()
    fused = case == "lora_attention_only"
    assert op_calls["swiglu_linear"] == (2 if fused else 0) and op_calls["swiglu"] == (0 if fused else 2)
    if case in ("hooked_down", "global_hook"):
        assert len(calls) == 2
    if fused:
        assert all(p.grad is None for n, p in patched.named_parameters() if "down_proj" in n)


def _record_checkpoints(models: dict, enable) -> dict:
    """Each model in training mode with ``enable(model)``'s checkpointing, its layers' checkpoint function
    recording the index of every layer it runs: {name: [layer index, ...]}, filled as the models run."""
    calls = {name: [] for name in models}
    for name, m in models.items():
        m.train()
        enable(m)
        for i, layer in enumerate(m.model.layers):
            real = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = lambda *a, real=real, seen=calls[name], i=i, **k: (
                seen.append(i) or real(*a, **k)
            )
    return calls


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing(reentrant):
    """Checkpointed layers give stock's loss and gradients, and are checkpointed as stock's are: one
    checkpoint call per layer (transformers >= 5.23 wraps the class's forward, which the patched instance
    forward must not bypass); without grad as stock's (5.17-5.24 checkpoint there too, dropping the
    cache; 5.25 runs the layer as is, cache kept), the same cache returned; none in eval."""
    stock = tiny_model("qwen2")
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched)
    enable = lambda m: m.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": reentrant}
    )
    calls = _record_checkpoints({"stock": stock, "patched": patched}, enable)
    ids, labels = batch()
    assert_same(loss_and_grads(patched, ids, labels), loss_and_grads(stock, ids, labels))
    layers = list(range(patched.config.num_hidden_layers))
    assert calls == {"stock": layers, "patched": layers}, calls

    def cached_tokens(m):
        out = m(ids, use_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return None if cache is None else cache.get_seq_length()

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reentrant checkpointing warns that no input requires grad
        assert cached_tokens(patched) == cached_tokens(stock)
    assert calls["patched"] == calls["stock"] in (layers, layers * 2), calls
    before = {name: list(seen) for name, seen in calls.items()}
    patched.eval()
    patched(ids, labels=labels)
    assert calls == before, calls


def _has_every_n_layers() -> bool:
    enable = getattr(transformers.PreTrainedModel, "activation_checkpointing_enable", None)
    return enable is not None and "every_n_layers" in inspect.signature(enable).parameters


@pytest.mark.skipif(not _has_every_n_layers(), reason="no every_n_layers in this transformers")
def test_activation_checkpointing_every_n_layers():
    """``activation_checkpointing_enable(every_n_layers=2)``: the patched model checkpoints the same layers
    as stock (every other one), with stock's loss and gradients."""
    stock = tiny_model("llama", num_hidden_layers=4)
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched)
    enable = lambda m: m.activation_checkpointing_enable(every_n_layers=2)
    calls = _record_checkpoints({"stock": stock, "patched": patched}, enable)
    ids, labels = batch()
    assert_same(loss_and_grads(patched, ids, labels), loss_and_grads(stock, ids, labels))
    assert calls == {"stock": [0, 2], "patched": [0, 2]}, calls


@pytest.mark.parametrize("family", FAMS)
def test_hidden_states_and_attention_weights_match_stock(family):
    """``output_hidden_states`` / ``output_attentions`` (eager attention: SDPA returns no weights) give
    stock's per-layer tensors: transformers records them through module hooks, which the patched
    forwards keep, also for the norms and projections fused into one op."""
    stock = tiny_model(family, attn_implementation="eager")
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched)
    ids, _ = batch()
    s = stock(ids, output_hidden_states=True, output_attentions=True)
    p = patched(ids, output_hidden_states=True, output_attentions=True)
    n = stock.config.num_hidden_layers
    assert len(p.hidden_states) == len(s.hidden_states) == n + 1
    assert len(p.attentions) == len(s.attentions) == n
    for a, b in zip(s.hidden_states + s.attentions, p.hidden_states + p.attentions):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_loss_kwargs_follow_hf():
    stock = tiny_model("mistral")
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched)
    ids, labels = batch()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    for kw in (
        dict(labels=labels, num_items_in_batch=torch.tensor(7)),
        dict(shift_labels=shift, labels=labels),
        dict(labels=labels[:, -5:], logits_to_keep=5),
        dict(labels=labels, return_dict=False),
    ):
        ours, ref = patched(ids, **kw), stock(ids, **kw)
        loss_o, loss_r = (ours[0], ref[0]) if isinstance(ours, tuple) else (ours.loss, ref.loss)
        torch.testing.assert_close(loss_o, loss_r, rtol=1e-5, atol=1e-6, msg=str(kw.keys()))
    out = patched(ids, labels=labels, return_logits=True)
    torch.testing.assert_close(out.logits, stock(ids).logits, rtol=1e-5, atol=1e-5)
    all_ignored = patched(ids, labels=torch.full_like(labels, -100))
    assert all_ignored.loss.item() == 0.0


def test_generate_after_apply():
    stock = tiny_model("qwen2")
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched)
    ids, _ = batch(b=1, t=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(ids, **kw), stock.generate(ids, **kw))


def test_dtype_move_after_apply_and_meta_device():
    stock = tiny_model("llama").double()
    patched = tiny_model("llama")
    chronipatch.apply(patched)
    patched.double()  # moved after apply: the forwards read module state at call time
    ids, labels = batch()
    (loss, grads), (ref_loss, ref_grads) = (
        loss_and_grads(patched, ids, labels),
        loss_and_grads(stock, ids, labels),
    )
    assert loss.dtype == torch.float64 and grads["lm_head.weight"].dtype == torch.float64
    # HF upcasts logits with .float(), i.e. its fp64 loss is computed in fp32.
    assert_same((loss, grads), (ref_loss.double(), ref_grads), rtol=1e-5, atol=1e-7)
    # Patch while on the meta device, then materialise and load weights: the usual big-model path.
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(stock.config)
    chronipatch.apply(meta)
    meta.to_empty(device="cpu").double().load_state_dict(stock.state_dict())
    with torch.no_grad():  # non-persistent buffers (rotary inv_freq) are not in the state dict
        for buf, ref in zip(meta.buffers(), stock.buffers()):
            buf.copy_(ref)
    assert chronipatch.is_patched(meta)
    assert_same(loss_and_grads(meta, ids, labels), (ref_loss.double(), ref_grads), rtol=1e-5, atol=1e-7)


def test_bf16_round_trip_after_apply(op_calls):
    """A patched model moved to bf16 and back keeps running the fused ops and matches stock moved alike."""
    stock = tiny_model("qwen2")
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched)
    ids, labels = batch()
    for model in (stock, patched):
        model.bfloat16()
    low, low_ref = patched(ids, labels=labels).loss, stock(ids, labels=labels).loss
    assert low.dtype == torch.float32 and abs(low.item() - low_ref.item()) < 0.02 * abs(low_ref.item())
    for model in (stock, patched):
        model.float()
    assert op_calls["linear_cross_entropy"] == 1
    assert_same(loss_and_grads(patched, ids, labels), loss_and_grads(stock, ids, labels))
    assert op_calls["linear_cross_entropy"] == 2 and op_calls["rms_norm"] > 0


def test_training_curve_matches_stock():
    stock = tiny_model("qwen3")
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched)
    curves = []
    for model in (stock, patched):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for step in range(30):
            ids, labels = batch(seed=step % 4)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    assert curves[0][-1] < curves[0][0] - 0.5  # it learns
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-4, atol=1e-4)
