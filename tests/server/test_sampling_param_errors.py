"""A request value that only SamplingParams refuses becomes a 400 whose ``param`` names the
request's field (``to_sampling_params``). The HTTP routes' pydantic bounds (``ge=-1``) catch
``logprobs=-2`` first; a request built past them reaches SamplingParams' refusal, whose message
starts ``logprobs must be ...`` (chat: the request's field is top_logprobs)."""

from __future__ import annotations

import pytest

from tessellm.entrypoints.openai.errors import OpenAIError
from tessellm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from tessellm.entrypoints.openai.sampling import to_sampling_params

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("request_, param", [
    (CompletionRequest.model_construct(prompt="hi", logprobs=-2), "logprobs"),
    (CompletionRequest.model_construct(prompt="hi", prompt_logprobs=-2), "prompt_logprobs"),
    (ChatCompletionRequest.model_construct(messages=MESSAGES, logprobs=True, top_logprobs=-2), "top_logprobs"),
    (CompletionRequest.model_construct(prompt="hi", temperature=-1.0), "temperature"),
])
def test_the_error_names_the_requests_field(request_, param):
    with pytest.raises(OpenAIError) as info:
        to_sampling_params(request_, max_tokens=4, vocab_size=100)
    assert info.value.status == 400 and info.value.param == param, (info.value.param, info.value.message)
