"""Tiny random-init configs of every supported family (CPU tests)."""

from __future__ import annotations

import torch
import transformers

COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=211,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    attn_implementation="sdpa",
)
FAMILIES = {
    "llama": ("LlamaConfig", dict(head_dim=16)),
    "qwen2": ("Qwen2Config", dict()),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "mistral": ("MistralConfig", dict(head_dim=16, sliding_window=None)),
}


def tiny_model(family: str, dtype=torch.float32, seed: int = 0, **overrides):
    cls, extra = FAMILIES[family]
    cfg = getattr(transformers, cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    # Random norm weights, so that a swapped norm that ignored its weight would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return model


def batch(vocab: int = 211, b: int = 2, t: int = 17, seed: int = 0, ignore_frac: float = 0.25):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[torch.rand(b, t, generator=g) < ignore_frac] = -100
    return ids, labels


def tiny_tokenizer():
    """A character-level fast tokenizer built in memory (nothing downloaded)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    chars = list("0123456789+-*=:abcdefghijklmnopqrstuvwxyz ")
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def addition_dataset(n: int = 64, seed: int = 0):
    """Prompt/completion pairs 'a+b=' -> 'c' with ragged lengths."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10 ** rng.randint(1, 4)), rng.randrange(10 ** rng.randint(1, 4))
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return Dataset.from_list(rows)


def loss_and_grads(model, ids, labels, **kw):
    """A fresh backward of ``model``'s loss: the loss and every parameter's gradient by name."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    grads = {
        n.removeprefix("_orig_mod."): p.grad.clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    return out.loss.detach(), grads


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    """Two ``loss_and_grads`` results agree: the loss and the same gradients by name."""
    loss_a, grads_a = a
    loss_b, grads_b = b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)
