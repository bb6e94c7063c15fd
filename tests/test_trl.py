"""SFTTrainer with vs without chronipatch: same per-step losses in fp32 on CPU."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

import torch
from trl import SFTConfig, SFTTrainer

import chronipatch
import chronipatch.trl as ctrl
from tiny import addition_dataset, tiny_model, tiny_tokenizer


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _trainer(tmp_path, *, integrate, seed=0, peft=False, steps=5, **cfg):
    tok = tiny_tokenizer()
    model = tiny_model("qwen2", seed=seed, vocab_size=len(tok))
    args = dict(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=seed,
        max_length=32,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
    )
    args.update(cfg)
    kw = {}
    if peft:
        from peft import LoraConfig

        kw["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    trainer = SFTTrainer(
        model=model, args=SFTConfig(**args), train_dataset=addition_dataset(), processing_class=tok, **kw
    )
    if integrate:
        chronipatch.apply(trainer.model)
        callback = ctrl.integrate(trainer)
        trainer._cb = callback
    return trainer


def _losses(trainer):
    trainer.train()
    hist = [h for h in trainer.state.log_history if "loss" in h]
    return torch.tensor([h["loss"] for h in hist]), hist


@pytest.mark.parametrize(
    "cfg",
    [dict(), dict(packing=True), dict(gradient_checkpointing=True)],
    ids=["plain", "packed", "checkpointing"],
)
def test_sft_losses_match_stock(tmp_path, cfg):
    stock, stock_hist = _losses(_trainer(tmp_path / "a", integrate=False, **cfg))
    trainer = _trainer(tmp_path / "b", integrate=True, **cfg)
    ours, hist = _losses(trainer)
    assert len(ours) == 5
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)
    assert trainer._cb.counter["calls"] == 5  # every step's loss came from chronipatch's op
    for key in ("entropy", "mean_token_accuracy"):
        torch.testing.assert_close(
            torch.tensor([h[key] for h in hist]),
            torch.tensor([h[key] for h in stock_hist]),
            rtol=1e-4,
            atol=1e-4,
        )
    assert hist[-1]["chronipatch/fused_loss_calls"] == 5
    if cfg.get("packing"):
        assert trainer.model.config._attn_implementation == "chronipatch_varlen"
    model = trainer.model  # transformers 5.2x renamed is_gradient_checkpointing
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    checkpointing = model.is_gradient_checkpointing if checkpointing is None else checkpointing
    assert checkpointing == bool(cfg.get("gradient_checkpointing"))


def test_sft_compiled_matches_stock(tmp_path):
    """SFTConfig(torch_compile=True) with TRL's packing: the Trainer compiles the patched model (the decoder
    one graph up to the fused head's masking of supervised rows) and the per-step losses stay stock's."""
    cfg = dict(packing=True, gradient_checkpointing=True)
    stock, _ = _losses(_trainer(tmp_path / "a", integrate=False, **cfg))
    trainer = _trainer(tmp_path / "b", integrate=True, torch_compile=True, **cfg)
    ours, _ = _losses(trainer)
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)
    assert trainer._cb.counter["calls"] == 5


def test_fused_head_matches_trls_with_num_items_and_shift_labels(tmp_path):
    """The fused head's other inputs, which a plain training step leaves at their defaults: num_items_in_batch
    (gradient accumulation) divides the loss, and shift_labels (already shifted, as long as the rows) scores
    every position; each output equals TRL's own head on the same model."""
    ours, _, _ = _fused_heads_agree(tmp_path)
    assert ours._cb.counter["calls"] == 2


