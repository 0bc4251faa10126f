"""``*ForSequenceClassification``: a decoder family's network with a ``score`` head.

HF's ``LlamaForSequenceClassification`` (and Qwen2's, Qwen3's, ...) runs the base model, takes
the hidden state (after the final norm) of each sequence's last non-pad token and maps it
through ``score``, a ``Linear(hidden, num_labels, bias=False)``. Here the runner's pooler does
the "last token" part (tessellm.pooling.pooler, LAST) and calls ``classify`` on the pooled rows,
so only one row per finished prompt goes through the head::

    tokens -> layers -> norm -> hidden [T, H] --pool LAST--> [B, H] --score (float32)--> logits [B, num_labels]

The head runs in float32 (vLLM's ``head_dtype`` default for pooling heads), whatever the
model's dtype; under tensor parallelism it is whole on every rank, as the final hidden states are.
The checkpoint's ``lm_head`` (if any) is not used, except by a from-token head: a ``*ForCausalLM``
served as a classifier (``tessellm.pooling.convert``) whose ``score`` is built from the LM head's
rows of ``classifier_from_token`` (``W[t1] - W[t0]`` for ``from_2_way_softmax``), taken from the
checkpoint tensor as it streams by, whole, so every tensor-parallel rank builds the same head.
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
        ids = getattr(config, "classifier_from_token_ids", None)  # tessellm.pooling.convert
        self.from_token = (list(ids), config.method) if ids else None

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_labels] (float32) from pooled hidden states [B, H]."""
        return self.score(pooled.float())

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded: set[str] = set()
        rows: dict[str, torch.Tensor] = {}  # from-token: "lm_head" / "embed" -> its rows of the tokens

        def rest():
            for name, tensor in weights:
                if name == "score.weight" and self.from_token is None:
                    llama._copy(self.score.weight, llama.materialize(tensor).float(), name)
                    loaded.add(name)
                elif name == "score.bias":
                    raise ValueError("The checkpoint's score head has a bias; HF's "
                                     f"{type(self).__name__} has none: is this the right architecture?")
                elif name == "score.weight":
                    raise ValueError("The checkpoint has a score head and the config asks for one built "
                                     "from classifier_from_token; drop classifier_from_token / method.")
                else:
                    if self.from_token is not None and name.endswith(("lm_head.weight", "embed_tokens.weight")):
                        key = "lm_head" if name.endswith("lm_head.weight") else "embed"
                        rows[key] = llama.materialize(tensor)[self.from_token[0]].float()
                    yield name, tensor

        loaded |= super().load_weights(rest())
        if self.from_token is not None:
            llama._copy(self.score.weight, self._head_from_token(rows), "score.weight")
            loaded.add("score.weight")
        elif "score.weight" not in loaded:
            raise ValueError(f"The checkpoint has no score.weight for {type(self).__name__}'s head: a "
                             "*ForCausalLM served with convert='classify' needs one, or a head built from "
                             "LM-head rows: hf_overrides {\"classifier_from_token\": [\"no\", \"yes\"], "
                             "\"method\": \"from_2_way_softmax\"} (docs/pooling.md).")
        return loaded

    def _head_from_token(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """The score weight [num_labels, hidden] from the LM head's rows of the tokens (the
        input embeddings' when they are tied, as HF ties them)."""
        key = "embed" if getattr(self, "tie_word_embeddings", False) else "lm_head"
        if key not in rows:
            raise ValueError(f"classifier_from_token needs the LM head's weight in the checkpoint "
                             f"({'embed_tokens' if key == 'embed' else 'lm_head'}.weight); it has none.")
        weight = rows[key]
        if self.from_token[1] == "from_2_way_softmax":  # logit(true) - logit(false): one label
            return weight[1:2] - weight[0:1]
        return weight


class LlamaForSequenceClassification(SequenceClassifierMixin, llama.LlamaForCausalLM):
    pass


class MistralForSequenceClassification(SequenceClassifierMixin, llama.MistralForCausalLM):
    pass


class Qwen2ForSequenceClassification(SequenceClassifierMixin, llama.Qwen2ForCausalLM):
    pass


class Qwen3ForSequenceClassification(SequenceClassifierMixin, llama.Qwen3ForCausalLM):
    pass
