"""Executors: how the engine core drives its workers.

* ``UniProcExecutor``: one device, the worker lives in the core process (no copies at all).
* ``MultiprocExecutor`` (``mp``): T x P worker processes on this host, spawned. The core sends
  each step's ``SchedulerOutput`` to every rank, msgpack over a private ZeroMQ ``ipc://``
  socket per rank (local only, never pickle); tensor rank 0 of the last pipeline stage sends
  back the sampled tokens. The ranks exchange activations among themselves through the
  backend's communicator (``torch.distributed``: nccl, gloo, ...).
* ``RayExecutor`` (``ray``, ``tessellm.distributed.ray_executor``): the same workers as Ray
  actors placed by a placement group, across nodes.

All of them let several steps be in flight (``submit`` / ``collect``, first in first out): the
pipeline depth, so every stage has a batch to work on; or, under async scheduling, two: step
N+1 is submitted, and launched on the devices, before step N is collected. Then an ``mp``
worker or Ray actor returns step N's tokens only once it has launched N+1 (or is told to
``flush``), so the wait for N's tokens never delays N+1's launch.

A worker that dies or raises makes the next call fail fast with ``WorkerDiedError`` naming the
rank and the reason; the remaining workers are stopped (no rank is left waiting in a
collective for a peer that will never come). An ``mp`` rank that raises releases what it holds
before it exits (its KV connector's saves under way written, its sockets closed), as one that is
told to shut down does; the others are told to shut down too, and given the same time
(``_SHUTDOWN_WAIT_S``) before they are terminated: one waiting in a collective for the failed
rank fails there once that rank is gone, and exits the same way.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import socket
import tempfile
import time
import traceback
from typing import Optional

from tessellm.config import EngineArgs
from tessellm.core.step import ModelRunnerOutput, SchedulerOutput
from tessellm.distributed.codec import (decode_runner_output, decode_scheduler_output,
                                        encode_runner_output, encode_scheduler_output, pack, unpack)
from tessellm.distributed.parallel_state import ParallelConfig
from tessellm.distributed.spawn import parent_gone, spawn_process

logger = logging.getLogger(__name__)

_POLL_MS = 500  # how often a waiting side checks that the other is still alive
_SHUTDOWN_WAIT_S = 10.0  # how long the ranks have to stop (their KV saves written) once asked


class WorkerDiedError(RuntimeError):
    """A worker process or actor exited or raised; the engine cannot go on."""


def rpc_timeout_message(method: str, late_ranks: list[int]) -> str:
    """``collective_rpc(timeout=...)``'s TimeoutError: the method and the ranks still out."""
    ranks = ", ".join(map(str, late_ranks))
    return (f"collective_rpc {method!r} timed out: rank{'s' if len(late_ranks) > 1 else ''} {ranks} did "
            "not answer in time (the call goes on there; its late answer is dropped). Give a longer "
            "timeout, or None to wait for every rank.")


