"""What crosses the process boundary: msgpack only, and everything survives the round trip."""

from __future__ import annotations

import msgpack

from tessellm.core.engine_core import EngineCoreRequest
from tessellm.core.engine_process import (decode_output, decode_request, encode_output, encode_request,
                                          pack, unpack)
from tessellm.core.sampling_params import SamplingParams
from tessellm.core.engine_output import EngineCoreOutput


def test_request_round_trip_is_plain_msgpack():
    params = SamplingParams(n=1, temperature=0.7, top_k=5, seed=3, max_tokens=9, stop=["\n"],
                            stop_token_ids=[2], logit_bias={17: -5.0, 4: 2.5}, logprobs=2,
                            extra={"not": object()},  # free-form extras stay behind
                            extra_args={"tenant": "blue", "w": 2, "r": 0.5, "tags": ["a", 1]})  # vllm_xargs
    req = EngineCoreRequest("r1", [1, 2, 3], params, 123.5, cache_salt="s", wait_for="r0", priority=-4)
    data = pack(["add", encode_request(req)])
    # plain msgpack: a reader with no custom hooks (no pickle, no ext types) decodes it
    assert msgpack.unpackb(data, raw=False, strict_map_key=False)[0] == "add"
    back = decode_request(unpack(data)[1])
    assert back.request_id == "r1" and back.prompt_token_ids == [1, 2, 3]
    assert back.arrival_time == 123.5 and back.cache_salt == "s" and back.wait_for == "r0"
    assert back.priority == -4
    assert back.sampling_params.extra_args == {"tenant": "blue", "w": 2, "r": 0.5, "tags": ["a", 1]}
    assert back.sampling_params.logit_bias == {17: -5.0, 4: 2.5}
    assert back.sampling_params.clone(extra={}) == params.clone(extra={})


def test_output_round_trip():
    out = EngineCoreOutput("r1", [5, 6], "stop", 6, logprobs=[(5, -0.1, 1, [(5, -0.1), (7, -2.0)])],
                           prompt_logprobs=None, num_cached_tokens=16)
    back = decode_output(unpack(pack(encode_output(out))))
    assert back.request_id == "r1" and back.new_token_ids == [5, 6]
    assert back.finish_reason == "stop" and back.stop_reason == 6 and back.num_cached_tokens == 16
    token, logprob, rank, top = back.logprobs[0]
    assert (token, logprob, rank) == (5, -0.1, 1) and [tuple(t) for t in top] == [(5, -0.1), (7, -2.0)]


def test_output_by_name_refuses_another_schema_version():
    from tessellm.core.step import STEP_SCHEMA_VERSION, StepSchemaError

    encoded = unpack(pack(encode_output(EngineCoreOutput("r1", [5]))))
    assert encoded["v"] == STEP_SCHEMA_VERSION and encoded["request_id"] == "r1"
    assert decode_output(dict(encoded)).new_token_ids == [5]
    for bad, words in (({**encoded, "v": STEP_SCHEMA_VERSION + 1}, "schema version"),
                       ({**encoded, "mystery": 1}, "mystery")):
        try:
            decode_output(bad)
        except StepSchemaError as exc:
            assert words in str(exc) and "same tessellm version" in str(exc)
        else:
            raise AssertionError("an unknown schema must be refused")
