"""Mixture-of-Experts: a router and the experts, run through the backend's ``fused_moe``.

Experts are sharded tensor-parallel style: every rank holds every expert, but only its slice
of each expert's intermediate dimension I (rank r of R: rows ``[r*I/R, (r+1)*I/R)`` of the gate
and of the up projection, the same columns of the down projection)::

    w13[e] rows:  [ gate_0 gate_1 | up_0 up_1 ]   (R = 2)   rank 0 holds [ gate_0 | up_0 ]
    w2[e]  cols:  [ down_0 | down_1 ]                       rank 0 holds [ down_0 ]

so each rank's output is a partial sum over I, summed by the next RMSNorm like a row-parallel
layer's (``layers/norm.py``). The router is replicated.

With expert parallelism (``expert_parallel``, ``--enable-expert-parallel``) the same group
splits the experts instead: rank r of R holds experts ``[r*E/R, (r+1)*E/R)`` whole, and an
``expert_map`` (global id -> local index, or -1) tells the op which routed pairs are its own::

    E = 4, R = 2     rank 0: w13 [2, 2I, H] = experts 0, 1    expert_map [0, 1, -1, -1]
                     rank 1: w13 [2, 2I, H] = experts 2, 3    expert_map [-1, -1, 0, 1]

Every rank routes every token over all E experts and runs the pairs of its experts; the
others' contribute zero, so its output is again a partial sum, added up by the same
all-reduce (no all-to-all: tokens are already on every rank of the group). Shared experts and
attention stay sliced as above. Each rank reads only its experts' checkpoint tensors.

fp8 experts (``quant``: ``moe_fp8.ExpertQuant``) keep e4m3 codes with a scale per row or per
block (``moe_fp8.py``) and hand them to ``fused_moe`` / ``fused_experts``; block scales go with
``block_shape`` only to ops declaring ``fused_moe_block_fp8``, else the reference loop runs them.
bitsandbytes 4-bit experts stay packed: ops declaring ``fused_moe_bnb4`` multiply the codes
(keyword ``bnb4_code``); for others they are dequantized per routed expert each step, then run
dense through ``fused_experts`` (``moe_bnb.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from tessellm.backends.reference.moe import (SILU, ExpertActivation, fused_experts_reference,
                                             fused_moe_reference, route)
from tessellm.distributed.parallel_state import TensorParallel
from tessellm.layers import moe_bnb, moe_fp8, moe_int4
from tessellm.layers.linear import Linear, materialize

# Checkpoint names of an expert's three projections -> (our tensor, shard in it).
EXPERT_PARTS = {"w1": ("w13", 0), "gate_proj": ("w13", 0), "w3": ("w13", 1), "up_proj": ("w13", 1),
                "w2": ("w2", None), "down_proj": ("w2", None)}


def stacked_expert_weights(kind: str, stacked, hidden: int, intermediate: int,
                           experts: Optional[range] = None):
    """``(expert, part, [out, in] weight)`` from all experts' projections stacked in one tensor,
    one expert read at a time (a lazy checkpoint tensor reads just that expert's bytes)::

        gate_up_proj  [E, H, 2I]  columns [gate | up]     (Llama 4's, Qwen3-VL-MoE's checkpoints)
                      [E, 2I, H]  rows [gate | up]        (transformers 5's modules, as saved raw)
        down_proj     [E, I, H]  or  [E, H, I]            likewise

    Both orientations are told apart by ``hidden`` and ``intermediate`` (the whole model's);
    where they coincide (H == 2I, or I == H) the checkpoints' is taken, which is what
    ``save_pretrained`` writes. ``experts``: the ids to read (default: all; expert
    parallelism reads the rank's own)."""
    gate_up = kind == "gate_up_proj"
    # each expert's [in, out] as stored, [out, in] (a linear's weight) as transformers holds it
    stored = (hidden, 2 * intermediate) if gate_up else (intermediate, hidden)
    loaded = stored[::-1]
    shape = tuple(stacked.shape[1:])
    if len(stacked.shape) != 3 or shape not in (stored, loaded):
        raise ValueError(f"experts.{kind} has shape {tuple(stacked.shape)} in the checkpoint; "
                         f"expected [experts, {stored[0]}, {stored[1]}] (or [experts, "
                         f"{loaded[0]}, {loaded[1]}]) from hidden_size {hidden} and the experts' "
                         f"intermediate size {intermediate}: the config does not match the weights.")
    transposed = shape == stored
    for e in range(stacked.shape[0]) if experts is None else experts:
        w = materialize(stacked.narrow(0, e, 1))[0]
        w = w.t() if transposed else w
        if gate_up:
            yield e, "gate_proj", w[:intermediate]
            yield e, "up_proj", w[intermediate:]
        else:
            yield e, "down_proj", w


def local_intermediate(num_experts: int, intermediate: int, top_k: int,
                       tp: TensorParallel) -> int:
    """This rank's slice of each expert's intermediate size (module docstring), once
    ``intermediate`` is known to split over the ranks and ``top_k`` to be within
    ``1..num_experts``."""
    if intermediate % tp.size:
        raise ValueError(f"The experts' intermediate size {intermediate} does not split over "
                         f"tensor_parallel_size {tp.size}; use a size that divides it.")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok {top_k} must be within 1..{num_experts}.")
    return intermediate // tp.size


def local_experts(num_experts: int, tp: TensorParallel, ops) -> range:
    """The global ids of this rank's experts under expert parallelism (module docstring),
    once the group, the count and the backend's op are known to allow it."""
    if tp.size == 1:
        raise ValueError("enable_expert_parallel splits the experts over the tensor-parallel "
                         "group, but tensor_parallel_size is 1; set tensor_parallel_size > 1 "
                         "or drop enable_expert_parallel.")
    if num_experts % tp.size:
        raise ValueError(f"enable_expert_parallel needs the {num_experts} routed experts to "
                         f"split evenly over tensor_parallel_size {tp.size}; use a size that "
                         "divides the expert count or drop enable_expert_parallel.")
    if getattr(ops, "fused_moe", None) is not None and not getattr(ops, "fused_moe_expert_map",
                                                                     False):
        raise ValueError(f"The backend's fused MoE ({type(ops).__name__}) does not declare "
                         "fused_moe_expert_map (plugin API 12), so it cannot run a rank's share "
                         "of the experts; drop enable_expert_parallel or upgrade the plugin.")
    per = num_experts // tp.size
    return range(tp.rank * per, (tp.rank + 1) * per)


class FusedMoE(nn.Module):
    """``num_experts`` SwiGLU experts of intermediate size ``intermediate`` (whole model).
    ``activation`` another kind (``reference.moe.ExpertActivation``): run by the backend's op
    where its ``fused_moe_activations`` lists the kind, else by the reference loop; an ungated
    one ("relu2") has only up rows in ``w13``. ``expert_parallel``: this rank holds its share
    of the experts whole (module docstring); ``expert_ids`` are the global ids it holds, in
    the order of ``w13``'s rows."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, top_k: int, ops,
                 scoring: str = "softmax", renormalize: bool = True,
                 tp: Optional[TensorParallel] = None,
                 quant: Optional[moe_fp8.ExpertQuant] = None,
                 activation: ExpertActivation = SILU, expert_parallel: bool = False):
        super().__init__()
        if quant is not None and activation != SILU:
            raise ValueError(f"Quantized experts with the {activation.kind!r} activation are not "
                             "supported; load an unquantized checkpoint.")
        self.tp = tp or TensorParallel()
        self.expert_parallel = expert_parallel
        if expert_parallel:
            local_intermediate(num_experts, intermediate, top_k, TensorParallel())  # top_k check
            self.expert_ids = local_experts(num_experts, self.tp, ops)
            self.local = intermediate
            expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
            expert_map[self.expert_ids.start:self.expert_ids.stop] = torch.arange(
                len(self.expert_ids), dtype=torch.int32)
            self.register_buffer("expert_map", expert_map, persistent=False)
            num_experts = len(self.expert_ids)
        else:
            self.expert_map: Optional[torch.Tensor] = None
            self.expert_ids = range(num_experts)
            self.local = local_intermediate(num_experts, intermediate, top_k, self.tp)
        # each expert's I cut over the group (else whole: one rank, or expert parallelism)
        self.sliced = self.tp.size > 1 and not expert_parallel
        self.top_k, self.scoring, self.renormalize = top_k, scoring, renormalize
        self.quant = quant
        self.awaiting_scale: set = set()  # fp8 codes loaded whose scale has not come yet
        self._bnb_dense = False  # bnb4 experts dequantized each step (moe_bnb.dense_experts)
        self._quant_args: tuple = ()
        self._op_kwargs: dict = {}  # block_shape (fp8 blocks) or activation (not SiLU)
        self.activation = activation
        if quant is None:
            rows = (2 if activation.gated else 1) * self.local
            self.w13 = nn.Parameter(torch.empty(num_experts, rows, hidden),
                                    requires_grad=False)
            self.w2 = nn.Parameter(torch.empty(num_experts, hidden, self.local),
                                   requires_grad=False)
        elif quant.kind in moe_int4.INT4_KINDS:
            moe_int4.allocate(self, quant, num_experts, hidden)
            moe_int4.expect(self)
            self._op_kwargs = {"int4": True}
        elif quant.kind == "bnb4":  # the ops' bnb4 variant, or dense per step (moe_bnb.py)
            moe_bnb.allocate(self, quant, num_experts, hidden)
            self._bnb_dense = not moe_bnb.fused_applies(ops)
        else:
            moe_fp8.allocate(self, quant, num_experts, hidden)
            if quant.kind == "fp8_block":
                self._op_kwargs = {"block_shape": quant.block}
        self._moe = getattr(ops, "fused_moe", None) or fused_moe_reference
        self._experts = getattr(ops, "fused_experts", None) or fused_experts_reference
        flag = "fused_moe_int4" if "int4" in self._op_kwargs else "fused_moe_block_fp8"
        if self._op_kwargs and not getattr(ops, flag, False):
            self._moe, self._experts = fused_moe_reference, fused_experts_reference
        self._act_order_op = bool(getattr(ops, "fused_moe_int4_act_order", False))
        if activation != SILU:
            self._op_kwargs = {"activation": activation}
            if activation.kind not in getattr(ops, "fused_moe_activations", ("silu",)):
                self._moe, self._experts = fused_moe_reference, fused_experts_reference

    def _scales(self) -> tuple:
        if self.quant is not None and self.quant.kind == "bnb4":
            return (self.w13_absmax, self.w2_absmax)
        return () if self.quant is None else (self.w13_scale, self.w2_scale)

    def _kwargs(self) -> dict:
        kwargs = self._op_kwargs
        if self.quant is not None and self.quant.kind == "bnb4":  # the table as it is now
            kwargs = dict(kwargs, bnb4_code=self.code)
        if "int4" in kwargs:  # the zero codes as they are now (moved)
            kwargs = dict(kwargs, w13_zeros=self.w13_zeros, w2_zeros=self.w2_zeros)
            if self.w13_perm is not None:  # GPTQ act order (layers/moe_int4.py)
                kwargs["w13_perm"] = self.w13_perm
        if self.expert_map is not None:  # the buffer as it is now (moved, or re-made on wake)
            return dict(kwargs, expert_map=self.expert_map)
        return kwargs

    def act_order_loaded(self) -> None:
        """GPTQ act-order int4 experts loaded (``w13_perm``): the reference loop unless the ops
        declare ``fused_moe_int4_act_order`` (plugin API 20)."""
        if not self._act_order_op:
            self._moe, self._experts = fused_moe_reference, fused_experts_reference

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """This rank's partial ``[T, H]`` (the whole result when not tensor-parallel)."""
        if self._bnb_dense:
            weights, ids = route(router_logits, self.top_k, self.scoring, self.renormalize)
            return self.forward_routed(hidden, weights, ids)
        return self._moe(hidden, router_logits, self.w13, self.w2, self.top_k, self.scoring,
                         self.renormalize, *self._scales(), **self._kwargs())

    def forward_routed(self, hidden: torch.Tensor, topk_weights: torch.Tensor,
                       topk_ids: torch.Tensor) -> torch.Tensor:
        """As ``forward`` with the routing done by the caller (``[T, k]`` weights, as given,
        and global expert ids): a router the contract's scorings do not describe (DeepSeek's)."""
        if self._bnb_dense:
            weights, ids, w13, w2 = moe_bnb.dense_experts(self, topk_weights, topk_ids,
                                                          hidden.dtype)
            return self._experts(hidden, weights, ids, w13, w2)
        return self._experts(hidden, topk_weights, topk_ids, self.w13, self.w2, *self._scales(),
                             **self._kwargs())

    def load_expert(self, expert: int, part: str, tensor, attr: str = "weight") -> list[str]:
        """Copy one checkpoint tensor (``attr`` of projection ``part``, a key of
        ``EXPERT_PARTS``) of ``expert`` (a global id); returns the parameters it filled (none
        for another rank's expert under expert parallelism: its tensor is never read)."""
        if expert not in self.expert_ids:
            if self.expert_parallel and 0 <= expert < len(self.expert_map):
                return []
            raise ValueError(f"The checkpoint has expert {expert} in a layer of "
                             f"{len(self.expert_ids)} experts; the config does not match the "
                             "weights.")
        expert -= self.expert_ids.start  # its row in w13 / w2
        name, shard = EXPERT_PARTS[part]
        if not self.activation.gated:  # up rows only
            if shard == 0:
                raise ValueError(f"Expert {expert} has a {part} in the checkpoint, but its "
                                 f"{self.activation.kind!r} experts have no gate; is this the "
                                 "right architecture?")
            shard = 0 if shard == 1 else shard
        start = self.tp.rank * self.local if self.sliced else 0
        if self.quant is not None and self.quant.kind in moe_int4.INT4_KINDS:
            return moe_int4.load(self, expert, name, shard, attr, materialize(tensor), start,
                                 f"expert {expert} {part}")
        if self.quant is not None and self.quant.kind == "bnb4":
            return moe_bnb.load(self, expert, name, shard, attr, tensor, start,
                                f"expert {expert} {part}")
        if attr != "weight":
            if self.quant is None:
                raise ValueError(f"Expert {expert} {part} has a {attr} in the checkpoint, but "
                                 "the model is loaded unquantized; leave quantization unset so "
                                 "the checkpoint's quantization_config applies.")
            return moe_fp8.load(self, expert, name, shard, attr, materialize(tensor), start,
                                f"expert {expert} {part}")
        dim = 1 if name == "w2" else 0
        src = materialize(tensor.narrow(dim, start, self.local) if self.sliced else tensor)
        if self.quant is not None:
            return moe_fp8.load(self, expert, name, shard, attr, src, start,
                                f"expert {expert} {part}")
        if name == "w2":
            dst = self.w2.data[expert]
        else:
            dst = self.w13.data[expert, shard * self.local:(shard + 1) * self.local]
        if dst.shape != src.shape:
            raise ValueError(f"Expert {expert} {part} has shape {tuple(tensor.shape)} in the "
                             f"checkpoint, which does not fit {tuple(dst.shape)} on this rank; "
                             "the config does not match the weights.")
        dst.copy_(src)
        return [name]


class SparseMoeBlock(nn.Module):
    """Router + experts, plus Qwen2-MoE's shared expert gated by ``sigmoid(shared_expert_gate)``
    when ``shared_expert`` is given (a dense MLP whose output is a partial sum too)."""

    def __init__(self, experts: FusedMoE, hidden: int, num_experts: int,
                 shared_expert: Optional[nn.Module] = None):
        super().__init__()
        self.gate = Linear(hidden, [num_experts])  # replicated router, never quantized
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_expert_gate = Linear(hidden, [1]) if shared_expert is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
