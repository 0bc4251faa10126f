"""Rotary tables sized by the positions the engine can rotate (``max_model_len`` plus a
drafter's lookahead), not by the model's ``max_position_embeddings``: a config claiming 1M
positions served at 64 holds 64 rows (Llama 4 Scout's 10M would be 5 GB a device), the rows
kept equal the full table's for every scaling type, and greedy tokens still equal HF's."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.backends.reference.ops import ReferenceOps
from tessellm.layers.rotary import RotaryEmbedding
from tests.conftest import hf_greedy

HUGE = 1 << 20
MAX_LEN = 64
CFG = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=HUGE,
           tie_word_embeddings=False, initializer_range=0.25)
ENGINE = dict(device="cpu", dtype="float32", block_size=4, max_model_len=MAX_LEN, max_num_seqs=4)
PROMPTS = [[(7 * i + 3 * j) % 383 + 1 for j in range(n)] for i, n in enumerate((5, 23, 41))]


@pytest.fixture(scope="module")
def huge_llama(tmp_path_factory):
    """A tiny Llama whose config claims 1M positions, llama3-scaled as Llama 3.1's."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**CFG, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 8192})
    torch.manual_seed(7)
    path = str(tmp_path_factory.mktemp("huge-rope") / "llama")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


def _rotary_rows(model) -> list[int]:
    return [m.cos_sin_cache.shape[0] for m in model.modules() if isinstance(m, RotaryEmbedding)]


def test_cache_holds_max_model_len_rows_and_generates_like_hf(huge_llama):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_LEN - 41, ignore_eos=True)
    with LLM(huge_llama, **ENGINE) as llm:
        rows = _rotary_rows(llm.engine.core.runner.model)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    assert rows == [MAX_LEN]  # one table shared by the layers; 1M rows (64 MB) before the cap
    want = hf_greedy(huge_llama, PROMPTS, MAX_LEN - 41)  # the longest reaches position 63
    assert [o.outputs[0].token_ids for o in outs] == want


def test_draft_model_tables_keep_its_lookahead(huge_llama):
    """The target and the draft model (here the target drafting for itself: every draft
    accepted) keep ``max_model_len + num_speculative_tokens`` rows; tokens as without."""
    k = 3
    spec = {"method": "draft_model", "model": huge_llama, "num_speculative_tokens": k}
    params = SamplingParams(temperature=0.0, max_tokens=MAX_LEN - 41, ignore_eos=True)
    with LLM(huge_llama, speculative_config=spec, **ENGINE) as llm:
        target = _rotary_rows(llm.engine.core.runner.model)
        draft = _rotary_rows(llm.engine.core.runner.spec.proposer.model)
        got = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        stats = llm.engine.core.scheduler.spec_stats
    assert target == draft == [MAX_LEN + k]
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    assert [o.outputs[0].token_ids for o in got] == hf_greedy(huge_llama, PROMPTS, MAX_LEN - 41)


LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 256,
            "short_factor": [1.0 + 0.3 * i for i in range(8)],
            "long_factor": [2.0 + 0.5 * i for i in range(8)]}
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "longrope": LONGROPE,  # default factor 1024 / 256: the attention factor depends on the length
    "longrope-mscale": dict(LONGROPE, short_mscale=1.1, long_mscale=1.3),
}


@pytest.mark.parametrize("kind", sorted(SCALINGS))
@pytest.mark.parametrize("cap", [100, 256, 300, 1024, 5000])  # longrope: below, at and past original
def test_capped_rows_equal_the_full_tables_first_rows(kind, cap):
    full = RotaryEmbedding(16, 1024, 10000.0, SCALINGS[kind], ReferenceOps())
    capped = RotaryEmbedding(16, 1024, 10000.0, SCALINGS[kind], ReferenceOps(), max_positions=cap)
    assert capped.cos_sin_cache.shape == (min(cap, 1024), 16)
    assert torch.equal(capped.cos_sin_cache, full.cos_sin_cache[:cap])
