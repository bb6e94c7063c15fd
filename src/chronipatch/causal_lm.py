"""The CausalLM forward: HF's backbone, then ``ops.linear_cross_entropy`` of the last hidden states against
the labels, in place of the lm_head's logits and transformers' loss."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import can_return_tuple

from . import ops
from .head import FSDPModule, active_adapters, head_weight, reshard_if_idle, tuner_layer, weight_wrapper
from .layers import BOUND, CAUSAL_ONLY, accelerate_hooked, own_hooks

try:  # transformers' own slicing: also 2-D positions [B, P] and boolean masks [B, T]
    from transformers.modeling_utils import slice_logits_to_keep as _slice_logits_to_keep
except ImportError:  # older releases: an int or 1-D positions

    def _slice_logits_to_keep(hidden_states, logits_to_keep):
        if isinstance(logits_to_keep, int):
            return hidden_states[:, -logits_to_keep:, :] if logits_to_keep else hidden_states
        return hidden_states[:, logits_to_keep, :]


# transformers 5.24 renamed the outputs' ``past_key_values`` field to ``cache``.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def plain_head(head: torch.nn.Module) -> bool:
    """Whether the fused loss may read ``head.weight`` in place of calling the head: no hooks of its own
    (FSDP2's gathering hooks aside: ``head_weight`` unshards it instead) nor accelerate's. Global module hooks
    (measuring tools: ``FlopCounterMode``, memory trackers) are not the head's: the fused loss never calls
    the head, so they do not see it, as they do not see any op's inside."""
    if accelerate_hooked(head) or not linear_head(head):
        return False
    fsdp = isinstance(head, FSDPModule)
    return not any(not (fsdp and _fsdp_hook(h)) for d in own_hooks(head) for h in d.values())


def linear_head(head: torch.nn.Module) -> bool:
    """Whether ``head(x)`` is ``F.linear(x, head.weight)``, checked per call (the head may have changed since
    ``apply`` checked it): an ``nn.Linear`` running the stock forward (FSDP2's ``FSDPLinear`` too) with no
    bias, or a peft wrapper whose ``weight`` is what its call multiplies by (``ModulesToSaveWrapper``,
    ``TrainableTokensWrapper``) or whose adapters are merged or disabled."""
    if active_adapters(head):
        return False  # the head's own call
    if tuner_layer(head):
        return linear_head(head.get_base_layer())
    if weight_wrapper(head):
        return all(linear_head(m) for m in head.modules() if isinstance(m, torch.nn.Linear))
    return (
        isinstance(head, torch.nn.Linear)
        and type(head).forward is torch.nn.Linear.forward
        and head.bias is None
    )


def _fsdp_hook(hook) -> bool:
    # FSDPState's bound methods, or the closures of a state over several modules (``fully_shard([...])``).
    return (getattr(hook, "__module__", None) or "").startswith("torch.distributed.fsdp.")


_HOOKED_HEAD = (
    "chronipatch: lm_head has hooks, adapters, a bias or a forward of its own, which the fused loss would "
    "bypass; this call runs the head and transformers' loss over the full logits instead"
)


def _causal_only(self, attention_mask, position_ids, use_cache, kwargs) -> bool:
    """Whether this CausalLM call's attention mask is the causal one alone: SDPA, no padding mask, no
    positions (packed rows restart them), no cache. Stock eager then runs SDPA's ``is_causal`` kernel with no
    mask; while compiling (torch < 2.14) transformers cannot tell and builds the dense [B, 1, T, T] mask,
    whose masked kernels took 2.4x the time (cuDNN, H200). The attention forwards drop that mask, as eager
    would, in every layer whose sliding window (if any) covers the rows."""
    return (
        self.config._attn_implementation == "sdpa"
        and attention_mask is None
        and position_ids is None
        and use_cache is False  # None: the config's choice, which may build a cache
        and kwargs.get("past_key_values") is None
        and kwargs.get("cache") is None
        and kwargs.get("cu_seq_lens_q") is None
    )


@can_return_tuple
def causal_lm_forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    logits_to_keep=0,
    return_logits: bool = False,
    **kwargs,
) -> CausalLMOutputWithPast:
    """HF ``XxxForCausalLM.forward`` whose loss is the fused ``linear_cross_entropy``.

    With labels the logits are never materialised and ``logits`` is None, unless ``return_logits=True``;
    a head with hooks (or accelerate's) runs its own call and stock's loss instead. ``**kwargs`` stays in
    the signature: Trainer reads it to decide that the model normalises by ``num_items_in_batch`` itself.
    """
    if getattr(self, BOUND, None) is not causal_lm_forward:
        # Reverted while a wrapper kept this function (accelerate's mixed-precision forward, which Trainer
        # installs in train(), wraps the forward it found): run the stock forward under that wrapper.
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        return type(self).forward(
            self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, logits_to_keep=logits_to_keep,
            **kwargs,
        )  # fmt: skip
    if use_cache is None and self.training:
        use_cache = False  # a training forward never reads a cache; building one hides packed rows
    if past_key_values is not None:  # the older name of ``cache`` (transformers < 5.24)
        kwargs["past_key_values"] = past_key_values
    if _causal_only(self, attention_mask, position_ids, use_cache, kwargs):
        kwargs[CAUSAL_ONLY] = True
    # As stock: a loss where labels are given; ``shift_labels`` given too are its targets, already shifted.
    shift_labels = kwargs.get("shift_labels")
    targets = None if labels is None else labels if shift_labels is None else shift_labels
    ignore_index = kwargs.get("ignore_index", -100)
    shift = shift_labels is None
    # A boolean mask keeps [num_true, H] rows (packed training), whose logits stock's loss reads in order
    # against its flattened targets: shifted within each row first where they are the labels.
    flat_rows = (
        isinstance(logits_to_keep, torch.Tensor)
        and logits_to_keep.dtype == torch.bool
        and logits_to_keep.ndim == 2
    )
    if targets is not None and flat_rows:
        targets = (F.pad(targets, (0, 1), value=ignore_index)[..., 1:] if shift else targets).reshape(1, -1)
        shift = False
    if targets is not None and targets.ndim == 1:
        targets = targets[None]  # one unbatched row, which stock's flattening loss takes (batch size 1)
    fused = targets is not None and plain_head(self.lm_head)
    # The loss's label check starts before the backbone: its one host sync then finds the counts already
    # there instead of draining the GPU queue that the backbone's launches filled.
    label_check = None
    if fused:
        label_check = ops.prefetch_label_check(
            targets,
            self.lm_head.weight.shape[0],
            ignore_index,
            shift=shift,
            num_items=kwargs.get("num_items_in_batch"),
        )
    outputs = self.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        **kwargs,
    )
    hidden_states = _slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)

    loss = logits = None
    if not fused:
        logits = self.lm_head(hidden_states)
        if targets is not None:  # a hooked head: its own call, whose output stock's loss reads
            if not torch.compiler.is_compiling():  # a graph would break at the warning
                warnings.warn(_HOOKED_HEAD, stacklevel=3)
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
    else:
        if flat_rows:
            # The kept rows' count is known only now (under compile, a value of its own): stated for the
            # graph, named for the caller.
            kept, n = hidden_states.shape[0], targets.shape[-1]
            if not torch.compiler.is_compiling() and kept != n:
                raise ValueError(
                    f"chronipatch: a bool logits_to_keep keeps {kept} positions, and the loss has {n} "
                    "targets: pass shift_labels of the kept positions (labels are shifted for it only where "
                    "every position is kept)"
                )
            torch._check(kept == n)
        weight = head_weight(self.lm_head)
        loss = ops.linear_cross_entropy(
            hidden_states[None] if flat_rows else hidden_states,
            weight,
            targets,
            ignore_index=ignore_index,
            num_items_in_batch=kwargs.get("num_items_in_batch"),
            shift=shift,
            label_check=label_check,
        )
        if return_logits:
            # From the weight the loss read, for a gathered FSDP head: its own call would reshard it after
            # its forward, freeing the weight the loss keeps for its backward.
            fsdp = isinstance(self.lm_head, FSDPModule)
            logits = F.linear(hidden_states, weight) if fsdp else self.lm_head(hidden_states)
        reshard_if_idle(self.lm_head, loss)
    return CausalLMOutputWithPast(
        loss=loss,
        logits=logits,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD, None)},
    )
