"""``LLM.beam_search`` (vLLM's algorithm, above the engine: tessellm/entrypoints/beam_search.py)
on tiny random float32 models, cpu.

Without EOS the beams equal HF transformers' beam search with ``length_penalty=0.0,
early_stopping="never"`` (the settings under which HF's algorithm is the textbook one, which
vLLM's is too). With EOS and a length penalty the two differ by design (the module's
docstring), so there the reference is an exhaustive search written here: on an 8-token
vocabulary with ``beam_width`` above every candidate count, beam search must return the best
sequences of all of them. Each step's requests hit the prefix cache (the engine's counters)."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from tessellm import LLM, BeamSearchParams

ENGINE = dict(device="cpu", dtype="float32", seed=0, block_size=4)
PROMPTS = [[5, 17, 42, 99, 3, 250, 11, 8, 64, 90, 120], [7, 7, 12, 30, 301]]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir("llama-sharp")


def _hf_beams(path, prompt, width, max_tokens):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), num_beams=width, num_return_sequences=width,
                      do_sample=False, max_new_tokens=max_tokens, length_penalty=0.0, early_stopping="never",
                      eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    return out.sequences.tolist(), out.sequences_scores.tolist()


@pytest.mark.parametrize("width", [2, 4])
def test_beams_equal_hf_without_eos(tiny, width):
    max_tokens = 6
    with LLM(tiny, **ENGINE) as llm:
        kv = llm.engine.core.scheduler.kv.stats
        queries, hits = kv.queries, kv.hits
        outs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS],
                               BeamSearchParams(beam_width=width, max_tokens=max_tokens, ignore_eos=True))
        computed = (kv.queries - queries) - (kv.hits - hits)
    requests = len(PROMPTS) * (1 + width * (max_tokens - 1))
    for prompt, out in zip(PROMPTS, outs):
        want, scores = _hf_beams(tiny, prompt, width, max_tokens)
        assert [s.tokens for s in out.sequences] == want
        assert [s.cum_logprob for s in out.sequences] == pytest.approx(scores, abs=1e-4)
        assert all(s.text is None for s in out.sequences)  # this model has no tokenizer
    # Every step's requests hit the prefix cache: a beam recomputes at most its last partial
    # block (block_size 4) plus its new token, never its whole prompt.
    uncached = sum(len(p) + t for p in PROMPTS for t in range(max_tokens)) * width
    assert computed <= sum(len(p) for p in PROMPTS) + requests * ENGINE["block_size"]
    assert computed < uncached / 3


def _computed(llm, prompt, params):
    kv = llm.engine.core.scheduler.kv.stats
    queries, hits = kv.queries, kv.hits
    out = llm.beam_search([prompt], params)[0].sequences
    return out, (kv.queries - queries) - (kv.hits - hits)


def test_sampled_candidates(tiny):
    """temperature > 0: a sampled token joins each beam's candidates, as vLLM's."""
    prompt, width, max_tokens = PROMPTS[0], 3, 5
    params = BeamSearchParams(beam_width=width, max_tokens=max_tokens, temperature=1.0, ignore_eos=True)
    with LLM(tiny, **ENGINE) as llm:
        out, computed = _computed(llm, {"prompt_token_ids": prompt}, params)
    assert len(out) == width and len({tuple(s.tokens) for s in out}) == width
    assert all(len(s.tokens) == len(prompt) + max_tokens and s.tokens[:len(prompt)] == prompt for s in out)
    assert [s.cum_logprob for s in out] == sorted((s.cum_logprob for s in out), reverse=True)
    assert computed <= len(prompt) + (1 + width * (max_tokens - 1)) * ENGINE["block_size"]


def test_cache_salt_is_kept_at_every_step(tiny):
    """A salted prompt's steps share no block with an unsalted search of the same prompt (they
    compute as much as on an empty cache), and hit their own blocks when searched again."""
    params = BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True)
    with LLM(tiny, **ENGINE) as llm:
        plain, fresh = _computed(llm, {"prompt_token_ids": PROMPTS[0]}, params)
        salted_prompt = {"prompt_token_ids": PROMPTS[0], "cache_salt": "tenant-a"}
        salted, computed = _computed(llm, salted_prompt, params)
        again, recomputed = _computed(llm, salted_prompt, params)
    assert [s.tokens for s in salted] == [s.tokens for s in again] == [s.tokens for s in plain]
    assert computed == fresh
    assert recomputed < computed


@pytest.fixture(scope="module")
def vocab8(tmp_path_factory):
    """A llama with 8 tokens, EOS = 3: small enough to enumerate every 3-token output."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.5, bos_token_id=1, eos_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(77)
    path = os.path.join(tmp_path_factory.mktemp("vocab8"), "llama")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


@torch.no_grad()
def _exhaustive(path, prompt, max_tokens, eos, length_penalty, keep_eos):
    """Every output a search of max_tokens steps can end with (stopped at EOS, or max_tokens
    long without one), scored as vLLM does, best first: (score, tokens, cum_logprob)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    vocab = hf.config.vocab_size
    logprobs = {}  # output prefix -> next-token log-softmax

    def next_lp(prefix):
        if prefix not in logprobs:
            logprobs[prefix] = torch.log_softmax(hf(torch.tensor([prompt + list(prefix)])).logits[0, -1], -1)
        return logprobs[prefix]

    ranked = []
    for length in range(1, max_tokens + 1):
        for out in itertools.product(range(vocab), repeat=length):
            if eos in out[:-1] or (out[-1] != eos and length < max_tokens):
                continue
            cum = sum(next_lp(out[:i])[t].item() for i, t in enumerate(out))
            tokens = prompt + list(out if out[-1] != eos or keep_eos else out[:-1])
            scored = len(prompt) + length - (out[-1] == eos)
            ranked.append((cum / scored ** length_penalty, tokens, cum))
    return sorted(ranked, key=lambda r: r[0], reverse=True)


@pytest.mark.parametrize("length_penalty,keep_eos", [(0.0, False), (1.0, True), (2.0, False), (-1.0, True)])
def test_eos_and_length_penalty_equal_exhaustive_search(vocab8, length_penalty, keep_eos):
    prompt, max_tokens, width = [1, 5, 2, 6], 3, 64  # 64 >= 7 * 7 beams: nothing is pruned early
    params = BeamSearchParams(beam_width=width, max_tokens=max_tokens, length_penalty=length_penalty,
                              include_stop_str_in_output=keep_eos)
    with LLM(vocab8, **ENGINE) as llm:
        out = llm.beam_search({"prompt_token_ids": prompt}, params)[0].sequences
    ref = _exhaustive(vocab8, prompt, max_tokens, 3, length_penalty, keep_eos)
    top = 12
    assert min(a[0] - b[0] for a, b in zip(ref[:top], ref[1:top + 1])) > 1e-5  # no ties decide it
    assert [s.tokens for s in out[:top]] == [r[1] for r in ref[:top]]
    assert [s.cum_logprob for s in out[:top]] == pytest.approx([r[2] for r in ref[:top]], abs=1e-4)
    assert len(out) == width
    finished = [s for s in out[:top] if s.finish_reason == "stop"]
    assert finished and all(s.stop_reason == 3 for s in finished)
    assert any(s.finish_reason is None for s in out[:top]) or length_penalty != 0.0
    assert all((s.tokens[-1] == 3) == keep_eos for s in finished)


def test_text_and_stop_at_eos_with_a_tokenizer(tokenized_model):
    with LLM(tokenized_model, **ENGINE) as llm:
        tok = llm.get_tokenizer()
        out = llm.beam_search(["The quick brown fox", "Once upon a time"],
                              BeamSearchParams(beam_width=3, max_tokens=5))
    for o in out:
        assert len(o.sequences) == 3
        scores = [s.cum_logprob / len(s.tokens) for s in o.sequences]
        assert scores == sorted(scores, reverse=True)
        for s in o.sequences:
            assert s.text == tok.decode(s.tokens)  # vLLM's: the prompt's text too


@pytest.mark.parametrize("kw,message", [
    (dict(beam_width=0, max_tokens=4), "beam_width must be an integer >= 1"),
    (dict(beam_width=2, max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(beam_width=2, max_tokens=4, temperature=-1.0), "temperature must be >= 0"),
    (dict(beam_width=2, max_tokens=4, length_penalty=math.inf), "length_penalty must be a finite number"),
])
def test_bad_params(kw, message):
    with pytest.raises(ValueError, match=message):
        BeamSearchParams(**kw)


def test_a_failed_step_ends_its_search_with_error(tiny):
    """The engine fails a step's requests (a custom logits processor raised): each prompt's
    search ends with one sequence, the prompt alone, finish_reason "error" and the cause as
    stop_reason (vLLM's server beam search answers the same); the next search is served."""
    from tests.sampling.failing_procs import POISON_TEMPERATURE

    procs = ["tests.sampling.failing_procs:PoisonedTemperatureProcessor"]
    with LLM(tiny, **ENGINE, logits_processors=procs) as llm:
        outs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS],
                               BeamSearchParams(beam_width=2, max_tokens=4, temperature=POISON_TEMPERATURE))
        for prompt, out in zip(PROMPTS, outs):
            (seq,) = out.sequences
            assert (seq.tokens, seq.finish_reason, seq.text) == (prompt, "error", "")
            assert "RuntimeError: poisoned temperature" in seq.stop_reason, seq.stop_reason
        served = llm.beam_search([{"prompt_token_ids": PROMPTS[0]}],
                                 BeamSearchParams(beam_width=2, max_tokens=4, ignore_eos=True))[0]
        assert [len(s.tokens) for s in served.sequences] == [len(PROMPTS[0]) + 4] * 2
        assert all(s.finish_reason is None for s in served.sequences)


def test_offline_beam_search_takes_a_priority_per_prompt(tiny):
    """``LLM.beam_search(priority=...)``, as ``generate``'s: one per prompt, for every step of its
    search; a first-come-first-served engine refuses a non-zero one naming the flag (it reaches
    the engine: not dropped to 0), a priority engine gives the same beams as without."""
    params = BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    with LLM(tiny, **ENGINE) as llm:
        with pytest.raises(ValueError, match=r"priority is 2, .*scheduling_policy='priority'"):
            llm.beam_search(prompts, params, priority=[0, 2])
        with pytest.raises(ValueError, match="1 values for 2 prompts; give one priority per prompt"):
            llm.beam_search(prompts, params, priority=[1])
        want = [[s.tokens for s in o.sequences] for o in llm.beam_search(prompts, params)]
    with LLM(tiny, **ENGINE, scheduling_policy="priority") as llm:
        got = llm.beam_search(prompts, params, priority=[3, -2])
    assert [[s.tokens for s in o.sequences] for o in got] == want


class _Connected:
    """The HTTP request's side the search reads: the client never leaves."""

    async def is_disconnected(self) -> bool:
        return False


async def _served_first(tiny: str) -> list[str]:
    """A priority engine of one sequence at a time, busy with a long request: a plain request
    (priority 0), then the server's beam search at priority -5, queue behind it; which ends
    first once the slot frees."""
    import asyncio

    from tessellm import SamplingParams
    from tessellm.config import EngineArgs
    from tessellm.core.input_processor import ProcessedPrompt
    from tessellm.entrypoints.async_llm import AsyncLLM
    from tessellm.entrypoints.openai.beam_search import beam_search

    engine = AsyncLLM(EngineArgs(model=tiny, **ENGINE, scheduling_policy="priority", max_num_seqs=1,
                                 enforce_eager=True))
    order: list[str] = []

    async def run(tag: str, prompt: list, max_tokens: int) -> None:
        async for _ in engine.generate({"prompt_token_ids": prompt}, SamplingParams(
                max_tokens=max_tokens, temperature=0, ignore_eos=True), request_id=tag):
            if tag == "long" and not started.is_set():
                started.set()
        order.append(tag)

    async def beams() -> None:
        await beam_search(engine, [ProcessedPrompt(None, PROMPTS[1])],
                          [BeamSearchParams(beam_width=2, max_tokens=1, ignore_eos=True)], None, None,
                          _Connected(), 1.0, priority=-5)
        order.append("beam")

    try:
        engine.start()
        started = asyncio.Event()
        long = asyncio.ensure_future(run("long", PROMPTS[0], 400))
        await started.wait()
        plain = asyncio.ensure_future(run("plain", PROMPTS[1], 1))
        await asyncio.sleep(0)  # the plain request is in the engine first
        await asyncio.gather(beams(), plain, long)
    finally:
        await engine.shutdown()
    return order


def test_server_beam_search_runs_at_the_request_priority(tiny):
    """The server's beam search (openai/beam_search.py) sends every step's beams at the
    request's priority: behind a running request, its step at -5 is served before a plain
    request at 0 that came first (at priority 0, as before, it would wait its turn)."""
    import asyncio

    order = asyncio.run(_served_first(tiny))
    assert order == ["long", "beam", "plain"], order
