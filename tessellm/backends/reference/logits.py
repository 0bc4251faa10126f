"""Pure-torch logits ops: the oracle for the conformance suite and the fallback of any backend
that does not provide ``tessellm_logits_ops``."""

from __future__ import annotations

import torch


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 ``[R, W]`` packed mask -> bool ``[R, vocab_size]`` (True: allowed)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    # torch.bitwise_right_shift, not ``>>``: torch-xla 2.9 lowers ``>>`` of a negative int32 as a
    # division rounded toward zero, which would read wrong bits from every word with bit 31 set
    bits = torch.bitwise_right_shift(bitmask.unsqueeze(-1), shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


class ReferenceLogitsOps:
    name = "reference"

    def apply_token_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor,
                            indices: torch.Tensor | None = None) -> None:
        vocab = logits.shape[-1]
        if bitmask.shape[-1] * 32 < vocab:
            raise ValueError(f"bitmask has {bitmask.shape[-1]} words per row, too few for a vocabulary "
                             f"of {vocab} (need {(vocab + 31) // 32}).")
        disallowed = ~unpack_bitmask(bitmask, vocab)
        if indices is None:
            logits[:bitmask.shape[0]].masked_fill_(disallowed, float("-inf"))
        else:
            logits[indices] = logits[indices].masked_fill(disallowed, float("-inf"))
