"""Replacement forwards, bound per instance by ``apply``. Each mirrors the HF 5.x forward it
replaces line for line, with the fused op in place of the eager math."""

from __future__ import annotations

import functools

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from . import ops
from .head import DTensor, FSDPModule
from .masked_sdpa import masked_sdpa
from .ops._utils import autocast_dtype


def rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)


# transformers >= 5.23 checkpoints a decoder layer by wrapping its class's ``forward``
# (``GradientCheckpointingLayer.__init_subclass__``), which an instance's own forward bypasses; earlier
# releases wrapped ``__call__``, which runs the instance's forward inside the checkpoint already.
_CLASS_CHECKPOINTS = "__call__" not in vars(GradientCheckpointingLayer)


def _checkpoints_without_grad() -> bool:
    """Whether the class wrapper also checkpoints without grad enabled (5.23 and 5.24 do, dropping the
    cache as under grad; 5.25 runs the layer as is): asked of the wrapper itself, not of a version."""

    class Probe(GradientCheckpointingLayer):
        def forward(self):
            return False

    try:
        probe = Probe()
        probe.gradient_checkpointing = True
        probe._gradient_checkpointing_func = lambda fn, *args: True
        with torch.no_grad():
            return bool(probe())
    except Exception:  # a wrapper this probe cannot drive: 5.25's rule (same values either way)
        return False


# Once, at import: a constant to the compiler too.
_CHECKPOINTS_WITHOUT_GRAD = _CLASS_CHECKPOINTS and _checkpoints_without_grad()


def decoder_layer_forward(self, *args, **kwargs):
    """``_decoder_layer``, checkpointed as transformers checkpoints the stock layer where its class's
    ``forward`` carries the checkpointing (``gradient_checkpointing_enable()``, training, and grad enabled
    where the installed wrapper asks for it)."""
    if (
        _CLASS_CHECKPOINTS
        and getattr(self, "gradient_checkpointing", False)
        and self.training
        and (torch.is_grad_enabled() or _CHECKPOINTS_WITHOUT_GRAD)
    ):
        # As transformers' wrapper: no cache under checkpointing (the recompute would write it twice).
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        if not getattr(self, "_can_checkpoint_with_cache", False):
            for name in ("cache", "past_key_values", "layer_past"):
                if kwargs.get(name) is not None:
                    kwargs[name] = None
        return self._gradient_checkpointing_func(functools.partial(_decoder_layer, self, **kwargs), *args)
    return _decoder_layer(self, *args, **kwargs)


def _decoder_layer(self, hidden_states, attention_mask=None, position_ids=None, **kwargs):
    """HF decoder layer whose RMSNorms run inside the projections they feed (``normed_projections``), where
    the attention and the MLP run our forwards: their [N, H] outputs are recomputed in the backward. A hooked
    attention or MLP gets the normalised input, as stock's hooks see it."""
    attn_norm = self.input_layernorm if fuses_norm(self.self_attn, attention_forward) else None
    mlp_norm = self.post_attention_layernorm if fuses_norm(self.mlp, mlp_forward) else None
    residual = hidden_states
    if attn_norm is None:
        hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **kwargs,
        **({} if attn_norm is None else {"input_norm": attn_norm}),
    )
    if mlp_norm is not None:
        # The residual add inside the norm's kernels, both ways (``ops.add_rms_norm_linear``).
        residual, hidden_states = self.mlp(hidden_states, input_norm=mlp_norm, residual=residual)
        return residual + hidden_states
    hidden_states = residual + hidden_states
    residual = hidden_states
    if mlp_norm is None:
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
    else:
        hidden_states = self.mlp(hidden_states, input_norm=mlp_norm)
    return residual + hidden_states


def fuses_norm(module: torch.nn.Module, fn) -> bool:
    """Whether ``module`` runs ``fn`` and nothing else that reads its input on a call: it may then take the
    norm's input. transformers' output-capturing hooks that read only outputs do not count."""
    return runs(module, fn) and no_hooks(module, inert=_reads_output_only)


@torch.compiler.assume_constant_result  # read at trace time: dynamo cannot trace a closure's cells
def _reads_output_only(hook) -> bool:
    """Whether ``hook`` is transformers' output-capturing hook of another output than the hidden states
    (``output_attentions``: the module's output alone). The first ``output_attentions`` or
    ``output_hidden_states`` call installs such hooks for good, inert outside such calls; the hidden
    states' one may read the module's input."""
    code = getattr(hook, "__code__", None)
    if code is None or code.co_name != "output_capturing_hook" or "key" not in code.co_freevars:
        return False
    if not getattr(hook, "__module__", "").startswith("transformers."):
        return False
    return hook.__closure__[code.co_freevars.index("key")].cell_contents != "hidden_states"


