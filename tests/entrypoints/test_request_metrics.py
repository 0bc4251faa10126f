"""``RequestOutput.metrics``: vLLM's ``RequestStateStats`` fields, filled with real values on the
real engine (tiny random llama, cpu, float32), from ``LLM.generate`` (the core in this process)
and ``AsyncLLM`` (the core in its own process, no stat logger), with vLLM's clocks: the front
end's wall clock for ``arrival_time``, the core's monotonic clock for ``queued_ts``,
``scheduled_ts``, ``first_token_ts`` and ``last_token_ts``."""

from __future__ import annotations

import asyncio
import time

import pytest

from tessellm import LLM, AsyncEngineArgs, AsyncLLM, SamplingParams
from tessellm.inputs import TokensPrompt

ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=64)
PROMPTS = [[5, 9, 11], [7, 3, 2, 8], [1, 2, 3, 4, 5]]
# vllm/v1/metrics/stats.py RequestStateStats, as of vLLM 0.11 / 0.12
VLLM_FIELDS = ("num_generation_tokens", "arrival_time", "queued_ts", "scheduled_ts", "first_token_ts",
               "last_token_ts", "first_token_latency", "is_corrupted")
# The wall and monotonic clocks' offset may drift by NTP slewing over a test (< 0.5 ms/s).
CLOCK_SLACK_S = 0.01


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def check_request_state_stats(out, num_prompt_tokens: int) -> None:
    m = out.metrics
    assert all(hasattr(m, name) for name in VLLM_FIELDS), [n for n in VLLM_FIELDS if not hasattr(m, n)]
    # vLLM's engine core stamps: monotonic, in order, all set
    assert 0 < m.queued_ts <= m.scheduled_ts <= m.first_token_ts <= m.last_token_ts <= time.monotonic()
    # arrival: the front end's wall clock, before the core queued the request
    offset = time.time() - time.monotonic()
    assert m.arrival_time <= m.queued_ts + offset + CLOCK_SLACK_S
    assert m.arrival_time <= time.time()
    assert m.first_token_latency == pytest.approx(m.first_token_time - m.arrival_time)
    assert 0 < m.first_token_latency <= time.time() - m.arrival_time
    assert m.num_generation_tokens == len(out.outputs[0].token_ids)
    assert m.is_corrupted is False
    # tessellm's wall-clock fields are kept
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time
    assert m.num_prompt_tokens == num_prompt_tokens


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return tiny_model_dir("llama")


def test_llm_generate_fills_vllms_request_state_stats(model):
    """One sequence at a time (max_num_seqs=1): the later prompts wait in the queue, so their
    scheduled_ts comes after the earlier ones' last tokens."""
    with LLM(model, max_num_seqs=1, **ENGINE) as llm:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS],
                            [_params(n) for n in (3, 4, 5)], use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        check_request_state_stats(out, len(prompt))
    assert [o.metrics.num_generation_tokens for o in outs] == [3, 4, 5]
    for earlier, later in zip(outs, outs[1:]):
        assert later.metrics.queued_ts < earlier.metrics.last_token_ts <= later.metrics.scheduled_ts


def test_async_llm_fills_vllms_request_state_stats(model):
    """The core in its own process stamps its outputs; each streamed output's metrics grow
    until the last one's."""

    async def run():
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, max_num_seqs=4, **ENGINE))
        try:
            seen = []
            async for out in engine.generate(TokensPrompt(prompt_token_ids=PROMPTS[2]), _params(6), "a"):
                seen.append((out.metrics.num_generation_tokens, out.metrics.last_token_ts))
            return out, seen
        finally:
            await engine.shutdown()

    final, seen = asyncio.run(run())
    assert final.finished
    check_request_state_stats(final, len(PROMPTS[2]))
    assert final.metrics.num_generation_tokens == 6
    assert [n for n, _ in seen] == sorted({n for n, _ in seen}) and seen[-1] == (6, final.metrics.last_token_ts)
    assert [ts for _, ts in seen] == sorted(ts for _, ts in seen)
