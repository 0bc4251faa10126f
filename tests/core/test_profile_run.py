"""The memory-profiling forward that sizes the KV cache on accelerators."""

from __future__ import annotations

from tessellm import LLM, SamplingParams
from tessellm.layers.rotary import RotaryEmbedding


def test_profile_run_keeps_positions_inside_the_context(tiny_model_dir):
    """A profile batch larger than the context is split into prompts of at most
    ``max_model_len`` tokens: one longer prompt indexed the rotary table past its end (an
    illegal address on a GPU, found when freed memory followed the table)."""
    llm = LLM(tiny_model_dir("llama"), device="cpu", dtype="float32", max_model_len=128,
              max_num_batched_tokens=300)
    runner = llm.engine.core.runner
    table = next(m for m in runner.model.modules() if isinstance(m, RotaryEmbedding)).cos_sin_cache
    caches = [(a.k_cache, a.v_cache) for a in runner.model.attention_layers()]
    seen = []
    real = runner.model.forward

    def spy(input_ids, positions, *rest):
        seen.append(positions.clone())
        return real(input_ids, positions, *rest)

    runner.model.forward = spy
    runner.profile_run(table.shape[0] + 300)  # more tokens than the rotary table has rows
    del runner.model.forward
    positions = seen[0]
    assert positions.numel() == table.shape[0] + 300
    assert int(positions.max()) == 127  # every prompt fits the context
    for a, (k, v) in zip(runner.model.attention_layers(), caches):  # profile_run frees them
        a.k_cache, a.v_cache = k, v
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}],
                       SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
