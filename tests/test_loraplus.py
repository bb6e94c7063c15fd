"""LoRA+ param groups, peft parity and a Trainer round trip through checkpoint resume (CPU)."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from chronipatch.loraplus import (  # noqa: E402
    group_learning_rates,
    has_lora,
    install,
    loraplus_param_groups,
)

LR, RATIO, LR_EMB, WD = 1e-3, 16.0, 1e-6, 0.01
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "modules_to_save": dict(target_modules="all-linear", modules_to_save=["embed_tokens"]),
    "lora_embedding": dict(target_modules=[*LINEAR, "embed_tokens"]),
    "lora_bias": dict(target_modules="all-linear", lora_bias=True),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def base_model(seed: int = 0):
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def lora_model(kind: str = "modules_to_save", seed: int = 0):
    model = base_model(seed)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **CONFIGS[kind]))


def expected(name: str, p: torch.Tensor) -> tuple[float, float]:
    if "lora_embedding_A" in name or "lora_embedding_B" in name:
        return LR_EMB, WD
    if ".lora_B." in name:
        return LR * RATIO, (0.0 if p.ndim == 1 else WD)
    return LR, (0.0 if p.ndim == 1 else WD)


def by_param(groups) -> dict[int, tuple[float, float]]:
    return {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_groups_partition_trainables(kind):
    model = lora_model(kind)
    if kind == "lora_bias":
        model.base_model.model.model.norm.weight.requires_grad_(True)  # exercises "no_decay"
    groups = loraplus_param_groups(model, LR, RATIO, LR_EMB, WD)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter sits in two groups"
    named = dict(model.named_parameters())
    trainable = {id(p) for p in named.values() if p.requires_grad}
    assert set(ids) == trainable  # every trainable once, frozen ones absent
    assert all(g["params"] for g in groups)
    lrs = by_param(groups)
    for name, p in named.items():
        if p.requires_grad:
            assert lrs[id(p)] == pytest.approx(expected(name, p)), name
    names = {g["name"] for g in groups}
    assert {"lora_A", "lora_B"} <= names
    assert {
        "modules_to_save": "other",
        "lora_embedding": "embedding",
        "lora_bias": "lora_B_no_decay",
    }[kind] in names
    if kind == "lora_bias":
        assert "no_decay" in names


@pytest.mark.parametrize("kind", ["modules_to_save", "lora_embedding"])
def test_matches_peft_reference(kind):
    from peft.optimizers import create_loraplus_optimizer

    model = lora_model(kind)
    ref = create_loraplus_optimizer(
        model,
        torch.optim.AdamW,
        lr=LR,
        loraplus_lr_ratio=RATIO,
        loraplus_lr_embedding=LR_EMB,
        loraplus_weight_decay=WD,
    )
    ours = loraplus_param_groups(model, LR, RATIO, LR_EMB, WD)
    assert by_param(ours) == by_param(ref.param_groups)


def test_names_survive_state_dict():
    """The group names travel in the optimizer's state_dict (what a checkpoint saves); loading it restores
    them over whatever the new optimizer's groups were called."""
    model = lora_model()
    opt = torch.optim.AdamW(loraplus_param_groups(model, LR))
    names = [g["name"] for g in opt.param_groups]
    assert "lora_B" in names and [g["name"] for g in opt.state_dict()["param_groups"]] == names
    fresh = torch.optim.AdamW([{**g, "name": "renamed"} for g in loraplus_param_groups(model, LR)])
    fresh.load_state_dict(opt.state_dict())
    assert [g["name"] for g in fresh.param_groups] == names
    assert has_lora(model) and not has_lora(base_model())


class TinyData(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, t: int = 12):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 100, (n, t), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_trainer(model, out, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=LR,
        save_steps=2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        **kw,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=TinyData())


def test_no_adapter_rejected(tmp_path):
    model = base_model()
    with pytest.raises(ValueError, match="LoRA"):
        loraplus_param_groups(model, LR)
    trainer = make_trainer(model, tmp_path)
    assert install(trainer) is False
    assert trainer.optimizer_cls_and_kwargs is None


@pytest.mark.parametrize(
    ("ratio", "lr_embedding"), [(0.0, 1e-6), (float("inf"), 1e-6), (True, 1e-6), (16.0, -1.0)]
)
def test_bad_settings_rejected(tmp_path, ratio, lr_embedding):
    model = lora_model()
    with pytest.raises(ValueError, match="must be a finite real number"):
        loraplus_param_groups(model, LR, ratio, lr_embedding)
    trainer = make_trainer(model, tmp_path)
    with pytest.raises(ValueError, match="must be a finite real number"):
        install(trainer, ratio, lr_embedding)
    assert trainer.optimizer_cls_and_kwargs is None


def test_explicit_optimizer_conflicts(tmp_path):
    model = lora_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = make_trainer(model, tmp_path)
    trainer.optimizer = opt  # what `optimizers=(opt, None)` leaves behind
    with pytest.raises(RuntimeError, match="optimizer"):
        install(trainer)


def test_trainer_builds_loraplus_optimizer(tmp_path):
    trainer = make_trainer(lora_model(), tmp_path, weight_decay=WD)
    assert install(trainer)
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    opt = trainer.optimizer
    assert opt.param_groups[0]["betas"] == (trainer.args.adam_beta1, trainer.args.adam_beta2)
    assert opt.param_groups[0]["eps"] == trainer.args.adam_epsilon
    assert all(g["weight_decay"] == WD for g in opt.param_groups)
    want = {"lr/lora_A": LR, "lr/lora_B": LR * RATIO, "lr/other": LR}  # other: embed_tokens copy
    assert group_learning_rates(opt) == pytest.approx(want)
    opt.step()
    trainer.lr_scheduler.step()  # linear decay over 4 steps, no warmup: every group at 3/4
    assert group_learning_rates(opt) == pytest.approx({k: 0.75 * v for k, v in want.items()})


def test_trainer_resume_keeps_groups(tmp_path):
    full = make_trainer(lora_model(), tmp_path / "full", weight_decay=WD)
    assert install(full)
    full.train()
    ckpt = str(tmp_path / "full" / "checkpoint-2")
    trained = {n: p for n, p in full.model.named_parameters() if p.requires_grad}
    assert all(p.abs().sum() > 0 for n, p in trained.items() if ".lora_B." in n)

    resumed = make_trainer(lora_model(), tmp_path / "resumed", weight_decay=WD)
    assert install(resumed)
    with torch.no_grad():  # the checkpoint's adapters must replace these, or the run cannot match
        for p in resumed.model.parameters():
            p.add_(0.5) if p.requires_grad else None
    resumed.train(resume_from_checkpoint=ckpt)
    assert [g["name"] for g in resumed.optimizer.param_groups] == [
        g["name"] for g in full.optimizer.param_groups
    ]
    again = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert again.keys() == trained.keys()
    for name in trained:
        torch.testing.assert_close(again[name], trained[name], rtol=0, atol=1e-7, msg=name)

    # Without LoRA+ the default two groups cannot take the saved six-group state.
    plain = make_trainer(lora_model(), tmp_path / "plain", weight_decay=WD)
    with pytest.raises(ValueError, match="parameter group"):
        plain.train(resume_from_checkpoint=ckpt)
