"""Captured steps share one logits buffer (``core/runner_graphs.py``): a device graph runner
keeps every graph's output alive, so each decode and verify graph writes its logits into the
first rows of one ``[most rows, vocab]`` buffer and returns that view. On the cpu backend a
stand-in runner keeps static inputs and outputs and calls the step on replay (as a device graph
runner replays it): the tokens stay HF's, the outputs share the buffer's storage, and the
memory reserve counts the buffer once."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.core.memory_profile import graph_memory_estimate
from tests.conftest import hf_greedy
from tests.spec_decode.test_verify_graphs import StandInGraphRunner

PROMPTS = [[5, 17, 42, 99, 3, 250, 11], [7, 7, 7, 12, 30, 31], [100, 101, 102]]
MAX_TOKENS = 8
ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=64, max_model_len=64,
              max_num_seqs=4, seed=0)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama")


def _captured(llm):
    runner = llm.engine.core.runner
    runner.graph_runner = StandInGraphRunner((1, 2, 4))
    runner.kernel.supports_graph_capture = True
    if runner.spec is not None:
        runner.verify_graph_factory = StandInGraphRunner
    runner.capture_graphs()
    return runner


def _tokens(llm) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_decode_and_verify_graphs_share_one_logits_buffer_and_keep_hf_tokens(model):
    want = hf_greedy(model, PROMPTS, MAX_TOKENS)
    replay = {"method": "replay", "num_speculative_tokens": 3, "replay_records": []}
    with LLM(model, speculative_config=replay, **ENGINE) as llm:
        runner = _captured(llm)
        spec = runner.spec
        spec.config.disable_by_batch_size = 1  # no drafts: decode graphs only
        assert _tokens(llm) == want
        decode_replays = runner.graph_runner.replays
        assert decode_replays > 0
        for p, w in zip(PROMPTS, want):  # the HF tokens as drafts: every step verifies q = 4
            spec.proposer.records[tuple(p)] = list(w)
        spec.config.disable_by_batch_size = 16
        buf = runner.graph_logits
        # decode graphs up to 4 rows; verify graphs up to 4 sequences of q = 4 rows
        assert buf.shape == (16, runner.vocab_size)
        outputs = list(runner.graph_runner.outputs.values())
        for verify in runner.verify_graphs.runners.values():
            outputs += [out.reshape(-1, buf.shape[1]) for out in verify.outputs.values()]
        assert len(outputs) == 3 + 3 * 3
        for out in outputs:
            assert out.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            assert out.data_ptr() == buf.data_ptr()  # rows [:n]
        assert _tokens(llm) == want
        assert sum(v.replays for v in runner.verify_graphs.runners.values()) > 0
        stats = llm.engine.core.scheduler.spec_stats
        assert stats.num_accepted_tokens == stats.num_draft_tokens > 0


@pytest.mark.parametrize("speculative", [False, True])
def test_steps_in_flight_sample_their_logits_before_the_next_replay(model, speculative):
    """Async scheduling: a step is launched while the one before is in flight (its tokens fed
    on the device); each step's sampler is queued before the next replay overwrites the buffer,
    so the tokens stay HF's (with speculation: steps ahead verify through the shared buffer)."""
    want = hf_greedy(model, PROMPTS, MAX_TOKENS)
    spec = None
    if speculative:
        spec = {"method": "replay", "num_speculative_tokens": 3,
                "replay_records": [{"prompt_token_ids": p, "output_token_ids": w}
                                   for p, w in zip(PROMPTS, want)]}
    with LLM(model, async_scheduling=True, speculative_config=spec, **ENGINE) as llm:
        assert llm.engine.core.max_in_flight == 2
        runner = _captured(llm)
        assert _tokens(llm) == want
        replays = runner.graph_runner.replays
        if speculative:
            replays += sum(v.replays for v in runner.verify_graphs.runners.values())
        assert replays > 0


