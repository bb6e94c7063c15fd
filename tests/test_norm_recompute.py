"""The decoder layers' norm recompute (``norm_recompute``): each RMSNorm runs inside the projections it
feeds (``ops.rms_norm_linear``) only where that computes exactly the stock layer; the switch, the
fallbacks (LoRA, hooks, autocast, mixed dtypes) and the memory it saves, against stock."""

from __future__ import annotations

import copy

import pytest
import torch

import chronipatch
from helpers import saved_bytes
from test_patch import _assert_same, _loss_and_grads
from tiny import COMMON, FAMILIES, batch, tiny_model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_switch_off_runs_the_norms_alone(family, op_calls):
    stock = tiny_model(family)
    patched = copy.deepcopy(stock)
    report = chronipatch.apply(patched, norm_recompute=False)
    assert "rms_norm_linear" not in report.ops()
    assert sum(why == "norm_recompute=False" for _, _, why in report.left) == COMMON["num_hidden_layers"]
    ids, labels = batch()
    _assert_same(_loss_and_grads(patched, ids, labels), _loss_and_grads(stock, ids, labels))
    qk_norms = 4 if family == "qwen3" else 0
    assert op_calls["rms_norm_linear"] == 0 and op_calls["rms_norm"] == 5 + qk_norms


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
    ref = _loss_and_grads(model, ids, labels)
    op_calls.clear()
    calls.clear()
    _assert_same(_loss_and_grads(patched, ids, labels), ref)
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
        ref = _loss_and_grads(stock, ids, labels)
        op_calls.clear()
        _assert_same(_loss_and_grads(patched, ids, labels), ref, rtol=0, atol=0)
    assert op_calls["rms_norm_linear"] == 0
    for m in (stock, patched):
        for layer in m.model.layers:
            layer.input_layernorm.bfloat16()  # bf16 weight * fp32 activations: fp32, by promotion
    ref = _loss_and_grads(stock, ids, labels)
    op_calls.clear()
    _assert_same(_loss_and_grads(patched, ids, labels), ref, rtol=0, atol=0)
    assert op_calls["rms_norm_linear"] == 2  # the post-attention norms, in the model's dtype, still fuse


def test_keeps_two_fewer_activations_per_layer():
    """What a training forward keeps for the backward: two [N, H] tensors less per decoder layer than with
    the switch off (the normalised inputs of the attention and the MLP, and their fp32 rstd), so this fails
    if they are kept."""
    ids, labels = batch()

    def kept(**switches):
        model = tiny_model("llama")
        chronipatch.apply(model, **switches)
        return saved_bytes(lambda: model(input_ids=ids, labels=labels))

    per_norm = ids.numel() * (COMMON["hidden_size"] + 1) * 4
    saved = kept(norm_recompute=False) - kept()
    assert saved == 2 * COMMON["num_hidden_layers"] * per_norm
