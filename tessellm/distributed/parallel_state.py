"""Who a rank is in the T x P grid, and the collectives layers call.

Ranks are laid out stage-major: global rank ``r`` is pipeline stage ``r // T`` and tensor
rank ``r % T`` within it::

    T=2, P=2:   stage 0: ranks 0 1   (one tensor-parallel group)
                stage 1: ranks 2 3   (another)
                hidden states flow 0->2 and 1->3

Layers take a ``TensorParallel`` at construction (../shared/STYLE.md: parallelism passed in, no
global state). ``TensorParallel()`` is a single device: every collective is the identity, so a
model builds and runs without a process group.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from tessellm import envs

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def coords(self, rank: int) -> tuple[int, int]:
        """Global rank -> (pipeline stage, tensor rank)."""
        return divmod(rank, self.tensor_parallel_size)

    def rank_of(self, stage: int, tp_rank: int) -> int:
        return stage * self.tensor_parallel_size + tp_rank

    @property
    def output_rank(self) -> int:
        """The rank whose sampled tokens the engine reads: tensor rank 0 of the last stage."""
        return self.rank_of(self.pipeline_parallel_size - 1, 0)


class TensorParallel:
    """One rank's view of its tensor-parallel group."""

    def __init__(self, rank: int = 0, size: int = 1, group=None):
        if not 0 <= rank < size:
            raise ValueError(f"tensor-parallel rank {rank} is outside a group of {size}.")
        self.rank = rank
        self.size = size
        self.group = group  # a torch.distributed ProcessGroup; None with size 1

        self.fast_all_reduce = None  # SymmMemAllReduce on NVLink GPUs, see enable_fast_all_reduce
        self.workspaces = {}  # a backend's per-group state for its fused collectives, by key

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group (in place, or into a new tensor that is returned)."""
        if self.size == 1:
            return x
        if self.fast_all_reduce is not None and self.fast_all_reduce.fits(x):
            return self.fast_all_reduce(x)
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def enable_fast_all_reduce(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Small all-reduces (decode steps) through symmetric memory instead of NCCL, where
        torch supports it on this device; False (NCCL for everything) otherwise."""
        if self.size == 1 or device.type != "cuda" or not envs.symm_mem_all_reduce():
            return False
        try:
            self.fast_all_reduce = SymmMemAllReduce(self.group, device, dtype)
        except Exception as exc:  # noqa: BLE001 - an optional fast path; NCCL always works
            logger.warning("Symmetric-memory all-reduce unavailable (%s: %s); using NCCL.",
                           type(exc).__name__, exc)
            return False
        return True

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dim, in rank order."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        if x.is_cuda:  # one NCCL call into one buffer (graph-capturable)
            out = torch.empty((self.size, *x.shape), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x.contiguous(), group=self.group)
            return out.movedim(0, -2).reshape(*x.shape[:-1], self.size * x.shape[-1])
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


class SymmMemAllReduce:
    """All-reduce through a buffer every rank maps (torch symmetric memory over NVLink P2P).

    One kernel (``one_shot_all_reduce_copy``, torch 2.8+; before it a copy, then the kernel):
    each rank copies its input into its slice of the shared buffer and, after a barrier, reads
    and sums every peer's (one-shot). Measured on 4 H200s inside a CUDA graph
    (benchmarks/allreduce_bench.py): 8.1 us vs NCCL's 10.6 at 8 KiB, 9.3 vs 12.1 at 64 KiB,
    equal at 1 MiB, slower above; so inputs above ``max_bytes`` (1 MiB: decode batches up to
    128 at hidden size 4096 in bf16) go to NCCL. Graph-capturable. NVLink multicast
    (``multimem``) is never used.
    """

    def __init__(self, group, device: torch.device, dtype: torch.dtype, max_bytes: int = 1 << 20):
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        group = group or dist.group.WORLD
        self.group_name = group.group_name
        if _torch_version() < (2, 8):  # needed before 2.8, deprecated (a warning) after
            symm_mem.enable_symm_mem_for_group(self.group_name)
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.max_numel = max_bytes // torch.empty(0, dtype=dtype).element_size()
        self.buffer = symm_mem.empty(self.max_numel, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype == self.dtype and x.numel() <= self.max_numel

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        buf = self.buffer[:x.numel()]
        if hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy"):  # one kernel copies, then sums
            return torch.ops.symm_mem.one_shot_all_reduce_copy(
                buf, x.reshape(-1), "sum", self.group_name).view(x.shape)
        buf.copy_(x.reshape(-1))
        return torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", self.group_name).view(x.shape)


class PipelineStage:
    """One rank's place in the pipeline: which layers it runs and whom it talks to."""

    def __init__(self, stage: int = 0, num_stages: int = 1, prev_rank: Optional[int] = None,
                 next_rank: Optional[int] = None):
        self.stage = stage
        self.num_stages = num_stages
        self.prev_rank = prev_rank  # global rank feeding this one hidden states; None: first
        self.next_rank = next_rank
        self._pending = []  # sends in flight: (work, tensors kept alive until done)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """Layers [start, end) of this stage: an even split, earlier stages taking one fewer
        when it does not divide (the last stage also runs the norm and the LM head)."""
        if num_layers < self.num_stages:
            raise ValueError(f"pipeline_parallel_size {self.num_stages} exceeds the model's "
                             f"{num_layers} layers; use at most {num_layers} stages.")
        return (self.stage * num_layers // self.num_stages,
                (self.stage + 1) * num_layers // self.num_stages)

    def send(self, tensors: list[torch.Tensor]) -> None:
        """Send to the next stage without waiting for it to receive (it is still busy with the
        previous batch); the tensors stay referenced until their send completes."""
        import torch.distributed as dist

        self.wait_sends()
        self._pending = [(dist.isend(t.contiguous(), self.next_rank), t) for t in tensors]

    def wait_sends(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending = []

    def recv(self, shapes: list[tuple[int, ...]], dtype: torch.dtype,
             device: torch.device) -> list[torch.Tensor]:
        import torch.distributed as dist

        out = [torch.empty(s, dtype=dtype, device=device) for s in shapes]
        for t in out:
            dist.recv(t, self.prev_rank)
        return out


def init_distributed(config: ParallelConfig, rank: int, dist_backend: str, init_method: str,
                     device: Optional[torch.device] = None,
                     timeout_s: float = 600.0) -> tuple[TensorParallel, PipelineStage]:
    """Join the process group (every rank calls this) and build this rank's views.

    ``dist_backend`` is the backend's communicator (``Backend.dist_backend``: nccl, gloo, ...).
    """
    import torch.distributed as dist

    kwargs = {}
    if device is not None and device.type == "cuda":
        kwargs["device_id"] = device  # binds NCCL to this rank's GPU at init
    dist.init_process_group(dist_backend, init_method=init_method, world_size=config.world_size,
                            rank=rank, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    stage, tp_rank = config.coords(rank)
    tp_size, pp_size = config.tensor_parallel_size, config.pipeline_parallel_size
    group = None
    if tp_size > 1:
        # new_group is collective: every rank creates every stage's group, in the same order.
        for s in range(pp_size):
            g = dist.new_group([config.rank_of(s, t) for t in range(tp_size)])
            if s == stage:
                group = g
    prev_rank = config.rank_of(stage - 1, tp_rank) if stage > 0 else None
    next_rank = config.rank_of(stage + 1, tp_rank) if stage < pp_size - 1 else None
    return TensorParallel(tp_rank, tp_size, group), PipelineStage(stage, pp_size, prev_rank, next_rank)
