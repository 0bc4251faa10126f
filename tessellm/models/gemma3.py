"""Gemma 3 (text): ``Gemma3ForCausalLM``, and the text tower of a Gemma 3 GGUF.

The sandwich-norm Gemma decoder (``gemma_decoder.py``: embedding scale, ``1 + w`` norms, four
norms per layer, GeGLU, ``query_pre_attn_scalar``, sliding and full layers, soft-caps) with:

- q and k RMS-normed per head;
- layers ``sliding_attention`` (rope base ``rope_parameters["sliding_attention"]``) or
  ``full_attention`` (their own rope base and scaling), per ``config.layer_types``; without it
  (transformers before 4.53) every ``sliding_window_pattern``-th layer (default 6) is global;
- ``attn_logit_softcapping`` refused (HF's Gemma 3 stores it and applies none).
"""

from __future__ import annotations

from typing import Optional

from tessellm.layers.context import ModelContext
from tessellm.layers.rope_config import complete_rope_parameters
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.models.gemma_decoder import SLIDING, GemmaSandwichForCausalLM, kinds_from_pattern


class Gemma3ForCausalLM(GemmaSandwichForCausalLM):
    family = "Gemma 3"
    qk_norm = True

    def layer_kinds(self, config) -> list[str]:
        return layer_types(config)

    def make_rotaries(self, config, kinds: set[str], ctx: ModelContext) -> dict:
        return {kind: _rotary(config, kind, ctx.ops, ctx.max_positions) for kind in kinds}

    def check_config(self, config) -> None:
        cap = getattr(config, "attn_logit_softcapping", None)
        if cap:  # HF's Gemma3Attention keeps the field but never passes it to its attention
            raise ValueError(f"Gemma 3 attn_logit_softcapping={cap} is not supported: HF "
                             "transformers' Gemma 3 ignores it (Gemma 2 applies it), so what "
                             "the checkpoint expects is unclear; use a checkpoint with it null.")
        super().check_config(config)


def _rotary(config, kind: str, ops, max_positions: Optional[int] = None) -> RotaryEmbedding:
    """transformers 5: ``rope_parameters[kind]``; 4: the local layers' ``rope_local_base_freq``
    (no scaling), the global layers' ``rope_theta`` and ``rope_scaling``."""
    nested = (getattr(config, "rope_parameters", None) or {}).get(kind)
    if isinstance(nested, dict):
        params = dict(nested)
    elif kind == SLIDING:
        params = {"rope_type": "default",
                  "rope_theta": getattr(config, "rope_local_base_freq", None) or 10_000.0}
    else:
        params = {**(getattr(config, "rope_scaling", None) or {}),
                  "rope_theta": getattr(config, "rope_theta", None) or 1_000_000.0}
    default_theta = 10_000.0 if kind == SLIDING else 1_000_000.0
    params = complete_rope_parameters(params, config, default_theta)
    return RotaryEmbedding.from_config(config, config.head_dim, ops, params=params,
                                       max_positions=max_positions)


def layer_types(config) -> list[str]:
    """``config.layer_types``; transformers before 4.53 had ``sliding_window_pattern`` instead
    (default 6: every sixth layer global)."""
    pattern = getattr(config, "sliding_window_pattern", None) or 6
    return kinds_from_pattern(config, lambda i: (i + 1) % pattern != 0)
