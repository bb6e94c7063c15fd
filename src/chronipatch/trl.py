"""TRL ``SFTTrainer`` integration: one line after building the trainer.

    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, peft_config=...)
    chronipatch.trl.integrate(trainer)
    trainer.train()

What it does, before ``train()``:
- patches the decoder (``chronipatch.apply``) if that was not done yet;
- routes the SFT loss through ``ops.linear_cross_entropy``. TRL 1.16 computes its loss with its own
  chunked lm-head (``model(..., fused_lm_head=True)``) and never calls the CausalLM forward, so the
  fused head TRL installed is wrapped: same outputs (log_probs, entropy, is_top1, label_mask), our op;
- builds LoRA+ parameter groups through the trainer's optimizer factory when the model has LoRA
  adapters, so checkpoints and resume keep the groups;
- with packing, runs packed rows with the varlen attention (TRL's padding-free batches, or
  chronipatch's BFD ``PackingCollator`` when TRL packs nothing);
- adds a callback that logs per-group learning rates, packing statistics and how often the fused
  loss ran.
"""

from __future__ import annotations

import functools
import logging
import numbers
import types

from transformers import TrainerCallback

from . import loraplus, ops
from .causal_lm import plain_head
from .head import check_head_adapters, head_weight, reshard_if_idle
from .layers import bound_forward
from .packing import PackingCollator
from .patch import FUSED_HEAD, apply, is_patched, own_config, select_varlen, wrapped_ours

log = logging.getLogger("chronipatch")


def _head_owner(model):
    """The model TRL put its fused head on: a peft wrapper's base model."""
    from accelerate.utils import is_peft_model

    return model.get_base_model() if is_peft_model(model) else model


def _fused_lm_head_owner(trainer):
    owner = _head_owner(trainer.model)
    fwd = owner.__dict__.get("forward")
    code = getattr(
        getattr(fwd, "__func__", None), "__code__", None
    )  # functools.wraps renamed it, not its code
    if getattr(code, "co_name", None) != "_fused_forward":
        raise ValueError(
            "chronipatch.trl.integrate: the trainer's model has no TRL fused lm-head "
            "(model(..., fused_lm_head=True)); it needs trl>=1.16's SFTTrainer, built before integrate()"
        )
    return owner, fwd


# What TRL's fused head may be set to for our op to compute the same thing (SFTTrainer's own settings).
_FUSED_HEAD_AS_OURS = dict(
    temperature=1.0, cast_lm_head_to_fp32=False, final_logit_softcapping=None, logit_scale=1.0
)
_FUSED_OUTPUTS_OURS = frozenset({"log_probs", "entropy", "is_top1"})


def _check_fused_head(owner, fwd) -> None:
    """Refuse a TRL fused head whose settings our loss does not implement (a changed objective otherwise).
    The settings live in the closure of TRL's ``_fused_forward``."""
    func = getattr(fwd, "__func__", fwd)
    settings = {n: c.cell_contents for n, c in zip(func.__code__.co_freevars, func.__closure__ or ())}
    missing = sorted({*_FUSED_HEAD_AS_OURS, "outputs"} - settings.keys())
    if missing:  # another TRL: its head may compute something else, and nothing here can tell
        raise ValueError(
            f"chronipatch.trl.integrate: cannot read {missing} from TRL's fused lm-head; this TRL version is "
            "not supported (trl 1.16 is)"
        )
    for key, ours in _FUSED_HEAD_AS_OURS.items():
        if settings[key] != ours:
            raise ValueError(
                f"chronipatch.trl.integrate: TRL's fused lm-head uses {key}={settings[key]!r}; chronipatch's "
                f"loss computes {key}={ours!r} only"
            )
    extra = set(settings["outputs"]) - _FUSED_OUTPUTS_OURS
    if extra:
        raise ValueError(
            f"chronipatch.trl.integrate: TRL's fused lm-head asks for {sorted(extra)}; chronipatch's loss "
            f"gives {sorted(_FUSED_OUTPUTS_OURS)}"
        )
    head = owner.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("chronipatch.trl.integrate: the lm_head has a bias; chronipatch's loss has none")
    check_head_adapters(head)  # before training, not at its first step


