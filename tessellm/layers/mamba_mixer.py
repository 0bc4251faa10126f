"""The Mamba2 mixer (HF's ``Mamba2Mixer`` / ``GraniteMoeHybridMambaLayer`` / ``BambaMixer``),
over flat tokens and the per-request state cache (``core/mamba_state.py``)::

    in_proj(h) -> [ z: I | xBC: I + 2GN | dt: H ]
    xBC = silu(causal_conv1d(xBC))             continues each request's conv state
    x, B, C = xBC -> [T, H, P], [T, G, N], [T, G, N]
    y = SSM(x, dt, A = -exp(A_log), B, C, D)   decodes: one state update; prefill chunks: the
                                              chunked SSD scan; both continue the SSM state
    out_proj(rmsnorm_gated(y, z))             per group of I / G channels: norm(y * silu(z))
                                              (``gate_norm``: Falcon-H1 may norm before the
                                              gate, norm(y) * silu(z), or not at all; the
                                              backend's ``gated_rms_norm``: one launch on cuda)

The device ops come from the backend (``FusedOps.mamba_*``, declared by ``supports_mamba2``);
``I = expand * hidden`` (``H * P``), ``G`` groups share B and C, ``N`` is the state size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessellm.backends.reference.gated_norm import gated_rms_norm as reference_gated_norm
from tessellm.backends.reference.recurrent_verify import verify_ops
from tessellm.backends.reference.state_saves import run_with_saves, save_conv_states
from tessellm.layers.context import ModelContext
from tessellm.layers.derived import DerivedWeight, neg_exp_float
from tessellm.layers.linear import ColumnParallelLinear, RowParallelLinear, materialize
from tessellm.quantization.stored_parts import split_stored


@dataclass(frozen=True)
class MambaShape:
    """A Mamba2 mixer's sizes, read from each family's config names."""

    hidden_size: int
    num_heads: int  # H
    head_dim: int  # P
    n_groups: int  # G
    d_state: int  # N
    d_conv: int  # the causal conv's kernel width
    chunk_size: int  # the SSD scan's chunk
    proj_bias: bool
    conv_bias: bool
    eps: float  # of the gated RMSNorm
    dt_limit: tuple[float, float]
    out_bias: Optional[bool] = None  # out_proj's bias (None: as proj_bias); Falcon-H1 sets it apart
    gate_norm: str = "after_gate"  # "after_gate": norm(y * silu(z)); "before_gate": norm(y) *
    # silu(z); "none": y * silu(z), no norm weight (both Falcon-H1's, by its config);
    # "after_gate_float32": Falcon-H1's norm(y * silu(z)), weight applied before the rounding
    # (``backends/reference/gated_norm.py``'s modes)

    @property
    def intermediate(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.intermediate + 2 * self.n_groups * self.d_state


class MambaMixer2(nn.Module):
    """Under tensor parallelism each rank holds ``H / T`` heads (their z, x, dt rows and conv
    channels) and the groups of B and C they read: ``G / T`` groups when T divides G, else
    (``G == 1``) the one group, replicated. ``out_proj`` sums the ranks' outputs::

        in_proj rows:  [ z: I | x: I | B: G*N | C: G*N | dt: H ]
        rank r holds:  [ z_r  | x_r  | B_r     | C_r     | dt_r ]   (each logical part cut alone)
    """

    def __init__(self, shape: MambaShape, ctx: ModelContext, reduce_output: bool = True):
        """``reduce_output`` False: ``out_proj`` leaves its output a partial sum under tensor
        parallelism, for the caller to sum (Falcon-H1 adds it to its attention's first)."""
        super().__init__()
        if shape.gate_norm not in GATE_NORMS:
            raise ValueError(f"Mamba gate_norm {shape.gate_norm!r} is not one of {GATE_NORMS}.")
        if not getattr(ctx.ops, "supports_mamba2", False):
            raise ValueError(f"This model has Mamba2 layers, whose ops the backend's fused ops "
                             f"{type(ctx.ops).__name__} do not provide (they do not declare "
                             "supports_mamba2, FusedOps' mamba_* ops); run it on a backend that "
                             "does (cpu, cuda, rocm).")
        self.shape = s = shape
        self.ops = ctx.ops
        self.tp = tp = ctx.tp
        self.local = local = _local_sizes(s, tp.rank, tp.size)
        inter, gn = s.intermediate, s.n_groups * s.d_state
        ranges = [(tp.rank * local.intermediate, local.intermediate)] * 2
        ranges += [(local.first_group * s.d_state, local.n_groups * s.d_state)] * 2
        ranges += [(tp.rank * local.num_heads, local.num_heads)]
        self.in_proj = ColumnParallelLinear(s.hidden_size, [inter, inter, gn, gn, s.num_heads],
                                            bias=s.proj_bias, quant_method=ctx.quant_method, tp=tp,
                                            shard_ranges=ranges)
        self.in_proj.stored_whole = True  # one checkpoint tensor for its five parts: cut here
        self._in_parts = [inter, inter, gn, gn, s.num_heads]
        # this rank's cuts of in_proj's output and of the conv's ([z | xBC | dt], [x | B | C])
        lgn = local.n_groups * s.d_state
        self._proj_cut = [local.intermediate, local.conv_dim, local.num_heads]
        self._xbc_cut = [local.intermediate, lgn, lgn]
        self.conv1d = _Conv1dWeights(local.conv_dim, s.d_conv, s.conv_bias)
        self._conv_rows = [ranges[1], ranges[2], ranges[3]]  # x, B, C channels of the checkpoint
        self.dt_bias = nn.Parameter(torch.ones(local.num_heads), requires_grad=False)
        self.A_log = nn.Parameter(torch.zeros(local.num_heads), requires_grad=False)
        self.D = nn.Parameter(torch.ones(local.num_heads), requires_grad=False)
        self.norm = _GatedNormWeight(local.intermediate) if s.gate_norm != "none" else None
        out_bias = s.proj_bias if s.out_bias is None else s.out_bias
        self.out_proj = RowParallelLinear(inter, s.hidden_size, bias=out_bias,
                                          quant_method=ctx.quant_method, tp=tp,
                                          reduce_results=reduce_output or out_bias)
        self._flags = (None, None)  # (ops, their flags): ``op_flags``
        self.conv_state = self.ssm_state = None  # bound by the state cache
        self.step = None
        self._decay = DerivedWeight(neg_exp_float)  # A from A_log: decay()
        self._conv_weight = DerivedWeight(depthwise_weight)  # conv1d.weight [C, 1, K] as [C, K]

    def load_checkpoint_tensor(self, attr: str, tensor) -> None:
        """``attr``: the name under the mixer (``in_proj.weight``, ``conv1d.weight``, ``A_log``,
        ...); this rank's slice of the whole checkpoint tensor goes in."""
        if attr.startswith("in_proj."):  # the weight, its bias or its fp8 scales
            piece = attr.split(".", 1)[1]
            for i, part in enumerate(split_stored(self.in_proj, piece, tensor, self._in_parts)):
                self.in_proj.load_shard(piece, part, i)
            return
        tensor = materialize(tensor)
        if attr.startswith("out_proj."):
            self.out_proj.load_shard(attr.split(".", 1)[1], tensor, None)
            return
        if attr.startswith("conv1d."):
            s = self.shape
            parts = tensor.split([s.intermediate, s.n_groups * s.d_state, s.n_groups * s.d_state])
            tensor = torch.cat([p[a:a + n] for p, (a, n) in zip(parts, self._conv_rows)])
        elif attr in ("A_log", "D", "dt_bias"):
            tensor = tensor[self.tp.rank * self.local.num_heads:][:self.local.num_heads]
        elif attr == "norm.weight":
            tensor = tensor[self.tp.rank * self.local.intermediate:][:self.local.intermediate]
        param = dict(self.named_parameters())[attr]
        if param.shape != tensor.shape:
            raise ValueError(f"Checkpoint tensor mamba {attr} has shape {tuple(tensor.shape)}, "
                             f"this rank expects {tuple(param.shape)}; the config does not match "
                             "the weights.")
        param.data.copy_(tensor)

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per slot: (conv state, SSM state) shapes of this rank's heads."""
        s, local = self.shape, self.local
        return (local.conv_dim, s.d_conv - 1), (local.num_heads, s.head_dim, s.d_state)

    def bind(self, conv_state: torch.Tensor, ssm_state: torch.Tensor, step) -> None:
        """The state cache's tensors for this layer and the step holder it sets each step."""
        self.conv_state, self.ssm_state, self.step = conv_state, ssm_state, step

    def decay(self) -> torch.Tensor:
        """``A = -exp(A_log)`` in float32, kept between steps while ``A_log`` is unchanged
        (``layers/derived.py``): not three launches per layer and step."""
        return self._decay(self.A_log)

    def op_flags(self) -> tuple[bool, bool, bool, bool]:
        """The ops' optional flags this mixer reads, ``(mamba_strided_inputs,
        mamba_conv_state_saves, mamba_state_saves, a gated_rms_norm)``: looked up again only
        when ``self.ops`` is another object (not through the ops wrapper's ``__getattr__``
        each layer and step). Flags declare what an ops class does, fixed before the model
        runs; code that changes them on a live ops object resets ``_flags`` (as
        ``benchmarks/hybrid_host_step.py --no-inpass`` does)."""
        ops, flags = self._flags
        if ops is not self.ops:
            ops = self.ops
            flags = (bool(getattr(ops, "mamba_strided_inputs", False)),
                     bool(getattr(ops, "mamba_conv_state_saves", False)),
                     bool(getattr(ops, "mamba_state_saves", False)),
                     # the backend's one-launch gated norm (``FusedOps.gated_rms_norm``,
                     # optional), else the reference's torch ops
                     callable(getattr(ops, "gated_rms_norm", None)))
            self._flags = (ops, flags)
        return flags

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        s, n, batch, t = self.shape, self.local, self.step.batch, hidden.shape[0]
        strided, conv_saves, scan_saves, fused_norm = self.op_flags()
        # xbc and dt stay column views of in_proj's output (rows strided, the last dim
        # contiguous), no copy each, where the ops declare they take them (``backends/spec.py``)
        z, xbc, dt = self.in_proj(hidden).split_with_sizes(self._proj_cut, -1)
        if not strided:  # a plugin of API < 17
            xbc, dt = xbc.contiguous(), dt.contiguous()
        pools = getattr(self, "snapshot_pools", (None, None))  # MambaStateCache.allocate_snapshots
        conv = self.conv1d
        xbc, m = causal_conv(self.ops, xbc, self._conv_weight(conv.weight), conv.bias,
                             self.conv_state, batch, pools[0], conv_saves)
        x, B, C = xbc.split_with_sizes(self._xbc_cut, -1)
        x = x.reshape(t, n.num_heads, s.head_dim)
        B = B.reshape(t, n.n_groups, s.d_state)
        C = C.reshape(t, n.n_groups, s.d_state)
        A = self.decay()
        nd = batch.num_decodes
        parts = []
        if nd:
            xs, dts, Bs, Cs = step_rows((x, dt, B, C), 0, nd, t)
            idx = batch.state_indices
            parts.append(self.ops.mamba_state_update(
                xs, dts, A, Bs, Cs, self.D, self.dt_bias, self.ssm_state,
                idx if idx.shape[0] == nd else idx[:nd], s.dt_limit))
        if batch.prefills is not None:
            def scan(rows, b):
                return self.ops.mamba_chunk_scan(rows[0], rows[1], A, rows[2], rows[3], self.D,
                                                 self.dt_bias, self.ssm_state, b, s.chunk_size,
                                                 s.dt_limit)
            rows = step_rows((x, dt, B, C), nd, m, t)
            if batch.prefills.state_saves and scan_saves:
                parts.append(self.ops.mamba_chunk_scan(   # the op keeps them (plugin API 21)
                    *rows[:2], A, *rows[2:], self.D, self.dt_bias, self.ssm_state,
                    batch.prefills, s.chunk_size, s.dt_limit, snapshots=pools[1]))
            else:
                parts.append(run_saving(scan, list(rows), batch.prefills,
                                        [(self.ssm_state, pools[1])]))
        if batch.verifies is not None:  # speculative decoding: the state after each token kept
            parts.append(verify_ops(self.ops)[1](
                x[m:], dt[m:], A, B[m:], C[m:], self.D, self.dt_bias, self.ssm_state,
                batch.verifies, s.dt_limit))
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
        y = y.reshape(t, n.intermediate)
        if self.norm is None:
            return self.out_proj((F.silu(z.float()) * y).to(y.dtype))  # y promotes in the mul
        mode = GATED_NORM_MODE[s.gate_norm]
        if s.n_groups == 1 and self.tp.size > 1:  # the one group's channels over the ranks
            return self.out_proj(tp_gated_rms_norm(y, z, self.norm.weight, s.eps, mode,
                                                   self.tp, s.intermediate))
        # the backend's one launch (``FusedOps.gated_rms_norm``), else the reference's torch ops
        norm = self.ops.gated_rms_norm if fused_norm else reference_gated_norm
        return self.out_proj(norm(y, z, self.norm.weight, n.intermediate // n.n_groups, s.eps,
                                  mode))


def depthwise_weight(weight: torch.Tensor) -> torch.Tensor:
    """The depthwise conv's ``[C, 1, K]`` weight as the ops take it, ``[C, K]`` (a view)."""
    return weight[:, 0]


def step_rows(tensors, lo: int, hi: int, total: int):
    """Rows ``lo:hi`` of each tensor: the tensors themselves when that is all of them (a step of
    prefills alone, or of decodes alone: no slice ops a layer and step)."""
    if lo == 0 and hi == total:
        return tensors
    return tuple(t[lo:hi] for t in tensors)


GATE_NORMS = ("after_gate", "after_gate_float32", "before_gate", "none")
# ``MambaShape.gate_norm`` -> the ``mode`` of ``FusedOps.gated_rms_norm``
GATED_NORM_MODE = {"after_gate": "gate_then_norm", "after_gate_float32": "gate_then_norm_float32",
                   "before_gate": "norm_then_gate"}


def causal_conv(ops, x: torch.Tensor, weight: torch.Tensor, bias, conv_state: torch.Tensor,
                batch, pool=None, conv_saves: Optional[bool] = None) -> tuple[torch.Tensor, int]:
    """``silu(causal conv)`` of the step's rows, continuing each sequence's conv state, and the
    number of rows before the verify rows (``MambaBatch.verifies``: run through the backend's
    ``mamba_conv1d_verify``, which keeps the conv state after each of their tokens). ``pool``:
    the conv snapshot pool that ``batch.state_saves`` name slots of: the op keeps them where it
    declares ``mamba_conv_state_saves`` (plugin API 23: in its launches), else they are copied
    from the conv's input first (``save_conv_states``: the inputs before each offset).
    ``conv_saves``: that flag as the caller read it (None: read here)."""
    kw = {}
    if batch.state_saves:
        if conv_saves is None:
            conv_saves = getattr(ops, "mamba_conv_state_saves", False)
        if conv_saves:
            kw = {"snapshots": pool}
        else:
            save_conv_states(x, conv_state, batch, pool)
    if batch.verifies is None:
        return ops.mamba_conv1d(x, weight, bias, conv_state, batch, "silu", **kw), x.shape[0]
    m = x.shape[0] - batch.verifies.query_start_loc_host[-1]
    out = verify_ops(ops)[0](x[m:], weight, bias, conv_state, batch.verifies, "silu")
    if m:
        out = torch.cat([ops.mamba_conv1d(x[:m], weight, bias, conv_state, batch, "silu", **kw),
                         out])
    return out, m


def run_saving(op, inputs: list, batch, pairs: list) -> torch.Tensor:
    """``op(inputs, batch)``, keeping the states ``batch.state_saves`` ask for on the way
    (``reference/state_saves.py``: the op run once per piece between them)."""
    if not batch.state_saves:
        return op(inputs, batch)
    return run_with_saves(op, inputs, batch, pairs)


def tp_gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                      mode: str, tp, group_size: int) -> torch.Tensor:
    """``reference/gated_norm.gated_rms_norm`` of one group (``G == 1``) whose ``group_size``
    channels are split over the tensor-parallel ranks ``tp``: the sum of squares is summed over
    them; the mode's rounding points as there."""
    h = F.silu(z.float()) * y if mode.startswith("gate_then_norm") else y.float()
    var = tp.all_reduce(h.pow(2).sum(-1, keepdim=True)) / group_size
    g = h * torch.rsqrt(var + eps)
    if mode == "gate_then_norm":
        return weight * g.to(y.dtype)
    if mode == "gate_then_norm_float32":
        return (weight * g).to(y.dtype)
    return (weight * g * F.silu(z.float())).to(y.dtype)  # norm_then_gate


