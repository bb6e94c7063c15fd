"""GPU invariants: 50 bf16 training steps of public configs, patched (eager and compiled) against stock and
the fp32 truth; gradient accumulation with ``num_items_in_batch``; apply/revert cycles."""

from __future__ import annotations

import pytest
import torch

import chronipatch
from invariant_probe import run_against_truth
from models import causal_lm
from test_invariants import _registry
from tiny import batch, tiny_model

pytestmark = pytest.mark.gpu
STEPS = 50


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "llama-3.2-1b"])
def test_bf16_training_matches_stock_within_bf16_noise(name):
    """A 50-step AdamW run in fp32; at every step the same weights and batch go through stock and patched
    (eager and compiled) models under bf16 autocast (Trainer's ``bf16=True``). Against the fp32 truth, the
    patched loss and every parameter's gradient may be off by at most twice the worst error stock bf16 shows
    along the run, plus a hair: loss curves and gradients match within bf16 noise, step by step, without the
    chaotic drift that would make two independent bf16 runs incomparable."""
    curve, names, errors = run_against_truth(name, 0, STEPS, ("eager", "compiled"))
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < first - 0.01, f"the run did not train: {first:.3f} -> {last:.3f}"
    noise_loss = max(errors["stock"][0])
    noise_grad = torch.stack(errors["stock"][1]).amax(0)  # worst over the run, per parameter
    print(
        f"{name}: loss {first:.3f} -> {last:.3f}; stock bf16 vs fp32: max |dloss| {noise_loss:.2e}, "
        f"relative gradient error up to {noise_grad.max():.2e}"
    )
    for v in ("eager", "compiled"):
        d_loss, d_grad = max(errors[v][0]), torch.stack(errors[v][1]).amax(0)
        print(
            f"{name} {v}: max |dloss| {d_loss:.2e}, relative gradient error up to {d_grad.max():.2e}, "
            f"worst ratio to stock's {(d_grad / noise_grad).max():.2f}"
        )
        assert d_loss <= 2 * noise_loss + 1e-3, (v, d_loss, noise_loss)
        worse = (d_grad > 2 * noise_grad + 2e-3).nonzero().flatten().tolist()
        assert not worse, [(v, names[i], d_grad[i].item(), noise_grad[i].item()) for i in worse]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gradient_accumulation_with_num_items_equals_one_big_batch_gpu(family):
    model = tiny_model(family).cuda()
    chronipatch.apply(model)
    micro = [batch(b=2, t=13, seed=1, ignore_frac=0.3), batch(b=3, t=13, seed=2, ignore_frac=0.6)]
    micro = [(ids.cuda(), labels.cuda()) for ids, labels in micro]
    num_items = sum(int((labels[:, 1:] != -100).sum()) for _, labels in micro)
    total = 0.0
    for ids, labels in micro:
        loss = model(input_ids=ids, labels=labels, num_items_in_batch=num_items).loss
        loss.backward()
        total = total + loss.detach()
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    big_ids, big_labels = (torch.cat(t) for t in zip(*micro))
    big = model(input_ids=big_ids, labels=big_labels).loss
    big.backward()
    torch.testing.assert_close(total, big.detach(), rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(accumulated[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_apply_revert_cycles_keep_gpu_memory_and_outputs():
    torch.manual_seed(0)
    model = causal_lm("qwen3-0.6b", num_hidden_layers=2, attn_implementation="sdpa")
    model = model.to("cuda", torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids)

    def cycle(i: int) -> None:
        chronipatch.apply(model, varlen_attention=i % 2 == 1)
        if i < 2 or i % 25 == 0:
            with torch.no_grad():
                model(input_ids=ids, labels=ids)
        chronipatch.revert(model)

    cycle(0)
    cycle(1)  # first registration of the varlen attention
    torch.cuda.synchronize()
    allocated, registry = torch.cuda.memory_allocated(), _registry()
    for i in range(2, 100):
        cycle(i)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated
    assert _registry() == registry
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
