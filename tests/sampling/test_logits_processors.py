"""Custom logits processors (tessellm.sample.logits_processor, vLLM v1's interface) on the real
engine (tiny random llama with the SmolLM2 tokenizer, cpu, float32): vLLM's example processors
force their target token on the rows that ask for it and leave the other rows' tokens equal to
a plain engine's, across continuous batching, preemption and async scheduling; the batch
bookkeeping (removed / added / moved) keeps every index on its request; per-request arguments
are checked at add_request; a processor that raises fails its step's requests only (vLLM's
finish reason "error")."""

from __future__ import annotations

import math
import random

import pytest

from tessellm import LLM, SamplingParams, StructuredOutputsParams
from tessellm.sample.logits_processor import MoveDirectionality, process_dict_updates
from tessellm.sample.logits_processor.load import load_class, spawn_names
from tessellm.sample.logits_processor.state import batch_update
from tests.sampling.logits_procs import DummyLogitsProcessor

ENGINE = dict(device="cpu", dtype="float32", seed=0, block_size=4, num_kv_blocks=256)
PROMPTS = ["Hello, my name is", "The president of the United States is", "The capital of France is",
           "The future of AI is"]
PROCS = "tests.sampling.logits_procs"


def _greedy(max_tokens=8, **extra_args) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra_args or None)


def _tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def plain(tokenized_model):
    """Greedy tokens of every prompt on an engine without processors."""
    with LLM(tokenized_model, **ENGINE) as llm:
        yield {p: t for p, t in zip(PROMPTS, _tokens(llm.generate(PROMPTS, _greedy(12), use_tqdm=False)))}


@pytest.fixture(scope="module")
def llm(tokenized_model):
    with LLM(tokenized_model, **ENGINE, logits_processors=[DummyLogitsProcessor, f"{PROCS}:RaisingProcessor",
                                                           f"{PROCS}.TopTwoProcessor"]) as engine:
        yield engine


def _processor(llm, cls):
    return next(p for p in llm.engine.core.runner.logitsprocs.processors if isinstance(p, cls))


def test_the_dummy_forces_its_target_on_the_rows_that_ask_only(llm, plain):
    params = [_greedy(12, target_token=128), _greedy(12), _greedy(12, target_token=67), _greedy(12)]
    out = _tokens(llm.generate(PROMPTS, params, use_tqdm=False))
    assert out[0] == [128] * 12 and out[2] == [67] * 12
    assert out[1] == plain[PROMPTS[1]] and out[3] == plain[PROMPTS[3]]


def test_rows_that_come_and_go_keep_their_state(llm, plain):
    """Continuous batching: requests join while others run and leave at different lengths; the
    processor's index -> request map follows (forced rows forced, the others plain)."""
    engine = llm.llm_engine
    wanted = {}
    plan = [(0, "a", 0, 5, 7), (0, "b", 1, 12, None), (2, "c", 2, 9, 42), (3, "d", 3, 6, None),
            (5, "e", 0, 10, 300), (7, "f", 2, 4, None)]
    outputs, step = {}, 0
    while plan or engine.has_unfinished_requests():
        while plan and plan[0][0] <= step:
            _, rid, prompt, n, target = plan.pop(0)
            engine.add_request(rid, PROMPTS[prompt], _greedy(n, **({"target_token": target} if target else {})))
            wanted[rid] = [target] * n if target else plain[PROMPTS[prompt]][:n]
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
    assert outputs == wanted
    updates = [u for u in _processor(llm, DummyLogitsProcessor).updates if u is not None]
    assert any(u.moved for u in updates) and any(u.removed for u in updates)


def test_preempted_requests_come_back_with_their_target(tokenized_model, plain):
    """Few KV blocks: requests are preempted and resume as new rows (removed, added again)."""
    with LLM(tokenized_model, **{**ENGINE, "num_kv_blocks": 14}, logits_processors=[DummyLogitsProcessor]) as small:
        params = [_greedy(16, target_token=128), _greedy(16), _greedy(16, target_token=67), _greedy(16)]
        out = _tokens(small.generate(PROMPTS, params, use_tqdm=False))
        assert small.engine.core.scheduler.num_preemptions_total > 0
    assert out[0] == [128] * 16 and out[2] == [67] * 16
    assert out[1] == plain[PROMPTS[1]][:12] + out[1][12:] and out[3][:12] == plain[PROMPTS[3]]


