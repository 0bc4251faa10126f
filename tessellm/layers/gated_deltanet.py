"""The gated DeltaNet linear-attention mixer (HF's ``Qwen3NextGatedDeltaNet``), over flat
tokens and the per-request state cache (``core/mamba_state.py``)::

    in_proj_qkvz(h) -> [ q: Hk*dk | k: Hk*dk | v: Hv*dv | z: Hv*dv ]      (rows reordered at load)
    in_proj_ba(h)   -> [ b: Hv | a: Hv ]
    q, k, v = silu(causal_conv1d([q | k | v]))          continues each request's conv state
    beta = sigmoid(b);  g = -exp(A_log) * softplus(a + dt_bias)             (float32)
    o = gated_delta_rule(q, k, v, g, beta)   decodes: one step; prefill chunks: the chunked form;
                                             both continue the recurrent state [Hv, dk, dv]
    out_proj(rmsnorm(o) * weight * silu(z))  per value head (norm before the gate)

The checkpoint groups ``in_proj_qkvz`` and ``in_proj_ba`` rows by key head (``[q_j k_j v_j z_j]``
for key head j, its ``Hv / Hk`` value heads' v and z together); loading regroups them by kind,
so the conv's input is one contiguous slice in the order of ``conv1d.weight``'s channels. The
device ops come from the backend: ``mamba_conv1d`` and ``gated_delta_chunk`` /
``gated_delta_step`` (``FusedOps``, declared by ``supports_gated_delta``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessellm.backends.reference.gated_norm import gated_rms_norm as reference_gated_norm
from tessellm.backends.reference.recurrent_verify import verify_ops
from tessellm.layers.context import ModelContext
from tessellm.layers.derived import DerivedWeight, as_float, neg_exp_float
from tessellm.layers.linear import ColumnParallelLinear, RowParallelLinear, materialize
from tessellm.layers.mamba_mixer import causal_conv, depthwise_weight, run_saving, step_rows
from tessellm.quantization.stored_parts import split_stored


@dataclass(frozen=True)
class DeltaNetShape:
    """A gated DeltaNet mixer's sizes (the config's ``linear_*`` fields)."""

    hidden_size: int
    key_heads: int  # Hk
    value_heads: int  # Hv, a multiple of Hk
    key_dim: int  # dk, of each head
    value_dim: int  # dv
    conv_width: int
    eps: float  # of the gated RMSNorm

    @property
    def keys(self) -> int:
        return self.key_heads * self.key_dim

    @property
    def values(self) -> int:
        return self.value_heads * self.value_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.keys + self.values


class GatedDeltaNet(nn.Module):
    """The recurrent state cache binds ``conv_state [slots, conv_dim, width - 1]`` and
    ``ssm_state [slots, Hv, dk, dv]`` (the delta rule's state, under the cache's name).

    Under tensor parallelism each rank holds ``Hk / T`` key heads and their ``Hv / T`` value
    heads (``local``): its rows of each part of the (regrouped) projections, its conv channels
    of q, k and v, its heads' ``A_log`` and ``dt_bias``; ``out_proj`` leaves its output a partial
    sum for the next norm to reduce, as attention's ``o_proj`` does::

        in_proj_qkvz rows:  [ q: Hk*dk | k: Hk*dk | v: Hv*dv | z: Hv*dv ]   each part cut alone
        rank r holds:       [ q_r      | k_r      | v_r      | z_r      ]
    """

    def __init__(self, shape: DeltaNetShape, ctx: ModelContext):
        super().__init__()
        ops = ctx.ops
        if not getattr(ops, "supports_gated_delta", False):
            raise ValueError(f"This model has gated DeltaNet layers, whose ops the backend's fused "
                             f"ops {type(ops).__name__} do not provide (they do not declare "
                             "supports_gated_delta, FusedOps' gated_delta_* ops); run it on a "
                             "backend that does (cpu, cuda, rocm).")
        if shape.value_heads % shape.key_heads:
            raise ValueError(f"linear_num_value_heads {shape.value_heads} must be a multiple of "
                             f"linear_num_key_heads {shape.key_heads}.")
        tp = ctx.tp
        if shape.key_heads % tp.size:
            raise ValueError(f"The model's {shape.key_heads} linear-attention key heads do not "
                             f"split over tensor_parallel_size {tp.size}; use a size that "
                             f"divides {shape.key_heads}.")
        self.shape = s = shape
        self.tp = tp
        self.local = n = replace(s, key_heads=s.key_heads // tp.size,
                                 value_heads=s.value_heads // tp.size)
        self.ops = ops
        parts = [s.keys, s.keys, s.values, s.values]
        self.in_proj_qkvz = ColumnParallelLinear(s.hidden_size, parts, bias=False,
                                                 quant_method=ctx.quant_method, tp=ctx.tp)
        self.in_proj_ba = ColumnParallelLinear(s.hidden_size, [s.value_heads, s.value_heads],
                                               bias=False, quant_method=ctx.quant_method,
                                               tp=ctx.tp)
        # one checkpoint tensor each, its rows grouped by key head: regrouped here on load
        self.in_proj_qkvz.stored_whole = self.in_proj_ba.stored_whole = True
        self.conv1d = _ConvWeight(n.conv_dim, s.conv_width)
        self.dt_bias = nn.Parameter(torch.ones(n.value_heads), requires_grad=False)
        self.A_log = nn.Parameter(torch.zeros(n.value_heads), requires_grad=False)
        self._decay, self._dt_bias = DerivedWeight(neg_exp_float), DerivedWeight(as_float)
        self._conv_weight = DerivedWeight(depthwise_weight)  # [C, 1, K] as [C, K], a view
        self.norm = _NormWeight(s.value_dim)  # one per value head dim: every rank's whole
        self.out_proj = RowParallelLinear(s.values, s.hidden_size, bias=False,
                                          quant_method=ctx.quant_method, tp=tp,
                                          reduce_results=False)
        # the backend's one-launch gated norm (``FusedOps.gated_rms_norm``, optional), else
        # ``norm_then_gate`` (the reference's function in torch ops)
        self._fused_norm = callable(getattr(ops, "gated_rms_norm", None))
        self.conv_state = self.ssm_state = None  # bound by the state cache
        self.step = None

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per slot: (conv state, recurrent state) shapes of this rank's heads."""
        n = self.local
        return (n.conv_dim, n.conv_width - 1), (n.value_heads, n.key_dim, n.value_dim)

    def bind(self, conv_state: torch.Tensor, ssm_state: torch.Tensor, step) -> None:
        """The state cache's tensors for this layer and the step holder it sets each step."""
        self.conv_state, self.ssm_state, self.step = conv_state, ssm_state, step

    def load_checkpoint_tensor(self, attr: str, tensor) -> None:
        """``attr``: the name under ``linear_attn`` (``in_proj_qkvz.weight``, ``A_log``, ...)."""
        s, tensor = self.shape, materialize(tensor)
        want = self._checkpoint_shape(attr)
        if want is not None and tuple(tensor.shape) != want:  # before it is cut or regrouped
            raise ValueError(f"Checkpoint tensor linear_attn.{attr} has shape "
                             f"{tuple(tensor.shape)}, expected {want} from the config's "
                             "linear_* sizes; the config does not match the weights.")
        per_key = s.value_heads // s.key_heads
        proj, _, piece = attr.partition(".")
        if proj in ("in_proj_qkvz", "in_proj_ba"):  # the weight or its fp8 scales, by key head
            layer = getattr(self, proj)
            sizes = ([s.key_dim, s.key_dim, per_key * s.value_dim, per_key * s.value_dim]
                     if proj == "in_proj_qkvz" else [per_key, per_key])
            for i, part in enumerate(split_stored(layer, piece, tensor, sizes, s.key_heads)):
                layer.load_shard(piece, part, i)
            return
        if proj == "out_proj":
            self.out_proj.load_shard(piece, tensor, None)
            return
        if attr == "conv1d.weight":  # channels [q | k | v]: this rank's of each
            tensor = torch.cat([self._mine(part) for part in tensor.split([s.keys, s.keys,
                                                                            s.values])])
        elif attr in ("A_log", "dt_bias"):
            tensor = self._mine(tensor)
        params = dict(self.named_parameters())
        if attr not in params:
            raise ValueError(f"Checkpoint tensor linear_attn.{attr} has no place in a gated "
                             "DeltaNet layer; is this the right architecture?")
        param = params[attr]
        if param.shape != tensor.shape:
            raise ValueError(f"Checkpoint tensor linear_attn.{attr} has shape "
                             f"{tuple(tensor.shape)}, expected {tuple(param.shape)}; the config "
                             "does not match the weights.")
        param.data.copy_(tensor)

    def _checkpoint_shape(self, attr: str):
        """The whole (unsharded) checkpoint shape of a tensor this layer cuts or regroups on
        load; None for the others (their parameter's shape is checked as they are copied)."""
        s = self.shape
        return {"in_proj_qkvz.weight": (2 * s.keys + 2 * s.values, s.hidden_size),
                "in_proj_ba.weight": (2 * s.value_heads, s.hidden_size),
                "conv1d.weight": (s.conv_dim, 1, s.conv_width),
                "A_log": (s.value_heads,), "dt_bias": (s.value_heads,)}.get(attr)

    def _mine(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's equal share of ``rows`` (its heads' rows of a part)."""
        size = rows.shape[0] // self.tp.size
        return rows[self.tp.rank * size:(self.tp.rank + 1) * size]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum of the layer's output (``out_proj`` is not reduced)."""
        s, batch, t = self.local, self.step.batch, hidden.shape[0]
        qkvz = self.in_proj_qkvz(hidden)
        b, a = self.in_proj_ba(hidden).split([s.value_heads, s.value_heads], dim=-1)
        pools = getattr(self, "snapshot_pools", (None, None))  # MambaStateCache.allocate_snapshots
        qkv, m = causal_conv(self.ops, qkvz[:, :s.conv_dim], self._conv_weight(self.conv1d.weight),
                             None, self.conv_state, batch, pools[0])
        q, k, v = qkv.split([s.keys, s.keys, s.values], dim=-1)
        q = q.reshape(t, s.key_heads, s.key_dim)
        k = k.reshape(t, s.key_heads, s.key_dim)
        v = v.reshape(t, s.value_heads, s.value_dim)
        beta = torch.sigmoid(b)
        # float32: a + dt_bias promotes inside the add (no casts); -exp(A_log) and the float32
        # dt_bias kept between steps (``layers/derived.py``)
        g = self._decay(self.A_log) * F.softplus(a + self._dt_bias(self.dt_bias))
        scale = s.key_dim ** -0.5
        nd = batch.num_decodes
        parts = []
        if nd:
            idx = batch.state_indices
            parts.append(self.ops.gated_delta_step(*step_rows((q, k, v, g, beta), 0, nd, t),
                                                   self.ssm_state,
                                                   idx if idx.shape[0] == nd else idx[:nd],
                                                   scale))
        if batch.prefills is not None:
            def chunk(rows, b):
                return self.ops.gated_delta_chunk(*rows, self.ssm_state, b, scale)
            rows = step_rows((q, k, v, g, beta), nd, m, t)
            if batch.prefills.state_saves and getattr(self.ops, "gated_delta_state_saves", False):
                parts.append(self.ops.gated_delta_chunk(   # the op keeps them (plugin API 22)
                    *rows, self.ssm_state, batch.prefills, scale, snapshots=pools[1]))
            else:
                parts.append(run_saving(chunk, list(rows), batch.prefills,
                                        [(self.ssm_state, pools[1])]))
        if batch.verifies is not None:  # speculative decoding: the state after each token kept
            parts.append(verify_ops(self.ops)[2](q[m:], k[m:], v[m:], g[m:], beta[m:],
                                                 self.ssm_state, batch.verifies, scale))
        o = parts[0] if len(parts) == 1 else torch.cat(parts)
        # HF's ``Qwen3NextRMSNormGated``: each value head's o RMS-normed in float32, rounded,
        # times the shared weight, times silu(z) (``reference/gated_norm.py``'s
        # "norm_round_then_gate"): the backend's one launch, else the reference's torch ops
        norm = self.ops.gated_rms_norm if self._fused_norm else reference_gated_norm
        o = norm(o.reshape(t, s.values), qkvz[:, s.conv_dim:], self.norm.weight, s.value_dim,
                 s.eps, "norm_round_then_gate")
        return self.out_proj(o)


class _ConvWeight(nn.Module):
    """The checkpoint's depthwise ``conv1d.weight [C, 1, K]`` (no bias)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, 1, width), requires_grad=False)


class _NormWeight(nn.Module):
    """The checkpoint's ``norm.weight [dv]`` of the gated RMSNorm, shared by the value heads."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