def _make_fused_forward(trl_forward, counter: dict):
    """TRL's ``_fused_forward`` contract (``trl_forward`` bound to the model), computed by
    ``ops.linear_cross_entropy``."""
    from trl.trainer.utils import FusedCausalLMOutput

    # The model class's signature, as TRL's head keeps it: generate passes position_ids and logits_to_keep
    # only to a forward that names them.
    @functools.wraps(type(trl_forward.__self__).forward)
    def forward(
        self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs
    ):
        head = self.get_output_embeddings()
        # TRL's own head where ours would compute something else: router losses, or a head with hooks; and
        # once reverted under a wrapper that kept this function (accelerate's autocast, from train()).
        own = getattr(self.config.get_text_config(), "output_router_logits", False) or not plain_head(head)
        if not fused_lm_head or own or not self.__dict__.get(FUSED_HEAD):
            return trl_forward(
                *args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch, **kwargs,
            )  # fmt: skip
        kwargs["use_cache"] = False
        given = labels if shift_labels is None else shift_labels
        # The label check starts before the backbone (None where it cannot: under torch.compile, off CUDA,
        # labels elsewhere than the head): the supervised rows are then found from its count, without the host
        # sync that would drain the GPU queue here.
        check = None
        if given is not None and given.device == head.weight.device:
            check = ops.prefetch_label_check(given, head.weight.shape[0], -100, shift=shift_labels is None)
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        weight = head_weight(head)  # after the backbone: under FSDP2 this gathers the head
        hidden = hidden.to(weight.device)
        labels = (labels[:, 1:] if shift_labels is None else shift_labels).to(weight.device)
        mask = labels != -100
        # Like TRL's head: score only supervised positions, then scatter back.
        selected = ops.select_supervised(check, given, labels)
        if selected is None:
            keep = mask.reshape(-1).nonzero().squeeze(1)  # one host sync
            selected = keep, labels.reshape(-1).index_select(0, keep), None
        keep, targets, label_check = selected
        # Their rows of the unshifted hidden states (no copy of hidden[:, :-1]): position t of sequence b
        # predicts labels[b, t + 1], the (b (T - 1) + t)-th selected label.
        at = keep + keep // labels.shape[1] if shift_labels is None else keep
        rows, stats = ops.linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]).index_select(0, at), weight, targets, shift=False,
            reduction="none", return_token_stats=True, label_check=label_check,
        )  # fmt: skip
        reshard_if_idle(head, rows)
        counter["calls"] += 1

        def scatter(x):
            return x.new_zeros(mask.numel()).index_copy(0, keep, x).view(mask.shape)

        log_probs = scatter(-rows)
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / denom,
            log_probs=log_probs,
            entropy=scatter(stats.entropy),
            is_top1=scatter(stats.correct).bool(),
            label_mask=mask,
        )

    forward._chronipatch_replaces = trl_forward  # what ``revert`` puts back
    return forward


