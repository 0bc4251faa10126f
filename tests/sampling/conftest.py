"""A tiny random llama that has a real tokenizer (the bundled SmolLM2's, saved next to it), so
text-level parameters (bad words, beam search text) run on a model that costs milliseconds."""

from __future__ import annotations

import os

import pytest

# tests/conftest.py's TINY_COMMON shape (that module is not importable from here by name)
_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)


@pytest.fixture(scope="session")
def tokenized_model(tmp_path_factory) -> str:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tessellm.loader.default_model import default_model_path
    from tessellm.loader.gguf_loader import load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer(default_model_path())
    path = os.path.join(tmp_path_factory.mktemp("tiny-tokenized"), "llama")
    config = LlamaConfig(**_SHAPE, vocab_size=len(tokenizer), tie_word_embeddings=False,
                         initializer_range=0.1, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(4321)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
