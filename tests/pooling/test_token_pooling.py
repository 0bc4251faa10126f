"""Per-token pooling (vLLM's ``token_embed`` / ``token_classify``: ALL pooling) through
``LLM.encode`` on tiny random models against HF transformers in float32: every prompt token's
row, across chunked prefill, mixed in a batch with one-vector requests, never from a prefix-cache
hit, aborted mid-prompt without leftovers; and the clear errors."""

from __future__ import annotations

import pytest
import torch

from tessellm import PoolingParams
from tessellm.entrypoints.llm import LLM
from tests.pooling.conftest import hf_embeddings, random_prompts

ATOL = 2e-5  # float32, the same math in another order


def _llm(path, **kwargs) -> LLM:
    opts = dict(device="cpu", runner="pooling", num_kv_blocks=64, max_num_batched_tokens=32)
    return LLM(path, **{**opts, **kwargs})


def hf_token_hidden(model_dir: str, prompt: list[int]) -> torch.Tensor:
    """HF's final hidden states (after the last norm) of every prompt token, float32."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([prompt])).last_hidden_state[0]


def hf_token_logits(model_dir: str, prompt: list[int]) -> torch.Tensor:
    """HF ``*ForSequenceClassification``'s score head on every token's hidden state (HF itself
    keeps only the last token's row: ``.logits`` is that row)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model.model(torch.tensor([prompt])).last_hidden_state[0]
        logits = model.score(hidden)
        assert torch.allclose(logits[-1], model(torch.tensor([prompt])).logits[0], atol=1e-6)
    return logits


def test_token_embed_equals_hf_rows_across_chunks(bare_model_dir):
    """8 prompts of 1..90 tokens in 32-token steps (a prompt spans up to 3 steps, several
    prompts share a step): each row equals HF's hidden state of that token, normalized."""
    path = bare_model_dir("qwen3")
    prompts = random_prompts(8, seed=11)
    with _llm(path) as llm:
        outs = llm.encode([{"prompt_token_ids": p} for p in prompts], pooling_task="token_embed")
        assert not llm.engine.core.runner.pooler.token_rows  # nothing kept once returned
        assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks
    for out, p in zip(outs, prompts):
        ref = torch.nn.functional.normalize(hf_token_hidden(path, p), dim=-1)
        assert out.outputs.data.shape == (len(p), 64) and out.outputs.data.dtype == torch.float32
        torch.testing.assert_close(out.outputs.data, ref, atol=ATOL, rtol=0)


def test_token_embed_params_dimensions_and_normalize(bare_model_dir):
    path = bare_model_dir("llama")
    prompt = random_prompts(1, seed=12, lo=40, hi=40)[0]
    with _llm(path) as llm:
        raw, short = llm.encode([{"prompt_token_ids": prompt}] * 2, pooling_task="token_embed",
                                pooling_params=[PoolingParams(normalize=False), PoolingParams(dimensions=16)])
    hidden = hf_token_hidden(path, prompt)
    torch.testing.assert_close(raw.outputs.data, hidden, atol=ATOL, rtol=0)
    torch.testing.assert_close(short.outputs.data, torch.nn.functional.normalize(hidden[:, :16], dim=-1),
                               atol=ATOL, rtol=0)


def test_mixed_batch_of_token_and_sequence_tasks(tiny_model_dir):
    """token_embed next to embed requests in the same steps (MEAN pooling for the others):
    each gets what it gets alone; the per-token rows' last row is the LAST embedding."""
    path = tiny_model_dir("qwen3")
    prompts = random_prompts(6, seed=13, lo=20, hi=70)
    params = [PoolingParams(task="token_embed" if i % 2 else "embed") for i in range(6)]
    with _llm(path, pooler_config={"pooling_type": "MEAN"}) as llm:
        outs = llm.encode([{"prompt_token_ids": p} for p in prompts], pooling_params=params)
    for i, (out, p) in enumerate(zip(outs, prompts)):
        if i % 2:
            ref = torch.nn.functional.normalize(hf_token_hidden(path, p), dim=-1)
        else:
            ref = hf_embeddings(path, [p], "MEAN")[0]
        torch.testing.assert_close(out.outputs.data, ref, atol=ATOL, rtol=0)


def test_token_embed_never_reads_the_prefix_cache(tiny_model_dir):
    """LAST pooling keeps prefix caching; a per-token request after the same prompt still
    computes (and returns) every row, and the LAST request after it still hits the cache."""
    path = tiny_model_dir("llama")
    prompt = random_prompts(1, seed=14, lo=80, hi=80)[0]
    with _llm(path) as llm:
        assert llm.engine.core.kv.enable_prefix_caching
        first = llm.encode([{"prompt_token_ids": prompt}])[0]
        rows = llm.encode([{"prompt_token_ids": prompt}], pooling_task="token_embed")[0]
        again = llm.encode([{"prompt_token_ids": prompt}])[0]
    assert (first.num_cached_tokens, rows.num_cached_tokens, again.num_cached_tokens) == (0, 0, 64)
    ref = torch.nn.functional.normalize(hf_token_hidden(path, prompt), dim=-1)
    assert rows.outputs.data.shape == (80, 64)
    torch.testing.assert_close(rows.outputs.data, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(again.outputs.data, ref[-1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_labels", [3, 1])
def test_token_classify_equals_hf_score_head_per_token(num_labels, classifier_dir):
    path = classifier_dir("qwen3", num_labels)
    prompts = random_prompts(5, seed=15 + num_labels, lo=1, hi=75)
    with _llm(path) as llm:
        probs = llm.encode([{"prompt_token_ids": p} for p in prompts], pooling_task="token_classify")
        logits = llm.encode([{"prompt_token_ids": p} for p in prompts], pooling_task="token_classify",
                            pooling_params=PoolingParams(use_activation=False))
        # vLLM's LLM.reward: the same per-token scores
        rewards = llm.reward([{"prompt_token_ids": p} for p in prompts],
                             pooling_params=PoolingParams(use_activation=False))
    for p, prob, logit, reward in zip(prompts, probs, logits, rewards):
        ref = hf_token_logits(path, p)
        assert logit.outputs.data.shape == (len(p), num_labels)
        torch.testing.assert_close(logit.outputs.data, ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(reward.outputs.data, ref, atol=ATOL, rtol=0)
        act = torch.sigmoid(ref) if num_labels == 1 else torch.softmax(ref, dim=-1)
        torch.testing.assert_close(prob.outputs.data, act, atol=ATOL, rtol=0)


def test_abort_mid_prompt_drops_the_kept_rows(bare_model_dir):
    path = bare_model_dir("qwen3")
    long, other = random_prompts(2, seed=16, lo=80, hi=90)
    with _llm(path) as llm:
        engine = llm.engine
        engine.add_pooling_request("a", {"prompt_token_ids": long}, PoolingParams(task="token_embed"))
        assert engine.step() == []  # the first 32-token chunk: its rows kept on the host
        assert [t.shape for t in engine.core.runner.pooler.token_rows["a"]] == [(32, 64)]
        engine.abort_request("a")
        engine.add_pooling_request("a", {"prompt_token_ids": other}, PoolingParams(task="token_embed"))
        done = []
        while engine.has_unfinished_requests():
            done += engine.step()
        assert not engine.core.runner.pooler.token_rows
    ref = torch.nn.functional.normalize(hf_token_hidden(path, other), dim=-1)
    torch.testing.assert_close(done[0].outputs.data, ref, atol=ATOL, rtol=0)


def test_wrong_per_token_task_is_refused(bare_model_dir, classifier_dir):
    with _llm(bare_model_dir("qwen3")) as llm:
        with pytest.raises(ValueError, match="embedding model.*token_classify"):
            llm.encode([[5, 6, 7]], pooling_task="token_classify")
        with pytest.raises(ValueError, match="pooling_task 'token_max' is not supported"):
            llm.encode([[5, 6, 7]], pooling_task="token_max")
    with _llm(classifier_dir("qwen3", 2)) as llm:
        with pytest.raises(ValueError, match="classifier.*token_classify"):
            llm.encode([[5, 6, 7]], pooling_task="token_embed")


def test_per_token_task_and_rows_cross_the_process_boundaries():
    """The task reaches a worker (NewRequestData) and the core process (EngineCoreRequest);
    the rows come back as plain msgpack bytes, bit for bit."""
    import numpy as np

    from tessellm.core.engine_core import EngineCoreRequest
    from tessellm.core.engine_output import EngineCoreOutput
    from tessellm.core.engine_process import decode_output, decode_request, encode_output, encode_request
    from tessellm.core.step import ModelRunnerOutput, NewRequestData, SchedulerOutput
    from tessellm.distributed.codec import (decode_runner_output, decode_scheduler_output, encode_runner_output,
                                            encode_scheduler_output, pack, unpack)
    from tessellm.pooling.front import POOLING_SAMPLING
    from tessellm.pooling.pooler import pack_rows, unpack_rows

    rows = torch.randn(5, 3)
    packed = pack_rows(rows)
    req = EngineCoreRequest("r", [1, 2], POOLING_SAMPLING, 1.0, pooling_task="token_embed")
    assert decode_request(unpack(pack(encode_request(req)))).pooling_task == "token_embed"
    out = decode_output(unpack(pack(encode_output(EngineCoreOutput("r", [], "stop", pooled=packed)))))
    step = SchedulerOutput([NewRequestData("r", [1, 2], [1, 2], POOLING_SAMPLING, [0], 0,
                                           pooling_task="token_classify")], [], {"r": 2}, 2)
    assert decode_scheduler_output(unpack(pack(encode_scheduler_output(step)))).new_requests[0].pooling_task \
        == "token_classify"
    back = decode_runner_output(unpack(pack(encode_runner_output(ModelRunnerOutput(pooled={"r": packed})))))
    for got in (out.pooled, back.pooled["r"]):
        assert np.array_equal(unpack_rows(got), rows.numpy())


def test_tensor_parallel_token_outputs(bare_model_dir, classifier_dir):
    """Real worker processes (gloo): the task reaches each rank and the rows come back through
    the step codec; embeddings and a classifier's per-token logits equal HF's."""
    prompts = random_prompts(3, seed=18, lo=20, hi=70)
    path = bare_model_dir("qwen3")
    with _llm(path, tensor_parallel_size=2) as llm:
        rows = llm.encode([{"prompt_token_ids": p} for p in prompts], pooling_task="token_embed")
    for out, p in zip(rows, prompts):
        torch.testing.assert_close(out.outputs.data, torch.nn.functional.normalize(hf_token_hidden(path, p), dim=-1),
                                   atol=ATOL, rtol=0)
    path = classifier_dir("llama", 3)
    with _llm(path, tensor_parallel_size=2) as llm:
        logits = llm.encode([{"prompt_token_ids": p} for p in prompts], pooling_task="token_classify",
                            pooling_params=PoolingParams(use_activation=False))
    for out, p in zip(logits, prompts):
        torch.testing.assert_close(out.outputs.data, hf_token_logits(path, p), atol=ATOL, rtol=0)
