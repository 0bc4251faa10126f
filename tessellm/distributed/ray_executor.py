"""The ``ray`` executor: one Ray actor per rank, placed by a placement group, across nodes.

Each bundle asks Ray for the accelerator the backend needs (``GPU`` for cuda/rocm/xpu, ``TPU``
for tpu, ``CPU`` for cpu). The actors join one torch.distributed group through rank 0's
address and then behave exactly like the ``mp`` executor's workers. Each step's
``SchedulerOutput`` goes to them as msgpack bytes (plain data, never a pickled object), and
tensor rank 0 of the last stage returns msgpack bytes of the sampled tokens.

Ray is used as it is found: inside an existing Ray job (``ray.init`` done, e.g. under Ray
Serve or ``RAY_ADDRESS`` set) the actors join that cluster; otherwise a local one is started.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Optional

from tessellm import envs
from tessellm.config import EngineArgs
from tessellm.core.step import ModelRunnerOutput, SchedulerOutput
from tessellm.distributed.codec import (decode_runner_output, decode_scheduler_output,
                                        encode_runner_output, encode_scheduler_output, pack, unpack)
from tessellm.distributed.executor import Executor, WorkerDiedError, rpc_timeout_message
from tessellm.distributed.parallel_state import ParallelConfig

logger = logging.getLogger(__name__)

_WAIT_S = 0.5
_RELEASE_S = 5.0  # how long shutdown waits for the ranks to release (their KV saves written)


def ray_resources(device_type: str, backend_name: str) -> dict[str, float]:
    """What one rank asks Ray for."""
    if device_type == "cpu":
        return {"CPU": 1}
    if backend_name == "tpu" or device_type == "xla":
        return {"TPU": 1}
    return {"GPU": 1}


class RayWorkerActor:
    """The body of each rank's actor (wrapped with ``ray.remote`` at start-up)."""

    def __init__(self, args: dict, rank: int, parallel: dict):
        self.args = EngineArgs(**args)
        self.rank = rank
        self.parallel = ParallelConfig(**parallel)
        self.worker = None
        self.held = None  # async scheduling: a launched step whose tokens wait for the next call

    def address(self) -> str:
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def start(self, init_method: str) -> dict:
        from tessellm.distributed.worker import Worker

        # Ray points each actor at its own accelerator (CUDA_VISIBLE_DEVICES): device index 0.
        self.worker = Worker(self.args, self.rank, self.parallel, init_method, local_rank=0)
        return self.worker.info()

    def call(self, method: str, args: list):
        return getattr(self.worker, method)(*args)

    def execute(self, payload: bytes, deferred: bool = False) -> Optional[bytes]:
        """Launch a step. Synchronous: return its tokens. ``deferred`` (async scheduling, the
        mp protocol of ``executor.py``): hold them, and return the previously held step's."""
        handle = self.worker.execute_async(decode_scheduler_output(unpack(payload)))
        if not deferred:
            return self._output(handle)
        previous = self.flush()  # after the launch: the device already has this step queued
        self.held = handle
        return previous

    def flush(self) -> Optional[bytes]:
        """The held step's tokens (None when nothing is held)."""
        held, self.held = self.held, None
        return None if held is None else self._output(held)

    def _output(self, handle) -> Optional[bytes]:
        out = handle.result()
        if self.rank == self.parallel.output_rank:
            return pack(encode_runner_output(out))
        return None


def _error_of(ref):
    """The exception a finished ref holds, or None (also None while it is not finished)."""
    import ray

    try:
        ray.get(ref, timeout=0)
    except ray.exceptions.GetTimeoutError:
        return None
    except Exception as exc:  # noqa: BLE001 - RayActorError, RayTaskError, ...
        return exc
    return None


def _describe(exc: Exception) -> str:
    import ray

    if isinstance(exc, ray.exceptions.RayActorError):
        return "its actor died (killed, out of memory, or its node was lost)"
    cause = getattr(exc, "cause", None)
    return f"{type(cause or exc).__name__}: {str(cause or exc).splitlines()[0][:500]}"


