"""The step boundary with several tokens per request: scheduler -> runner -> sampler -> back.

A stub draft proposer hands request A three draft tokens; the step computes 4 tokens for A
(its last known token + 3 drafts) and samples 4 rows for it, and 1 token / 1 row for B. Real
engine on a tiny random Llama on the cpu backend; greedy tokens are checked against HF
transformers, KV lengths against the block manager and the runner's block table.
"""

from __future__ import annotations

import pytest

from tessellm import LLM
from tessellm.core.engine_core import EngineCoreRequest
from tessellm.core.sampling_params import SamplingParams
from tests.conftest import hf_greedy

PROMPT_A, PROMPT_B = [5, 17, 42, 99, 3, 250, 11], [7, 7, 7, 12, 30]
NEW = 10


class StubDrafter:
    """Proposes the continuation it was told (the reference), with chosen positions wrong."""

    def __init__(self, reference: list[int], wrong: tuple[int, ...] = ()):
        self.reference = reference
        self.wrong = wrong

    def propose(self, output_so_far: list[int], k: int) -> list[int]:
        n = len(output_so_far)
        drafts = self.reference[n:n + k]
        return [(t + 1) % 256 if j in self.wrong else t for j, t in enumerate(drafts)]


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    path = tiny_model_dir("llama-sharp")
    want = hf_greedy(path, [PROMPT_A, PROMPT_B], NEW)
    llm = LLM(path, device="cpu", dtype="float32", seed=0, block_size=4, num_kv_blocks=64,
              async_scheduling=False)
    yield llm.engine.core, want
    llm.shutdown()


def _run(core, want, drafter: StubDrafter, k: int = 3):
    """Generate A and B to NEW tokens, drafting k tokens for A at every decode step; return the
    outputs and, per step, (scheduled, sampled, spec) as the runner saw them."""
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    for rid, prompt in (("a", PROMPT_A), ("b", PROMPT_B)):
        core.add_request(EngineCoreRequest(rid, prompt, params, 0.0))
    steps, tokens = [], {"a": [], "b": []}
    submit = core.executor.submit
    core.executor.submit = lambda sched: (steps.append(sched), submit(sched))[1]
    try:
        while core.has_unfinished_requests():
            req_a = core.scheduler.requests.get("a")
            if req_a is not None and req_a.num_output_tokens:
                req_a.spec_token_ids = drafter.propose(req_a.output_token_ids, k)
            for out in core.step():
                tokens[out.request_id] += out.new_token_ids
                if out.request_id == "a" and out.finish_reason is None:
                    _check_kv(core, core.scheduler.requests["a"])
    finally:
        del core.executor.submit
    return tokens, steps


def _check_kv(core, req) -> None:
    """K/V for exactly the accepted tokens but the last: in the scheduler's count, the block
    manager's blocks and the runner's block table alike (the runner cuts rejected drafts'
    blocks when it applies the next step: ``SchedulerOutput.kept_blocks``)."""
    assert req.num_computed_tokens == req.num_tokens - 1
    blocks = core.kv.block_ids(req.request_id)
    assert len(blocks) == core.kv.blocks_needed(req.num_computed_tokens)
    state = core.runner.requests[req.request_id]
    kept = core.scheduler.kept_blocks.get(req.request_id, len(state.block_ids))
    assert state.block_ids[:kept] == blocks and state.token_ids == req.all_token_ids
    assert core.runner.batch.tables.num_blocks[state.row] == len(state.block_ids)


def test_four_computed_four_sampled_next_to_one(setup):
    core, want = setup
    tokens, steps = _run(core, want, StubDrafter(want[0]))
    assert tokens == {"a": want[0], "b": want[1]}
    first = steps[1]  # the first decode step: A verifies 3 drafts, B decodes one token
    assert first.num_scheduled_tokens == {"a": 4, "b": 1}
    assert first.num_sampled_tokens == {"a": 4, "b": 1}
    assert first.spec_token_ids == {"a": want[0][1:4]}
    # Every draft accepted: A needs 1 prefill step + ceil(9 / 4) verifying steps.
    assert sum(1 for s in steps if "a" in s.num_scheduled_tokens) == 1 + 3
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_rejected_drafts_give_back_their_slots(setup):
    core, want = setup
    tokens, steps = _run(core, want, StubDrafter(want[0], wrong=(1,)))
    # The drafts after a wrong one are dropped, the target's own token taken: still exact.
    assert tokens == {"a": want[0], "b": want[1]}
    verifying = [s for s in steps if "a" in s.spec_token_ids]
    assert verifying and all(s.num_sampled_tokens["a"] == len(s.spec_token_ids["a"]) + 1 for s in verifying)
    assert core.kv.num_free_blocks == core.kv.num_blocks
    assert not core.kv.cached.keys() - {h for h in _hashes(core, PROMPT_A + want[0])} - \
        {h for h in _hashes(core, PROMPT_B + want[1])}, "only accepted tokens are published"


def _hashes(core, tokens: list[int]) -> list[int]:
    from tessellm.core.request import Request

    req = Request("h", tokens, SamplingParams())
    core.kv.update_block_hashes(req)
    return req.block_hashes