class ChronipatchCallback(TrainerCallback):
    """Logs LoRA+ group learning rates, packing statistics and fused-loss calls; checks LoRA+ at start."""

    def __init__(
        self,
        counter: dict,
        collator: PackingCollator | None,
        loraplus_ratio: float | None,
        varlen: bool = False,
        options: dict | None = None,
    ):
        self.counter, self.collator, self.ratio = counter, collator, loraplus_ratio
        self.varlen = varlen  # packed rows: what integrate wires again after a revert
        self.options = options or {}  # integrate's arguments, which a later integrate of the trainer repeats
        self.step_lrs = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.collator is not None and args.dataloader_num_workers > 0:
            # Each worker collates with its own copy of the collator: the main process's counters stay 0.
            log.warning(
                "chronipatch: packing statistics are counted inside the DataLoader's workers "
                "(dataloader_num_workers=%d) and not logged; dataloader_num_workers=0 logs them",
                args.dataloader_num_workers,
            )
        if self.ratio is None or optimizer is None:
            return
        lrs = loraplus.group_learning_rates(optimizer)
        a, b = lrs.get("lr/lora_A"), lrs.get("lr/lora_B")
        # Adapters on embeddings alone build an ``embedding`` group and no lora_A/lora_B pair.
        built = {"lr/lora_A", "lr/lora_B", "lr/lora_B_no_decay", "lr/embedding"} & lrs.keys()
        if not built or (
            a is not None and b is not None and not abs(b - self.ratio * a) <= 1e-12 * max(1.0, b)
        ):
            raise RuntimeError(f"chronipatch: LoRA+ groups not built as asked (ratio {self.ratio}): {lrs}")
        log.info("chronipatch: LoRA+ learning rates %s", lrs)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # The rates this step used: Trainer steps the scheduler before it logs, as its ``learning_rate`` does.
        if self.ratio is not None and optimizer is not None:
            self.step_lrs = loraplus.group_learning_rates(optimizer)

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is None:
            return
        extra = {"chronipatch/fused_loss_calls": self.counter["calls"]}
        if self.step_lrs is not None:
            extra.update(self.step_lrs)
        if self.collator is not None and not args.dataloader_num_workers:
            extra.update(self.collator.stats.as_dict())
        logs.update(extra)  # what later callbacks (reporters) receive
        if state.log_history:  # Trainer stored a copy of logs just before this event
            state.log_history[-1].update(extra)


class _Default:
    """An argument left out: its default at a trainer's first integrate, that call's choice at a later one."""

    def __init__(self, value):
        self.value = value

    def __repr__(self) -> str:  # as the signature shows it
        return repr(self.value)


def integrate(
    trainer,
    *,
    loraplus_ratio: float | None = _Default(16.0),
    loraplus_lr_embedding: float = _Default(1e-6),
    packing: bool | None = _Default(None),
) -> ChronipatchCallback:
    """Wire chronipatch into a built TRL ``SFTTrainer``, before ``trainer.train()``; again after ``revert``.

    ``loraplus_ratio=None`` keeps the trainer's optimizer. ``packing=None`` follows the trainer (TRL
    packing / padding-free on -> varlen attention); ``True`` also packs with chronipatch's collator
    when TRL does not, into rows of ``args.max_length`` tokens.
    """
    if not all(hasattr(trainer, a) for a in ("model", "args", "callback_handler", "processing_class")):
        raise TypeError(
            f"chronipatch.trl.integrate expects a built trl.SFTTrainer, got {type(trainer).__name__} "
            "(for a model alone use chronipatch.apply(model))"
        )
    given = dict(loraplus_ratio=loraplus_ratio, loraplus_lr_embedding=loraplus_lr_embedding, packing=packing)
    callback = getattr(trainer, "_chronipatch", None)
    if callback is not None:
        # Called again (after a revert, say): what is passed must match the first call's choice.
        changed = {k: v for k, v in given.items() if not isinstance(v, _Default) and v != callback.options[k]}
        if changed:
            raise ValueError(
                f"chronipatch.trl.integrate: this trainer was integrated with {callback.options}; called "
                f"again with {changed}. Optimizer groups, collator and attention are chosen once per "
                "trainer: build a new trainer to change them"
            )
        if not _wired(trainer):  # reverted since (and maybe applied again): wired again as first chosen
            _wire(trainer, callback.counter, callback.varlen)
        return callback
    options = {k: v.value if isinstance(v, _Default) else v for k, v in given.items()}
    loraplus_ratio, loraplus_lr_embedding, packing = options.values()
    if packing is not None and not isinstance(packing, bool):
        raise TypeError(
            f"chronipatch.trl.integrate: packing must be True, False or None, got {packing!r:.40}"
        )
    if loraplus_ratio is not None:
        names = ("loraplus_ratio", "loraplus_lr_embedding")
        loraplus.check_settings(loraplus_ratio, loraplus_lr_embedding, names, "chronipatch.trl.integrate")
    if trainer.processing_class is not None and getattr(trainer.processing_class, "pad_token", 1) is None:
        raise ValueError("chronipatch.trl.integrate: the tokenizer has no pad token; set tokenizer.pad_token")
    owner, trl_forward = _fused_lm_head_owner(trainer)
    # Before anything changes: a refusal leaves the trainer and the model as they were. (apply leaves a
    # forward someone else bound on the instance, TRL's fused head, where it is.)
    _check_fused_head(owner, trl_forward)
    trl_packs = bool(getattr(trainer, "padding_free", False))
    if packing and not trl_packs and not trainer.args.max_length:
        raise ValueError(
            "chronipatch.trl.integrate: packing=True packs rows of SFTConfig.max_length tokens, and "
            f"max_length is {trainer.args.max_length!r}; set it (TRL then truncates examples to it, as "
            "without packing)"
        )
    varlen = trl_packs or bool(packing)
    if varlen and not _flash(trainer.model):
        rates = (getattr(m, "attention_dropout", 0.0) for m in trainer.model.modules())
        dropout = max((float(r) for r in rates if isinstance(r, numbers.Real)), default=0.0)
        if dropout > 0:
            raise ValueError(
                "chronipatch.trl.integrate: packed rows (TRL's packing or padding_free, or packing=True) "
                "run the varlen attention, which has no dropout, and the model's attention_dropout is "
                f"{dropout:g}; set it to 0"
            )
    # LoRA+ first too: it refuses a trainer given its own optimizer, and changes only the optimizer factory.
    ratio = None
    if loraplus_ratio is not None:
        if loraplus.install(trainer, ratio=loraplus_ratio, lr_embedding=loraplus_lr_embedding):
            ratio = loraplus_ratio
        else:
            log.info("chronipatch: no LoRA adapters (full fine-tuning); optimizer groups left as they are")
    counter = {"calls": 0}
    _wire(trainer, counter, varlen)
    collator = None
    if packing and not trl_packs:
        given = trainer.data_collator
        if given is not None and not type(given).__module__.startswith("trl."):  # not one of TRL's
            name = getattr(given, "__qualname__", None) or type(given).__qualname__
            log.warning(
                "chronipatch: packing=True replaces the trainer's collator %s with PackingCollator", name
            )
        collator = PackingCollator(max_length=trainer.args.max_length)
        trainer.data_collator = collator

    callback = ChronipatchCallback(counter, collator, ratio, varlen, options)
    trainer.callback_handler.callbacks.insert(1, callback)  # before reporters, so they see our log keys
    trainer._chronipatch = callback
    return callback


