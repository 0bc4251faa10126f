"""LLM.embed / LLM.encode on tiny random decoder models against HF AutoModel in float32:
every pooling type, batched with chunked prefill, prefix caching, preemption, dimensions,
truncation, the checkpoint's sentence-transformers config, and the clear errors."""

from __future__ import annotations

import pytest
import torch

from tessellm.core.request import Request
from tessellm.entrypoints.llm import LLM
from tessellm.pooling.front import POOLING_SAMPLING
from tessellm import PoolingParams
from tests.pooling.conftest import hf_embeddings, random_prompts, with_sentence_transformers

ATOL = 2e-5  # float32, the same math in another order


def _llm(path, **kwargs) -> LLM:
    opts = dict(device="cpu", runner="pooling", num_kv_blocks=64, max_num_batched_tokens=32)
    return LLM(path, **{**opts, **kwargs})


def _embed(llm, prompts, **kwargs) -> torch.Tensor:
    outs = llm.embed([{"prompt_token_ids": p} for p in prompts], **kwargs)
    for out, p in zip(outs, prompts):
        assert out.finished and out.prompt_token_ids == p[-len(out.prompt_token_ids):]
    return torch.tensor([o.outputs.embedding for o in outs])


def _model(kind: str, tiny_model_dir, bare_model_dir) -> str:
    family, _, form = kind.partition("-")
    return bare_model_dir(family) if form == "bare" else tiny_model_dir(family)


@pytest.mark.parametrize("kind,pooling", [
    ("qwen3", "LAST"), ("qwen3", "MEAN"), ("qwen3", "CLS"),
    ("llama", "LAST"), ("qwen2", "MEAN"), ("mistral", "MEAN"), ("qwen3-bare", "LAST"), ("llama-bare", "MEAN"), ("llama-bare", "CLS")])
def test_batched_chunked_embeddings_equal_hf(kind, pooling, tiny_model_dir, bare_model_dir):
    """12 prompts of 1..90 tokens in 32-token steps: chunks of several steps, many prompts a
    step; each vector equals HF's for that prompt alone (so it equals its own solo run)."""
    path = _model(kind, tiny_model_dir, bare_model_dir)
    prompts = random_prompts(12, seed=hash(kind) % 100)
    with _llm(path, pooler_config={"pooling_type": pooling}) as llm:
        got = _embed(llm, prompts)
        assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks  # none held
        solo = _embed(llm, prompts[:1])
    ref = hf_embeddings(path, prompts, pooling)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(solo[0], got[0], atol=ATOL, rtol=0)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(prompts)), atol=1e-5)


def test_bare_checkpoint_pools_by_default_and_cannot_generate(bare_model_dir):
    path = bare_model_dir("qwen3")
    with LLM(path, device="cpu", num_kv_blocks=32) as llm:  # runner auto: a bare Qwen3Model pools
        assert llm.engine.core.info.runner == "pooling"
        assert llm.engine.core.runner.model.lm_head.weight.numel() == 0  # untied head freed
        with pytest.raises(ValueError, match="does not generate text"):
            llm.generate([[5, 6, 7]])
    with pytest.raises(ValueError, match="bare model without an LM head"):
        LLM(path, device="cpu", runner="generate", num_kv_blocks=32)


def test_embed_on_a_generating_engine_is_refused(tiny_model_dir):
    with LLM(tiny_model_dir("qwen3"), device="cpu", num_kv_blocks=32) as llm:
        with pytest.raises(ValueError, match="generates text.*runner='pooling'"):
            llm.embed([[5, 6, 7]])


@pytest.mark.parametrize("spelling", [dict(task="embed"), dict(convert="embed"), dict(runner="pooling")])
def test_vllm_spellings_of_the_pooling_runner(spelling, tiny_model_dir):
    with LLM(tiny_model_dir("qwen3"), device="cpu", num_kv_blocks=32, **spelling) as llm:
        assert llm.engine.core.info.runner == "pooling"
    with pytest.raises(ValueError, match="disagree"):
        LLM(tiny_model_dir("qwen3"), device="cpu", runner="generate", task="embed")


