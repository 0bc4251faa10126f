"""The captured verify step (tessellm.spec_decode.verify_graphs) gives the tokens of the plain
decode path. The emulated cuda backend runs its Triton kernels on CPU tensors (interpreted);
a stand-in graph runner keeps static buffers and calls the step on replay, as a device graph
runner would replay it, so the same padding, bucketing and buffer reuse are exercised."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams

PROMPTS = [[5, 17, 42, 99, 3, 250, 11], [7, 7, 7, 12, 30, 31], [100, 101, 102]]


class StandInGraphRunner:
    name = "stand-in"
    static_outputs = True  # keeps each size's output, as a device graph runner does

    def __init__(self, sizes):
        self.capture_sizes = tuple(sorted(sizes))
        self.static = {}
        self.outputs = {}
        self.replays = 0

    def capture(self, step, make_inputs):
        self.step = step
        for size in reversed(self.capture_sizes):  # largest first, as device graph runners
            self.static[size] = make_inputs(size)
            self.outputs[size] = step(*self.static[size])

    def padded_size(self, n):
        return next((s for s in self.capture_sizes if s >= n), None)

    def run(self, inputs):
        static = self.static[inputs[0].shape[0]]
        for dst, src in zip(static, inputs):
            dst[tuple(slice(0, n) for n in src.shape)].copy_(src)
        self.replays += 1
        return self.step(*static)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), device="cuda", emulate=True, dtype="float32", block_size=4,
              num_kv_blocks=64, max_num_seqs=4, seed=0,
              speculative_config={"method": "replay", "num_speculative_tokens": 3, "replay_records": []})
    runner = llm.engine.core.runner
    runner.graph_runner = StandInGraphRunner((1, 2, 4))
    runner.kernel.supports_graph_capture = True  # the Triton kernel's; emulation only turned graphs off
    runner.verify_graph_factory = StandInGraphRunner
    runner.capture_graphs()
    yield llm
    llm.shutdown()


@pytest.mark.slow  # about 40 s of interpreted Triton on one core
@pytest.mark.interpreted
def test_verify_graphs_give_the_plain_tokens(llm):
    runner = llm.engine.core.runner
    assert set(runner.verify_graphs.runners) == {2, 3, 4}
    params = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
    spec = runner.spec
    spec.config.disable_by_batch_size = 1  # no drafts: the plain (decode graph) path
    want = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                                                         use_tqdm=False)]
    for p, w in zip(PROMPTS, want):
        spec.proposer.records[tuple(p)] = list(w)
    spec.config.disable_by_batch_size = 16
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                                                        use_tqdm=False)]
    assert got == want
    assert sum(r.replays for r in runner.verify_graphs.runners.values()) >= 2
    stats = llm.engine.core.scheduler.spec_stats
    assert stats.num_accepted_tokens == stats.num_draft_tokens > 0
