"""What layers need from the backend, passed in explicitly at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from tessellm.distributed.parallel_state import PipelineStage, TensorParallel


@dataclass
class ModelContext:
    ops: Any  # FusedOps from the backend (rms_norm, rotary, silu_and_mul)
    # (sliding window, logit_softcap=None, attention_sinks=False, **spec fields) ->
    # AttentionKernel; one kernel per distinct combination (attention_sinks is passed only
    # when True; a family may add AttentionSpec fields such as prefill_key_limits)
    make_attention_kernel: Callable[..., Any]
    dtype: torch.dtype
    device: torch.device
    quant_method: Any = None  # QuantMethod for linear layers, or None (dense weights)
    tp: TensorParallel = field(default_factory=TensorParallel)  # this rank's tensor-parallel group
    pp: PipelineStage = field(default_factory=PipelineStage)  # this rank's pipeline stage
    # the QuantSpec quant_method was made for (None: dense): how MoE experts are stored
    quant_spec: Any = None
    # positions the engine can rotate (max_model_len plus a drafter's lookahead): the rotary
    # tables hold no more rows; None: the model's own length (rope_max_positions)
    max_positions: Optional[int] = None
    # routed experts split by expert over ``tp`` rather than sliced (``layers/moe.py``); only
    # model families that pass it to their ``FusedMoE`` take it (``loader/model_loader.py``)
    expert_parallel: bool = False
