"""Pipeline-parallel I/O of one step: what a stage receives from the previous one and sends on.

A stage that is not the first receives ``(hidden, residual)`` for the step's tokens; one that
is not the last sends them on and samples nothing (it learns the sampled tokens from the
scheduler: ``CachedRequestData.new_token_ids``). With one stage both are no-ops.
"""

from __future__ import annotations

from typing import Optional

import torch

from tessellm.distributed.parallel_state import PipelineStage


class StageIO:
    def __init__(self, pp: PipelineStage, model, dtype: torch.dtype, device: torch.device):
        self.pp = pp
        self.model = model
        self.dtype = dtype  # of activations (hidden states sent between stages)
        self.device = device

    @property
    def hidden_size(self) -> int:
        config = self.model.config  # an image-text model's: its language model's width
        return config.get_text_config().hidden_size if hasattr(config, "get_text_config") \
            else config.hidden_size

    def receive(self, num_tokens: int) -> Optional[tuple]:
        """The previous stage's ``(hidden, residual)`` for ``num_tokens`` rows; None on the first."""
        if self.pp.is_first:
            return None
        return self.pp.recv([(num_tokens, self.hidden_size)] * 2, self.dtype, self.device)

    def send(self, hidden) -> bool:
        """Send the stage's output on; True when this stage is not the last (it samples nothing)."""
        if self.pp.is_last:
            return False
        self.pp.send(list(hidden))
        return True

    def dummy(self, num_tokens: int) -> Optional[tuple]:
        """Zeros in place of a previous stage's output (the profile run)."""
        if self.pp.is_first:
            return None
        shape = (num_tokens, self.hidden_size)
        return (torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device))
