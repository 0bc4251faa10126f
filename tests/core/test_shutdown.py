"""LLM.shutdown() and leaving ``with LLM(...)`` release the model and KV cache at once (not when
the LLM object is collected), so a second LLM in the same process can take the memory again."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from tessellm import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def _engine_tensors(llm) -> list[weakref.ref]:
    runner = llm.engine.core.runner
    refs = [weakref.ref(p) for p in runner.model.parameters()]
    for attn in runner.model.attention_layers():
        refs += [weakref.ref(attn.k_cache), weakref.ref(attn.v_cache)]
    return refs


@pytest.mark.parametrize("how", ["shutdown", "with"])
def test_engine_tensors_are_released(tiny_model_dir, how):
    path = tiny_model_dir("llama")
    if how == "shutdown":
        llm = LLM(path, device="cpu", num_kv_blocks=16)
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], GREEDY, use_tqdm=False)
        refs = _engine_tensors(llm)
        llm.shutdown()
    else:
        with LLM(path, device="cpu", num_kv_blocks=16) as llm:
            llm.generate([{"prompt_token_ids": [1, 2, 3]}], GREEDY, use_tqdm=False)
            refs = _engine_tensors(llm)
    gc.collect()
    alive = [r for r in refs if r() is not None]
    assert refs and not alive, f"{len(alive)} of {len(refs)} engine tensors outlived shutdown()"
    llm.shutdown()  # idempotent


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_second_llm_takes_the_gpu_again():
    """Llama-3.1-8B shapes (dummy weights): the KV cache, not a cap, takes the 90%."""
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "model-configs", "llama-3.1-8b")
    kwargs = dict(device="cuda", load_format="dummy", max_model_len=8192, gpu_memory_utilization=0.9)
    first = LLM(path, **kwargs)
    blocks = first.engine.core.info.num_kv_blocks
    expected = first.generate([{"prompt_token_ids": [1, 2, 3]}], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    first.shutdown()
    with LLM(path, **kwargs) as second:  # failed before: "No memory is left for the KV cache"
        assert second.engine.core.info.num_kv_blocks >= 0.95 * blocks
        out = second.generate([{"prompt_token_ids": [1, 2, 3]}], GREEDY, use_tqdm=False)
        assert out[0].outputs[0].token_ids == expected