def test_async_scheduling_sees_each_step(tokenized_model, plain):
    """Under async scheduling each step's processor reads the output so far (prompt and output
    ids of a 3-argument per-request callable): the tokens alternate as it asks; a constrained
    request beside it samples after its grammar mask (a deferred sample)."""
    with LLM(tokenized_model, **ENGINE, async_scheduling=True,
             logits_processors=[f"{PROCS}:AlternatingPerReqProcessor"]) as engine:
        assert engine.engine.core.async_scheduling
        choice = SamplingParams(temperature=0, max_tokens=8,
                                structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
        out = engine.generate(PROMPTS[:3], [_greedy(9, alternate=True), _greedy(12), choice], use_tqdm=False)
    prompt = out[0].prompt_token_ids
    assert list(out[0].outputs[0].token_ids) == [prompt[0], prompt[-1]] * 4 + [prompt[0]]
    assert _tokens(out)[1] == plain[PROMPTS[1]]
    assert out[2].outputs[0].text in ("yes", "no")  # a constrained row samples after its mask


@pytest.mark.parametrize("proc,extra,waits", [("DummyLogitsProcessor", {"target_token": 9}, False),
                                               ("AlternatingPerReqProcessor", {"alternate": True}, True)])
def test_only_a_processor_that_reads_output_ids_waits_for_the_step_in_flight(tokenized_model, plain, proc,
                                                                            extra, waits):
    """Async scheduling: the step before is still in flight when a step samples. A processor
    that never reads output ids samples without waiting for it (on an accelerator, no host
    sync a step); one that reads them waits (``OutputIds``) and reads every token."""
    with LLM(tokenized_model, **ENGINE, async_scheduling=True, logits_processors=[f"{PROCS}:{proc}"]) as llm:
        steps = llm.engine.core.runner.steps
        in_flight, resolve_all = [], steps.resolve_all
        steps.resolve_all = lambda: (in_flight.append(len(steps.unresolved)), resolve_all())
        out = llm.generate(PROMPTS[:2], [_greedy(9, **extra), _greedy(12)], use_tqdm=False)
    assert any(in_flight) is waits
    prompt = out[0].prompt_token_ids
    forced = [prompt[0], prompt[-1]] * 4 + [prompt[0]] if waits else [9] * 9
    assert _tokens(out) == [forced, plain[PROMPTS[1]]]


def test_the_adapter_wraps_a_per_request_callable(tokenized_model, plain):
    with LLM(tokenized_model, **ENGINE, logits_processors=[f"{PROCS}:WrappedPerReqLogitsProcessor"]) as engine:
        params = [_greedy(6, target_token=128), _greedy(12), _greedy(6, target_token=67), _greedy(12)]
        out = _tokens(engine.generate(PROMPTS, params, use_tqdm=False))
    assert out == [[128] * 6, plain[PROMPTS[1]], [67] * 6, plain[PROMPTS[3]]]


def test_bad_extra_args_are_refused_at_add_request(llm, plain):
    with pytest.raises(ValueError, match="target_token must be a non-negative integer.*DummyLogitsProcessor"):
        llm.generate(PROMPTS[0], _greedy(4, target_token="x"), use_tqdm=False)
    assert _tokens(llm.generate(PROMPTS[1], _greedy(12), use_tqdm=False)) == [plain[PROMPTS[1]]]


def test_a_processor_that_raises_fails_its_steps_requests_only(llm, plain):
    out = llm.generate(PROMPTS[:2], [_greedy(6, boom=True), _greedy(6)], use_tqdm=False)
    for o in out:
        assert o.outputs[0].finish_reason == "error" and list(o.outputs[0].token_ids) == []
        assert "logits processor RaisingProcessor raised in apply: RuntimeError: boom" in o.outputs[0].stop_reason
        assert 0 < o.metrics.queued_ts <= o.metrics.scheduled_ts  # it was queued and scheduled
    after = llm.generate(PROMPTS, [_greedy(12), _greedy(12, target_token=5), _greedy(12), _greedy(12)],
                         use_tqdm=False)
    assert _tokens(after) == [plain[PROMPTS[0]], [5] * 12, plain[PROMPTS[2]], plain[PROMPTS[3]]]


def test_under_async_scheduling_a_failure_stays_with_its_steps_requests(tokenized_model, plain):
    """The step after a failure was scheduled before it was known, with the failed requests in
    it: they no longer reach the processors there (they are finished), so a request that joined
    in that step is served as usual instead of failing with them."""
    with LLM(tokenized_model, **ENGINE, async_scheduling=True,
             logits_processors=[f"{PROCS}:RaisingProcessor"]) as llm:
        engine, finished = llm.llm_engine, {}
        engine.add_request("a", PROMPTS[0], _greedy(8))
        engine.step()
        engine.add_request("boom", PROMPTS[1], _greedy(8, boom=True))
        engine.step()  # launches the step that fails
        engine.add_request("b", PROMPTS[2], _greedy(8))
        while engine.has_unfinished_requests():
            finished.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
    assert finished["a"].finish_reason == finished["boom"].finish_reason == "error"
    assert finished["b"].finish_reason == "length"
    assert list(finished["b"].token_ids) == plain[PROMPTS[2]][:8]


def test_a_data_parallel_engine_returns_the_failed_request(tokenized_model, plain):
    """With the cores in other processes the failure comes back as the request's output
    (finish reason "error", the cause its stop_reason), not as an exception; later requests
    are served."""
    with LLM(tokenized_model, **ENGINE, data_parallel_size=2,
             logits_processors=[f"{PROCS}:RaisingProcessor"]) as engine:
        (failed,) = engine.generate(PROMPTS[0], _greedy(6, boom=True), use_tqdm=False)
        assert failed.outputs[0].finish_reason == "error"
        assert "RaisingProcessor raised in apply: RuntimeError: boom" in failed.outputs[0].stop_reason
        assert _tokens(engine.generate(PROMPTS[1:3], _greedy(12), use_tqdm=False)) == [plain[PROMPTS[1]],
                                                                                       plain[PROMPTS[2]]]


def test_a_processor_that_returns_no_tensor_fails_its_steps_requests_only(tokenized_model, plain):
    """``apply`` must return the logits (a tensor of their shape); one that returns None fails
    the step's requests as a raising one does, naming what it returned; the engine goes on."""
    with LLM(tokenized_model, **ENGINE, logits_processors=[f"{PROCS}:NoneReturningProcessor"]) as engine:
        out = engine.generate(PROMPTS[:2], [_greedy(6, forget=True), _greedy(6)], use_tqdm=False)
        for o in out:
            assert o.outputs[0].finish_reason == "error"
            assert "NoneReturningProcessor returned NoneType from apply" in o.outputs[0].stop_reason
        assert _tokens(engine.generate(PROMPTS[1], _greedy(12), use_tqdm=False)) == [plain[PROMPTS[1]]]


def test_an_argmax_invariant_processor_applies_to_random_sampling_only(llm, plain):
    top_two = _processor(llm, __import__(PROCS, fromlist=["TopTwoProcessor"]).TopTwoProcessor)
    before = top_two.applied
    assert _tokens(llm.generate(PROMPTS[0], _greedy(12, top_two=True), use_tqdm=False)) == [plain[PROMPTS[0]]]
    assert top_two.applied == before  # all greedy: never asked
    params = SamplingParams(temperature=2.0, max_tokens=12, ignore_eos=True, logprobs=2, seed=1,
                            extra_args={"top_two": True})
    (out,) = llm.generate(PROMPTS[0], params, use_tqdm=False)
    assert top_two.applied > before
    for token, top in zip(out.outputs[0].token_ids, out.outputs[0].logprobs):
        ranked = sorted(top.items(), key=lambda kv: -kv[1].logprob)
        assert token in [t for t, _ in ranked[:2]]  # of the raw logprobs' two best


def test_min_p_applies_before_the_argmax_invariant_processors(tokenized_model):
    """vLLM's order: min-p (on the temperature-scaled logits) drops tokens first, then the
    argmax-invariant processors run; a processor that flattens the row samples among min-p's
    survivors only. Min-p after it would keep nearly every token (the row is flat by then)."""
    with LLM(tokenized_model, **ENGINE, logits_processors=[f"{PROCS}:FlatteningProcessor"]) as engine:
        params = SamplingParams(temperature=1.0, min_p=0.5, max_tokens=24, ignore_eos=True, logprobs=1, seed=3,
                                extra_args={"flatten": True})
        (out,) = engine.generate(PROMPTS[0], params, use_tqdm=False)
    for token, top in zip(out.outputs[0].token_ids, out.outputs[0].logprobs):
        best = max(lp.logprob for lp in top.values())  # the raw logprobs' best
        assert top[token].logprob >= best + math.log(0.5) - 1e-5  # a min-p survivor


def test_speculative_decoding_and_pooling_are_refused(tokenized_model):
    with pytest.raises(ValueError, match="speculative decoding"):
        LLM(tokenized_model, **ENGINE, logits_processors=[DummyLogitsProcessor],
            speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2})
    with pytest.raises(ValueError, match="logits_processors apply to generating models"):
        LLM(tokenized_model, **ENGINE, convert="embed", logits_processors=[DummyLogitsProcessor])


