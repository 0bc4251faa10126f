"""Prefix caching and speculative decoding together on models with a per-request recurrent
state (core/state_prefix.py, core/mamba_state.py): prompts sharing a prefix start from the
snapshot at the hit's last block, and a request that speculates keeps the state after its
*accepted* tokens at each block boundary they cross (a verify step of ``k + 1`` tokens may cross
one in its middle: the snapshot is its per-token state there), so a later prompt of the prompt
and the answer (a next chat turn) hits through the answer and speculates on from the restored
state.

Tiny random Mamba2, Qwen3-Next and (slow) Granite 4.0-H models built from HF configs, greedy in
float32, a vocabulary of 16 tokens and prompts that repeat themselves (n-gram drafts both
accepted and rejected): HF transformers' tokens, with the hits asserted. A snapshot taken past a
rejected draft, or from the wrong token of a verify step, changes the next turn's tokens (the
weights are sharp). Nothing is mocked."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tests.core.test_state_prefix import check_pool
from tests.models.variant_parity import hf_reference, prompts, save_tiny
from tests.spec_decode.test_recurrent_spec import NGRAM, VOCAB

BLOCK = 4
MAX_NEW = 20
ENGINE = dict(device="cpu", dtype="float32", seed=0, block_size=BLOCK, num_kv_blocks=128)
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
_a, _b = prompts((5, 3), VOCAB, seed=11)
A = _a * 3 + _b  # 18 tokens that repeat themselves: drafts to find


def _config(name: str, **overrides):
    if name == "mamba2_4":  # EAGLE-3 reads three distinct layers
        return _config("mamba2", num_hidden_layers=4, **overrides)
    if name == "mamba2":
        from tests.models.test_mamba2 import mamba2_config

        return mamba2_config(vocab_size=VOCAB, **overrides)
    if name == "granite4h":
        from tests.models.test_granite_moe_hybrid import granite_hybrid_config

        return granite_hybrid_config(vocab_size=VOCAB, **overrides)
    from tests.models.test_qwen3_next import qwen3_next_config

    return qwen3_next_config(vocab_size=VOCAB, **overrides)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    paths: dict = {}

    def get(name: str) -> str:
        if name not in paths:
            paths[name] = save_tiny(_config(name), str(tmp_path_factory.mktemp(name)))
        return paths[name]
    return get


_HF: dict = {}


def _hf(path: str) -> tuple[list[list[int]], list[list[int]]]:
    """The three prompts (A; a prompt extending A; A and HF's answer but its last token, the
    tokens A's request computed: a hit there leaves one token to compute, so the restored state
    decides the next tokens) and HF's greedy tokens for them, computed once per model."""
    if path not in _HF:
        (answer,), _ = hf_reference(path, [A], MAX_NEW)
        longer = A + prompts((3,), VOCAB, seed=21)[0]
        turn = A + answer[:-1]  # what A's request computed: the hit leaves one token to compute
        want, _ = hf_reference(path, [longer, turn], MAX_NEW)
        _HF[path] = [A, longer, turn], [answer] + want
    return _HF[path]


def _turns(llm: LLM, path: str):
    """The three prompts, each alone, in order (each sees the ones before cached). Returns
    (tokens, HF's tokens, cached tokens) per prompt."""
    prompt_list, want = _hf(path)
    outs = [llm.generate([{"prompt_token_ids": p}], GREEDY, use_tqdm=False)[0] for p in prompt_list]
    return [list(o.outputs[0].token_ids) for o in outs], want, [o.num_cached_tokens for o in outs]


@pytest.mark.parametrize("name", ["mamba2", "qwen3_next",
                                  pytest.param("granite4h", marks=pytest.mark.slow)])
