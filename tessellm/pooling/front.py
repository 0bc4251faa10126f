"""The front end's side of pooling: which requests an engine takes, and their parameters.

A pooling request enters the core as a prompt with ``POOLING_SAMPLING`` (one "token", never
sampled: the runner pools instead, and the scheduler finishes the request with its prompt);
its PoolingParams stay here and are applied to the vector the core sends back.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from tessellm.core.sampling_params import SamplingParams
from tessellm.pooling.params import PoolingParams

POOLING_SAMPLING = SamplingParams(max_tokens=1, temperature=0.0)


class RunnerMismatchError(ValueError):
    """A request for what this engine does not do (generate on a pooling engine, or the reverse)."""


def check_generates(info) -> None:
    if getattr(info, "runner", "generate") == "pooling":
        raise RunnerMismatchError(
            "This engine runs an embedding model (runner='pooling'): it does not generate text. "
            "Use LLM.embed / POST /v1/embeddings, or start it with runner='generate'.")


def resolve_pooling_params(params: Optional[PoolingParams], info,
                           truncate_prompt_tokens: Optional[int] = None) -> PoolingParams:
    """The request's PoolingParams, checked, with the engine's default ``normalize`` filled in."""
    if getattr(info, "runner", "generate") != "pooling":
        raise RunnerMismatchError(
            "This engine generates text (runner='generate'): it has no embeddings. Start it with "
            "runner='pooling' (--runner pooling, or vLLM's --task embed) for an embedding model.")
    params = params if params is not None else PoolingParams()
    if not isinstance(params, PoolingParams):
        raise ValueError(f"pooling_params must be a PoolingParams, got {type(params).__name__}.")
    if truncate_prompt_tokens is not None:
        params = replace(params, truncate_prompt_tokens=truncate_prompt_tokens)
    params.verify(info.pooling["hidden_size"], info.pooling.get("matryoshka_dimensions"))
    if params.normalize is None:
        params = replace(params, normalize=info.pooling["normalize"])
    return params
