"""Loading q/k norm weights that span several heads (OLMo 2's over all of q or k, Cohere's one
row per head): under tensor parallelism each rank keeps the part for the heads it holds."""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

from tessellm.layers.linear import materialize

_QK_NORM = re.compile(r"^(?:model\.)?layers\.(\d+)\.self_attn\.([qk])_norm\.weight$")


def local_qk_norm_weights(model, weights: Iterable[tuple[str, torch.Tensor]]
                          ) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` with each ``layers.N.self_attn.{q,k}_norm.weight`` of ``model``'s pipeline
    stage replaced by ``self_attn.local_norm_weight("q" | "k", tensor, name)``: the rows or
    elements this rank's heads use. Other tensors, and other stages' layers, pass unchanged."""
    for name, tensor in weights:
        match = _QK_NORM.match(name)
        index = int(match.group(1)) if match else -1
        if model.start_layer <= index < model.end_layer:
            attn = model.layers[index].self_attn
            tensor = attn.local_norm_weight(match.group(2), materialize(tensor), name)
        yield name, tensor
