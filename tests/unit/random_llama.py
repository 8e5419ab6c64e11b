"""A small llama of mlx-lm's own class with seeded random weights, built in memory
for engine unit tests (no files, no tokenizer: the tests feed token ids)."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models import llama


def random_llama(
    *,
    vocab: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    context: int = 512,
    tied: bool = True,
    seed: int = 0,
) -> llama.Model:
    """``tied=False`` for tests that compare tokens: a random model with tied
    embeddings only repeats its last prompt token."""
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        rms_norm_eps=1e-5,
        vocab_size=vocab,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        tie_word_embeddings=tied,
    )
    mx.random.seed(seed)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model
