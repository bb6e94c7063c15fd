"""The patched CausalLM forward keeps stock's contract where the fused loss cannot stand in for the head's
call: hooked or accelerate-offloaded heads and projections, ``shift_labels`` without labels, unbatched
labels."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import chronipatch
from chronipatch import causal_lm
from tiny import batch, tiny_model


def _pair(family="llama"):
    stock = tiny_model(family)
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched)
    return stock, patched


def _losses_and_grads(model, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(**kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(ours, theirs):
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    assert ours[1].keys() == theirs[1].keys()
    for name, grad in theirs[1].items():
        torch.testing.assert_close(ours[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward"])
def test_hooked_head_runs_its_call_and_stock_loss(kind):
    """A hook on lm_head changes what stock's loss reads (or its gradients): the patched model calls the head
    and takes stock's loss of its logits, with a warning, instead of reading the weight past the hook."""
    stock, patched = _pair()
    for model in (stock, patched):
        head = model.lm_head
        if kind == "forward":
            head.register_forward_hook(lambda mod, args, out: out * 2)
        elif kind == "forward_pre":
            head.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))
        else:
            head.register_full_backward_hook(lambda mod, gin, gout: (gin[0] * 3,))
    ids, labels = batch()
    theirs = _losses_and_grads(stock, input_ids=ids, labels=labels)
    with pytest.warns(UserWarning, match="lm_head has hooks"):
        ours = _losses_and_grads(patched, input_ids=ids, labels=labels)
    _assert_same(ours, theirs)


def test_unhooked_head_is_fused_again(op_calls):
    _, patched = _pair()
    ids, labels = batch()
    handle = patched.lm_head.register_forward_hook(lambda mod, args, out: out)
    assert not causal_lm.plain_head(patched.lm_head)
    op_calls.clear()
    with pytest.warns(UserWarning):
        patched(input_ids=ids, labels=labels)
    assert op_calls["linear_cross_entropy"] == 0
    handle.remove()
    assert causal_lm.plain_head(patched.lm_head)
    patched(input_ids=ids, labels=labels)
    assert op_calls["linear_cross_entropy"] == 1


@pytest.mark.parametrize("order", ["apply_then_offload", "offload_then_apply"])
def test_accelerate_offloaded_model_matches_stock(order):
    """accelerate's offload keeps every weight on the meta device outside its module's hooked call: the
    patched model calls those modules (MLP down projection, norms, head) and matches the stock model."""
    accelerate = pytest.importorskip("accelerate")
    stock = tiny_model("llama")
    ids, labels = batch()
    theirs = stock(input_ids=ids, labels=labels).loss
    model = copy.deepcopy(stock)
    if order == "apply_then_offload":
        chronipatch.apply(model)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    if order == "offload_then_apply":
        chronipatch.apply(model)
    assert model.model.layers[0].mlp.down_proj.weight.device.type == "meta"
    # Offloaded first, the root's forward is accelerate's: apply leaves it (stock's head and loss).
    fused_root = order == "apply_then_offload"
    with pytest.warns(UserWarning, match="lm_head has hooks") if fused_root else contextlib.nullcontext():
        ours = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_shift_labels_without_labels_give_no_loss():
    """Stock computes a loss only where ``labels`` are given (``shift_labels`` then replace their shift)."""
    stock, patched = _pair("qwen2")
    ids, labels = batch()
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    ours, theirs = patched(input_ids=ids, shift_labels=shifted), stock(input_ids=ids, shift_labels=shifted)
    assert ours.loss is None and theirs.loss is None
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    odd = torch.full_like(shifted, 3)  # not the labels' shift: the loss follows shift_labels, as stock's
    ours, theirs = (m(input_ids=ids, labels=labels, shift_labels=odd).loss for m in (patched, stock))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_unbatched_labels_of_one_row():
    """1-D labels with a batch of one, which stock's flattening loss takes; a larger batch still raises."""
    stock, patched = _pair("mistral")
    ids, labels = batch()
    for kw in (dict(labels=labels[0]), dict(labels=labels[0], shift_labels=labels[0].roll(-1))):
        ours, theirs = (m(input_ids=ids[:1], **kw).loss for m in (patched, stock))
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        patched(input_ids=ids, labels=labels[0])