def test_tensor_parallel_ranks_load_the_processor_by_name(tokenized_model, plain):
    """Worker processes (mp executor, gloo) import the class by name; a class of a function
    body cannot cross and is refused before any worker starts."""
    with LLM(tokenized_model, **ENGINE, tensor_parallel_size=2, logits_processors=[DummyLogitsProcessor]) as tp:
        assert len(tp.engine.core.executor.worker_info) == 2
        out = _tokens(tp.generate(PROMPTS[:2], [_greedy(6, target_token=99), _greedy(12)], use_tqdm=False))
    assert out == [[99] * 6, plain[PROMPTS[1]]]

    class Local(DummyLogitsProcessor):
        pass

    with pytest.raises(ValueError, match="defined in a function.*move it into a module"):
        LLM(tokenized_model, **ENGINE, tensor_parallel_size=2, logits_processors=[Local])


def test_classes_are_loaded_by_name_and_checked():
    assert load_class(f"{PROCS}:DummyLogitsProcessor") is DummyLogitsProcessor
    assert load_class(f"{PROCS}.DummyLogitsProcessor") is DummyLogitsProcessor
    with pytest.raises(ValueError, match="not a subclass of tessellm.sample.logits_processor.LogitsProcessor"):
        load_class("collections:OrderedDict")
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_class("no_such_module_here:Proc")
    assert spawn_names([DummyLogitsProcessor, "a:B"]) == [f"{PROCS}:DummyLogitsProcessor", "a:B"]

    class Local(DummyLogitsProcessor):
        pass

    with pytest.raises(ValueError, match="move it into a module"):
        spawn_names([Local])


class _Req:
    """A stand-in for the runner's per-request state (only what batch_update reads)."""

    def __init__(self, name):
        self.name, self.params, self.token_ids, self.num_prompt_tokens, self.embeds_prompt = name, name, [], 0, False


def test_batch_updates_keep_every_index_on_its_request():
    """Random batches: applying each update (removed, added, moved, vLLM's order) to a dict
    gives index i -> rows[i]; added indices never collide with removed ones (vLLM's helper
    processes added before removed)."""
    rng = random.Random(0)
    pool = [_Req(i) for i in range(12)]
    before, state = [], {}
    for _ in range(400):
        rows = rng.sample(pool, rng.randint(0, 8))
        if rng.random() < 0.2:  # a preempted request comes back as a new state object
            i = rng.randrange(len(pool))
            pool[i] = _Req(pool[i].name)
        update = batch_update(before, rows)
        if update is None:
            assert rows == before
        else:
            assert not set(update.removed) & {i for i, *_ in update.added}
            assert all(how in MoveDirectionality for *_, how in update.moved)
            process_dict_updates(state, update, lambda params, _, __: params)
            assert update.batch_size == len(rows)
        assert state == {i: r.name for i, r in enumerate(rows)}
        before = rows
