"""Gemma 2: ``Gemma2ForCausalLM``.

The sandwich-norm Gemma decoder (``gemma_decoder.py``: embedding scale, ``1 + w`` norms, four
norms per layer, GeGLU, ``query_pre_attn_scalar``) with, per HF's modeling_gemma2:

- layers alternating ``sliding_attention`` (window ``sliding_window``, 4096) and
  ``full_attention``, per ``config.layer_types``; without it (older transformers) the even
  layers slide;
- attention logit soft-capping, ``attn_logit_softcapping`` (50.0): the scaled scores become
  ``cap * tanh(s / cap)`` inside the attention kernel (``AttentionSpec.logit_softcap``; a
  backend whose kernel cannot do it refuses the model at load);
- final logit soft-capping, ``final_logit_softcapping`` (30.0);
- one rotary embedding (``rope_parameters`` / ``rope_theta``) for every layer; no q/k norms.
"""

from __future__ import annotations

from tessellm.layers.context import ModelContext
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.models.gemma_decoder import GemmaSandwichForCausalLM, kinds_from_pattern


class Gemma2ForCausalLM(GemmaSandwichForCausalLM):
    family = "Gemma 2"
    qk_norm = False

    def layer_kinds(self, config) -> list[str]:
        return kinds_from_pattern(config, lambda i: i % 2 == 0)

    def make_rotaries(self, config, kinds: set[str], ctx: ModelContext) -> dict:
        rotary = RotaryEmbedding.from_config(config, config.head_dim, ctx.ops,
                                             max_positions=ctx.max_positions)
        return dict.fromkeys(kinds, rotary)
