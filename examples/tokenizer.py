"""A character-level ChatML tokenizer built in memory, so the examples need no download."""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|pad|>", "<|eos|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
# Printable ASCII with space and newline; string.printable's other whitespace (tab, CR, VT, FF) is left out.
CHARACTERS = sorted(set(string.printable) - set("\t\r\x0b\x0c"))

# ChatML as in Qwen2.5: each message ends "<|im_end|>\n", the generation prompt is "<|im_start|>assistant\n".
# So a prompt rendered with add_generation_prompt=True is a token prefix of prompt + completion, which is
# what TRL's prompt-completion preparation relies on to place the completion mask.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, plus the ChatML specials; pad and eos set, ChatML template."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    # BPE without merges and without a pre-tokenizer splits every string into its characters; special
    # tokens are matched as whole strings before that, so "<|im_end|>" in text is one token.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.decoder = decoders.Fuse()  # join characters without the space the default decoder puts between tokens
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|eos|>",
        unk_token="<|unk|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        model_max_length=4096,
    )