def normed_projections(norm, x: torch.Tensor, projections) -> list[torch.Tensor]:
    """``[p(norm(x)) for p in projections]`` (``norm`` None: x is normalised already), as one
    ``ops.rms_norm_linear`` where that computes exactly this: the norm runs our forward with no hooks, the
    projections are plain ``nn.Linear`` in x's dtype, no autocast. Otherwise the modules' own calls."""
    if norm is None:
        return [p(x) for p in projections]
    if _fusable(norm, x, projections):
        weights, biases = [p.weight for p in projections], [p.bias for p in projections]
        return ops.rms_norm_linear(x, norm.weight, norm.variance_epsilon, weights, biases)
    x = norm(x)
    return [p(x) for p in projections]


def _fusable(norm, x: torch.Tensor, projections) -> bool:
    dtype, weight = x.dtype, norm.weight  # each module attribute read once: ~1 us of host apiece
    return (
        runs(norm, rms_norm_forward)
        and no_hooks(norm)
        and weight.dtype == dtype
        and not isinstance(weight, DTensor)
        and all(plain_linear(p) and p.weight.dtype == dtype for p in projections)
        and autocast_dtype(x) is None
    )


def mlp_forward(self, x: torch.Tensor, input_norm=None, residual=None):
    """The MLP of ``input_norm(x)`` (None: x is normalised already); with a ``residual``,
    ``(s, mlp(input_norm(s)))`` of s = residual + x."""
    # gate_proj/up_proj/down_proj stay the HF modules, so LoRA wrappers on them keep working.
    projections = (self.gate_proj, self.up_proj)
    down = self.down_proj
    # Whether the residual add and the norm run inside the gate/up projections' op: decided once per call.
    fused = (
        residual is not None
        and input_norm is not None
        and residual.dtype == x.dtype
        and _fusable(input_norm, x, projections)
    )
    if fused:
        weights, biases = [p.weight for p in projections], [p.bias for p in projections]
        eps = input_norm.variance_epsilon
        if plain_linear(down):  # the whole block as one op (eager CUDA: one autograd node)
            return ops.add_rms_norm_swiglu(
                residual, x, input_norm.weight, eps, weights, down.weight, biases, down.bias
            )
        s, (gate, up) = ops.add_rms_norm_linear(residual, x, input_norm.weight, eps, weights, biases)
    elif residual is None:
        gate, up = normed_projections(input_norm, x, projections)
    else:
        s = residual + x
        gate, up = normed_projections(input_norm, s, projections)
    if plain_linear(down):  # the gating and down projection as one op, which keeps no [N, I] product
        out = ops.swiglu_linear(gate, up, down.weight, down.bias)
    else:
        out = down(ops.swiglu(gate, up))
    return out if residual is None else (s, out)


def bound_forward(module: torch.nn.Module):
    """The function behind a forward bound on this instance (None for the class's own forward)."""
    return getattr(module.__dict__.get("forward"), "__func__", None)


# ``apply`` also keeps the function it binds as a plain attribute: while compiling, torch 2.11 traces
# ``bound_forward`` to None (silently: the layers then took the unfused path, and their compiled graph kept
# every norm's output), and a plain attribute holding a function traces exactly.
BOUND = "_chronipatch_forward"


def runs(module: torch.nn.Module, fn) -> bool:
    """Whether ``module``'s forward is ``fn`` as ``apply`` bound it. Eager calls also check the binding
    itself; compiled ones read the mark alone, so a forward rebound or deleted by hand after ``apply`` (not
    by ``revert``) is not seen there. accelerate's hooks, which rebind it, are (``_hf_hook``)."""
    if getattr(module, BOUND, None) is not fn or accelerate_hooked(module):
        return False
    return torch.compiler.is_compiling() or bound_forward(module) is fn


def accelerate_hooked(module: torch.nn.Module) -> bool:
    """Whether accelerate hooked ``module`` (offload, device maps): its forward is rebound, and its weights
    may live on the meta device outside that forward."""
    if torch.compiler.is_compiling():
        return hasattr(module, "_hf_hook")
    # A plain attribute (hasattr of a missing one raises in Module.__getattr__: a few us).
    return "_hf_hook" in module.__dict__


def own_hooks(m: torch.nn.Module) -> tuple[dict, ...]:
    """The registries of ``m``'s own forward, pre-forward, backward and pre-backward hooks."""
    return m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks


def no_hooks(m: torch.nn.Module, inert=None) -> bool:
    """No hooks of its own nor global ones: a module call would run nothing but its forward. ``inert``:
    forward hooks for which it is true do not count."""
    forward, *others = own_hooks(m)
    if any(others) or any(_GLOBAL_HOOKS):
        return False
    return not forward or (inert is not None and all(inert(hook) for hook in forward.values()))


