"""``*ForSequenceClassification``: a decoder family's network with a ``score`` head.

HF's ``LlamaForSequenceClassification`` (and Qwen2's, Qwen3's, ...) runs the base model, takes
the hidden state (after the final norm) of each sequence's last non-pad token and maps it
through ``score``, a ``Linear(hidden, num_labels, bias=False)``. Here the runner's pooler does
the "last token" part (tessellm.pooling.pooler, LAST) and calls ``classify`` on the pooled rows,
so only one row per finished prompt goes through the head::

    tokens -> layers -> norm -> hidden [T, H] --pool LAST--> [B, H] --score (float32)--> logits [B, num_labels]

The head runs in float32 (vLLM's ``head_dtype`` default for pooling heads), whatever the
model's dtype; under tensor parallelism it is whole on every rank, as the final hidden states are.
The checkpoint's ``lm_head`` (if any) is not used.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from tessellm.models import llama


class SequenceClassifierMixin:
    """Adds ``score`` and ``classify`` to a ``*ForCausalLM`` class of this package (listed
    first in the bases, so its ``__init__`` and ``load_weights`` wrap the family's)."""

    def __init__(self, config, ctx):
        num_labels = int(getattr(config, "num_labels", 0) or 0)
        if num_labels < 1:
            raise ValueError(f"{type(self).__name__} needs num_labels >= 1 in config.json, got "
                             f"{num_labels}; is the config complete?")
        super().__init__(config, ctx)
        self.score = nn.Linear(config.hidden_size, num_labels, bias=False, dtype=torch.float32)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_labels] (float32) from pooled hidden states [B, H]."""
        return self.score(pooled.float())

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded: set[str] = set()

        def rest():
            for name, tensor in weights:
                if name == "score.weight":
                    llama._copy(self.score.weight, llama.materialize(tensor).float(), name)
                    loaded.add(name)
                elif name == "score.bias":
                    raise ValueError("The checkpoint's score head has a bias; HF's "
                                     f"{type(self).__name__} has none: is this the right architecture?")
                else:
                    yield name, tensor

        return super().load_weights(rest()) | loaded


class LlamaForSequenceClassification(SequenceClassifierMixin, llama.LlamaForCausalLM):
    pass


class MistralForSequenceClassification(SequenceClassifierMixin, llama.MistralForCausalLM):
    pass


class Qwen2ForSequenceClassification(SequenceClassifierMixin, llama.Qwen2ForCausalLM):
    pass


class Qwen3ForSequenceClassification(SequenceClassifierMixin, llama.Qwen3ForCausalLM):
    pass