class Executor:
    parallel: ParallelConfig
    worker_info: list[dict]
    # ``sample_deferred``: a step submitted with ``grammar_deferred`` samples once its mask comes.
    supports_deferred_sample = False

    @property
    def max_concurrent_batches(self) -> int:
        return self.parallel.pipeline_parallel_size

    def num_kv_blocks(self) -> int:
        """The KV cache size every rank can hold: the smallest over ranks."""
        return min(self.collective_rpc("num_kv_blocks"))

    def initialize_cache(self, num_blocks: int) -> None:
        """Every rank allocates ``num_blocks`` and captures its graphs."""
        for info, graphs in zip(self.worker_info, self.collective_rpc("initialize_cache", num_blocks)):
            info["graphs"] = graphs

    def collective_rpc(self, method: str, *args, timeout: Optional[float] = None) -> list:
        """``method`` of every rank's worker with ``args``; one result per rank, in rank order.
        ``timeout`` (seconds, vLLM's): TimeoutError when a rank has not answered by then (the
        call goes on there; its late answer is dropped). None: wait for every rank."""
        raise NotImplementedError

    def save_sharded_state(self, path: str, pattern: Optional[str] = None,
                           max_size: Optional[int] = None) -> list[str]:
        """Every rank writes its weights under ``path`` (``loader/sharded_state.py``); the
        files written, rank by rank."""
        os.makedirs(path, exist_ok=True)  # a bad path fails here, not in a worker process
        return [f for files in self.collective_rpc("save_sharded_state", path, pattern, max_size)
                for f in files]

    def mark_compile_ready(self) -> None:
        """Warm-up ended: every worker process counts its Triton compilations as 'after ready'
        from now on (``tessellm.metrics.compile_counter``)."""
        self.collective_rpc("mark_compile_ready")

    def restart_plugin_checks(self) -> None:
        """Warm-up ended: every worker's checked plugin calls check their next calls again, so
        the warm-up's synthetic requests do not use up the checks (``backends/checked.py``)."""
        self.collective_rpc("restart_plugin_checks")

    def worker_compilations_after_ready(self) -> int:
        """Triton compilations after ready in worker processes (not the caller's own)."""
        return sum(getattr(self, "_worker_compilations", {}).values())

    def submit(self, sched: SchedulerOutput) -> None:
        raise NotImplementedError

    def collect(self) -> ModelRunnerOutput:
        raise NotImplementedError

    def sample_deferred(self, bitmask, bitmask_rows: dict[str, int]) -> None:
        """The mask of the last submitted step (``grammar_deferred``): it samples now."""
        raise NotImplementedError

    def shutdown(self) -> None:
        pass


class UniProcExecutor(Executor):
    supports_deferred_sample = True

    def __init__(self, args: EngineArgs):
        from tessellm.distributed.worker import Worker

        self.parallel = ParallelConfig()
        self.worker = Worker(args)
        self.worker_info = [self.worker.info()]
        self._launched: collections.deque = collections.deque()  # StepHandles, oldest first

    def collective_rpc(self, method: str, *args, timeout: Optional[float] = None) -> list:
        # In this process the call runs to its end: there is no rank to stop waiting for (vLLM's
        # UniProcExecutor ignores timeout too).
        return [getattr(self.worker, method)(*args)]

    def mark_compile_ready(self) -> None:
        pass  # the worker runs in the caller's process, whose counter the caller marks

    def submit(self, sched: SchedulerOutput) -> None:
        self._launched.append(self.worker.execute_async(sched))

    def collect(self) -> ModelRunnerOutput:
        return self._launched.popleft().result()

    def sample_deferred(self, bitmask, bitmask_rows: dict[str, int]) -> None:
        self.worker.runner.sample_deferred(bitmask, bitmask_rows)

    def shutdown(self) -> None:
        """Release the model and KV cache now, not when this object is collected."""
        worker, self.worker = self.worker, None
        self._launched.clear()
        if worker is not None:
            worker.release()


# -- multiprocessing ---------------------------------------------------------------------------

