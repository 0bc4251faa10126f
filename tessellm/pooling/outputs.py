"""Results of a pooling engine, shaped like vLLM's ``PoolingRequestOutput`` /
``EmbeddingRequestOutput`` / ``ClassificationRequestOutput`` / ``ScoringRequestOutput``
(``LLM.encode`` / ``LLM.embed`` / ``LLM.classify`` / ``LLM.score``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class PoolingOutput:
    data: torch.Tensor  # float32 [dimensions] (per-token tasks: [tokens, width]) after the request's params


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class PoolingRequestOutput:
    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    finished: bool
    prompt: Optional[str] = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class _TaskRequestOutput:
    """A task's view of a ``PoolingRequestOutput`` (vLLM's ``EmbeddingRequestOutput``,
    ``ClassificationRequestOutput``): the same request fields, ``outputs`` the pooled values
    wrapped in the task's type (``_wrap``, a class attribute of each subclass)."""
    request_id: str
    outputs: object
    prompt_token_ids: list[int]
    finished: bool
    prompt: Optional[str] = None

    @classmethod
    def from_base(cls, out: PoolingRequestOutput):
        return cls(out.request_id, cls._wrap(out.outputs.data.tolist()), out.prompt_token_ids,
                   out.finished, out.prompt)


@dataclass
class EmbeddingRequestOutput(_TaskRequestOutput):
    outputs: EmbeddingOutput
    _wrap = EmbeddingOutput


@dataclass
class ClassificationOutput:
    probs: list[float]  # softmax over the labels (sigmoid for one), or logits without activation

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ClassificationRequestOutput(_TaskRequestOutput):
    outputs: ClassificationOutput
    _wrap = ClassificationOutput


@dataclass
class ScoringOutput:
    score: float  # a cross-encoder's sigmoid(logit), or the cosine similarity of two embeddings


@dataclass
class ScoringRequestOutput:
    request_id: str
    outputs: ScoringOutput
    prompt_token_ids: list[int]  # the pair's tokens (cross-encoder), or the two prompts' concatenated
    finished: bool


def pooling_output(state) -> PoolingRequestOutput:
    """A pooling request's result from the output processor's state (an empty vector when it
    ended without one: aborted)."""
    data = torch.zeros(0)
    if state.pooled is not None:
        from tessellm.pooling.pooler import unpack_rows

        raw = unpack_rows(state.pooled) if isinstance(state.pooled, dict) else state.pooled
        values = state.pooling.apply(raw, True)  # raw logits may still be the received bytes
        data = torch.from_numpy(values if values.flags.writeable else values.copy())
    return PoolingRequestOutput(state.request_id, PoolingOutput(data), state.prompt_token_ids,
                                state.finished, state.prompt, state.num_cached_tokens)
