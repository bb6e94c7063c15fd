"""Public model configs (random init, nothing downloaded) used by benchmarks and GPU tests."""

from __future__ import annotations

import transformers

PUBLIC = {
    # Qwen/Qwen2.5-0.5B config.json
    "qwen2.5-0.5b": (
        "Qwen2Config",
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            hidden_act="silu",
        ),
    ),
    # meta-llama/Llama-3.2-1B config.json
    "llama-3.2-1b": (
        "LlamaConfig",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=128256,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            tie_word_embeddings=True,
            hidden_act="silu",
            rope_scaling=dict(
                rope_type="llama3",
                factor=32.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
        ),
    ),
    # Qwen/Qwen3-0.6B config.json
    "qwen3-0.6b": (
        "Qwen3Config",
        dict(
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            hidden_act="silu",
        ),
    ),
}


# A tiny stand-in for any public config: CPU smoke runs of the benchmarks.
SMOKE_CONFIG = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
)


def public_config(name: str, **overrides) -> transformers.PretrainedConfig:
    cls, kw = PUBLIC[name]
    return getattr(transformers, cls)(**{**kw, **overrides})


def causal_lm(name: str, **overrides):
    cfg = public_config(name, **overrides)
    return transformers.AutoModelForCausalLM.from_config(cfg)