class MultiprocExecutor(Executor):
    """``deferred``: async scheduling's protocol (module docstring); a worker holds a step's
    tokens until the next step or a ``flush``."""

    supports_deferred_sample = True

    def __init__(self, args: EngineArgs, parallel: ParallelConfig, deferred: bool = False):
        import zmq

        from tessellm.core.ipc import ParentEndpoints

        self.parallel = parallel
        self.deferred = deferred
        self._held = False  # the workers hold the last submitted step's tokens
        self._dead: Optional[str] = None
        self._in_flight = 0
        self._call_id = 0  # the last collective_rpc's id; its answers echo it
        self._awaited_call: Optional[int] = None  # the call collective_rpc waits for now
        self._worker_compilations: dict[int, int] = {}  # rank -> Triton compilations after ready
        self._tmp = tempfile.mkdtemp(prefix="tessellm-workers-")
        # Released by shutdown(), or when garbage-collected without it (after a failure).
        self._ipc = ParentEndpoints(self, self._tmp)
        results_addr = f"ipc://{self._tmp}/results"
        self._results = self._ipc.socket(zmq.PULL, bind=results_addr)
        self._cmds = []
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self._procs = []
        for rank in range(parallel.world_size):
            addr = f"ipc://{self._tmp}/cmd{rank}"
            self._cmds.append(self._ipc.socket(zmq.PUSH, bind=addr))
            # From a clean main: the user's script is never re-run in a worker (spawn.py).
            proc = spawn_process(run_worker, f"tessellm-worker-{rank}",
                                 (args.spawn_dict(), rank, dataclasses.asdict(parallel),
                                  init_method, addr, results_addr, os.getpid()))
            self._procs.append(proc)
            self._ipc.adopt(proc)
        # Dropped without shutdown (the program ends): the ranks stop as shutdown() stops them.
        self._ipc.farewell(self._cmds, pack(["shutdown"]), _SHUTDOWN_WAIT_S)
        try:
            infos = {}
            while len(infos) < parallel.world_size:
                msg = self._recv()
                if msg[0] != "ready":
                    raise WorkerDiedError(f"Unexpected message {msg[0]!r} from a starting worker.")
                infos[msg[1]] = msg[2]
            self.worker_info = [infos[r] for r in range(parallel.world_size)]
        except BaseException:
            self.shutdown()
            raise

    def _broadcast(self, message: list) -> None:
        import zmq

        self._check()
        data = pack(message)
        for sock in self._cmds:
            # A PUSH socket whose worker is gone blocks on send: wait while checking liveness.
            while not sock.poll(_POLL_MS, zmq.POLLOUT):
                self._check_processes()
            sock.send(data)

    def collective_rpc(self, method: str, *args, timeout: Optional[float] = None) -> list:
        """Each call carries an id its answers echo: the late answers of a call that timed out
        are dropped by ``_recv`` whenever they come (during a later call or step)."""
        if self._in_flight:
            raise RuntimeError("collective_rpc while steps are in flight; collect them first.")
        deadline = None if timeout is None else time.monotonic() + timeout
        self._call_id += 1
        self._broadcast(["call", method, list(args), self._call_id])
        results, refused = {}, {}
        self._awaited_call = self._call_id
        try:
            while len(results) + len(refused) < self.parallel.world_size:
                msg = self._recv(deadline)
                if msg is None:
                    late = [r for r in range(self.parallel.world_size) if r not in results and r not in refused]
                    raise TimeoutError(rpc_timeout_message(method, late))
                if msg[0] == "call_refused":  # the call raised on that rank, which serves on
                    refused[msg[1]] = msg[2]
                    continue
                if msg[0] != "result":
                    raise WorkerDiedError(f"Unexpected message {msg[0]!r} while waiting for {method}.")
                results[msg[1]] = msg[2]
        finally:
            self._awaited_call = None
        if refused:
            rank = min(refused)
            raise ValueError(f"{method} failed on rank {rank}: {refused[rank]}")
        return [results[r] for r in range(self.parallel.world_size)]

    def submit(self, sched: SchedulerOutput) -> None:
        self._broadcast(["execute", encode_scheduler_output(sched), self.deferred])
        self._in_flight += 1
        self._held = self.deferred

    def sample_deferred(self, bitmask, bitmask_rows: dict[str, int]) -> None:
        from tessellm.distributed.codec import encode_bitmask

        self._broadcast(["sample", encode_bitmask(bitmask), bitmask_rows])

    def collect(self) -> ModelRunnerOutput:
        if not self._in_flight:
            raise RuntimeError("collect() with no step in flight.")
        if self._in_flight == 1 and self._held:  # no later step will release it: ask for it
            self._broadcast(["flush"])
            self._held = False
        msg = self._recv()
        if msg[0] != "output":
            raise WorkerDiedError(f"Unexpected message {msg[0]!r} while waiting for a step.")
        self._in_flight -= 1
        return decode_runner_output(msg[1])

    def _recv(self, deadline: Optional[float] = None) -> Optional[list]:
        """The next message from any worker; fails fast if a worker died or raised. None once
        ``deadline`` (``time.monotonic()``) passes. A call's answer that is not the awaited
        call's (one that timed out) is dropped."""
        while True:
            self._check()
            wait_ms = _POLL_MS
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                wait_ms = max(1, min(_POLL_MS, int(left * 1000)))
            if self._results.poll(wait_ms):
                msg = unpack(self._results.recv())
                if msg[0] in ("result", "call_refused") and msg[3] != self._awaited_call:
                    continue  # the late answer of a call that timed out
                if msg[0] == "error":
                    # A peer's collective fails when a rank dies: name the dead rank, the cause.
                    self._check_processes(reporter=msg[1])
                    self._fail(f"Worker rank {msg[1]} failed: {msg[2]}")
                if msg[0] == "compiled":  # unsolicited: a rank compiled after ready
                    self._worker_compilations[msg[1]] = msg[2]
                    continue
                return msg
            self._check_processes()

    def _check_processes(self, reporter: Optional[int] = None) -> None:
        """Fail naming a rank that exited, other than ``reporter`` (a rank that just sent its
        error and exits by itself). A rank killed by a signal goes first: its peers then fail in
        their next collective and exit with code 1 themselves, as effects, not the cause."""
        exited = [rank for rank, proc in enumerate(self._procs)
                  if proc.exitcode is not None and rank != reporter]
        if exited:
            rank = min(exited, key=lambda r: (self._procs[r].exitcode >= 0, r))
            proc = self._procs[rank]
            self._fail(f"Worker rank {rank} (pid {proc.pid}) exited with code "
                       f"{proc.exitcode}; the engine cannot continue without it.")

    def _check(self) -> None:
        if self._dead is not None:
            raise WorkerDiedError(self._dead)

    def _fail(self, reason: str) -> None:
        logger.error("%s Stopping the other workers.", reason)
        self._dead = reason
        self._ipc.stopping()
        self._wind_down()
        raise WorkerDiedError(reason)

    def _wind_down(self) -> None:
        """After a failure: every rank still running is told to shut down (and the failed one
        is releasing), then given ``_SHUTDOWN_WAIT_S`` to exit before it is terminated."""
        import zmq

        for sock in self._cmds:
            try:
                sock.send(pack(["shutdown"]), zmq.NOBLOCK)
            except zmq.ZMQError:  # that rank is gone
                pass
        deadline = time.monotonic() + _SHUTDOWN_WAIT_S
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        self._stop_processes()

    def _stop_processes(self) -> None:
        from tessellm.core.ipc import stop_processes

        stop_processes(self._procs)

    def shutdown(self) -> None:
        if getattr(self, "_procs", None) is None:
            return
        self._ipc.stopping()  # the wait is this one's: none again at exit if it overruns
        if self._dead is None:
            try:
                for sock in self._cmds:
                    sock.send(pack(["shutdown"]))
            except Exception:  # noqa: BLE001 - best effort; the processes are stopped below
                pass
            deadline = time.monotonic() + _SHUTDOWN_WAIT_S
            for proc in self._procs:
                proc.join(timeout=max(0.0, deadline - time.monotonic()))
        self._stop_processes()
        self._ipc.release()
        self._procs = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(args: dict, rank: int, parallel: dict, init_method: str, cmd_addr: str,
               results_addr: str, parent_pid: int) -> None:
    """Entry point of a worker process: build the Worker, then serve the core's commands."""
    import zmq

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [rank {rank}] %(message)s")
    ctx = zmq.Context()
    cmds = ctx.socket(zmq.PULL)
    cmds.connect(cmd_addr)
    results = ctx.socket(zmq.PUSH)
    results.connect(results_addr)
    config = ParallelConfig(**parallel)
    worker = None
    try:
        from tessellm.distributed.worker import Worker

        worker = Worker(EngineArgs(**args), rank, config, init_method)
        results.send(pack(["ready", rank, worker.info()]))
        serve_worker(worker, cmds, results, config.output_rank, parent_pid)
        worker.release()  # the KV connector's saves under way are written before the rank exits
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the core
        if not isinstance(exc, SystemExit):
            if _told_to_stop(cmds):  # a peer failed first (this rank's collective with it broke)
                logger.warning("Worker stopped after another rank's failure: %s: %s",
                               type(exc).__name__, exc)
            else:
                logger.error("Worker failed:\n%s", traceback.format_exc())
            results.send(pack(["error", rank, f"{type(exc).__name__}: {exc}"]))
        _release_failed(worker)  # the core knows; now what the rank holds (its saves under way)
        cmds.close(linger=0)
        results.close(linger=2000)  # let the error reach the core
        ctx.term()
        raise SystemExit(1)
    cmds.close(linger=0)
    results.close(linger=2000)
    ctx.term()


