"""On a CUDA GPU (Triton attention, CUDA graphs for the verify and draft steps): greedy tokens
with n-gram, replay, draft-model, EAGLE and EAGLE-3 speculation equal those without, for a
mixed batch with chunked prefill and preemption, in float32; every KV block comes back."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tests.spec_decode.test_draft_proposers import (DRAFT, PROMPTS, TARGET, _save_head, _save_llama,
                                                    _spec)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ENGINE = dict(device="cuda", dtype="float32", block_size=16, num_kv_blocks=12, max_model_len=128,
              max_num_seqs=4, max_num_batched_tokens=32)
GPU_PROMPTS = PROMPTS + [[11, 12, 13, 14] * 6]  # a repetitive one: n-gram always finds drafts


def _greedy(llm) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in GPU_PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec-gpu")
    return {"target": _save_llama(str(root / "target"), TARGET, 1),
            "draft": _save_llama(str(root / "draft"), DRAFT, 2),
            "eagle": _save_head(str(root / "eagle"), "eagle", TARGET, 3),
            "eagle3": _save_head(str(root / "eagle3"), "eagle3", TARGET, 4)}


@pytest.fixture(scope="module")
def plain(models):
    with LLM(models["target"], **ENGINE) as llm:
        return _greedy(llm)


def _config(method: str, models: dict, plain: list) -> dict:
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                "prompt_lookup_max": 3, "disable_by_batch_size": 0}
    if method == "replay":
        return {"method": "replay", "num_speculative_tokens": 4, "disable_by_batch_size": 0,
                "replay_records": [{"prompt_token_ids": p, "output_token_ids": w}
                                   for p, w in zip(GPU_PROMPTS, plain)]}
    return _spec(method, models["draft" if method == "draft_model" else method])


@pytest.mark.parametrize("method", ["ngram", "replay", "draft_model", "eagle", "eagle3"])
def test_greedy_equals_plain_on_cuda(models, plain, method):
    with LLM(models["target"], speculative_config=_config(method, models, plain), **ENGINE) as llm:
        assert _greedy(llm) == plain
        core = llm.engine.core
        stats = core.scheduler.spec_stats
        assert stats.num_drafts > 0
        if method == "replay":
            assert stats.num_accepted_tokens == stats.num_draft_tokens
        assert core.kv.num_free_blocks == core.kv.num_blocks
