"""The batch-level logits processor interface, with vLLM v1's names and meanings.

A processor sees the whole batch of sampled rows each step. Row ``i`` of the logits given to
``apply`` is the request the processor last saw at batch index ``i``; ``update_state`` tells it,
before every step, which requests left (``removed``), which came (``added``, with their
``SamplingParams``, prompt ids and a live view of their output ids) and which changed index
(``moved``). Apply the three in that order: removed, added, moved::

    before   0:A  1:B  2:C          removed [1]   added [(1, D, ...)]   moved [(2, 0, SWAP)]
    after    0:C  1:D  2:A
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any, Optional

import torch


class MoveDirectionality(Enum):
    UNIDIRECTIONAL = auto()  # i1 -> i2: i2 takes i1's request, i1 is left empty
    SWAP = auto()  # i1 <-> i2: the two requests trade places


RemovedRequest = int  # a batch index that no longer holds a request
# (index, its SamplingParams, prompt token ids (None: an embeddings prompt), output token ids
# so far: a live view, so a processor that keeps it reads later tokens too)
AddedRequest = tuple[int, Any, Optional[Sequence[int]], Sequence[int]]
MovedRequest = tuple[int, int, MoveDirectionality]  # (index 1, index 2, how)


@dataclass(frozen=True)
class BatchUpdate:
    """What changed in the batch since the processor's last ``update_state``."""

    batch_size: int  # requests in the batch after the update (the logits' rows)
    removed: Sequence[RemovedRequest]
    added: Sequence[AddedRequest]
    moved: Sequence[MovedRequest]


class LogitsProcessor(ABC):
    """A custom logits processor (vLLM v1's ``LogitsProcessor``). Given to the engine as a
    class (``LLM(logits_processors=[Cls])``, ``--logits-processors module:Cls``, or the entry
    point groups ``tessellm.logits_processors`` / ``vllm.logits_processors``); one instance per
    engine (per rank), built in the process that samples."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Called when a request is added: raise ValueError for per-request arguments
        (``sampling_params.extra_args``) this processor cannot take; the request is then
        refused (HTTP 400 at the server) and the engine never sees it."""
        return None

    @abstractmethod
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        """``vllm_config``: a ``tessellm.core.engine_surface.VllmConfig`` (model_config,
        cache_config, scheduler_config, parallel_config); ``device``: where the logits are;
        ``is_pin_memory``: whether host tensors may be pinned there."""
        raise NotImplementedError

    @abstractmethod
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The float32 ``[batch_size, vocab]`` logits with this processor applied; may be
        modified in place, and must be returned."""
        raise NotImplementedError

    @abstractmethod
    def is_argmax_invariant(self) -> bool:
        """True if it never changes which token has the largest logit: it is then applied to
        random sampling only (after temperature), never to greedy rows."""
        raise NotImplementedError

    @abstractmethod
    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        """Called before every step that samples; ``batch_update`` is None when the batch is
        the same requests at the same indices as the step before (only their outputs grew)."""
        raise NotImplementedError
