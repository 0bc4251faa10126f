"""Prefix caching for models with a per-request recurrent state (core/state_prefix.py), on tiny
random models (a Mamba2 model, and Qwen3-Next: gated DeltaNet with gated attention layers):
a later prompt sharing a cached prefix starts from the state snapshot at the hit's last block
(the hit counted in the request's ``num_cached_tokens``), and its greedy tokens equal HF
transformers' and a run without prefix caching, in float32: a prompt extending an earlier one,
a prefix ending inside a block (the hit is cut back to a snapshot), chunked prefill (a snapshot
at every chunk end on a block boundary), and snapshots and blocks evicted under memory
pressure. Nothing is mocked."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tests.core.test_state_prefix import check_pool
from tests.models.test_mamba2 import mamba2_config
from tests.models.test_qwen3_next import qwen3_next_config
from tests.models.variant_parity import hf_reference, prompts, save_tiny

MAX_NEW = 6
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
A = prompts((45,), seed=7)[0]
PROMPTS = {
    "a": A,
    "longer": A + prompts((6,), seed=8)[0],  # a's prompt, then more
    "inside": A[:42] + prompts((5,), seed=9)[0],  # shares 42 tokens: ends inside a block
    "other1": prompts((44,), seed=10)[0],
    "other2": prompts((44,), seed=11)[0],
}
CONFIGS = {"mamba2": mamba2_config, "qwen3_next": qwen3_next_config}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request, tmp_path_factory):
    """(path, HF's greedy tokens per prompt name)."""
    path = save_tiny(CONFIGS[request.param](), str(tmp_path_factory.mktemp(request.param)))
    names = sorted(PROMPTS)
    tokens, _ = hf_reference(path, [PROMPTS[n] for n in names], MAX_NEW)
    return path, dict(zip(names, tokens))


def run(llm: LLM, *names: str):
    """Each prompt alone, in order (one after another: each sees the ones before cached)."""
    outs = [llm.generate([{"prompt_token_ids": PROMPTS[n]}], GREEDY, use_tqdm=False)[0]
            for n in names]
    return [list(o.outputs[0].token_ids) for o in outs], [o.num_cached_tokens for o in outs]


def test_a_longer_prompt_starts_from_the_snapshot(model):
    path, want = model
    with LLM(path, dtype="float32", block_size=4) as llm:
        tokens, cached = run(llm, "a", "longer", "a")
        kv = llm.engine.core.kv
        check_pool(kv)
        assert kv.states.num_restored == 2
    # a: 45 tokens, its state kept after 44; the longer prompt and a again start there
    assert cached == [0, 44, 44]
    assert tokens == [want["a"], want["longer"], want["a"]]
    with LLM(path, dtype="float32", block_size=4, enable_prefix_caching=False) as llm:
        assert run(llm, "a", "longer") == ([want["a"], want["longer"]], [0, 0])


def test_chunked_prefill_keeps_a_snapshot_at_each_block_boundary_chunk_end(model):
    """Chunks of 16 tokens: a's states after 16, 32 and 44 are kept; a prompt sharing a's first
    42 tokens hits 10 KV blocks (40 tokens), cut back to the snapshot after 32."""
    path, want = model
    with LLM(path, dtype="float32", block_size=4, max_num_batched_tokens=16) as llm:
        tokens, cached = run(llm, "a", "inside")
        check_pool(llm.engine.core.kv)
    assert cached == [0, 32]
    assert tokens == [want["a"], want["inside"]]


def test_snapshots_leave_with_their_evicted_blocks(model):
    """A cache of 16 blocks (64 tokens): other1 evicts a's blocks past its first 3, and a's
    snapshot (after 44) with them; the longer prompt misses and is computed whole, and evicts
    other1's snapshot the same way (only its own stays)."""
    path, want = model
    with LLM(path, dtype="float32", block_size=4, num_kv_blocks=16, recurrent_state_snapshots=4) as llm:
        tokens, cached = run(llm, "a", "other1", "longer")
        kv = llm.engine.core.kv
        check_pool(kv)
        assert len(kv.states.published) == 1 and kv.states.num_free == 3
    assert cached == [0, 0, 0]
    assert tokens == [want[n] for n in ("a", "other1", "longer")]


def test_a_full_snapshot_pool_gives_up_the_least_recently_used(model):
    """2 snapshots, blocks to spare: other2's save takes a's snapshot (the least recently used),
    so the longer prompt's KV hit of 44 tokens has no state to start from and is computed
    whole; its own save takes other1's, and other2 then hits its own (after 40)."""
    path, want = model
    names = ("a", "other1", "other2", "longer", "other2")
    with LLM(path, dtype="float32", block_size=4, recurrent_state_snapshots=2) as llm:
        tokens, cached = run(llm, *names)
        check_pool(llm.engine.core.kv)
    assert cached == [0, 0, 0, 0, 40]
    assert tokens == [want[n] for n in names]
