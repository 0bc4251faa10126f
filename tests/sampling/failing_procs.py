"""A custom logits processor that fails requests whose routes carry no ``extra_args`` (beam
search's step requests, /v1/responses): it keys on the temperature instead."""

from __future__ import annotations

import torch

from tessellm.sample.logits_processor import LogitsProcessor, process_dict_updates

POISON_TEMPERATURE = 0.625  # exact in binary: no rounding on the way to the engine


class PoisonedTemperatureProcessor(LogitsProcessor):
    """Raises in apply while a request sampled at ``POISON_TEMPERATURE`` is in the batch."""

    def __init__(self, vllm_config, device, is_pin_memory):
        self.rows: dict[int, bool] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update) -> None:
        process_dict_updates(self.rows, batch_update,
                             lambda params, _, __: True if params.temperature == POISON_TEMPERATURE else None)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.rows:
            raise RuntimeError("poisoned temperature")
        return logits