def test_a_replay_returns_its_own_rows(model):
    """Replaying size n gives the logits of its n rows (the eager step's), whatever a larger or
    smaller graph left in the buffer before."""
    with LLM(model, **ENGINE) as llm, torch.inference_mode():
        runner = _captured(llm)
        graphs = runner.graph_runner
        inputs = {}
        for size in (4, 1, 2):  # distinct tokens per size at position 0, one block each
            ids, positions, slots, lens, table = (t.clone() for t in graphs.static[size])
            ids.copy_(torch.arange(size) + 10 * size)
            slots.copy_(torch.arange(size) * 4)
            table[:, 0] = torch.arange(size)
            inputs[size] = (ids, positions, slots, lens, table)
        want = {size: runner._decode_step(*inputs[size]).clone() for size in (4, 1, 2)}
        assert not torch.equal(want[1][0], want[2][0])
        for size in (4, 1, 2, 4):
            got = graphs.run(inputs[size])
            assert got.shape[0] == size
            torch.testing.assert_close(got, want[size], rtol=0, atol=0)


def test_reserve_counts_the_buffer_once(model):
    """The reserve before the cache: one logits buffer of the most rows instead of one output
    per graph (for Llama-3.1-8B at the default sizes, about 1 GiB less)."""
    from tessellm.backends.cuda.graph_runner import default_capture_sizes
    from tessellm.spec_decode.verify_graphs import capture_sizes

    row = 128256 * 2  # Llama-3.1-8B's bf16 logits row
    sizes = default_capture_sizes(256)
    own = graph_memory_estimate(sizes, row, 0.0, shared_logits=False)
    one = graph_memory_estimate(sizes, row, 0.0)
    rounded = lambda n: -(-n // (2 << 20)) * (2 << 20)  # noqa: E731
    assert own - one == sum(rounded(n * row) for n in sizes) - rounded(256 * row)
    assert own - one > 0.9 * 2**30

    with LLM(model, speculative_config={"method": "ngram", "num_speculative_tokens": 3},
             **ENGINE) as llm:
        runner = llm.engine.core.runner
        runner.logits_row_bytes = runner.vocab_size * 4  # (profile_run's, float32)
        runner.graph_runner = StandInGraphRunner((1, 2, 4))
        runner.kernel.supports_graph_capture = True
        runner.verify_graph_factory = StandInGraphRunner
        shared = runner.graph_memory_estimate()
        runner.graph_runner.static_outputs = False
        apart = runner.graph_memory_estimate()
        row = runner.logits_row_bytes
        seqs = capture_sizes(4, runner.spec.config.disable_by_batch_size)
        verify = [n * q for q in (2, 3, 4) for n in seqs]
        assert apart - shared == sum(rounded(n * row) for n in (1, 2, 4, *verify)) - rounded(16 * row)
        runner.graph_runner.static_outputs = True
        with torch.inference_mode():
            runner.capture_graphs()
        assert runner.graph_logits.nbytes == 16 * row


def test_a_request_past_its_prompt_lets_the_decode_steps_replay(model):
    """prompt_logprobs and prompt_logprob_token_ids need the hidden states of the steps that
    compute prompt rows, which run eagerly; once past its prompt such a request's decode steps
    replay the graphs like the others' (every step of the batch ran eagerly to its end before).
    Tokens stay HF's, the prompt scores those of a run without graphs."""
    want = hf_greedy(model, PROMPTS, MAX_TOKENS)
    base = dict(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    params = [SamplingParams(prompt_logprob_token_ids=[1, 2, 3], prompt_logprob_start=1, **base),
              SamplingParams(prompt_logprobs=2, **base), SamplingParams(**base)]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    runs = []
    for graphs in (False, True):
        with LLM(model, **ENGINE) as llm:
            runner = _captured(llm) if graphs else None
            outs = llm.generate(prompts, params, use_tqdm=False)
            runs.append(outs)
            if graphs:
                assert runner.graph_runner.replays > 0
    eager, replayed = runs
    assert [list(o.outputs[0].token_ids) for o in replayed] == want
    assert replayed[0].prompt_token_id_logprobs.shape == (len(PROMPTS[0]) - 2, 3)
    assert torch.allclose(torch.as_tensor(replayed[0].prompt_token_id_logprobs),
                          torch.as_tensor(eager[0].prompt_token_id_logprobs), atol=1e-5)
    assert [{t: lp.logprob for t, lp in d.items()} for d in replayed[1].prompt_logprobs[1:]] == pytest.approx(
        [{t: lp.logprob for t, lp in d.items()} for d in eager[1].prompt_logprobs[1:]])