def test_hooked_head_compiles_in_one_graph():
    stock, patched = _pair()
    for model in (stock, patched):
        model.lm_head.register_forward_hook(lambda mod, args, out: out * 2)
    ids, labels = batch()
    torch._dynamo.reset()
    ours = torch.compile(patched, fullgraph=True)(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(ours, stock(input_ids=ids, labels=labels).loss, rtol=1e-5, atol=1e-6)


@pytest.fixture
def world_of_one():
    """A gloo process group of this process alone, for FSDP2's ``fully_shard``."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp2_gathering_hooks_leave_the_head_fused(op_calls, world_of_one):
    """FSDP2's own hooks on the head (a unit of its own, or shared with the embedding: ``fully_shard([...])``
    registers closures) are not a user's: the loss stays fused and equals stock's; a user's hook is seen."""
    from torch.distributed.fsdp import fully_shard

    stock, patched = _pair()
    fully_shard([patched.lm_head, patched.model.embed_tokens])
    fully_shard(patched)
    assert causal_lm.plain_head(patched.lm_head)
    ids, labels = batch()
    op_calls.clear()
    ours = patched(input_ids=ids, labels=labels)
    assert op_calls["linear_cross_entropy"] == 1 and ours.logits is None
    torch.testing.assert_close(ours.loss, stock(input_ids=ids, labels=labels).loss, rtol=1e-5, atol=1e-6)
    patched.lm_head.register_forward_hook(lambda mod, args, out: out)
    assert not causal_lm.plain_head(patched.lm_head)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fsdp2_sharded_layers_are_swapped(op_calls, family, world_of_one):
    """``fully_shard`` on each decoder layer makes an ``FSDP<cls>`` subclass whose forward transformers'
    ``GradientCheckpointingLayer`` wraps once more: the layers are still swapped (their norms run inside the
    projections), and loss and gradients equal stock's."""
    from torch.distributed.fsdp import fully_shard

    stock = tiny_model(family)
    patched = copy.deepcopy(stock)
    for layer in patched.model.layers:
        fully_shard(layer)
    fully_shard(patched)
    report = chronipatch.apply(patched)
    ids, labels = batch()
    op_calls.clear()
    ours = _losses_and_grads(patched, input_ids=ids, labels=labels)
    # Each layer's two norms inside the projections they feed (the MLP's with the residual add).
    n_layers = len(patched.model.layers)
    assert report.ops()["rms_norm_linear"] == n_layers, str(report)
    assert op_calls["rms_norm_linear"] == 2 * op_calls["add_rms_norm_swiglu"] == 2 * n_layers
    grads = {name: grad.full_tensor() for name, grad in ours[1].items()}
    _assert_same((ours[0], grads), _losses_and_grads(stock, input_ids=ids, labels=labels))


def test_global_module_hooks_leave_the_head_fused(op_calls):
    """A measuring tool's global module hooks (``FlopCounterMode``) do not unfuse the loss."""
    from torch.utils.flop_counter import FlopCounterMode

    _, patched = _pair()
    ids, labels = batch()
    op_calls.clear()
    with FlopCounterMode(display=False):
        patched(input_ids=ids, labels=labels)
    assert op_calls["linear_cross_entropy"] == 1


class _HalvedHead(torch.nn.Linear):
    """A user's head with a forward of its own (a logit scale, a quantised matmul)."""

    def forward(self, x):
        return super().forward(x) * 0.5


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: setattr(m.lm_head, "bias", torch.nn.Parameter(torch.linspace(-3, 3, 211))),
        lambda m: setattr(m, "lm_head", torch.nn.Linear(64, 211, bias=True)),
        lambda m: setattr(m, "lm_head", _HalvedHead(64, 211, bias=False)),
    ],
    ids=["bias-added", "biased-linear", "own-forward"],
)
def test_head_changed_after_apply_runs_its_own_call(edit):
    """``apply`` found a plain bias-free head; one changed since (a bias, another module) is checked again at
    each call: the head's own call and stock's loss, with a warning, not a loss of its weight alone."""
    stock, patched = _pair()
    for model in (stock, patched):
        torch.manual_seed(1)
        edit(model)
    ids, labels = batch()
    with pytest.warns(UserWarning, match="a bias or a forward of its own"):
        ours = _losses_and_grads(patched, input_ids=ids, labels=labels)
    _assert_same(ours, _losses_and_grads(stock, input_ids=ids, labels=labels))


