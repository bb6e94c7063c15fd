"""An integrated SFTTrainer beyond its training steps: generate, integrate again after revert, LoRA+ on
embeddings alone and with arguments changed after integrate, packing without a row size."""

from __future__ import annotations

import inspect
import io

import pytest

pytest.importorskip("trl")

import torch

import chronipatch
import chronipatch.trl as ctrl
from test_trl import _trainer


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _generate(trainer, batch, seen):
    model = trainer.model.eval()
    hook = model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("position_ids")), with_kwargs=True
    )
    try:
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True,
                pad_token_id=trainer.processing_class.pad_token_id,
            )  # fmt: skip
    finally:
        hook.remove()
    return out


def test_generate_after_integrate_is_stocks(tmp_path):
    """The fused head keeps the model's signature, as TRL's does: generate then passes the position ids of a
    right-padded batch (and logits_to_keep), and scores every step as stock TRL does."""
    runs = []
    for integrate in (False, True):
        trainer = _trainer(tmp_path / str(integrate), integrate=integrate, steps=1)
        tok = trainer.processing_class
        tok.padding_side = "right"
        batch = tok(["12+34=", "7+5=1", "123+4567="], return_tensors="pt", padding=True)
        seen = []
        runs.append((_generate(trainer, batch, seen), seen[0]))
        params = inspect.signature(trainer.model.forward).parameters
        assert {"position_ids", "logits_to_keep"} <= params.keys()
    (stock, stock_pos), (ours, pos) = runs
    assert stock_pos is not None and torch.equal(pos, stock_pos)
    assert torch.equal(ours.sequences, stock.sequences)
    for a, b in zip(ours.scores, stock.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("apply_first", [False, True], ids=["integrate", "apply-then-integrate"])
def test_integrate_after_revert_wires_the_trainer_again(tmp_path, apply_first):
    trainer = _trainer(tmp_path, integrate=False, steps=2)
    callback = ctrl.integrate(trainer, packing=True)
    trainer.train()
    assert callback.counter["calls"] == 2
    chronipatch.revert(trainer.model)
    assert trainer.model.config._attn_implementation != "chronipatch_varlen"
    if apply_first:  # the model patched again, TRL's head still in place
        chronipatch.apply(trainer.model)
    assert ctrl.integrate(trainer) is callback
    assert chronipatch.is_patched(trainer.model)
    assert (trainer.model.config._attn_implementation, trainer.model.config.use_cache) == (
        "chronipatch_varlen",
        False,
    )
    trainer.train()  # a second run of two steps, through the fused head again
    assert callback.counter["calls"] == 4


def test_packing_without_a_row_size_is_refused_before_anything_changes(tmp_path):
    trainer = _trainer(tmp_path, integrate=False, steps=1, max_length=None)
    collator = trainer.data_collator
    with pytest.raises(ValueError, match=r"packing=True packs rows of SFTConfig\.max_length tokens"):
        ctrl.integrate(trainer, packing=True)
    assert not chronipatch.is_patched(trainer.model) and trainer.data_collator is collator


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(loraplus_ratio=-16.0), r"loraplus_ratio must be a finite real number > 0, got -16\.0"),
        (dict(loraplus_ratio=float("nan")), "loraplus_ratio must be a finite real number > 0, got nan"),
        (dict(loraplus_ratio="16"), "loraplus_ratio must be a finite real number > 0, got '16'"),
        (dict(loraplus_lr_embedding=-1e-6), "loraplus_lr_embedding must be a finite real number >= 0"),
        (dict(packing="yes"), "packing must be True, False or None, got 'yes'"),
    ],
)
def test_bad_arguments_are_refused_before_anything_changes(tmp_path, kw, match):
    """A negative or nan LoRA+ ratio would train lora_B uphill or fill it with nan, a string one fail inside
    ``train()``: integrate refuses each, naming it, with the trainer and its model as they were."""
    trainer = _trainer(tmp_path, integrate=False, peft=True, steps=1)
    collator = trainer.data_collator
    with pytest.raises((ValueError, TypeError), match=match):
        ctrl.integrate(trainer, **kw)
    assert not chronipatch.is_patched(trainer.model) and trainer.data_collator is collator
    assert trainer.optimizer_cls_and_kwargs is None and not hasattr(trainer, "_chronipatch")


def test_loraplus_on_embedding_adapters_alone_trains(tmp_path):
    """LoRA on the embeddings alone builds an ``embedding`` group and no lora_A/lora_B pair: training runs,
    as with peft's own LoRA+ optimizer."""
    from peft import LoraConfig, get_peft_model

    trainer = _trainer(tmp_path, integrate=False, steps=1)
    trainer.model = get_peft_model(trainer.model, LoraConfig(r=4, target_modules=["embed_tokens"]))
    trainer.model_wrapped = trainer.model
    ctrl.integrate(trainer, loraplus_lr_embedding=2e-5)
    trainer.train()
    groups = {g["name"]: g["initial_lr"] for g in trainer.optimizer.param_groups}
    assert groups == {"embedding": pytest.approx(2e-5)}


