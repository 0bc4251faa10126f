"""OpenAI's gpt-oss (HF ``GptOssForCausalLM``) on the llama decoder.

What differs from llama, as HF transformers 5.25's ``modeling_gpt_oss.py`` does it:

- attention: biases on q/k/v/o; **attention sinks**, a learned logit per query head
  (``self_attn.sinks``) in the softmax denominator, applied by the backend's kernel
  (``AttentionSpec.attention_sinks``; the engine refuses the model on a kernel without them);
  layers alternate sliding-window and full attention (``config.layer_types``); YaRN rotary
  (NeoX halves, ``truncate`` honoured by ``layers/rotary.py``);
- MLP: a Mixture of Experts on every layer. The router is a linear layer with a bias; each
  token takes the top-k logits and softmaxes over those k (equal to softmax over all then
  renormalized over the k: ``route(..., "softmax", renormalize=True)``). Experts have biases on
  both projections and gpt-oss's clamped SwiGLU (``ExpertActivation("swiglu_oai")``: gate
  clamped above at ``swiglu_limit``, up to ``[-limit, limit]``, ``(up + 1) * gate *
  sigmoid(swiglu_alpha * gate)``), run by the backend's ``fused_moe`` where its
  ``fused_moe_activations`` lists that activation, else by the reference loop.

Checkpoint layout (HF's, one tensor per projection for all experts, ``[E, in, out]``)::

    mlp.experts.gate_up_proj       [E, H, 2I]  columns interleaved: gate 0, up 0, gate 1, ...
    mlp.experts.gate_up_proj_bias  [E, 2I]     interleaved likewise
    mlp.experts.down_proj          [E, I, H]
    mlp.experts.down_proj_bias     [E, H]

loaded into the fused MoE's ``w13 [E, 2I, H]`` (gate rows, then up rows) and ``w2 [E, H, I]``.
Under tensor parallelism each rank holds every expert's slice of I (``layers/moe.py``); the down
bias is added on rank 0 only, since the ranks' outputs are partial sums.

MXFP4 checkpoints (the released weights: experts as ``<proj>_blocks`` / ``<proj>_scales``,
``quantization/mxfp4.py``) are dequantized to the model's dtype as they are read, then loaded
like dense ones (no MXFP4 kernel: the experts take their dense size in memory). The harmony
chat format is not handled here.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

import torch
import torch.nn as nn

from tessellm.backends.reference.moe import ExpertActivation, fused_moe_reference
from tessellm.layers.context import ModelContext
from tessellm.layers.linear import Linear, materialize
from tessellm.layers.moe import local_intermediate
from tessellm.models.decoder import DecoderAttention
from tessellm.models.layer_windows import window_by_layer_type
from tessellm.models.llama import LlamaForCausalLM, _strip_prefix
from tessellm.quantization.mxfp4 import dequantize_mxfp4

_EXPERTS = re.compile(r"^(layers\.\d+\.mlp)\.experts\.(gate_up_proj|gate_up_proj_bias|down_proj|"
                      r"down_proj_bias)$")
_MXFP4 = re.compile(r"^(layers\.\d+\.mlp)\.experts\.(gate_up_proj|down_proj)_(blocks|scales)$")
_SINKS = re.compile(r"^(layers\.\d+\.self_attn)\.sinks$")


class GptOssMoE(nn.Module):
    """Router (with bias) and the experts, through ``fused_moe`` with the clamped SwiGLU and
    expert biases. Output: this rank's partial sum (summed by the next norm)."""

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        self.tp = ctx.tp
        experts, hidden = config.num_local_experts, config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.local = local_intermediate(experts, config.intermediate_size, self.top_k, self.tp)
        self.router = Linear(hidden, [experts], bias=True)  # replicated, never quantized
        self.w13 = nn.Parameter(torch.empty(experts, 2 * self.local, hidden), requires_grad=False)
        self.w13_bias = nn.Parameter(torch.empty(experts, 2 * self.local), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(experts, hidden, self.local), requires_grad=False)
        self.w2_bias = nn.Parameter(torch.zeros(experts, hidden), requires_grad=False)
        # transformers before 5.2x know neither (their GptOssExperts fix alpha 1.702 and limit
        # 7.0, and the config they build lacks both); released configs carry swiglu_limit 7.0
        self.activation = ExpertActivation("swiglu_oai", float(getattr(config, "swiglu_alpha", 1.702)),
                                           float(getattr(config, "swiglu_limit", 7.0)))
        ops_moe = getattr(ctx.ops, "fused_moe", None)
        served = "swiglu_oai" in getattr(ctx.ops, "fused_moe_activations", ("silu",))
        self._moe = ops_moe if ops_moe is not None and served else fused_moe_reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._moe(x, self.router(x), self.w13, self.w2, self.top_k, "softmax", True,
                         None, None, activation=self.activation, w13_bias=self.w13_bias,
                         w2_bias=self.w2_bias)

    def load(self, part: str, tensor: torch.Tensor) -> str:
        """One HF experts tensor (module docstring); returns the parameter it filled."""
        t = materialize(tensor)
        lo, n = self.tp.rank * self.local, self.local
        if part in ("gate_up_proj", "gate_up_proj_bias"):
            gate, up = t[..., 0::2], t[..., 1::2]  # interleaved columns
            if part == "gate_up_proj":  # [E, H, I] each -> rows of w13 [E, 2I_local, H]
                gate, up = gate.transpose(1, 2), up.transpose(1, 2)
            value = torch.cat([gate[:, lo:lo + n], up[:, lo:lo + n]], dim=1)
            param = self.w13 if part == "gate_up_proj" else self.w13_bias
        elif part == "down_proj":  # [E, I, H] -> [E, H, I_local]
            value, param = t.transpose(1, 2)[:, :, lo:lo + n], self.w2
        else:  # the down bias joins once: on rank 0 (the ranks' outputs are summed)
            value, param = (t if self.tp.rank == 0 else torch.zeros_like(t)), self.w2_bias
        if value.shape != param.shape:
            raise ValueError(f"Checkpoint experts.{part} has shape {tuple(tensor.shape)}, which "
                             f"does not fit {tuple(param.shape)} on this rank; the config does "
                             "not match the weights.")
        param.data.copy_(value)
        return {"gate_up_proj": "w13", "gate_up_proj_bias": "w13_bias", "down_proj": "w2",
                "down_proj_bias": "w2_bias"}[part]


