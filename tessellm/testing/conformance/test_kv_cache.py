"""KV cache memory accounting on the backend's device: blocks x bytes per block, exactly."""

from __future__ import annotations

import pytest
import torch

from tessellm.testing.harness import TINY_LLAMA, greedy_tokens


def test_kv_cache_bytes(target, tiny_llama_dir):
    target.skip_if_emulated("allocating the KV cache")
    from tessellm import LLM

    blocks, bs = 5, 16  # 80 tokens of cache, under max_model_len
    llm = LLM(tiny_llama_dir, device=target.name, dtype="float32", block_size=bs,
              num_kv_blocks=blocks, max_model_len=128, max_num_seqs=4)
    runner = llm.engine.core.runner
    layers = runner.model.attention_layers()
    kvh = TINY_LLAMA["num_key_value_heads"]
    head = TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"]
    per_block = TINY_LLAMA["num_hidden_layers"] * 2 * bs * kvh * head * 4
    assert runner.kv_bytes_per_block(torch.float32) == per_block
    total = 0
    for attn in layers:
        for cache in (attn.k_cache, attn.v_cache):
            assert tuple(cache.shape) == (blocks, bs, kvh, head)
            assert cache.dtype == torch.float32
            assert cache.device.type == target.backend.device_type
            total += cache.numel() * cache.element_size()
    assert total == blocks * per_block
    assert llm.engine.core.info.num_kv_blocks == blocks
    # Capacity is enforced at the edge: a prompt needing more blocks than exist is refused...
    with pytest.raises(ValueError, match="KV cache"):
        llm.generate([{"prompt_token_ids": [5] * (blocks * bs + 10)}], use_tqdm=False)
    # ...and the engine goes on serving.
    assert len(greedy_tokens(llm, [[1, 2, 3]], 4)[0]) == 4


def test_memory_info(target):
    target.skip_if_emulated("memory_info")
    info = target.backend.memory_info
    if info is None:
        pytest.skip(f"{target.name} reports no memory info")
    free, total = info()
    assert isinstance(free, int) and isinstance(total, int) and 0 <= free <= total and total > 0
