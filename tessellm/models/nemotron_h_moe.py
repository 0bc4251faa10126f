"""Nemotron-H's MoE layer ("E" in ``hybrid_override_pattern``; HF's ``NemotronHMoE``)::

    weights, ids = DeepSeek-V3 router(x)     sigmoid scores + e_score_correction_bias, n_group /
                                             topk_group, norm_topk_prob, routed_scaling_factor
    y = fc2_latent(experts(fc1_latent(x)))   experts ungated: down(relu2(up(.))); the latent
                                             projections only with moe_latent_size
    out = y + shared_experts(x)              a relu2 MLP of moe_shared_expert_intermediate_size

The experts run through ``FusedMoE`` with the "relu2" activation (the backend's op where it
lists it, else the reference loop). Under tensor parallelism each rank holds a slice of every
expert and of the shared MLP; the layer returns the whole sum (``MixerBlock``'s contract).

Checkpoint names under ``mixer.``: ``gate.weight``, ``gate.e_score_correction_bias``,
``experts.{e}.up_proj.weight``, ``experts.{e}.down_proj.weight``,
``shared_experts.{up,down}_proj.*``, ``fc1_latent_proj.*``, ``fc2_latent_proj.*``.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from tessellm.backends.reference.moe import ExpertActivation
from tessellm.layers.context import ModelContext
from tessellm.layers.linear import materialize
from tessellm.layers.moe import FusedMoE
from tessellm.models.deepseek_v2 import DeepseekRouter
from tessellm.models.dense_mlp import DenseMLP

_EXPERT = re.compile(r"experts\.(\d+)\.(up_proj|down_proj)\.weight$")
_FP8_EXPERT = re.compile(r"(?:experts\.\d+|fc[12]_latent_proj)\.")  # never quantized here
_SCALES = ("weight_scale", "weight_scale_inv", "input_scale")
_SHARED = {"up_proj": ("fc_in", 0), "down_proj": ("fc_out", None)}


class NemotronHMoE(nn.Module):
    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        act = getattr(config, "mlp_hidden_act", "relu2")
        if act != "relu2":
            raise ValueError(f"Nemotron-H MoE layers with mlp_hidden_act {act!r} are not "
                             "supported; their experts are relu2.")
        self.tp = ctx.tp
        self.gate = DeepseekRouter(config, v3=True)
        latent = getattr(config, "moe_latent_size", None)
        width = latent or config.hidden_size
        self.experts = FusedMoE(config.n_routed_experts, width, config.moe_intermediate_size,
                                config.num_experts_per_tok, ctx.ops, tp=ctx.tp,
                                activation=ExpertActivation("relu2"))
        # without latent projections the experts' and the shared MLP's partial sums meet and
        # are summed once; with them the experts' latent partial sum is summed before fc2
        self.shared_experts = DenseMLP(config, ctx, bias=bool(config.mlp_bias),
                                       family="Nemotron-H", reduce_output=latent is not None,
                                       intermediate_size=config.moe_shared_expert_intermediate_size,
                                       act="relu2")
        self.fc1_latent_proj = self.fc2_latent_proj = None
        if latent:
            bias = bool(config.mlp_bias)
            self.fc1_latent_proj = nn.Linear(config.hidden_size, latent, bias=bias)
            self.fc2_latent_proj = nn.Linear(latent, config.hidden_size, bias=bias)
            for p in self.parameters():
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        if self.fc1_latent_proj is None:
            out = self.experts.forward_routed(x, weights, ids) + self.shared_experts(x)
            return self.tp.all_reduce(out)
        y = self.experts.forward_routed(self.fc1_latent_proj(x), weights, ids)
        return self.fc2_latent_proj(self.tp.all_reduce(y)) + self.shared_experts(x)

    def load_checkpoint_tensor(self, attr: str, tensor) -> str:
        """``attr``: the name under ``mixer.``; returns the parameter it filled."""
        if _FP8_EXPERT.match(attr):
            tensor = materialize(tensor)
        if _FP8_EXPERT.match(attr) and (attr.rpartition(".")[2] in _SCALES
                                        or tensor.dtype in (torch.float8_e4m3fn,
                                                            torch.float8_e4m3fnuz)):
            raise ValueError(f"Checkpoint tensor mixer.{attr} is an fp8 expert's; Nemotron-H's "
                             "relu2 experts are kept in the model dtype (the fused MoE op's fp8 "
                             "experts are SwiGLU), so fp8 expert checkpoints are not supported "
                             "yet: load the bf16 checkpoint, with quantization='fp8' for the "
                             "other layers.")
        match = _EXPERT.match(attr)
        if match is not None:
            self.experts.load_expert(int(match[1]), match[2], tensor)
            return f"experts.{'w2' if match[2] == 'down_proj' else 'w13'}"
        module, _, param = attr.partition(".")
        if module == "shared_experts":
            proj, _, param = param.partition(".")
            if proj in _SHARED:
                name, shard = _SHARED[proj]
                getattr(self.shared_experts, name).load_shard(param, tensor, shard)
                return f"shared_experts.{name}.{param}"
        params = dict(self.named_parameters())
        if attr not in params:
            raise ValueError(f"Checkpoint tensor mixer.{attr} has no place in a Nemotron-H MoE "
                             "layer; does the config (moe_latent_size, mlp_bias) match the "
                             "weights?")
        tensor = materialize(tensor)
        if params[attr].shape != tensor.shape:
            raise ValueError(f"Checkpoint tensor mixer.{attr} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(params[attr].shape)}; the config does not match "
                             "the weights.")
        params[attr].data.copy_(tensor)
        return attr