def test_prefix_cache_hit_with_last_pooling(tiny_model_dir):
    """LAST keeps prefix caching: a repeated 80-token prompt reuses its blocks and the vector
    is unchanged (the last token is always computed)."""
    path = tiny_model_dir("qwen3")
    prompt = random_prompts(1, seed=7, lo=80, hi=80)[0]
    with _llm(path) as llm:
        assert llm.engine.core.kv.enable_prefix_caching
        first = llm.encode([{"prompt_token_ids": prompt}])[0]
        second = llm.encode([{"prompt_token_ids": prompt}])[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 64
    ref = hf_embeddings(path, [prompt], "LAST")[0]
    torch.testing.assert_close(second.outputs.data, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(first.outputs.data, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("pooling", ["MEAN", "CLS"])
def test_mean_and_cls_run_without_prefix_caching(pooling, tiny_model_dir):
    """A cache hit would skip the hidden states MEAN and CLS read: prefix caching is off for
    them, and a repeated prompt is computed again, with the same vector."""
    path = tiny_model_dir("qwen3")
    prompt = random_prompts(1, seed=8, lo=80, hi=80)[0]
    with _llm(path, pooler_config={"pooling_type": pooling}) as llm:
        assert not llm.engine.core.kv.enable_prefix_caching
        outs = [llm.encode([{"prompt_token_ids": prompt}])[0] for _ in range(2)]
    assert [o.num_cached_tokens for o in outs] == [0, 0]
    ref = hf_embeddings(path, [prompt], pooling)[0]
    for out in outs:
        torch.testing.assert_close(out.outputs.data, ref, atol=ATOL, rtol=0)


def test_abort_mid_prompt_leaves_nothing_behind(tiny_model_dir):
    """A MEAN request aborted between two of its chunks: its running sum goes with it, its
    blocks are free, and the request after it (the same id reused) gets HF's vector."""
    path = tiny_model_dir("llama")
    long, other = random_prompts(2, seed=3, lo=80, hi=90)
    with _llm(path, pooler_config={"pooling_type": "MEAN"}) as llm:
        engine = llm.engine
        engine.add_pooling_request("a", {"prompt_token_ids": long})
        assert engine.step() == []  # the first 32-token chunk: a partial sum kept
        assert set(engine.core.runner.pooler.partial) == {"a"}
        engine.abort_request("a")
        engine.add_pooling_request("a", {"prompt_token_ids": other})
        done = []
        while engine.has_unfinished_requests():
            done += engine.step()
        assert not engine.core.runner.pooler.partial
        assert engine.core.kv.num_free_blocks == engine.core.kv.num_blocks
    assert [o.request_id for o in done] == ["a"] and done[0].prompt_token_ids == other
    torch.testing.assert_close(done[0].outputs.data, hf_embeddings(path, [other], "MEAN")[0], atol=ATOL, rtol=0)


def test_dimensions_and_normalize(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    prompts = random_prompts(3, seed=5)
    with _llm(path) as llm:
        short = _embed(llm, prompts, pooling_params=PoolingParams(dimensions=16))
        raw = _embed(llm, prompts, pooling_params=PoolingParams(normalize=False))
        mixed = llm.embed([{"prompt_token_ids": p} for p in prompts],
                          pooling_params=[PoolingParams(dimensions=8), None, PoolingParams(dimensions=64)])
        with pytest.raises(ValueError, match="dimensions is 65, more than this model's embedding size 64"):
            llm.embed([prompts[0]], pooling_params=PoolingParams(dimensions=65))
        with pytest.raises(ValueError, match="dimensions must be a positive integer"):
            llm.embed([prompts[0]], pooling_params=PoolingParams(dimensions=0))
        assert not llm.engine.has_unfinished_requests()
    assert short.shape == (3, 16) and [len(o.outputs.embedding) for o in mixed] == [8, 64, 64]
    torch.testing.assert_close(short, hf_embeddings(path, prompts, "LAST", dimensions=16), atol=ATOL, rtol=0)
    torch.testing.assert_close(raw, hf_embeddings(path, prompts, "LAST", normalize=False), atol=1e-4, rtol=1e-5)
    # Matryoshka: truncate the raw vector, then normalize
    torch.testing.assert_close(short, torch.nn.functional.normalize(raw[:, :16], dim=-1), atol=ATOL, rtol=0)


def test_truncate_prompt_tokens_keeps_the_first_tokens(tiny_model_dir):
    """vLLM's pooling runner cuts on the right (its tokenizer's truncation_side): a token-id
    prompt keeps its first k tokens (-1: the first max_model_len)."""
    path = tiny_model_dir("qwen3")
    long = random_prompts(1, seed=11, lo=600, hi=600)[0]  # over max_position_embeddings (512)
    with _llm(path, max_model_len=512) as llm:
        with pytest.raises(ValueError, match="maximum context length is 512 tokens; shorten the "
                                             "prompt to at most 512 tokens"):
            llm.embed([long])
        out = llm.embed([long], truncate_prompt_tokens=40)[0]
        fitted = llm.embed([long], truncate_prompt_tokens=-1)[0]
    assert out.prompt_token_ids == long[:40] and fitted.prompt_token_ids == long[:512]
    ref = hf_embeddings(path, [long[:40], long[:512]], "LAST")
    torch.testing.assert_close(torch.tensor(out.outputs.embedding), ref[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.tensor(fitted.outputs.embedding), ref[1], atol=ATOL, rtol=0)


def test_a_prompt_may_fill_the_whole_context(tiny_model_dir):
    """Nothing is generated after a pooling prompt: max_model_len tokens fit (a generating
    engine keeps one position free), in the front end's check and the scheduler's."""
    path = tiny_model_dir("llama")
    prompt = random_prompts(1, seed=13, lo=512, hi=512)[0]
    with _llm(path, max_model_len=512, pooler_config={"pooling_type": "MEAN"}) as llm:
        got = _embed(llm, [prompt])
        llm.engine.core.scheduler.check_fits(Request("x", prompt, POOLING_SAMPLING))
    torch.testing.assert_close(got, hf_embeddings(path, [prompt], "MEAN"), atol=ATOL, rtol=0)
    with LLM(path, device="cpu", num_kv_blocks=64, max_model_len=512) as llm:
        with pytest.raises(ValueError, match="at most 511 tokens"):
            llm.generate([prompt])


def test_sentence_transformers_config_and_override(tiny_model_dir, tmp_path):
    """modules.json + 1_Pooling/config.json choose MEAN without Normalize; pooler_config wins."""
    path = with_sentence_transformers(tiny_model_dir("qwen3"), str(tmp_path / "st"), "mean", normalize=False)
    prompts = random_prompts(4, seed=9)
    with _llm(path) as llm:
        info = llm.engine.core.info.pooling
        assert (info["pooling_type"], info["normalize"]) == ("MEAN", False)
        got = _embed(llm, prompts)
    torch.testing.assert_close(got, hf_embeddings(path, prompts, "MEAN", normalize=False), atol=1e-4, rtol=1e-5)
    with _llm(path, pooler_config='{"pooling_type": "cls", "normalize": true}') as llm:
        got = _embed(llm, prompts)
    torch.testing.assert_close(got, hf_embeddings(path, prompts, "CLS"), atol=ATOL, rtol=0)


@pytest.mark.parametrize("config,message", [
    ({"pooling_type": "MAX"}, "pooling_type 'MAX' is not supported"),
    ({"softmax": True}, "use_activation .softmax, activation. applies to a sequence classifier"),
    ({"dimensions": 8}, "key 'dimensions' is not supported"),
    ("{not json", "not valid JSON")])
def test_bad_pooler_config_is_refused(config, message, tiny_model_dir):
    with pytest.raises(ValueError, match=message):
        LLM(tiny_model_dir("qwen3"), device="cpu", runner="pooling", pooler_config=config)


def test_encode_returns_tensors_equal_to_embed(tiny_model_dir):
    prompts = random_prompts(3, seed=12)
    with _llm(tiny_model_dir("qwen3")) as llm:
        enc = llm.encode([{"prompt_token_ids": p} for p in prompts])
        emb = llm.embed([{"prompt_token_ids": p} for p in prompts])
    for e, m in zip(enc, emb):  # (the second call hits the prefix cache: another float order)
        assert e.outputs.data.dtype == torch.float32 and e.outputs.data.shape == (64,)
        torch.testing.assert_close(e.outputs.data, torch.tensor(m.outputs.embedding), atol=ATOL, rtol=0)
