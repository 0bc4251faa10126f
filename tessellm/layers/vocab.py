"""The embedding and the LM head, split by vocabulary rows over the tensor-parallel group.

The vocabulary is padded up to a multiple of T and each rank holds one contiguous slice of
rows. The embedding looks up the ids it owns, writes zeros for the rest, and sums over the
group; the LM head computes its slice of the logits and gathers the full row (padding cut).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessellm.distributed.parallel_state import TensorParallel
from tessellm.layers.linear import materialize


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: Optional[TensorParallel] = None):
        super().__init__()
        self.tp = tp or TensorParallel()
        self.vocab_size = vocab_size
        rows, self.vocab_start, self.vocab_end = vocab_shard(vocab_size, self.tp)
        self.weight = nn.Parameter(torch.empty(rows, hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        owned = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(owned, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight).masked_fill_(~owned[:, None], 0)
        return self.tp.all_reduce(out)

    def load_weight(self, tensor) -> None:
        load_vocab_rows(self.weight, tensor, self.vocab_start, self.vocab_end, self.vocab_size)


class ParallelLMHead(nn.Module):
    """``logits = hidden @ W^T (+ b)`` over the whole vocabulary, W split by rows like the
    embedding. With ``weight`` given (tied embeddings on the same rank) it reads that tensor
    instead. ``bias`` (Phi): ``b`` is whole on every rank, added to the gathered logits."""

    dense_mm = staticmethod(F.linear)  # the backend's FusedOps.linear when it has one

    def __init__(self, vocab_size: int, hidden_size: int, tp: Optional[TensorParallel] = None,
                 weight: Optional[nn.Parameter] = None, bias: bool = False):
        super().__init__()
        self.tp = tp or TensorParallel()
        self.vocab_size = vocab_size
        rows, self.vocab_start, self.vocab_end = vocab_shard(vocab_size, self.tp)
        self.tied = weight
        if weight is None:
            self.weight = nn.Parameter(torch.empty(rows, hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(vocab_size), requires_grad=False) if bias else None
        # A quantized copy of the head (``quantization="gguf"``: the file's own blocks, set by
        # ``loader.model_loader``) and the QuantOps product that reads it; None: dense.
        self.quant_weight = None
        self.quant_mm = None

    def set_quantized(self, segment: nn.Module, mm) -> None:
        """Compute the logits from ``segment`` (a ``quantization.packed`` weight) with ``mm``."""
        self.quant_weight, self.quant_mm = segment, mm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quant_mm is not None:
            logits = self.quant_mm(hidden, self.quant_weight).to(hidden.dtype)
        else:
            weight = self.tied if self.tied is not None else self.weight
            logits = self.dense_mm(hidden, weight)
        if self.tp.size > 1:
            logits = self.tp.all_gather(logits)[..., :self.vocab_size]
        return logits if self.bias is None else logits + self.bias

    def load_weight(self, tensor) -> None:
        load_vocab_rows(self.weight, tensor, self.vocab_start, self.vocab_end, self.vocab_size)


def vocab_shard(vocab_size: int, tp: TensorParallel) -> tuple[int, int, int]:
    """(rows per rank, first vocabulary id, end id) of this rank's slice; the last rank's slice
    may end before its rows do (padding)."""
    rows = -(-vocab_size // tp.size)
    start = tp.rank * rows
    return rows, start, min(start + rows, vocab_size)


def load_vocab_rows(param: torch.Tensor, tensor, start: int, end: int, vocab_size: int) -> None:
    """Copy checkpoint rows [start, end) into ``param``; padding rows past the vocabulary are 0."""
    if tuple(tensor.shape) != (vocab_size, param.shape[1]):
        raise ValueError(f"Checkpoint vocabulary tensor has shape {tuple(tensor.shape)}, expected "
                         f"{(vocab_size, param.shape[1])}; the config does not match the weights.")
    rows = materialize(tensor.narrow(0, start, end - start) if (start, end) != (0, vocab_size)
                       else tensor)
    param.data[:end - start].copy_(rows)
    param.data[end - start:].zero_()