def test_ngram_with_prefix_caching_hits_through_a_speculated_answer(name, saved):
    """A (18 tokens) keeps its state after 16 (its prefill) and, as it speculates, after each
    block boundary of its answer whose token before was accepted: the latest, 36 (A's 18 + 20
    sampled, the last one never computed: 37 computed; in this run a verify step first reached
    36 past a rejected draft, whose state must not be kept). The longer prompt hits 16, A and
    its answer 36; the tokens are HF's and drafts were both accepted and rejected."""
    path = saved(name)
    with LLM(path, speculative_config=NGRAM, **ENGINE) as llm:
        tokens, want, cached = _turns(llm, path)
        core = llm.engine.core
        check_pool(core.kv)
        stats = core.scheduler.spec_stats
        assert core.kv.states.num_restored == 2
    assert tokens == want
    assert cached == [0, 16, (len(A) + MAX_NEW - 1) // BLOCK * BLOCK]
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


def test_async_scheduling_with_drafts_reserved_ahead(saved):
    """Async scheduling: a step ahead verifies drafts reserved before the step in flight's
    accepted count is known (core/spec_ahead.py), so only the runner knows where its tokens
    start. It lists every boundary from the request's computed tokens to its furthest token
    (sharing a slot with the step in flight where both list one); whichever step computed and
    kept the token before a boundary keeps its snapshot. The same hits, HF's tokens."""
    path = saved("mamba2")
    with LLM(path, speculative_config=NGRAM, async_scheduling=True, **ENGINE) as llm:
        assert llm.engine.core.async_scheduling
        tokens, want, cached = _turns(llm, path)
        check_pool(llm.engine.core.kv)
    assert tokens == want
    assert cached == [0, 16, (len(A) + MAX_NEW - 1) // BLOCK * BLOCK]


@pytest.mark.parametrize("method", ["draft_model", "eagle3"])
def test_drafters_with_prefix_caching(method, saved, tmp_path):
    """An attention-only draft model (a tiny random Llama) over Mamba2, and a random EAGLE-3
    head over a 4-layer Mamba2 (reading layers 0, 2 and 3): the same hits, HF's tokens (a
    drafter's own KV for a hit prefix is the cached blocks')."""
    if method == "draft_model":
        from transformers import LlamaConfig

        from tests.models.variant_parity import TINY

        path = saved("mamba2")
        draft = save_tiny(LlamaConfig(**{**TINY, "vocab_size": VOCAB, "num_hidden_layers": 1}),
                          str(tmp_path / "draft"), seed=4)
    else:
        from tests.spec_decode.test_recurrent_spec import _save_eagle3_head

        path = saved("mamba2_4")
        draft = _save_eagle3_head(str(tmp_path / "eagle3"), [0, 2, 3])
    spec = {"method": method, "model": draft, "num_speculative_tokens": 3}
    with LLM(path, speculative_config=spec, **ENGINE) as llm:
        tokens, want, cached = _turns(llm, path)
        check_pool(llm.engine.core.kv)
    assert tokens == want
    assert cached == [0, 16, (len(A) + MAX_NEW - 1) // BLOCK * BLOCK]


@pytest.mark.gpu
@pytest.mark.parametrize("name,method", [("mamba2", "ngram"), ("granite4h", "ngram"),
                                         ("granite4h", "eagle3")])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_cuda_speculation_with_prefix_caching(name, method, async_scheduling, tmp_path,
                                              monkeypatch):
    """On a CUDA GPU: the Triton one-token kernels composed per verify position, decode graphs
    beside eager verify steps (n-gram; EAGLE-3 reads hidden states, so its target runs
    eagerly), the snapshot copies eager around them; the same hits and HF's tokens, with and
    without async scheduling."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from tests.models.test_mamba2 import hf_norms_each_group
    from tests.spec_decode.test_recurrent_spec import _save_eagle3_head

    monkeypatch.delenv("TESSELLM_RECURRENT_STATE_GRAPHS", raising=False)  # on by default
    config = _config(name)
    if not hf_norms_each_group(config):  # older HF norms all groups at once
        config = _config(name, **{"n_groups" if name == "mamba2" else "mamba_n_groups": 1})
    path = save_tiny(config, str(tmp_path / name))
    spec = NGRAM if method == "ngram" else {
        "method": "eagle3", "model": _save_eagle3_head(str(tmp_path / "eagle3"), [0, 1, 2]),
        "num_speculative_tokens": 3}
    with LLM(path, speculative_config=spec, async_scheduling=async_scheduling,
             **{**ENGINE, "device": "cuda"}) as llm:
        assert llm.engine.core.runner.graph_runner is not None
        tokens, want, cached = _turns(llm, path)
    assert tokens == want
    assert cached == [0, 16, (len(A) + MAX_NEW - 1) // BLOCK * BLOCK]