def _fused_heads_agree(tmp_path):
    """Each output of the fused head equals TRL's own head's on one batch: with labels and num_items_in_batch,
    and with shift_labels. Returns the integrated trainer, the batch and its labels."""
    stock, ours = _trainer(tmp_path / "a", integrate=False), _trainer(tmp_path / "b", integrate=True)
    batch = next(iter(stock.get_train_dataloader()))
    labels = batch.pop("labels")
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    for kw in (dict(labels=labels, num_items_in_batch=7), dict(shift_labels=shifted, num_items_in_batch=5)):
        want = stock.model(**batch, **kw, fused_lm_head=True)
        got = ours.model(**batch, **kw, fused_lm_head=True)
        for key in ("loss", "log_probs", "entropy"):
            torch.testing.assert_close(getattr(got, key), getattr(want, key), rtol=1e-5, atol=1e-6, msg=key)
        for key in ("is_top1", "label_mask"):
            assert torch.equal(getattr(got, key), getattr(want, key)), key
    return ours, batch, labels


def test_fused_head_finds_the_supervised_rows_from_the_prefetched_check(tmp_path, monkeypatch, cpu_prefetch):
    """Where the label check was prefetched (CUDA; here CPU stand-ins for its pinned copy and event), the
    fused head selects the supervised rows from its count, with no host sync of its own, and the loss takes
    the selection's check: the same outputs as TRL's head, and a bad label is still named."""
    from chronipatch import ops

    selections = []
    real = ops.select_supervised

    def spy(check, labels, targets):
        selections.append(real(check, labels, targets))
        return selections[-1]

    monkeypatch.setattr(ops, "prefetch_label_check", lambda labels, vocab, ignore, shift: cpu_prefetch(
        labels, vocab, ignore, shift, None))  # fmt: skip
    monkeypatch.setattr(ops, "select_supervised", spy)
    from chronipatch.ops import _labels

    counted, real_counts = [], _labels.label_counts
    monkeypatch.setattr(_labels, "label_counts", lambda *a: counted.append(1) or real_counts(*a))
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda *a, **k: pytest.fail("a host sync for the rows"))
    ours, batch, labels = _fused_heads_agree(tmp_path)
    # One count a forward, the prefetch's: the loss reads the selection's check.
    assert len(selections) == 2 and all(s is not None for s in selections) and len(counted) == 2
    bad = labels.clone()
    bad[bad != -100] = ours.model.config.vocab_size + 3
    with pytest.raises(ValueError, match=f"label {ours.model.config.vocab_size + 3} outside"):
        ours.model(**batch, labels=bad, fused_lm_head=True)


def test_sft_fused_head_breaks_the_graph_only_at_the_supervised_rows(tmp_path):
    """TRL's call of the patched model (fused head, packed rows) traces as one graph up to the fused head's
    selection of supervised rows, the one data-dependent shape; nothing in the decoder breaks it."""
    trainer = _trainer(tmp_path, integrate=True, packing=True)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model

    def loss(**batch):
        return model(**batch, fused_lm_head=True).loss

    explained = torch._dynamo.explain(loss)(**batch)
    assert explained.graph_break_count == 1, [r.reason for r in explained.break_reasons]
    frame = explained.break_reasons[0].user_stack[-1]
    assert frame.filename.endswith("chronipatch/trl.py") and "nonzero" in frame.line, frame


def test_sft_chronipatch_packing_matches_stock_on_the_same_rows(tmp_path):
    """integrate(packing=True) on a trainer that packs nothing: chronipatch's BFD collator with the varlen
    attention. Stock on the same collator (transformers separates the documents by their position_ids)
    gives the same per-step losses."""
    from chronipatch.packing import PackingCollator

    stock = _trainer(tmp_path / "a", integrate=False)
    stock.data_collator = PackingCollator(max_length=32)
    ref, _ = _losses(stock)
    trainer = _trainer(tmp_path / "b", integrate=False)
    callback = ctrl.integrate(trainer, packing=True)
    assert isinstance(trainer.data_collator, PackingCollator)
    assert trainer.model.config._attn_implementation == "chronipatch_varlen"
    ours, hist = _losses(trainer)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert callback.counter["calls"] == 5
    assert any(key.startswith("packing/") for key in hist[-1]), hist[-1]


