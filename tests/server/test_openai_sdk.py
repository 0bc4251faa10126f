"""The official openai SDK against a real server: every feature it parses, streamed and not."""

from __future__ import annotations

import pytest

MODEL = "SmolLM2-135M-Instruct"

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_completion_stream_with_usage(client):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completion(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens <= 6


def test_completion_stream_matches_non_stream(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_token_id_prompts_and_echo(client):
    r = client.completions.create(model=MODEL, prompt=[[504, 3575, 282], [1780, 2365]], max_tokens=3,
                                  temperature=0, echo=True)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.prompt_tokens == 5


def test_n_2(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, n=2, seed=3,
                                       temperature=1.0)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.message.content for c in r.choices)
    assert 2 <= r.usage.completion_tokens <= 12
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, n=2, stream=True,
                                            temperature=1.0, seed=5))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    ends = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(ends) == [0, 1]


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)
    assert "".join(e.token for e in content) == r.choices[0].message.content


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(x <= 0 for x in lp.token_logprobs)
    assert lp.text_offset[0] == 0


def test_stop_strings(client):
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = base.choices[0].text
    assert "," in text
    stop = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0,
                                     stop=[","])
    assert stop.choices[0].text == text[:text.index(",")]
    assert stop.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12,
                                              temperature=0, stop=[","], stream=True))
    assert "".join(c.choices[0].text for c in streamed) == stop.choices[0].text


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=12,
                  temperature=1.0, top_p=0.95, seed=1234)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_greedy_chat_equals_llm_chat(client):
    import torch

    from tessellm import LLM, SamplingParams

    messages = [{"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": "Name three colors."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(max_model_len=1024, num_kv_blocks=64)
        ref = llm.chat(messages, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    finally:
        torch.set_num_threads(threads)
    assert r.choices[0].message.content == ref[0].outputs[0].text
    assert r.usage.completion_tokens == len(ref[0].outputs[0].token_ids)


def test_vllm_extras(client):
    r = client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=6, temperature=0.8, seed=7,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True,
                    "min_tokens": 6, "skip_special_tokens": True, "include_stop_str_in_output": False})
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
