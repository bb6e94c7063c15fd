"""apply/revert where the model's state is shared or handled from outside: module hooks, pickling, a config
shared with another model, peft wrappers around the varlen switch, a switch that contradicts an earlier
apply, an activation or a window the config names but the modules do not use."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import chronipatch
from chronipatch import attention
from tiny import batch, tiny_model


def _shift(_module, args, kwargs):
    """A pre-hook that steers a module's input (activation steering, adapters done by hand)."""
    if args:
        return (args[0] + 1.0, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + 1.0}


@pytest.mark.parametrize("child", ["self_attn", "mlp"])
def test_hooks_on_attention_and_mlp_see_the_normalised_input(child, op_calls):
    """A hook on the attention or the MLP module gets (and may change) what stock hands it: the norm's
    output. The layer then leaves that norm outside the module; the other one stays fused."""
    stock = tiny_model("llama")
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched)
    ids, labels = batch()
    seen = {}
    for name, model in (("stock", stock), ("patched", patched)):

        def record(_module, args, kwargs, name=name):
            seen[name] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        module = getattr(model.model.layers[0], child)
        module.register_forward_pre_hook(_shift, with_kwargs=True)
        module.register_forward_pre_hook(record, with_kwargs=True)
    out, ref = patched(ids, labels=labels), stock(ids, labels=labels)
    torch.testing.assert_close(seen["patched"], seen["stock"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert op_calls["rms_norm"] and op_calls["rms_norm_linear"]  # the unhooked layers stay fused


def test_patched_model_pickles_and_loads_patched():
    model = tiny_model("qwen2")
    report = chronipatch.apply(model)
    ids, labels = batch()
    loss = model(ids, labels=labels).loss
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for loaded in (pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)):
        mlp = loaded.model.layers[0].mlp
        assert chronipatch.is_patched(loaded) and mlp.forward.__self__ is mlp  # bound to the copy
        assert torch.equal(loaded(ids, labels=labels).loss, loss)
        assert chronipatch.revert(loaded) == len(report.swapped)


def test_varlen_model_unpickled_in_a_fresh_process_runs(tmp_path):
    """A model saved with the varlen attention selected registers it again when loaded (a fresh process, a
    spawned worker), before its first forward looks the name up; ``revert`` drops the marker."""
    import subprocess
    import sys

    model = tiny_model("llama")
    chronipatch.apply(model, varlen_attention=True)
    ids, labels = batch()
    loss = model(ids, labels=labels).loss.item()
    torch.save(model, tmp_path / "model.pt")
    child = (
        "import torch, tiny; "
        f"m = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False); "
        "ids, labels = tiny.batch(); print(m(ids, labels=labels).loss.item())"
    )
    env = {**__import__("os").environ, "PYTHONPATH": __import__("os").pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) == loss
    chronipatch.revert(model)
    assert not any(k.startswith("_chronipatch") for k in model.__dict__)


def test_revert_after_trainers_mixed_precision_wrapper(tmp_path):
    """Trainer(bf16=True).train() wraps the forward it finds (ours) in accelerate's autocast: ``revert`` still
    counts and undoes every swap, and under that wrapper the model runs stock's forward (logits, stock's
    loss) from then on; a second revert finds nothing, and ``apply`` again makes ours serve under it."""
    from transformers import Trainer, TrainingArguments

    stock = tiny_model("llama")
    model = copy.deepcopy(stock)
    swapped = len(chronipatch.apply(model).swapped)
    ids, _ = batch(b=8)
    args = TrainingArguments(
        str(tmp_path), max_steps=1, per_device_train_batch_size=4, bf16=True, use_cpu=True, report_to=[],
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    rows = [{"input_ids": r, "labels": r} for r in ids]
    for m in (stock, model):
        torch.manual_seed(0)
        Trainer(model=m, args=args, train_dataset=rows).train()
    assert chronipatch.is_patched(model)
    assert chronipatch.revert(model) == swapped
    assert not chronipatch.is_patched(model)
    stock.load_state_dict(model.state_dict())  # the weights the patched step left, under stock's wrapper
    want, got = (m(input_ids=ids[:2], labels=ids[:2]) for m in (stock, model))
    assert got.logits is not None
    assert torch.equal(got.loss, want.loss) and torch.equal(got.logits, want.logits)
    assert chronipatch.revert(model) == 0  # nothing left to undo
    chronipatch.apply(model)  # our forward under the wrapper serves again
    assert chronipatch.is_patched(model) and model(input_ids=ids[:2], labels=ids[:2]).logits is None
    assert chronipatch.revert(model) == swapped


def test_varlen_switch_leaves_a_model_sharing_the_config_alone():
    stock = tiny_model("llama")
    other = copy.deepcopy(stock)
    for m in other.modules():  # two models of one config object, as two constructions from it give
        if hasattr(m, "config"):
            m.config = stock.config
    ids = torch.randint(0, 211, (1, 12))
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]  # two packed documents
    before = other(input_ids=ids, position_ids=positions).logits
    chronipatch.apply(stock, varlen_attention=True)
    assert stock.config._attn_implementation == attention.NAME
    assert other.config._attn_implementation == "sdpa"
    assert torch.equal(other(input_ids=ids, position_ids=positions).logits, before)
    assert all(m.config is stock.config for m in stock.modules() if hasattr(m, "config"))
    shared = other.config
    chronipatch.revert(stock)
    assert stock.config._attn_implementation == "sdpa"
    # The config object they shared again, in every module: a later change reaches both, as before apply.
    assert all(m.config is shared for m in stock.modules() if hasattr(m, "config"))


def test_revert_keeps_the_models_own_config_where_it_changed_since():
    """A config value set on the patched model after apply is not lost: revert keeps the model's own copy
    then (the switch's own values restored on it)."""
    model = tiny_model("llama")
    shared = model.config
    chronipatch.apply(model, varlen_attention=True)
    model.config.pad_token_id = 7
    chronipatch.revert(model)
    assert model.config is not shared and model.config.pad_token_id == 7
    assert model.config._attn_implementation == "sdpa" and shared.pad_token_id != 7


@pytest.mark.parametrize("order", ["apply_then_peft", "peft_then_apply_then_merge"])
def test_varlen_switch_reverts_through_peft(order):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    if order == "apply_then_peft":
        base = tiny_model("llama")
        chronipatch.apply(base, varlen_attention=True)
        model = peft.get_peft_model(base, lora)
    else:
        model = peft.get_peft_model(tiny_model("llama"), lora)
        chronipatch.apply(model, varlen_attention=True)
        model = model.merge_and_unload()
    assert model.config._attn_implementation == attention.NAME
    chronipatch.revert(model)
    assert model.config._attn_implementation == "sdpa"
    assert not chronipatch.is_patched(model)


def test_a_switch_cannot_undo_an_earlier_apply():
    model = tiny_model("llama")
    chronipatch.apply(model)
    patched = {name: m.__dict__["forward"] for name, m in model.named_modules() if "forward" in m.__dict__}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp \(LlamaMLP\).*swiglu=False.*revert"):
        chronipatch.apply(model, swiglu=False)
    assert {n: m.__dict__["forward"] for n, m in model.named_modules() if "forward" in m.__dict__} == patched
    chronipatch.revert(model)
    assert ("model.layers.0.mlp", "LlamaMLP", "swiglu=False") in chronipatch.apply(model, swiglu=False).left


def test_llama_ignores_a_window_its_config_carries_as_stock_does():
    """Llama-fied checkpoints carry ``sliding_window`` (with ``use_sliding_window=False``), which stock Llama
    never reads: the varlen attention applies no window either."""
    stock = tiny_model("llama", sliding_window=4, use_sliding_window=False)
    ids = torch.randint(0, 211, (2, 20), generator=torch.Generator().manual_seed(0))
    want = stock(input_ids=ids, use_cache=False).logits
    chronipatch.apply(stock, varlen_attention=True)
    torch.testing.assert_close(stock(input_ids=ids, use_cache=False).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["module", "config"])
def test_mlp_follows_its_own_activation_not_the_configs_name(how):
    """The MLP is fused only where its ``act_fn`` is SiLU: an activation swapped on the module, or a config
    renamed after the model was built, leaves it stock (and says why)."""
    model = tiny_model("llama", **({"hidden_act": "gelu"} if how == "config" else {}))
    if how == "module":
        for layer in model.model.layers:
            layer.mlp.act_fn = torch.nn.GELU()
    else:
        model.config.hidden_act = "silu"
    ids, labels = batch(seed=1)
    want, want_loss = model(input_ids=ids).logits, model(input_ids=ids, labels=labels).loss
    report = chronipatch.apply(model)
    assert all("is not SiLU" in why for name, _, why in report.left if name.endswith(".mlp")), report.left
    assert sum(name.endswith(".mlp") for name, _, _ in report.left) == 2
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, want_loss, rtol=1e-5, atol=1e-6)


def test_mistral_subclass_keeps_its_window():
    """A subclass of Mistral's attention that keeps the stock forward (FSDP2's ``FSDP<cls>``, a user's) still
    reads its window from the config."""
    from transformers.models.mistral.modeling_mistral import MistralAttention

    model = tiny_model("mistral", sliding_window=4)
    sub = type("MyMistralAttention", (MistralAttention,), {})
    for layer in model.model.layers:
        layer.self_attn.__class__ = sub
    ids, labels = batch(t=24, seed=2)
    want = model(input_ids=ids, labels=labels).loss
    report = chronipatch.apply(model, varlen_attention=True)
    assert any(name.endswith("self_attn") for name, _, _ in report.swapped), report
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, want, rtol=1e-5, atol=1e-6)