def _flash(model) -> bool:
    """Whether the user chose flash-attn, whose own varlen kernel reads ``cu_seq_lens`` (with dropout)."""
    return str(model.config._attn_implementation).startswith("flash_attention")


def _wired(trainer) -> bool:
    """Whether the trainer's model is patched and its fused head is ours (``revert`` puts TRL's back)."""
    return is_patched(trainer.model) and bool(_head_owner(trainer.model).__dict__.get(FUSED_HEAD))


def _wire(trainer, counter: dict, varlen: bool) -> None:
    """Patch the trainer's model, route TRL's fused head through our loss, and with packed rows (``varlen``)
    run the varlen attention without a cache; ``revert`` undoes all three."""
    model = trainer.model
    owner = _head_owner(model)
    # Our head under a wrapper that a revert kept (accelerate's autocast, from train()) serves again as it is.
    kept = hasattr(wrapped_ours(bound_forward(owner), fused_head=True), "_chronipatch_replaces")
    trl_forward = None if kept else _fused_lm_head_owner(trainer)[1]
    if not is_patched(model):
        apply(model)
    if trl_forward is not None:
        owner.forward = types.MethodType(_make_fused_forward(trl_forward, counter), owner)
    # A flag, not the function: a local function in the model's __dict__ would not pickle.
    owner.__dict__[FUSED_HEAD] = True  # what revert drops, where a wrapper keeps the forward
    if varlen:
        # On the model's own config, undone by revert: a cache would hide the packed boundaries from the mask
        # logic. flash-attn's own varlen kernel, when the user chose it, reads cu_seq_lens too: kept.
        own_config(model, use_cache=False)
        if not _flash(model):
            select_varlen(model)
