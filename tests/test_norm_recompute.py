"""The decoder layers' norm recompute (``norm_recompute``): each RMSNorm runs inside the projections it
feeds (``ops.rms_norm_linear``) only where that computes exactly the stock layer; the switch, the
fallbacks (LoRA, hooks, autocast, mixed dtypes) and the memory it saves, against stock."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

import chronipatch
from helpers import dynamo_graphs, saved_bytes
from tiny import COMMON, FAMILIES, assert_same, batch, loss_and_grads, tiny_model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_switch_off_runs_the_norms_alone(family, op_calls):
    stock = tiny_model(family)
    patched = copy.deepcopy(stock)
    report = chronipatch.apply(patched, norm_recompute=False)
    assert "rms_norm_linear" not in report.ops()
    assert sum(why == "norm_recompute=False" for _, _, why in report.left) == COMMON["num_hidden_layers"]
    ids, labels = batch()
    assert_same(loss_and_grads(patched, ids, labels), loss_and_grads(stock, ids, labels))
    qk_norms = 4 if family == "qwen3" else 0
    assert op_calls["rms_norm_linear"] == 0 and op_calls["rms_norm"] == 5 + qk_norms


@pytest.mark.parametrize("family", list(FAMILIES))
def test_attention_stacks_qkv_except_under_qk_norms(family, monkeypatch):
    """Each decoder layer's q/k/v run as one stacked GEMM with q and k rotated (``rms_norm_linear_rope``),
    except under Qwen3's q_norm/k_norm, which would read its column views (``rms_norm_linear``, three
    GEMMs); the MLP's gate/up never (SwiGLU reads them whole). Loss and gradients equal stock's."""
    from chronipatch import ops

    stock = tiny_model(family)
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched)
    calls, real, real_rope = [], ops.rms_norm_linear, ops.rms_norm_linear_rope

    def spy(x, nw, eps, weights, biases=None, stacked=False):
        calls.append((len(weights), stacked))
        return real(x, nw, eps, weights, biases, stacked)

    def spy_rope(x, nw, eps, weights, *args, **kwargs):
        calls.append((len(weights), "rope"))
        return real_rope(x, nw, eps, weights, *args, **kwargs)

    monkeypatch.setattr(ops, "rms_norm_linear", spy)
    monkeypatch.setattr(ops, "rms_norm_linear_rope", spy_rope)
    ids, labels = batch()
    assert_same(loss_and_grads(patched, ids, labels), loss_and_grads(stock, ids, labels))
    expected = (3, False) if family == "qwen3" else (3, "rope")
    assert calls == [expected] * COMMON["num_hidden_layers"]  # the MLP's: add_rms_norm_linear


@pytest.mark.parametrize("case", ["lora_attention", "hooked_norm", "norm_off", "swiglu_off"])
def test_falls_back_where_fusing_would_change_the_layer(case, op_calls):
    """LoRA on the attention projections (their adapters must see the normalised input) and a hooked norm
    (its hook fires) keep the stock calls there; the MLP's norm still fuses. A norm or MLP swap turned off
    leaves the layer's other half fused. Loss and gradients equal stock's in every case."""
    model, calls, switches = tiny_model("qwen2"), [], {}
    if case == "lora_attention":
        peft = pytest.importorskip("peft")
        lora = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
        model = peft.get_peft_model(model, lora)
    elif case == "hooked_norm":
        for layer in model.model.layers:
            layer.input_layernorm.register_forward_hook(lambda m, a, out: calls.append(out.shape))
    else:
        switches = {"rms_norm": False} if case == "norm_off" else {"swiglu": False}
    patched = copy.deepcopy(model)
    report = chronipatch.apply(patched, **switches)
    ids, labels = batch()
    ref = loss_and_grads(model, ids, labels)
    op_calls.clear()
    calls.clear()
    assert_same(loss_and_grads(patched, ids, labels), ref)
    layers = COMMON["num_hidden_layers"]
    fused = {"lora_attention": layers, "hooked_norm": layers, "norm_off": 0, "swiglu_off": layers}[case]
    assert op_calls["rms_norm_linear"] == fused
    assert len(calls) == (layers if case == "hooked_norm" else 0)
    if case == "norm_off":
        assert "rms_norm_linear" not in report.ops()


def test_autocast_and_mixed_dtypes_fall_back(op_calls):
    """Under autocast, or with a norm weight in another dtype than the activations, the norm and the
    projections run as modules (autocast's dtype rules): the values of the layer with the switch off."""
    stock = tiny_model("llama")
    patched = copy.deepcopy(stock)
    chronipatch.apply(stock, norm_recompute=False)
    chronipatch.apply(patched)
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = loss_and_grads(stock, ids, labels)
        op_calls.clear()
        assert_same(loss_and_grads(patched, ids, labels), ref, rtol=0, atol=0)
    assert op_calls["rms_norm_linear"] == 0
    for m in (stock, patched):
        for layer in m.model.layers:
            layer.input_layernorm.bfloat16()  # bf16 weight * fp32 activations: fp32, by promotion
    ref = loss_and_grads(stock, ids, labels)
    op_calls.clear()
    assert_same(loss_and_grads(patched, ids, labels), ref, rtol=0, atol=0)
    assert op_calls["rms_norm_linear"] == 2  # the post-attention norms, in the model's dtype, still fuse


def test_keeps_two_fewer_activations_per_layer():
    """What a training forward keeps for the backward: two [N, H] tensors less per decoder layer than with
    the switch off (the normalised inputs of the attention and the MLP), so this fails if they are kept."""
    ids, labels = batch()

    def kept(**switches):
        model = tiny_model("llama")
        chronipatch.apply(model, **switches)
        return saved_bytes(lambda: model(input_ids=ids, labels=labels))

    per_norm = ids.numel() * COMMON["hidden_size"] * 4
    saved = kept(norm_recompute=False) - kept()
    assert saved == 2 * COMMON["num_hidden_layers"] * per_norm


def _graph_ops(model, ids, labels) -> Counter:
    """The chronipatch ops in dynamo's graph of a compiled training forward, by name."""
    return Counter(
        str(n.target).split(".")[1]
        for gm in dynamo_graphs(model, input_ids=ids, labels=labels)
        for n in gm.graph.nodes
        if n.op == "call_function" and str(n.target).startswith("chronipatch.")
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compiled_forward_runs_the_eager_ops(family, op_calls):
    """A compiled forward fuses what the eager one does: each layer's norms inside their projections, not
    a norm whose [N, H] output the projections' backward then keeps. (The checks that choose the fused
    path read the modules; a check that traced differently would fall back silently, losing only memory.)"""
    model = tiny_model(family).train()
    chronipatch.apply(model)
    ids, labels = batch()
    model(input_ids=ids, labels=labels)
    eager = Counter({op: n for op, n in op_calls.items() if n})
    layers = COMMON["num_hidden_layers"]
    assert eager["rms_norm_linear"] == 2 * layers and eager.pop("add_rms_norm_linear") == layers
    # Public names and op names differ only where the public function picks between two ops (and
    # add_rms_norm_linear, counted under rms_norm_linear, its op, too; rms_norm_linear_rope, a composition
    # of two ops when traced, under both).
    assert eager.pop("rms_norm_linear_rope", 0) == (0 if family == "qwen3" else layers)
    assert eager.pop("add_rms_norm_swiglu") == layers
    graph = _graph_ops(model, ids, labels)
    assert graph == eager, (graph, eager)


def test_output_capturing_hooks_keep_the_layers_fused(op_calls):
    """The first ``output_attentions`` / ``output_hidden_states`` call installs transformers' capturing hooks
    on the attention modules for good; they read the attention's output only, so later training steps, eager
    and compiled, still run the norms inside the projections. The captured outputs equal stock's."""
    stock = tiny_model("llama", attn_implementation="eager")
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched)
    ids, labels = batch()
    with torch.no_grad():
        outs = [
            m.eval()(input_ids=ids, output_attentions=True, output_hidden_states=True)
            for m in (stock, patched)
        ]
    for a, b in zip(outs[0].attentions + outs[0].hidden_states, outs[1].attentions + outs[1].hidden_states):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert all(layer.self_attn._forward_hooks for layer in patched.model.layers)  # installed for good
    op_calls.clear()
    assert_same(loss_and_grads(patched.train(), ids, labels), loss_and_grads(stock.train(), ids, labels))
    layers = COMMON["num_hidden_layers"]
    assert op_calls["rms_norm_linear_rope"] == op_calls["add_rms_norm_swiglu"] == layers
    graph = _graph_ops(patched, ids, labels)
    assert graph["rms_norm_linear"] == 2 * layers and graph["rope"] == layers, graph


def test_a_capturing_hook_that_may_read_the_input_unfuses(op_calls):
    """transformers' capturing hook of the hidden states may read the module's input: on an attention it
    keeps the stock norm before it (the MLP's side stays fused), and the model equals stock's."""
    capturing = pytest.importorskip("transformers.utils.output_capturing")
    install = getattr(capturing, "install_output_capuring_hook", None) or getattr(
        capturing, "install_output_capturing_hook", None
    )
    if install is None:
        pytest.skip("this transformers installs its capturing hooks otherwise")
    stock = tiny_model("llama")
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched)
    for model in (stock, patched):
        for layer in model.model.layers:
            install(layer.self_attn, "hidden_states", 0)
    ids, labels = batch()
    op_calls.clear()
    assert_same(loss_and_grads(patched, ids, labels), loss_and_grads(stock, ids, labels))
    layers = COMMON["num_hidden_layers"]
    assert op_calls["rms_norm_linear_rope"] == 0 and op_calls["add_rms_norm_swiglu"] == layers