class GptOssForCausalLM(LlamaForCausalLM):
    def make_attention(self, config, ctx: ModelContext, rotary, index: int) -> nn.Module:
        qkv_bias, o_bias = self.attention_biases(config)
        return DecoderAttention(config, ctx, rotary, qkv_bias, False, o_bias=o_bias,
                                window=self.layer_window(config, index), attention_sinks=True)

    def make_mlp(self, config, ctx: ModelContext, index: int) -> nn.Module:
        return GptOssMoE(config, ctx)

    def attention_biases(self, config) -> tuple[bool, bool]:
        bias = bool(getattr(config, "attention_bias", True))
        return bias, bias

    def mlp_bias(self, config) -> bool:
        return False  # the experts' down bias is added on rank 0 only (GptOssMoE.load)

    def layer_window(self, config, index: int) -> Optional[int]:
        return window_by_layer_type(config, index)

    def check_config(self, config) -> None:
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"gpt-oss hidden_act {config.hidden_act!r} is not supported; its "
                             "experts use the clamped SwiGLU (hidden_act 'silu').")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Sinks and experts here (module docstring), the rest as for llama."""
        loaded: set[str] = set()
        modules = dict(self.named_modules())
        experts_seen: dict[str, set[str]] = {}
        packed: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # MXFP4 halves seen

        def load_experts(prefix: str, part: str, tensor) -> None:
            loaded.add(f"{prefix}.{modules[prefix].load(part, tensor)}")
            experts_seen.setdefault(prefix, set()).add(part)

        def others():
            for name, tensor in weights:
                short = _strip_prefix(name)
                sinks = _SINKS.match(short) if short else None
                experts = _EXPERTS.match(short) if short else None
                mxfp4 = _MXFP4.match(short) if short else None
                if sinks is None and experts is None and mxfp4 is None:
                    yield name, tensor
                elif not self._owns(short):
                    continue
                elif sinks is not None:
                    modules[sinks.group(1)].load_sinks(tensor)
                    loaded.add(short)
                elif experts is not None:
                    load_experts(*experts.groups(), tensor)
                else:  # [E, out, in] once both halves are read; HF's parameter is [E, in, out]
                    prefix, part, half = mxfp4.groups()
                    pair = packed.setdefault((prefix, part), {})
                    pair[half] = materialize(tensor)
                    if len(pair) == 2:
                        dense = dequantize_mxfp4(pair["blocks"], pair["scales"], torch.float32)
                        load_experts(prefix, part, dense.transpose(1, 2))
                        del packed[(prefix, part)]

        loaded |= super().load_weights(others())
        for prefix, part in packed:
            raise ValueError(f"The checkpoint has only one of {prefix}.experts.{part}_blocks and "
                             f"{part}_scales (MXFP4); is it complete?")
        for prefix, seen in experts_seen.items():
            missing = {"gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"} - seen
            if missing:
                raise ValueError(f"The checkpoint has no {', '.join(sorted(missing))} for "
                                 f"{prefix}.experts; is it complete?")
        return loaded