class RayExecutor(Executor):
    """``deferred``: async scheduling; every ``execute`` call returns the step before it (the
    first one after a flush returns nothing) and ``collect`` asks for a ``flush`` when no later
    step will bring the oldest one back."""

    def __init__(self, args: EngineArgs, parallel: ParallelConfig, deferred: bool = False):
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from tessellm.backends.registry import get_registry

        self.parallel = parallel
        self.deferred = deferred
        self._held = False  # the actors hold the last submitted step's tokens
        self._launch_only: list = []  # refs of calls that return no step (checked for errors)
        self._dead: Optional[str] = None
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=envs.ray_address(), include_dashboard=False,
                     log_to_driver=True)
        backend = get_registry().select(args.device, getattr(args, "emulate", False))
        bundle = ray_resources(backend.device_type, backend.name)
        self._pg = placement_group([dict(bundle)] * parallel.world_size, strategy="PACK")
        self._remove_pg = remove_placement_group
        self._queue: collections.deque = collections.deque()
        try:
            ray.get(self._pg.ready(), timeout=envs.ray_placement_timeout_s())
        except Exception as exc:  # noqa: BLE001
            self._cleanup()
            raise RuntimeError(
                f"Ray could not place {parallel.world_size} ranks each needing {bundle} "
                f"(cluster resources: {ray.cluster_resources()}); add nodes or lower "
                "tensor_parallel_size x pipeline_parallel_size.") from exc
        cls = ray.remote(RayWorkerActor)
        self._actors = []
        for rank in range(parallel.world_size):
            opts = dict(scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, rank),
                        num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                        resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
                        max_restarts=0, name=None)
            self._actors.append(cls.options(**opts).remote(args.spawn_dict(), rank,
                                                           dataclasses.asdict(parallel)))
        try:
            init_method = self._get([self._actors[0].address.remote()])[0]
            self.worker_info = self._get([a.start.remote(init_method) for a in self._actors])
        except BaseException:
            self.shutdown()
            raise

    def _get(self, refs: list, deadline: Optional[float] = None, what: str = "") -> list:
        """Wait for every ref; fail fast on the first error or dead actor (a rank stuck in a
        collective waiting for a dead peer would otherwise block this forever). ``deadline``
        (``time.monotonic()``): TimeoutError naming the ranks still out (``collective_rpc``)."""
        import ray

        if self._dead is not None:
            raise WorkerDiedError(self._dead)
        pending = list(refs)
        while pending:
            wait = _WAIT_S if deadline is None else max(0.0, min(_WAIT_S, deadline - time.monotonic()))
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=wait)
            if pending and deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(rpc_timeout_message(what, sorted(refs.index(r) for r in pending)))
            errors = [(refs.index(r), e) for r in ready if (e := _error_of(r)) is not None]
            if errors:
                # A dead rank makes its peers' collectives fail too: give them a moment to
                # report, then name the rank that died rather than one that lost its peer.
                ray.wait(pending, num_returns=len(pending), timeout=2 * _WAIT_S)
                errors += [(refs.index(r), e) for r in pending if (e := _error_of(r)) is not None]
                errors.sort(key=lambda re: not isinstance(re[1], ray.exceptions.RayActorError))
                rank, exc = errors[0]
                self._dead = f"Ray worker rank {rank} failed: {_describe(exc)}"
                logger.error("%s Stopping the other workers.", self._dead)
                self.shutdown()
                raise WorkerDiedError(self._dead) from exc
        return ray.get(list(refs))

    def collective_rpc(self, method: str, *args, timeout: Optional[float] = None) -> list:
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._get([a.call.remote(method, list(args)) for a in self._actors], deadline, method)

    def submit(self, sched: SchedulerOutput) -> None:
        if self._dead is not None:
            raise WorkerDiedError(self._dead)
        payload = pack(encode_scheduler_output(sched))
        refs = [a.execute.remote(payload, self.deferred) for a in self._actors]
        if self.deferred and not self._held:
            self._launch_only.append(refs)  # nothing held before it: it returns no step
        else:
            self._queue.append(refs)  # returns this step (sync) or the held one (deferred)
        self._held = self.deferred

    def collect(self) -> ModelRunnerOutput:
        if self._launch_only:  # a launch that failed must not pass for a held step
            self._get([r for refs in self._launch_only for r in refs])
            self._launch_only = []
        if not self._queue:  # the one step in flight is held: no later call will return it
            self._queue.append([a.flush.remote() for a in self._actors])
            self._held = False
        results = self._get(self._queue.popleft())
        return decode_runner_output(unpack(results[self.parallel.output_rank]))

    def _cleanup(self) -> None:
        import ray

        if getattr(self, "_pg", None) is not None:
            try:
                self._remove_pg(self._pg)
            except Exception:  # noqa: BLE001 - already gone
                pass
            self._pg = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

    def shutdown(self) -> None:
        import ray

        actors = getattr(self, "_actors", [])
        if actors and hasattr(self, "worker_info") and self._dead is None:  # started, all alive
            # Each rank's KV connector writes its saves under way first (Worker.release), as an
            # mp worker does; bounded, then the actors are killed whatever they are doing.
            ray.wait([a.call.remote("release", []) for a in actors], num_returns=len(actors),
                     timeout=_RELEASE_S)
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self._actors = []
        self._cleanup()