def test_loraplus_takes_the_arguments_the_optimizer_is_built_with(tmp_path):
    """lr, weight decay and Adam's settings are read when Trainer builds the optimizer, not at integrate."""
    trainer = _trainer(tmp_path, integrate=False, peft=True, steps=1)
    ctrl.integrate(trainer)
    trainer.args.learning_rate, trainer.args.weight_decay, trainer.args.adam_beta2 = 1e-4, 0.1, 0.9
    optimizer = trainer.create_optimizer()
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["lora_A"]["lr"] == pytest.approx(1e-4) and groups["lora_B"]["lr"] == pytest.approx(1.6e-3)
    assert groups["lora_A"]["weight_decay"] == 0.1 and groups["lora_A"]["betas"] == (0.9, 0.9)


def test_integrate_again_with_other_options_is_refused(tmp_path):
    """A second integrate cannot change what the first chose (it would be ignored): it raises instead."""
    trainer = _trainer(tmp_path, integrate=False, steps=1)
    callback = ctrl.integrate(trainer)
    collator = trainer.data_collator
    with pytest.raises(ValueError, match="chosen once per trainer"):
        ctrl.integrate(trainer, packing=True)
    assert trainer.data_collator is collator
    assert ctrl.integrate(trainer) is callback  # the defaults: as first chosen
    assert ctrl.integrate(trainer, loraplus_ratio=16.0) is callback  # what the first chose, passed
    other = _trainer(tmp_path / "other", integrate=False, steps=1)
    ctrl.integrate(other, loraplus_ratio=None)
    with pytest.raises(ValueError, match="chosen once per trainer"):  # a default passed is a choice too
        ctrl.integrate(other, loraplus_ratio=16.0)


def test_integrate_refuses_a_model_for_a_trainer():
    with pytest.raises(TypeError, match=r"expects a built trl\.SFTTrainer"):
        ctrl.integrate(torch.nn.Linear(2, 2))


def test_revert_after_bf16_training_under_accelerates_wrapper(tmp_path):
    """Trainer(bf16=True).train() wraps the model's forward (our fused head) in accelerate's autocast: revert
    still undoes every swap and the head, whose calls then run TRL's own head under that wrapper; integrate
    again makes ours serve under it, and the model still pickles."""
    runs = []
    for integrate in (False, True):
        trainer = _trainer(tmp_path / str(integrate), integrate=integrate, steps=1, bf16=True)
        trainer.train()
        runs.append(trainer)
    stock, ours = runs
    calls = ours._cb.counter["calls"]
    assert calls == 1
    swapped = sum(1 for m in ours.model.modules() if "forward" in m.__dict__)
    assert chronipatch.revert(ours.model) == swapped  # the swaps and the fused head, under the wrapper too
    assert not chronipatch.is_patched(ours.model)
    stock.model.load_state_dict(ours.model.state_dict())  # the weights our step left, under stock's wrapper
    ids = torch.randint(0, 20, (2, 9), generator=torch.Generator().manual_seed(0))
    want, got = (t.model(input_ids=ids, labels=ids, fused_lm_head=True) for t in (stock, ours))
    assert ours._cb.counter["calls"] == calls  # TRL's head ran, not ours
    assert torch.equal(got.loss, want.loss) and torch.equal(got.log_probs, want.log_probs)
    assert chronipatch.revert(ours.model) == 0
    ctrl.integrate(ours)  # ours again, under the wrapper
    ours.model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert ours._cb.counter["calls"] == calls + 1
    torch.save(ours.model, io.BytesIO())  # the mark is a flag: the model still pickles


def test_packing_statistics_with_loader_workers_are_not_logged_as_zeros(tmp_path, caplog):
    """DataLoader workers collate with copies of the collator, whose counters the main process never sees:
    its log then leaves the packing statistics out, with a warning, instead of logging zeros."""
    trainer = _trainer(tmp_path, integrate=False, steps=2, dataloader_num_workers=1)
    ctrl.integrate(trainer, packing=True)
    with caplog.at_level("WARNING", logger="chronipatch"):
        trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and not any(key.startswith("packing/") for h in logged for key in h), logged
    assert "counted inside the DataLoader's workers (dataloader_num_workers=1) and not logged" in caplog.text


def test_packing_under_attention_dropout_is_refused_before_anything_changes(tmp_path):
    """The varlen attention that packed rows run has no dropout: integrate refuses a model with attention
    dropout before patching it, where the first step would have raised."""
    trainer = _trainer(tmp_path, integrate=False, steps=1)
    for module in trainer.model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.1
    collator = trainer.data_collator
    with pytest.raises(ValueError, match=r"attention_dropout is 0\.1; set it to 0"):
        ctrl.integrate(trainer, packing=True)
    assert not chronipatch.is_patched(trainer.model) and trainer.data_collator is collator
    ctrl.integrate(trainer)  # unpacked rows keep stock's dropout
    assert chronipatch.is_patched(trainer.model)


def test_packing_names_the_collator_it_replaces(tmp_path, caplog):
    """packing=True replaces the trainer's collator: TRL's own silently, a user's with a warning naming it."""
    trainer = _trainer(tmp_path / "a", integrate=False, steps=1)
    with caplog.at_level("WARNING", logger="chronipatch"):
        ctrl.integrate(trainer, packing=True)
    assert "replaces" not in caplog.text

    class MyCollator:
        def __call__(self, examples):
            raise AssertionError("replaced")

    trainer = _trainer(tmp_path / "b", integrate=False, steps=1)
    trainer.data_collator = MyCollator()
    with caplog.at_level("WARNING", logger="chronipatch"):
        ctrl.integrate(trainer, packing=True)
    assert (
        "replaces the trainer's collator test_packing_names_the_collator_it_replaces.<locals>.MyCollator"
        in (caplog.text)
    )
