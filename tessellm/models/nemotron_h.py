"""NVIDIA Nemotron-H (``NemotronHForCausalLM``: Nemotron-H 8B / 47B / 56B, Nemotron Nano 2,
Nemotron 3 Nano 30B-A3B): Mamba2's stack of pre-norm blocks (``mamba2.py``) in which each
layer's one mixer is what the config's ``hybrid_override_pattern`` says (transformers 5 reads it
into ``layers_block_type``)::

    "M"  linear_attention   a Mamba2 mixer (mamba_num_heads x mamba_head_dim, n_groups,
                            ssm_state_size, conv_kernel, chunk_size, use_bias, use_conv_bias)
    "*"  full_attention     attention without positions or biases (HF's JambaAttention)
    "-"  mlp                down_proj(relu2(up_proj(x))), no gate (``mlp_hidden_act``)
    "E"  moe                ``nemotron_h_moe.NemotronHMoE``: DeepSeek-V3's router over ungated
                            relu2 experts, plus a shared relu2 MLP

    h = embeddings(ids);  per layer: h = h + mixer(norm(h));  logits = lm_head(norm_f(h))

Every mixer sums its own output under tensor parallelism (one all-reduce a layer, as before).
Checkpoint names: ``backbone.embeddings``, ``backbone.layers.{i}.norm``,
``backbone.layers.{i}.mixer.*`` (each kind's HF names), ``backbone.norm_f``, ``lm_head`` (never
tied to the embeddings: HF's class does not tie them, whatever ``tie_word_embeddings`` says);
multi-token-prediction tensors (``mtp.*``) are skipped, as HF does.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.layers.mamba_mixer import MambaMixer2, MambaShape
from tessellm.models.decoder import DecoderAttention
from tessellm.models.dense_mlp import DenseMLP
from tessellm.models.mamba2 import Mamba2ForCausalLM
from tessellm.models.nemotron_h_moe import NemotronHMoE
from tessellm.models.state_space import check_time_step_limit

_PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
# checkpoint projection -> (our module, shard) for the attention and MLP mixers
_ATTENTION = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "o_proj": ("o_proj", None)}
_MLP = {"up_proj": ("fc_in", 0), "down_proj": ("fc_out", None)}


def nemotron_layer_kinds(config) -> list[str]:
    """Per layer one of ``_PATTERN``'s values, from ``layers_block_type`` or the pattern."""
    kinds = getattr(config, "layers_block_type", None)
    if not kinds:
        pattern = getattr(config, "hybrid_override_pattern", None) or ""
        bad = sorted(set(pattern) - set(_PATTERN))
        if bad or not pattern:
            raise ValueError(f"Nemotron-H hybrid_override_pattern {pattern!r} is not a string of "
                             f"{', '.join(_PATTERN)} (one per layer).")
        kinds = [_PATTERN[c] for c in pattern]
    unknown = sorted(set(kinds) - set(_PATTERN.values()))
    if unknown:
        raise ValueError(f"Nemotron-H layer types {unknown} are not supported; the types are "
                         f"{sorted(_PATTERN.values())}.")
    return list(kinds)


def nemotron_mamba_shape(config) -> MambaShape:
    return MambaShape(hidden_size=config.hidden_size, num_heads=config.mamba_num_heads,
                      head_dim=config.mamba_head_dim, n_groups=config.n_groups,
                      d_state=config.ssm_state_size, d_conv=config.conv_kernel,
                      chunk_size=config.chunk_size, proj_bias=bool(config.use_bias),
                      conv_bias=bool(config.use_conv_bias), eps=config.layer_norm_epsilon,
                      dt_limit=check_time_step_limit(getattr(config, "time_step_limit", None)))


class NemotronHForCausalLM(Mamba2ForCausalLM):
    def __init__(self, config, ctx: ModelContext):
        self.kinds = nemotron_layer_kinds(config)
        super().__init__(config, ctx)

    def check_config(self, config) -> None:
        act = getattr(config, "mamba_hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"Nemotron-H mamba_hidden_act {act!r} is not supported; only silu is.")
        if getattr(config, "sliding_window", None) is not None:
            raise ValueError(f"Nemotron-H sliding_window={config.sliding_window} is not "
                             "supported; HF's Nemotron-H attends to the whole sequence.")

    def ties_embeddings(self, config) -> bool:
        return False  # HF's NemotronHForCausalLM never ties, whatever tie_word_embeddings says

    def make_mixer(self, config, ctx: ModelContext, index: int) -> nn.Module:
        kind = self.kinds[index]
        if kind == "linear_attention":
            return MambaMixer2(nemotron_mamba_shape(config), ctx)
        if kind == "full_attention":  # HF's JambaAttention: no rotary, no biases
            return DecoderAttention(config, ctx, None, qkv_bias=False, qk_norm=False,
                                    reduce_output=True)
        if kind == "mlp":
            return DenseMLP(config, ctx, bias=bool(config.mlp_bias), family="Nemotron-H",
                            reduce_output=True, act=config.mlp_hidden_act)
        return NemotronHMoE(config, ctx)

    def load_mixer_tensor(self, index: int, attr: str, tensor) -> str:
        mixer = self.layers[index].mixer
        if isinstance(mixer, MambaMixer2):
            return super().load_mixer_tensor(index, attr, tensor)
        if isinstance(mixer, NemotronHMoE):
            return f"layers.{index}.mixer." + mixer.load_checkpoint_tensor(attr, tensor)
        proj, _, param = attr.partition(".")
        table = _ATTENTION if isinstance(mixer, DecoderAttention) else _MLP
        if proj not in table:
            raise ValueError(f"Checkpoint tensor layers.{index}.mixer.{attr} has no place in "
                             f"Nemotron-H's {self.kinds[index]} layer {index}; does the config's "
                             "layer pattern match the weights?")
        module, shard = table[proj]
        getattr(mixer, module).load_shard(param, tensor, shard)
        return f"layers.{index}.mixer.{module}.{param}"

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights((name, tensor) for name, tensor in weights
                                    if not name.startswith("mtp."))