@pytest.mark.parametrize("tied", [False, True], ids=["lora-on-lm_head", "trainable-tokens-tied"])
def test_peft_adapters_on_the_head_after_apply_run_its_own_call(tied):
    """peft wrapping after ``apply`` with adapters on the head (LoRA on lm_head; trainable tokens on tied
    embeddings, which wrap the head too): stock's loss and gradients, through the head's own call."""
    peft = pytest.importorskip("peft")

    def config():
        if tied:
            return peft.TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[1, 2, 3])
        return peft.LoraConfig(r=4, target_modules=["lm_head", "q_proj"], init_lora_weights=False)

    stock = tiny_model("llama", tie_word_embeddings=tied)
    patched = copy.deepcopy(stock)
    chronipatch.apply(patched)
    torch.manual_seed(2)
    stock = peft.get_peft_model(stock, config())
    torch.manual_seed(2)
    patched = peft.get_peft_model(patched, config())
    ids, labels = batch()
    with pytest.warns(UserWarning, match="adapters"):
        ours = _losses_and_grads(patched, input_ids=ids, labels=labels)
    _assert_same(ours, _losses_and_grads(stock, input_ids=ids, labels=labels))


@pytest.mark.parametrize(
    "keep",
    [torch.tensor([[1, 4], [0, 6]]), torch.tensor([2, 5]), torch.arange(34).view(2, 17) % 3 == 0],
    ids=["positions-per-row", "positions", "bool-mask"],
)
def test_logits_to_keep_as_tensors_slices_as_stock(keep):
    """``logits_to_keep`` as positions per row ``[B, P]``, shared positions ``[P]`` or a bool mask ``[B, T]``
    (transformers' own slicing where it has one): stock's logits, shape and values."""
    import transformers.modeling_utils as mu

    if keep.dim() == 2 and not hasattr(mu, "slice_logits_to_keep"):
        pytest.skip("this transformers slices by 1-D positions only")
    stock, patched = _pair()
    ids, _ = batch()
    with torch.no_grad():
        want = stock.eval()(ids, logits_to_keep=keep).logits
        got = patched.eval()(ids, logits_to_keep=keep).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _needs_bool_masks():
    import transformers.modeling_utils as mu

    if not hasattr(mu, "slice_logits_to_keep"):
        pytest.skip("this transformers slices by 1-D positions only")


def _every_third_left_out(labels):
    """A bool ``logits_to_keep`` leaving out every third position, and ``shift_labels`` of the kept ones."""
    keep = torch.arange(labels.numel()).view(labels.shape) % 3 != 0
    return keep, torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)[keep]


@pytest.mark.parametrize("targets", ["shift_labels", "labels"])
def test_loss_of_rows_a_bool_mask_keeps_is_stock(op_calls, targets):
    """A bool ``logits_to_keep`` [B, T] keeps [num_true, H] rows (transformers' form for packed training):
    their fused loss, against ``shift_labels`` of the kept positions or (every position kept) the labels
    shifted within each row, with ``num_items_in_batch``, equals stock's, gradients too."""
    _needs_bool_masks()
    stock, patched = _pair()
    ids, labels = batch()
    labels[0, :3] = -100
    if targets == "labels":
        keep = torch.ones_like(labels, dtype=torch.bool)
        kw = dict(labels=labels, num_items_in_batch=torch.tensor(7))
    else:
        keep, shifted = _every_third_left_out(labels)
        kw = dict(labels=labels, shift_labels=shifted, num_items_in_batch=torch.tensor(7))
    op_calls.clear()
    ours = _losses_and_grads(patched, input_ids=ids, logits_to_keep=keep, **kw)
    assert op_calls["linear_cross_entropy"] == 1
    _assert_same(ours, _losses_and_grads(stock, input_ids=ids, logits_to_keep=keep, **kw))


def test_bool_mask_loss_compiles_in_one_graph_and_names_a_short_target():
    """The kept rows' count is data-dependent: compiled with ``fullgraph`` (dynamo capturing the mask's
    output shape, as stock needs too) the loss equals stock's eager one; eager, a mask that keeps fewer rows
    than the plain labels' targets raises naming both counts."""
    _needs_bool_masks()
    stock, patched = _pair()
    ids, labels = batch()
    keep, shifted = _every_third_left_out(labels)
    want = stock(input_ids=ids, labels=labels, shift_labels=shifted, logits_to_keep=keep).loss
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(patched, fullgraph=True)
        got = compiled(input_ids=ids, labels=labels, shift_labels=shifted, logits_to_keep=keep).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    kept = int(keep.sum())
    with pytest.raises(
        ValueError, match=rf"keeps {kept} positions, and the loss has {labels.numel()} targets"
    ):
        patched(input_ids=ids, labels=labels, logits_to_keep=keep)