@dataclass(frozen=True)
class _LocalSizes:
    """One rank's part of a mixer (see ``MambaMixer2``)."""

    num_heads: int
    n_groups: int
    first_group: int
    intermediate: int
    conv_dim: int


def _local_sizes(s: MambaShape, rank: int, size: int) -> _LocalSizes:
    if s.num_heads % size:
        raise ValueError(f"The model's {s.num_heads} Mamba heads do not split over "
                         f"tensor_parallel_size {size}; use a size that divides {s.num_heads}.")
    if s.n_groups % size and s.n_groups != 1:
        raise ValueError(f"The model's {s.n_groups} Mamba groups (n_groups) do not split over "
                         f"tensor_parallel_size {size}; use a size that divides {s.n_groups}.")
    groups = s.n_groups // size if s.n_groups % size == 0 else 1
    first = rank * groups if s.n_groups % size == 0 else 0
    heads = s.num_heads // size
    inter = heads * s.head_dim
    return _LocalSizes(heads, groups, first, inter, inter + 2 * groups * s.d_state)


class _Conv1dWeights(nn.Module):
    """The checkpoint's ``conv1d.weight [C, 1, K]`` and ``conv1d.bias [C]`` (depthwise)."""

    def __init__(self, channels: int, width: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, 1, width), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(channels), requires_grad=False) if bias else None


class _GatedNormWeight(nn.Module):
    """The checkpoint's ``norm.weight`` of the gated RMSNorm."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