def test_compiled_forward_fuses_where_the_binding_traces_to_none(monkeypatch):
    """torch 2.11's dynamo traces ``bound_forward`` (the function behind a module's bound forward) to
    None; the compiled forward must still find the fused path (``layers.runs`` reads ``apply``'s own mark)."""
    from chronipatch import layers

    real = layers.bound_forward
    monkeypatch.setattr(layers, "bound_forward", lambda m: None if torch.compiler.is_compiling() else real(m))
    model = tiny_model("llama").train()
    chronipatch.apply(model)
    graph = _graph_ops(model, *batch())
    assert graph["rms_norm_linear"] == 2 * COMMON["num_hidden_layers"] and graph["rms_norm"] == 1, graph


def test_revert_removes_the_mark():
    model = tiny_model("llama")
    before = {name: set(m.__dict__) for name, m in model.named_modules()}
    chronipatch.apply(model)
    chronipatch.revert(model)
    assert {name: set(m.__dict__) for name, m in model.named_modules()} == before


def test_apply_marks_forwards_bound_without_their_mark(op_calls):
    """A forward of ours bound without the mark (by hand) is reported as already patched and marked, so
    its layer fuses as after a fresh ``apply``."""
    from chronipatch import layers

    model = tiny_model("llama")
    chronipatch.apply(model)
    for m in model.modules():
        m.__dict__.pop(layers.BOUND, None)
    report = chronipatch.apply(model)
    assert not report.swapped and report.already
    op_calls.clear()
    model(*batch())
    assert op_calls["rms_norm_linear"] == 2 * COMMON["num_hidden_layers"]


def test_accelerate_hooked_modules_keep_their_calls(op_calls):
    """A module carrying an accelerate hook (``_hf_hook``, whose wrapper rebinds forward) is called, not
    fused past, in eager and compiled forwards alike."""
    model = tiny_model("llama")
    chronipatch.apply(model)
    model.model.layers[0].input_layernorm._hf_hook = object()
    ids, labels = batch()
    op_calls.clear()
    model(input_ids=ids, labels=labels)
    assert op_calls["rms_norm_linear"] == 2 * COMMON["num_hidden_layers"] - 1
    assert _graph_ops(model, ids, labels)["rms_norm_linear"] == 2 * COMMON["num_hidden_layers"] - 1
