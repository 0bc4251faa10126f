"""The step codec: every field of the step boundary survives msgpack, by name and versioned."""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest
import torch

from tessellm.core.prompt_embeds import PromptEmbeds
from tessellm.core.sampling_params import SamplingParams
from tessellm.core.step import (STEP_SCHEMA_VERSION, CachedRequestData, ModelRunnerOutput,
                                NewRequestData, SchedulerOutput, StepSchemaError)
from tessellm.distributed.codec import (decode_runner_output, decode_scheduler_output,
                                        encode_runner_output, encode_scheduler_output, pack, unpack)


def _full_step() -> SchedulerOutput:
    """A step with every field away from its default."""
    params = SamplingParams(temperature=0.5, top_k=3, seed=7, max_tokens=12, logit_bias={9: -1.5},
                            logprobs=2)
    return SchedulerOutput(
        new_requests=[NewRequestData("n", [1, 2, 3], [1, 2, 3, 4], params, [5, 6], 2,
                                     prompt_embeds=PromptEmbeds.from_tensor(torch.ones(3, 4), 4, "float32"))],
        cached_requests=[CachedRequestData("c", [8], 17, [40, 41])],
        num_scheduled_tokens={"n": 2, "c": 4}, total_num_scheduled_tokens=6,
        num_sampled_tokens={"n": 1, "c": 4}, spec_token_ids={"c": [41, 42, 43]},
        grammar_bitmask_rows={"c": 1},
        grammar_bitmask=np.arange(10, dtype=np.int32).reshape(5, 2) - 3, grammar_deferred=True,
        lora_slots={"c": 2}, lora_loads=[[2, {"name": "a", "id": 3, "path": "/a"}]],
        lora_prefetch=[{"name": "b", "id": 4, "path": "/b"}], lora_unloads=[5], spec_ahead={"c": 3}, kept_blocks={"c": 2},
        encoder_inputs={"n": [0, 1]}, kv_transfers=[[0, 7, 1], [1, 2, 9]],
        kv_connector_meta={"loads": [["n", [["k0", 5]]]], "saves": [["k1", 8]]},
        state_restores={"n": 3}, state_saves={"c": 4}, state_saves_within={"n": [[16, 7]]},
        state_saves_if_accepted={"c": [[12, 5], [16, 6]]},
        finished_request_ids={"f1", "f2"}, preempted_request_ids={"p"})


def _equal(a, b) -> bool:
    return np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b


def test_scheduler_output_round_trips_every_field():
    step = _full_step()
    for f in dataclasses.fields(SchedulerOutput):  # the fixture covers every field
        default = f.default_factory() if callable(f.default_factory) else f.default
        assert getattr(step, f.name) is not None and not _equal(getattr(step, f.name), default), f.name
    data = pack(encode_scheduler_output(step))
    raw = msgpack.unpackb(data, raw=False, strict_map_key=False)  # plain msgpack, no hooks
    assert raw["v"] == STEP_SCHEMA_VERSION and "spec_token_ids" in raw
    back = decode_scheduler_output(unpack(data))
    for f in dataclasses.fields(SchedulerOutput):
        if f.name not in ("grammar_bitmask", "new_requests"):
            assert getattr(back, f.name) == getattr(step, f.name), f.name
    assert np.array_equal(back.grammar_bitmask, step.grammar_bitmask)
    assert back.grammar_bitmask.dtype == np.int32
    new, orig = back.new_requests[0], step.new_requests[0]
    assert dataclasses.replace(new, sampling_params=None) == dataclasses.replace(orig, sampling_params=None)
    assert new.sampling_params.clone(extra={}) == orig.sampling_params.clone(extra={})
    assert back.num_preempted == 1 and back.dropped_request_ids == {"f1", "f2", "p"}


def test_runner_output_round_trips():
    out = ModelRunnerOutput({"a": [1, 2, 3]}, {"a": [(1, -0.5, 1, [(1, -0.5)])] * 3},
                            {"b": [None, (4, -1.0, 2, [])]}, kv_load_failed=["b"])
    back = decode_runner_output(unpack(pack(encode_runner_output(out))))
    assert back.sampled == out.sampled and back.kv_load_failed == ["b"]
    assert [tuple(x[:3]) for x in back.logprobs["a"]] == [(1, -0.5, 1)] * 3
    assert back.prompt_logprobs["b"][0] is None


@pytest.mark.parametrize("decode,encoded", [
    (decode_scheduler_output, encode_scheduler_output(_full_step())),
    (decode_runner_output, encode_runner_output(ModelRunnerOutput())),
])
def test_unknown_version_or_field_is_refused_clearly(decode, encoded):
    with pytest.raises(StepSchemaError, match="schema version 99.*same tessellm version"):
        decode({**encoded, "v": 99})
    with pytest.raises(StepSchemaError, match="schema version None"):
        decode({k: v for k, v in encoded.items() if k != "v"})
    with pytest.raises(StepSchemaError, match=r"\['draft_probs'\].*does not know"):
        decode({**encoded, "draft_probs": [0.5]})


def test_a_new_field_with_a_default_may_be_left_out():
    encoded = encode_scheduler_output(_full_step())
    del encoded["lora_slots"]  # an older sender that had no such field
    assert decode_scheduler_output(encoded).lora_slots == {}
