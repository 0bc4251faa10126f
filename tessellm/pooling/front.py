"""The front end's side of pooling: which requests an engine takes, and their parameters.

A pooling request enters the core as a prompt with ``POOLING_SAMPLING`` (one "token", never
sampled: the runner pools instead, and the scheduler finishes the request with its prompt);
its PoolingParams stay here and are applied to the vector the core sends back.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from tessellm.core.sampling_params import RequestOutputKind, SamplingParams
from tessellm.core.scheduler_config import RequestParamError
from tessellm.pooling.params import POOLING_TASKS, PoolingParams

# One result per request, when it finishes (no partial outputs while its prompt is computed)
POOLING_SAMPLING = SamplingParams(max_tokens=1, temperature=0.0, output_kind=RequestOutputKind.FINAL_ONLY)


class RunnerMismatchError(ValueError):
    """A request for what this engine does not do (generate on a pooling engine, or the reverse)."""


def _wrong_task(task: str, info) -> str:
    if info.pooling.get("task", "embed") == "classify":
        return (f"This model is a sequence classifier ({info.pooling['num_labels']} labels): it does "
                f"not {task}. Use LLM.classify / POST /classify (per token: task token_classify)"
                + (", or LLM.score / POST /score, /rerank (it is a cross-encoder)."
                   if info.pooling["num_labels"] == 1 else "."))
    return (f"This model is an embedding model: it does not {task}; {task} needs a "
            "*ForSequenceClassification checkpoint (a score head). Use LLM.embed / POST "
            "/v1/embeddings (per token: task token_embed), or LLM.score / POST /score, /rerank "
            "(cosine similarity).")


def check_generates(info) -> None:
    if getattr(info, "runner", "generate") == "pooling":
        if info.pooling.get("task") == "classify":
            raise RunnerMismatchError(
                "This engine runs a sequence classifier (runner='pooling'): it does not generate "
                "text. Use LLM.classify / POST /classify (LLM.score, /score, /rerank for a cross-encoder).")
        raise RunnerMismatchError(
            "This engine runs an embedding model (runner='pooling'): it does not generate text. "
            "Use LLM.embed / POST /v1/embeddings, or start it with runner='generate'.")


def resolve_pooling_params(params: Optional[PoolingParams], info,
                           truncate_prompt_tokens: Optional[int] = None) -> PoolingParams:
    """The request's PoolingParams, checked, with the engine's task and its default
    ``normalize`` (embed) or ``use_activation`` (classify) filled in."""
    if getattr(info, "runner", "generate") != "pooling":
        raise RunnerMismatchError(
            "This engine generates text (runner='generate'): it has no embeddings, classes or "
            "scores. Start it with runner='pooling' (--runner pooling, or vLLM's --task embed) for "
            "an embedding model or a *ForSequenceClassification checkpoint.")
    params = params if params is not None else PoolingParams()
    if not isinstance(params, PoolingParams):
        raise ValueError(f"pooling_params must be a PoolingParams, got {type(params).__name__}.")
    if truncate_prompt_tokens is not None:
        params = replace(params, truncate_prompt_tokens=truncate_prompt_tokens)
    engine_task = info.pooling.get("task", "embed")
    task = params.task or engine_task
    if task not in POOLING_TASKS:
        raise RequestParamError(f"task {task!r} is not a pooling task; use one of "
                                f"{', '.join(POOLING_TASKS)}.", "task")
    if task.removeprefix("token_") != engine_task:
        raise RunnerMismatchError(_wrong_task(task, info))
    if engine_task == "classify":
        for name in ("dimensions", "normalize"):
            if getattr(params, name) is not None:
                raise RequestParamError(f"{name} applies to embeddings; this model classifies "
                                        "(use use_activation for raw logits).", name)
        params.verify(0)
        default = info.pooling.get("use_activation", True)
        return replace(params, task=task, use_activation=default if params.use_activation is None
                       else params.use_activation)
    if params.use_activation is not None:
        raise RequestParamError("use_activation applies to a classification model's probabilities; "
                                "for an embedding, use normalize.", "use_activation")
    params = replace(params, task=task)
    params.verify(info.pooling["hidden_size"], info.pooling.get("matryoshka_dimensions"))
    if params.normalize is None:
        params = replace(params, normalize=info.pooling["normalize"])
    return params