def plain_linear(m: torch.nn.Module) -> bool:
    """Whether ``m(x)`` is exactly ``F.linear(x, m.weight, m.bias)``: an ``nn.Linear`` itself (no adapter or
    quantised subclass), no hooks of its own, accelerate's or global ones, not its own FSDP unit (whose
    forward gathers the weight), no DTensor."""
    return (
        type(m) is torch.nn.Linear
        and no_hooks(m)
        and not accelerate_hooked(m)
        and not isinstance(m, FSDPModule)
        and not isinstance(m.weight, DTensor)  # m.weight: FSDP1 sets it as a plain attribute in forward
    )


# The registries of torch.nn.modules.module.register_module_*_hook, which every module call runs.
_GLOBAL_HOOKS = tuple(
    getattr(torch.nn.modules.module, name)
    for name in (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
)


# Attention classes that read their window from the config, as stock's forwards do. Qwen2/Qwen3 decide per
# layer (an attribute); Llama has none, even where its config carries one (Llama-fied checkpoints do).
_WINDOW_FROM_CONFIG = frozenset({"MistralAttention"})


def _sliding_window(attn) -> int | None:
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    # By the class and its bases: FSDP2's FSDP<cls>, or a user's subclass that keeps the stock forward.
    if any(k.__name__ in _WINDOW_FROM_CONFIG for k in type(attn).__mro__):
        return getattr(attn.config, "sliding_window", None)
    return None


# Set by ``causal_lm.causal_lm_forward`` for calls whose mask is causal alone (see its ``_causal_only``).
CAUSAL_ONLY = "chronipatch_causal_only"


def attention_forward(
    self,
    hidden_states,
    position_embeddings,
    attention_mask=None,
    past_key_values=None,
    input_norm=None,
    **kwargs,
):
    """Llama/Qwen2/Qwen3/Mistral attention with the fused RoPE (Qwen3's q_norm/k_norm kept); with
    ``input_norm`` (the decoder layer's), ``hidden_states`` are its input, normalised with the projections."""
    input_shape = hidden_states.shape[:-1]
    window = _sliding_window(self)
    if kwargs.pop(CAUSAL_ONLY, False) and (window is None or window >= input_shape[-1]):
        attention_mask = None  # SDPA's is_causal, as stock eager runs it
    hidden_shape = (*input_shape, -1, self.head_dim)
    projections = (self.q_proj, self.k_proj, self.v_proj)
    cos, sin = position_embeddings
    # Flash/varlen kernels read q/k in the projections' [B, T, H, D] layout; masked attention (SDPA, eager)
    # runs faster on the contiguous [B, H, T, D] that stock's RoPE leaves (SDPA masked fwd+bwd: -9% time).
    dense = attention_mask is not None and "flash" not in str(self.config._attn_implementation)
    qk_norm = hasattr(self, "q_norm")
    if input_norm is not None and not qk_norm and _fusable(input_norm, hidden_states, projections):
        # q/k/v as one GEMM, q and k rotated, in one op; v a copy of its own (``rms_norm_linear_rope``).
        weights, biases = [p.weight for p in projections], [p.bias for p in projections]
        eps = input_norm.variance_epsilon
        query_states, key_states, value_states = ops.rms_norm_linear_rope(
            hidden_states, input_norm.weight, eps, weights, biases, self.head_dim, cos, sin, dense=dense
        )
    else:
        # Separate GEMMs where Qwen3's q_norm/k_norm would read stacked column views (a copy each).
        q, k, v = normed_projections(input_norm, hidden_states, projections)
        query_states, key_states = q.view(hidden_shape), k.view(hidden_shape)
        if qk_norm:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)
        value_states = v.contiguous().view(hidden_shape).transpose(1, 2)  # a no-op but for odd hooks
        query_states, key_states = ops.rope(query_states, key_states, cos, sin, dense=dense)

    # transformers >= 5.24 passes the cache as ``cache`` (and wants the call kwargs in ``update``).
    new_api = "cache" in kwargs
    cache = kwargs.pop("cache", None) if past_key_values is None else past_key_values
    if cache is not None:
        if "cu_seq_lens_q" in kwargs and self.config._attn_implementation in ("sdpa", "eager"):
            # With a cache, sdpa/eager build a plain causal mask: packed documents would see each other.
            raise ValueError(
                "chronipatch: packed rows (cu_seq_lens_q) with a KV cache under "
                f"{self.config._attn_implementation!r} attention would attend across documents; pass "
                "use_cache=False or apply(model, varlen_attention=True)"
            )
        extra = {"kwargs": kwargs} if new_api else {}
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx, **extra)

    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, eager_attention_forward
    )
    if window is not None:
        kwargs["sliding_window"] = window
    if attention_interface is sdpa_attention_forward:  # stock SDPA, not a user's registered override
        attention_interface = masked_sdpa  # the same call, its kernel cost steady over padded lengths
    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights
