"""vLLM's repetition_detection: a request whose output ends with min_count copies of one
pattern stops there, finish reason "repetition"; an output without one is untouched."""

from __future__ import annotations

import random

import pytest

from tessellm import LLM, SamplingParams
from tessellm.core.repetition import RepetitionDetectionParams, RepetitionDetector


def repeats(output: list[int], low: int, high: int, count: int) -> bool:
    """The rule by brute force: for some length L in [low, high] the last L * count tokens are
    count equal blocks of L."""
    for length in range(max(1, low), high + 1):
        span = length * count
        if span <= len(output):
            tail = output[len(output) - span:]
            if all(tail[j * length:(j + 1) * length] == tail[:length] for j in range(count)):
                return True
    return False


@pytest.mark.parametrize("low, high, count", [(0, 1, 2), (0, 3, 2), (2, 4, 3), (1, 6, 4), (3, 3, 2)])
def test_detector_agrees_with_the_rule_on_every_prefix(low, high, count):
    rng = random.Random(low * 100 + high * 10 + count)
    for _ in range(60):
        prompt = [rng.randrange(3) for _ in range(rng.randrange(4))]  # never looked at
        output = [rng.randrange(rng.choice((2, 3, 5))) for _ in range(rng.randrange(1, 40))]
        detector = RepetitionDetector(RepetitionDetectionParams(high, low, count))
        tokens = list(prompt)
        for i, tok in enumerate(output):
            tokens.append(tok)
            assert detector.add(tokens, len(prompt)) == repeats(output[:i + 1], low, high, count)


@pytest.mark.parametrize("fields, match", [
    ({"max_pattern_size": 4, "min_count": 1}, "min_count must be >= 2"),
    ({"max_pattern_size": 2, "min_pattern_size": 3, "min_count": 2}, "min_pattern_size <= max_pattern_size"),
    ({"max_pattern_size": -1}, "must be >= 0"),
    ({"max_pattern_size": 2, "min_count": 2, "window": 9}, "unknown field"),
    ({"max_pattern_size": 2.5, "min_count": 2}, "must be an integer"),
    # past 64 bits the request could not reach the engine core (msgpack): refused here, a 400
    ({"max_pattern_size": 2 ** 64, "min_count": 2}, "below 2\\*\\*63"),
])
def test_bad_parameters_are_refused_in_one_sentence(fields, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(repetition_detection=fields)


def test_all_zero_is_off():
    params = SamplingParams(repetition_detection={})
    assert isinstance(params.repetition_detection, RepetitionDetectionParams)
    assert not params.repetition_detection.enabled


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("llama"), dtype="float32")


def _greedy(llm, prompt, n=40, **kw):
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)
    return llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0]


def _first_hit(output, low, high, count, start=1):
    return next((k for k in range(start, len(output) + 1) if repeats(output[:k], low, high, count)), None)


@pytest.mark.parametrize("low, high, count", [(2, 8, 3), (0, 2, 2)])
def test_a_looping_output_stops_at_the_token_that_completes_the_repetition(llm, low, high, count):
    """The tiny model's greedy output after [100, 200, 300] (and [1, 2, 3, 4]) loops: it stops
    on the token that completes ``count`` copies, with vLLM's finish and stop reasons."""
    for prompt in ([100, 200, 300], [1, 2, 3, 4]):
        full = list(_greedy(llm, prompt).token_ids)
        k = _first_hit(full, low, high, count)
        assert k is not None and k < len(full), (prompt, full)  # the model does loop
        co = _greedy(llm, prompt, repetition_detection=RepetitionDetectionParams(high, low, count))
        assert list(co.token_ids) == full[:k]
        assert (co.finish_reason, co.stop_reason) == ("repetition", "repetition_detected")
        # min_tokens holds the check off; it fires at the first repeat from there on
        later = _first_hit(full, low, high, count, start=k + 1)
        co = _greedy(llm, prompt, min_tokens=k + 1,
                     repetition_detection={"max_pattern_size": high, "min_pattern_size": low, "min_count": count})
        assert list(co.token_ids) == full[:later or len(full)]
        assert co.finish_reason == ("repetition" if later else "length")


def test_an_output_without_the_repetition_runs_to_its_length(llm):
    prompt = [5, 77, 31, 200, 9]
    full = list(_greedy(llm, prompt, n=30).token_ids)
    assert _first_hit(full, 1, 4, 3) is None
    co = _greedy(llm, prompt, n=30, repetition_detection=RepetitionDetectionParams(4, 1, 3))
    assert list(co.token_ids) == full and co.finish_reason == "length"


def test_a_huge_max_pattern_size_costs_the_output_not_its_size(llm):
    """max_pattern_size has no upper bound (vLLM's rule): a request asking 10**12 must not make
    the engine core allocate (MemoryError, which killed the core) or loop over 10**12 lengths
    per token; the detector only holds the lengths the output has reached, and agrees with the
    rule; in the engine the request stops as it would with max_pattern_size = its output's
    length, beside a request without the detection."""
    huge = 10 ** 12
    rng = random.Random(7)
    for _ in range(20):
        output = [rng.randrange(rng.choice((2, 3))) for _ in range(rng.randrange(1, 30))]
        detector = RepetitionDetector(RepetitionDetectionParams(huge, 0, 2))
        for i in range(len(output)):
            assert detector.add(output[:i + 1]) == repeats(output[:i + 1], 0, i + 1, 2)
        assert len(detector.runs) <= len(output)
    prompt = [100, 200, 300]
    full = list(_greedy(llm, prompt).token_ids)
    k = _first_hit(full, 0, len(full), 2)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                            repetition_detection=RepetitionDetectionParams(huge, 0, 2))
    plain = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    got = llm.generate([{"prompt_token_ids": prompt}] * 2, [params, plain], use_tqdm=False)
    assert list(got[0].outputs[0].token_ids) == full[:k] and got[0].outputs[0].finish_reason == "repetition"
    assert list(got[1].outputs[0].token_ids) == full
