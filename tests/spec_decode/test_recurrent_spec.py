"""Speculative decoding on models whose layers keep a per-request recurrent state (Mamba2
mixers, gated DeltaNet): a verify step keeps the state after each of its tokens and the next
step keeps the one after the accepted prefix (``core/mamba_state.py``,
``backends/reference/recurrent_verify.py``).

Tiny random Mamba2, Granite 4.0-H (Mamba + attention + MoE) and Qwen3-Next (gated DeltaNet +
gated attention + MoE) models built from HF configs, greedy in float32, a vocabulary of
``VOCAB`` tokens and prompts that repeat themselves, so n-gram drafts are both accepted and
rejected: the tokens equal the run without speculation (whose tokens equal HF's:
tests/models), and the counters show both outcomes. A state kept past a rejected draft would
change the later tokens (the models' weights are sharp: ``TINY``'s initializer range). Nothing
is mocked."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tests.models.variant_parity import prompts, save_tiny

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}
ENGINE = dict(device="cpu", dtype="float32", seed=0, block_size=4, num_kv_blocks=128)
VOCAB = 16  # small: a random model's greedy tokens often repeat an earlier n-gram


def repetitive_prompts() -> list[list[int]]:
    """Prompts that repeat a phrase (drafts to find) and one that does not (drafts rare)."""
    a, b, c = prompts((5, 3, 7), VOCAB, seed=11)
    return [a * 3, b * 4 + a[:2], c + c[:4], prompts((9,), VOCAB, seed=12)[0]]


def generate(path: str, spec=None, max_tokens: int = 20, **engine):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    with LLM(path, speculative_config=spec, **{**ENGINE, **engine}) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in repetitive_prompts()], params,
                            use_tqdm=False)
        core = llm.engine.core
        stats = core.scheduler.spec_stats.copy() if spec is not None else None
        if spec is not None and not getattr(core, "async_scheduling", False):
            cache = core.executor.worker.runner.mamba
            assert cache.spec_tokens == spec["num_speculative_tokens"]
    return [list(o.outputs[0].token_ids) for o in outs], stats


def assert_spec_matches_plain(path: str, spec=NGRAM, **engine) -> None:
    want, _ = generate(path, **engine)
    got, stats = generate(path, spec, **engine)
    assert got == want
    assert stats.num_drafts > 0
    assert 0 < stats.num_accepted_tokens, "some drafts should be accepted"
    assert stats.num_accepted_tokens < stats.num_draft_tokens, "some drafts should be rejected"


@pytest.fixture(scope="module")
def mamba2_dir(tmp_path_factory):
    from tests.models.test_mamba2 import mamba2_config

    return save_tiny(mamba2_config(vocab_size=VOCAB), str(tmp_path_factory.mktemp("mamba2spec")))


@pytest.fixture(scope="module")
def qwen3_next_dir(tmp_path_factory):
    from tests.models.test_qwen3_next import qwen3_next_config

    return save_tiny(qwen3_next_config(vocab_size=VOCAB), str(tmp_path_factory.mktemp("qwen3nextspec")))


def test_ngram_on_mamba2_equals_plain_greedy(mamba2_dir):
    assert_spec_matches_plain(mamba2_dir)


def test_ngram_on_mamba2_with_chunked_prefill_and_async_scheduling(mamba2_dir):
    """A small token budget mixes verify steps with prefill chunks and cuts drafts; async
    scheduling verifies drafts reserved a step ahead (core/spec_ahead.py)."""
    assert_spec_matches_plain(mamba2_dir, max_num_batched_tokens=12, async_scheduling=True)


def test_ngram_on_granite_hybrid_equals_plain_greedy(tmp_path):
    from tests.models.test_granite_moe_hybrid import granite_hybrid_config

    path = save_tiny(granite_hybrid_config(vocab_size=VOCAB), str(tmp_path / "granite"))
    assert_spec_matches_plain(path, max_num_batched_tokens=16)


def test_ngram_on_qwen3_next_equals_plain_greedy(qwen3_next_dir):
    assert_spec_matches_plain(qwen3_next_dir)


def test_unserved_methods_are_refused(mamba2_dir, tmp_path):
    with pytest.raises(ValueError, match="does not support speculative decoding with method "
                                         "'draft_model' yet; use method ngram, mtp, replay"):
        LLM(mamba2_dir, dtype="float32",
            speculative_config={"method": "draft_model", "model": str(tmp_path),
                                "num_speculative_tokens": 2})