def _told_to_stop(cmds) -> bool:
    """Whether the core has told this failed rank to shut down already (it does when another
    rank failed: ``MultiprocExecutor._wind_down``); reads the commands waiting."""
    import zmq

    while True:
        try:
            if unpack(cmds.recv(zmq.NOBLOCK))[0] == "shutdown":
                return True
        except zmq.Again:
            return False


def _release_failed(worker) -> None:
    """``worker.release()`` after a failure (not built, or released already: nothing); a
    failure of its own is logged, the rank exits all the same."""
    if worker is None or worker.runner is None:
        return
    try:
        worker.release()
    except Exception:  # noqa: BLE001
        logger.exception("Worker rank %d failed to release after its failure.", worker.rank)


def serve_worker(worker, cmds, results, output_rank: int, parent_pid: int) -> None:
    from tessellm import envs
    from tessellm.metrics.compile_counter import COUNTER

    held = None  # a launched step whose tokens wait for the next step or a flush (deferred)
    reported = 0  # compilations after ready that the core knows of
    fails_at, steps = envs.test_worker_fails_at(), 0  # a test's failing rank (envs.py)

    def send(handle) -> None:
        nonlocal reported
        out = handle.result()
        if COUNTER.after_ready != reported:  # rare: tell the core, whose /metrics sums the ranks
            reported = COUNTER.after_ready
            results.send(pack(["compiled", worker.rank, reported]))
        if worker.rank == output_rank:
            results.send(pack(["output", encode_runner_output(out)]))

    while True:
        if not cmds.poll(_POLL_MS * 2):
            if parent_gone(parent_pid):  # the engine core is gone: do not hold the device
                logger.info("The engine core is gone; worker %d exits.", worker.rank)
                return
            continue
        msg = unpack(cmds.recv())
        kind = msg[0]
        if kind == "execute":
            handle = worker.execute_async(decode_scheduler_output(msg[1]))
            steps += 1
            if fails_at == (worker.rank, steps):
                raise RuntimeError(f"rank {worker.rank} fails in its step {steps} "
                                   "(TESSELLM_TEST_WORKER_FAILS_AT, a test's hook)")
            if held is not None:  # launched first, so the device has the next step queued
                send(held)
                held = None
            if msg[2]:
                held = handle
            else:
                send(handle)
        elif kind == "sample":  # the mask of the last step (grammar_deferred)
            from tessellm.distributed.codec import decode_bitmask

            worker.runner.sample_deferred(decode_bitmask(msg[1]), msg[2])
        elif kind == "flush":
            if held is not None:
                send(held)
                held = None
        elif kind == "call":
            try:
                value = getattr(worker, msg[1])(*msg[2])
            except (ValueError, TypeError, KeyError) as exc:  # bad input (a weight's shape): serve on
                results.send(pack(["call_refused", worker.rank, f"{type(exc).__name__}: {exc}", msg[3]]))
                continue
            results.send(pack(["result", worker.rank, value, msg[3]]))  # msg[3]: the call's id
        elif kind == "shutdown":
            return
        else:
            raise ValueError(f"Unknown command {kind!r} from the engine core.")


def executor_backend(args: EngineArgs) -> str:
    """The executor ``args`` ask for: uni, mp or ray (default: uni for one device, else mp)."""
    if args.distributed_executor_backend is not None:
        return args.distributed_executor_backend
    return "mp" if args.tensor_parallel_size * args.pipeline_parallel_size > 1 else "uni"


def make_executor(args: EngineArgs, async_scheduling: bool = False) -> Executor:
    parallel = ParallelConfig(args.tensor_parallel_size, args.pipeline_parallel_size)
    backend = executor_backend(args)
    if backend == "uni":
        if parallel.world_size > 1:
            raise ValueError("distributed_executor_backend 'uni' runs one device; use 'mp' or "
                             "'ray' for tensor_parallel_size or pipeline_parallel_size > 1.")
        return UniProcExecutor(args)
    if backend == "mp":
        return MultiprocExecutor(args, parallel, deferred=async_scheduling)
    if backend == "ray":
        from tessellm.distributed.ray_executor import RayExecutor

        return RayExecutor(args, parallel, deferred=async_scheduling)
    raise ValueError(f"distributed_executor_backend {backend!r} is not supported; use uni, mp or ray.")
