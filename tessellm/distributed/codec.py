"""msgpack encodings of what the engine core and its workers exchange each step.

Plain data only (ids, counts, sampling parameters, a numpy bitmask as raw bytes): never
pickle, so a worker on another host can only ever be handed numbers and strings.

Every message is a map from field **name** to value, with the schema version under ``"v"``
(``tessellm.core.step.STEP_SCHEMA_VERSION``), so a field added to a step dataclass can never
shift the ones before it. A reader refuses another version, or a field name it does not know,
with one error that says to run the same tessellm on every host.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np

from tessellm.core.sampling_params import SamplingParams
from tessellm.core.prompt_embeds import PromptEmbeds, encode_prompt_embeds
from tessellm.multimodal.inputs import decode_features, encode_features
from tessellm.core.step import (STEP_SCHEMA_VERSION, CachedRequestData, ModelRunnerOutput,
                                NewRequestData, SchedulerOutput, StepSchemaError,  # noqa: F401
                                build_dataclass, check_version, dataclass_fields)


def pack(message: Any) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _params(p: SamplingParams) -> dict:
    d = dataclasses.asdict(p)
    d.pop("extra", None)  # free-form, never read by the engine
    return d


def encode_bitmask(mask) -> Any:
    if mask is None:
        return None
    mask = np.ascontiguousarray(mask, dtype=np.int32)
    return {"shape": list(mask.shape), "data": mask.tobytes()}


def decode_bitmask(d) -> Any:
    if d is None:
        return None
    return np.frombuffer(d["data"], dtype=np.int32).reshape(d["shape"]).copy()


def encode_scheduler_output(s: SchedulerOutput) -> dict:
    d = dataclass_fields(s)
    d["new_requests"] = [{**dataclass_fields(r), "sampling_params": _params(r.sampling_params),
                          "mm_features": encode_features(r.mm_features) or [],
                          "prompt_embeds": encode_prompt_embeds(r.prompt_embeds)}
                         for r in s.new_requests]
    d["cached_requests"] = [dataclass_fields(c) for c in s.cached_requests]
    d["finished_request_ids"] = sorted(s.finished_request_ids)
    d["preempted_request_ids"] = sorted(s.preempted_request_ids)
    d["grammar_bitmask"] = encode_bitmask(s.grammar_bitmask)
    d["v"] = STEP_SCHEMA_VERSION
    return d


def decode_scheduler_output(d: dict) -> SchedulerOutput:
    d = dict(d)
    check_version(d, "A SchedulerOutput")
    d["new_requests"] = [
        build_dataclass(NewRequestData, {**r, "sampling_params": SamplingParams(**r["sampling_params"]),
                                         "mm_features": decode_features(r.get("mm_features")),
                                         "prompt_embeds": PromptEmbeds.from_dict(r.get("prompt_embeds"))},
               "A NewRequestData") for r in d.get("new_requests", [])]
    d["cached_requests"] = [build_dataclass(CachedRequestData, c, "A CachedRequestData")
                            for c in d.get("cached_requests", [])]
    d["finished_request_ids"] = set(d.get("finished_request_ids", ()))
    d["preempted_request_ids"] = set(d.get("preempted_request_ids", ()))
    d["grammar_bitmask"] = decode_bitmask(d.get("grammar_bitmask"))
    return build_dataclass(SchedulerOutput, d, "A SchedulerOutput")


def encode_runner_output(o: ModelRunnerOutput) -> dict:
    return {**dataclass_fields(o), "v": STEP_SCHEMA_VERSION}


def decode_runner_output(d: dict) -> ModelRunnerOutput:
    d = dict(d)
    check_version(d, "A ModelRunnerOutput")
    return build_dataclass(ModelRunnerOutput, d, "A ModelRunnerOutput")