def test_integrate_packing_sets_the_models_own_config_and_revert_undoes_it(tmp_path):
    """Another model built from the same config object keeps its attention and cache setting; ``revert``
    restores this model's, and TRL's own fused head."""
    import transformers

    trainer = _trainer(tmp_path, integrate=False, steps=1)
    model = trainer.model
    other = transformers.AutoModelForCausalLM.from_config(model.config)
    other.config = model.config  # one config object for both, as from_config(cfg) twice gives
    model.config.use_cache = True  # (SFTTrainer may have turned it off already)
    before = (model.config._attn_implementation, model.config.use_cache)
    callback = ctrl.integrate(trainer, packing=True)
    assert (model.config._attn_implementation, model.config.use_cache) == ("chronipatch_varlen", False)
    assert (other.config._attn_implementation, other.config.use_cache) == before
    assert chronipatch.revert(model) > 0
    assert (model.config._attn_implementation, model.config.use_cache) == before
    trainer.train()
    assert callback.counter["calls"] == 0  # TRL's head again


def test_sft_lora_plus(tmp_path):
    from chronipatch import loraplus

    stock = _trainer(tmp_path / "a", integrate=False, peft=True)
    loraplus.install(stock)  # the same optimizer groups, without chronipatch's kernels
    ref, _ = _losses(stock)
    trainer = _trainer(tmp_path / "b", integrate=True, peft=True)
    ours, hist = _losses(trainer)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    initial = {g["name"]: g["initial_lr"] for g in trainer.optimizer.param_groups}
    assert initial["lora_B"] == pytest.approx(16 * 3e-3) and initial["lora_A"] == pytest.approx(3e-3)
    # The logged per-group rates, while they are not yet decayed to 0 (linear schedule over 5 steps).
    assert hist[0]["lr/lora_B"] == pytest.approx(16 * hist[0]["lr/lora_A"]) and hist[0]["lr/lora_A"] > 0
    # Each the rate its step used, as Trainer's own ``learning_rate`` (the scheduler steps before the log).
    for entry in hist:
        assert entry["lr/lora_A"] == pytest.approx(entry["learning_rate"]), entry


def test_sft_resume_reproduces_uninterrupted_run(tmp_path):
    full = _trainer(tmp_path / "full", integrate=True, peft=True, steps=4)
    full.train()
    first = _trainer(
        tmp_path / "resume", integrate=True, peft=True, steps=4, save_strategy="steps", save_steps=2
    )
    first.train()
    resumed = _trainer(
        tmp_path / "resume", integrate=True, peft=True, steps=4, save_strategy="steps", save_steps=2
    )
    with torch.no_grad():  # the checkpoint's adapters must replace these, or the run cannot match
        for p in resumed.model.parameters():
            p.add_(0.5) if p.requires_grad else None
    resumed.train(resume_from_checkpoint=str(tmp_path / "resume" / "checkpoint-2"))
    assert resumed._cb.counter["calls"] == 2  # steps 3 and 4 only
    for (name, a), b in zip(resumed.model.named_parameters(), full.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    losses = {h["step"]: h["loss"] for h in full.state.log_history if "loss" in h}
    resumed_losses = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h}
    assert [resumed_losses[k] for k in (3, 4)] == pytest.approx([losses[k] for k in (3, 4)], rel=1e-5)
    initial = {g["name"]: g["initial_lr"] for g in resumed.optimizer.param_groups}
    assert initial["lora_B"] == pytest.approx(16 * initial["lora_A"])


def test_integrate_bad_input(tmp_path):
    trainer = _trainer(tmp_path, integrate=False)
    trainer.processing_class.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        ctrl.integrate(trainer)
    with pytest.raises(ValueError, match="no TRL fused lm-head"):
        ctrl._fused_lm_head_owner(type("T", (), {"model": tiny_model("llama")})())


