"""``AdapterLogitsProcessor``: a batch-level processor made of per-request callables (vLLM's).

A subclass says, per request, which callable (if any) processes its row:
``new_req_logits_processor(params)`` returns ``fn(output_ids, logits_row)`` or
``fn(prompt_ids, output_ids, logits_row)`` (vLLM v0's request-level form), or None. Each step
the callable gets the request's output ids so far and its ``[vocab]`` row, and returns the
row (changed in place or a new tensor).
"""

from __future__ import annotations

import inspect
from abc import abstractmethod
from functools import partial
from typing import Callable, Optional

import torch

from tessellm.sample.logits_processor.builtin import process_dict_updates
from tessellm.sample.logits_processor.interface import BatchUpdate, LogitsProcessor

# fn(output_ids, logits_row) -> logits_row, or fn(prompt_ids, output_ids, logits_row)
RequestLogitsProcessor = Callable[..., torch.Tensor]


class AdapterLogitsProcessor(LogitsProcessor):
    """Subclass it, implement ``is_argmax_invariant`` and ``new_req_logits_processor``; an
    ``__init__`` of its own must call ``super().__init__(vllm_config, device, is_pin_memory)``."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        # batch index -> the request's callable with its id lists bound (live: later tokens seen)
        self.req_info: dict[int, partial] = {}

    @abstractmethod
    def new_req_logits_processor(self, params) -> Optional[RequestLogitsProcessor]:
        """The callable for a request with these ``SamplingParams``; None: leave its row alone."""
        raise NotImplementedError

    def _new_state(self, params, prompt_ids, output_ids) -> Optional[partial]:
        fn = self.new_req_logits_processor(params)
        if fn is None:
            return None
        takes_prompt = len(inspect.signature(fn).parameters) == 3
        return partial(fn, prompt_ids, output_ids) if takes_prompt else partial(fn, output_ids)

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        process_dict_updates(self.req_info, batch_update, self._new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, fn in self.req_info.items():
            row = logits[index]
            new = fn(row)
            if new is not row:
                logits[index] = new
        return logits
