"""msgpack encodings of what the engine core and its workers exchange each step.

Plain data only (ids, counts, sampling parameters): never pickle, so a worker on another host
can only ever be handed numbers and strings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from tessellm.core.model_runner import ModelRunnerOutput
from tessellm.core.sampling_params import SamplingParams
from tessellm.core.scheduler import CachedRequestData, NewRequestData, SchedulerOutput


def pack(message: Any) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _params(p: SamplingParams) -> dict:
    d = dataclasses.asdict(p)
    d.pop("extra", None)  # free-form, never read by the engine
    return d


def encode_scheduler_output(s: SchedulerOutput) -> list:
    return [[[r.request_id, r.prompt_token_ids, r.all_token_ids, _params(r.sampling_params),
              r.block_ids, r.num_computed_tokens] for r in s.new_requests],
            [[c.request_id, c.new_block_ids, c.num_computed_tokens, c.new_token_ids]
             for c in s.cached_requests],
            s.num_scheduled_tokens, s.total_num_scheduled_tokens, sorted(s.finished_request_ids),
            s.num_preempted]


def decode_scheduler_output(v: list) -> SchedulerOutput:
    new = [NewRequestData(rid, prompt, all_ids, SamplingParams(**params), blocks, computed)
           for rid, prompt, all_ids, params, blocks, computed in v[0]]
    cached = [CachedRequestData(*c) for c in v[1]]
    return SchedulerOutput(new, cached, v[2], v[3], set(v[4]), v[5])


def encode_runner_output(o: ModelRunnerOutput) -> list:
    return [o.sampled, o.logprobs, o.prompt_logprobs]


def decode_runner_output(v: list) -> ModelRunnerOutput:
    return ModelRunnerOutput(*v)