@pytest.mark.parametrize(
    "setting",
    [dict(temperature=0.7), dict(cast_lm_head_to_fp32=True), dict(outputs=("log_probs", "mean_logits"))],
    ids=["temperature", "fp32-head", "outputs"],
)
def test_integrate_refuses_a_fused_head_it_does_not_compute(tmp_path, setting):
    """A TRL fused head set up otherwise than SFTTrainer's (temperature, fp32 head, other outputs) would be
    silently replaced by a different computation: integrate refuses it, naming the setting."""
    from trl.trainer.utils import add_fused_lm_head

    trainer = _trainer(tmp_path, integrate=False)
    add_fused_lm_head(trainer.model, **setting)  # what a subclass or another trainer could install
    with pytest.raises(ValueError, match=next(iter(setting)) if "outputs" not in setting else "mean_logits"):
        ctrl.integrate(trainer)


def test_lora_on_the_head_is_refused_before_training(tmp_path):
    """TRL refuses LoRA on lm_head when it builds the trainer; integrate's own check refuses a fused head
    over such a head too (a model adapted before TRL saw it), before anything is patched."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"])
    with pytest.raises(ValueError, match="lm_head"):
        SFTTrainer(
            model=tiny_model("qwen2", vocab_size=len(tiny_tokenizer())),
            args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_steps=1),
            train_dataset=addition_dataset(),
            processing_class=tiny_tokenizer(),
            peft_config=lora,
        )
    model = tiny_model("qwen2")
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    model = get_peft_model(model, lora)
    owner = model.get_base_model()
    with pytest.raises(ValueError, match="lm_head carries unmerged LoRA adapters"):
        ctrl._check_fused_head(owner, owner.__dict__["forward"])
    assert not chronipatch.is_patched(model)


def test_full_finetuning_keeps_optimizer_and_says_so(tmp_path, caplog):
    trainer = _trainer(tmp_path, integrate=False)
    with caplog.at_level("INFO", logger="chronipatch"):
        ctrl.integrate(trainer)
    assert "no LoRA adapters (full fine-tuning)" in caplog.text
    assert trainer.optimizer_cls_and_kwargs is None


def test_dataset_without_its_text_field_stops_before_training(tmp_path):
    """A dataset that lacks the field SFTTrainer reads (``dataset_text_field``, default "text") is refused
    while the trainer is built, naming the field: nothing trains on a different objective."""
    import datasets

    tok = tiny_tokenizer()
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_steps=1)
    data = datasets.Dataset.from_dict({"question": ["1+1=", "2+2="]})
    with pytest.raises(KeyError, match="text"):
        SFTTrainer(
            model=tiny_model("qwen2", vocab_size=len(tok)),
            args=args,
            train_dataset=data,
            processing_class=tok,
        )


def test_integrate_refuses_a_given_optimizer_before_changing_anything(tmp_path):
    """LoRA+ cannot replace an optimizer the trainer was given: the refusal leaves the model unpatched and
    TRL's head in place, so integrate works once the optimizer is gone."""
    trainer = _trainer(tmp_path, integrate=False, peft=True)
    head_forward = trainer.model.get_base_model().__dict__["forward"]
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="already has an optimizer"):
        ctrl.integrate(trainer)
    assert not chronipatch.is_patched(trainer.model)
    assert trainer.model.get_base_model().__dict__["forward"] is head_forward
    trainer.optimizer = None
    callback = ctrl.integrate(trainer)
    assert chronipatch.is_patched(trainer.model) and callback.ratio == 16.0


def test_full_finetuning_keeps_a_given_optimizer(tmp_path):
    """Without LoRA adapters no LoRA+ groups are built: an optimizer the trainer was given is kept."""
    trainer = _trainer(tmp_path, integrate=False, steps=1)
    trainer.optimizer = optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    callback = ctrl.integrate(trainer)
    assert callback.ratio is None and trainer.optimizer is optimizer and chronipatch.is_patched(trainer.model)


def test_submodules_load_on_first_use():
    """`chronipatch.trl.integrate` works after `import chronipatch` alone, which imports no TRL."""
    import subprocess
    import sys

    code = (
        "import chronipatch, sys\nassert 'trl' not in sys.modules\nprint(chronipatch.trl.integrate.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "integrate" and chronipatch.trl is ctrl
