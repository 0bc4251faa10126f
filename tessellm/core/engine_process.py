"""The engine core in its own process, and the client the API process talks to it through.

Serving keeps tokenization, JSON and HTTP out of the model loop: the core runs in a child
process (multiprocessing ``spawn``) and the API process talks to it over two local ZeroMQ
sockets in a private temp dir. Every message is **msgpack** (never pickle on a socket)::

    API process (EngineCoreClient)                    core process (run_engine_core)
      input  PUSH  --["add", req] ["abort", ids]-->   PULL
                    ["remove_lora", id] ["call", id, method(, args)] ["shutdown"]
                    (methods: "stats", "ping", _CORE_CALLS, "set_tokenizer")
      output PULL  <--["ready", info] ["startup_failed", msg]--  PUSH
                    ["warm", WarmupReport] (after warm-up, before any step)
                    ["outputs", [out...], EngineStats] ["rejected", rid, msg]
                    (EngineStats carries "timestamp", the core's time.monotonic() when
                    it sent the outputs (RequestOutput.metrics' first/last_token_ts); data
                    parallelism: "load", the balancer's figures, and "prefix_events", the
                    prefix cache's changes: core/cache_view.py)
                    ["call_result", id, result] ["dead", msg]

Invariants
----------
* The core sends exactly one of ``ready`` / ``startup_failed`` first (the handshake); after
  ``ready`` it warms up (``tessellm.core.warmup``) and sends ``warm`` before anything else, so
  the server's ``/ready`` answers 200 only once no request can meet a cold kernel.
* While it has work the core loop never blocks: it drains the input socket without waiting,
  runs one ``step()`` and sends what the step produced, with ``EngineStats`` (counters only:
  the metrics cost the loop a few integers per step; see ``tessellm.metrics``). Idle, it
  blocks on the input socket, waking every second. Busy or idle, it exits once its parent (the
  API process) is gone, so a killed server never leaves an orphan holding the device.
* A crash in the core is sent as ``dead`` before the process exits; the client also notices a
  core that vanished without a word (killed) from its exit code.
* Every exit after ``ready`` ends in ``EngineCore.shutdown()`` (the KV connector's saves under
  way written, the LoRA loader ended, the worker processes stopped): the ``shutdown`` message,
  the parent gone, an error in warm-up or the loop, SIGTERM (sent as ``dead``: the core stops
  as on an error). It is bounded, and the client waits longer than that before it terminates
  the core (``core_stop.py``). SIGINT (Ctrl-C to the process group) is ignored: the parent
  sends ``shutdown``, at its exit too.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
import traceback
from typing import Any, Optional

import msgpack
import zmq

from tessellm import envs
from tessellm.config import EngineArgs
from tessellm.core.engine_core import EngineCoreRequest, EngineInfo
from tessellm.core.prompt_embeds import PromptEmbeds, encode_prompt_embeds
from tessellm.core.core_stop import CLOSE_WAIT_S, CoreTerminated, StopSignal, shut_down
from tessellm.core.core_tokenizer import set_core_tokenizer
from tessellm.core.ipc import ParentEndpoints
from tessellm.core.cache_view import CacheEvents
from tessellm.core.load_report import StepTimer, core_load, waiting_kv_blocks
from tessellm.core.sampling_params import SamplingParams
from tessellm.core.engine_output import EngineCoreOutput
from tessellm.core.step import STEP_SCHEMA_VERSION, build_dataclass, check_version
from tessellm.distributed.executor import WorkerDiedError
from tessellm.distributed.spawn import parent_gone, spawn_process
from tessellm.metrics.compile_counter import COUNTER as COMPILE_COUNTER
from tessellm.metrics.device_memory import DeviceMemoryProbe
from tessellm.multimodal.inputs import decode_features, encode_features

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 1000  # how often an idle core checks that its parent is still alive
# EngineCore methods the API process may call (its dev routes): answered {"result"} or {"error"}.
_CORE_CALLS = frozenset({"sleep", "wake_up", "is_sleeping", "reset_prefix_cache", "load_weights_from_path",
                         "start_profile", "stop_profile"})


# -- encoding ------------------------------------------------------------------------------

def pack(message: Any) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> Any:
    # strict_map_key=False: logit_bias maps int token ids to floats.
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# Requests and outputs travel as maps from field name to value with the schema version under
# "v" (the step schema's: tessellm.distributed.codec): a new field never shifts the others, and
# a reader refuses a version or a field it does not know with one clear error.

def encode_request(req: EngineCoreRequest) -> dict:
    params = dataclasses.asdict(req.sampling_params)
    params.pop("extra", None)  # free-form and ignored by the engine: not sent
    return {"v": STEP_SCHEMA_VERSION, "request_id": req.request_id,
            "prompt_token_ids": list(req.prompt_token_ids), "sampling_params": params,
            "arrival_time": req.arrival_time, "cache_salt": req.cache_salt, "wait_for": req.wait_for,
            "lora_request": req.lora_request, "mm_features": encode_features(req.mm_features),
            "pooling_task": req.pooling_task, "prompt_embeds": encode_prompt_embeds(req.prompt_embeds),
            "priority": req.priority}


def decode_request(d: dict) -> EngineCoreRequest:
    d = dict(d)
    check_version(d, "An EngineCoreRequest")
    d["sampling_params"] = SamplingParams(**d["sampling_params"])
    d["mm_features"] = decode_features(d.get("mm_features")) or None
    d["prompt_embeds"] = PromptEmbeds.from_dict(d.get("prompt_embeds"))
    return build_dataclass(EngineCoreRequest, d, "An EngineCoreRequest")


_OUTPUT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineCoreOutput)
                    if f.default is not dataclasses.MISSING}


def encode_output(out: EngineCoreOutput) -> dict:
    """By name; fields at their default (None, 0) are left out to keep the message small."""
    d = {"v": STEP_SCHEMA_VERSION}
    for f in dataclasses.fields(out):
        value = getattr(out, f.name)
        if f.name not in _OUTPUT_DEFAULTS or value != _OUTPUT_DEFAULTS[f.name]:
            d[f.name] = value
    return d


def decode_output(d: dict) -> EngineCoreOutput:
    d = dict(d)
    check_version(d, "An EngineCoreOutput")
    return build_dataclass(EngineCoreOutput, d, "An EngineCoreOutput")


def engine_args_to_dict(args: EngineArgs) -> dict:
    return args.spawn_dict()


# -- the core process ----------------------------------------------------------------------

def run_engine_core(args: dict, input_addr: str, output_addr: str, parent_pid: int,
                    serving: bool = True) -> None:
    """Entry point of the core process: build the EngineCore, handshake, then serve.
    ``serving``: warm up as a server does (False: as ``LLM(...)`` does, off by default)."""
    rank, size = args.get("data_parallel_rank", 0), args.get("data_parallel_size", 1)
    tag = f"core {rank}" if size > 1 else "core"
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [{tag}] %(message)s")
    ctx = zmq.Context()
    out_sock = ctx.socket(zmq.PUSH)
    out_sock.connect(output_addr)
    in_sock = ctx.socket(zmq.PULL)
    in_sock.connect(input_addr)
    COMPILE_COUNTER.install()
    try:
        from tessellm.core.engine_core import EngineCore

        core_args = EngineArgs(**args)
        core = EngineCore(core_args)
    except BaseException as exc:  # noqa: BLE001 - every start-up failure goes to the parent
        out_sock.send(pack(["startup_failed", f"{type(exc).__name__}: {exc}"]))
        _close(ctx, out_sock, in_sock)
        raise SystemExit(1)
    out_sock.send(pack(["ready", dataclasses.asdict(core.info)]))
    stop = StopSignal()
    failed = False
    try:
        try:
            stop.install()
            # Loaded: the API process starts serving /health now; /ready waits for "warm".
            from tessellm.core.warmup import warm_up

            report = warm_up(core, core_args, serving=serving)
            out_sock.send(pack(["warm", dataclasses.asdict(report) if report else {}]))
            stop.interrupt = False  # from here a SIGTERM ends the loop between steps
            _CoreLoop(core, in_sock, out_sock, parent_pid, report_load=size > 1, stop=stop).run()
            stop.check()
        finally:
            stop.begun = True  # a SIGTERM from now on no longer cuts anything short
    except BaseException as exc:  # noqa: BLE001 - a SIGTERM's CoreTerminated included
        if isinstance(exc, CoreTerminated):
            logger.info("%s", exc)
        elif isinstance(exc, WorkerDiedError):  # the rank logged its own traceback: one line here
            logger.error("Engine core died: %s", exc)
        else:
            logger.error("Engine core died:\n%s", traceback.format_exc())
        out_sock.send(pack(["dead", f"{type(exc).__name__}: {exc}"]))
        failed = True
    shut_down(core, stop.bound)
    _close(ctx, out_sock, in_sock)
    if failed:
        raise SystemExit(1)


def _close(ctx, *socks) -> None:
    for sock in socks:
        sock.close(linger=2000)  # let the last message (an error) reach the parent
    ctx.term()


class _CoreLoop:
    def __init__(self, core, in_sock, out_sock, parent_pid: int, report_load: bool = False,
                 stop: Optional[StopSignal] = None):
        self.core = core
        self.in_sock = in_sock
        self.out_sock = out_sock
        self.parent_pid = parent_pid
        self.shutdown = False
        self.stop = stop or StopSignal()  # its ``requested``: SIGTERM arrived (core_stop.py)
        # Device memory is read where the model runs. With worker processes (tensor or pipeline
        # parallel) asking here would open a device context in a process that has none: then
        # it is not reported.
        self.memory = DeviceMemoryProbe(core.backend if hasattr(core, "runner") else None)
        self.step_num_tokens: list[int] = []  # tokens of each step since the last message
        # Data parallelism: each stats message carries the balancer's figures (load_balance.py).
        self.report_load = report_load
        self.received = 0  # "add" messages handled (rejected ones too): the balancer's sync point
        self.step_timer = StepTimer()  # its busy steps' wall time, the balancer's speed figure
        # ... and the prefix cache's changes since the last message (core/cache_view.py).
        self.cache_events = CacheEvents() if report_load else None
        if self.cache_events is not None:
            core.scheduler.kv.events = self.cache_events
            if core.scheduler.kv.host is not None:  # the host tier's residency too (tier=HOST)
                core.scheduler.kv.host.events = self.cache_events

    def run(self) -> None:
        self._send_outputs([])  # the stats before any request (device memory after loading)
        while not (self.shutdown or self.stop.requested):
            if parent_gone(self.parent_pid):  # the API process died
                logger.info("The API process is gone; the engine core exits.")
                return
            busy = self.core.has_unfinished_requests()
            changed = False
            if self.in_sock.poll(0 if busy else _IDLE_POLL_MS):
                changed = self._drain_inputs()
            elif not busy:
                continue
            if self.shutdown or self.stop.requested:
                return
            if self.core.has_unfinished_requests():
                outputs = self._step()
                # going idle: the last stats too (e.g. a KV connector's saves settled late)
                if outputs or changed or not self.core.has_unfinished_requests():
                    self._send_outputs(outputs)
            elif changed:
                self._send_outputs([])  # e.g. aborts freed blocks: report the new KV usage

    def _drain_inputs(self) -> bool:
        changed = False
        while True:
            try:
                raw = self.in_sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return changed
            changed |= self._handle(unpack(raw))

    def _handle(self, msg: list) -> bool:
        kind = msg[0]
        if kind == "add":
            self.received += 1
            try:
                self.core.add_request(decode_request(msg[1]))
            except (ValueError, TypeError, KeyError) as exc:  # the front end checks first
                self.out_sock.send(pack(["rejected", msg[1].get("request_id"), str(exc)]))
                return False
            except Exception as exc:  # a bug (or e.g. MemoryError): refuse this one, keep the rest
                logger.exception("Adding request %r failed; it is refused, the others go on.",
                                 msg[1].get("request_id"))
                self.out_sock.send(pack(["rejected", msg[1].get("request_id"),
                                         f"Internal error adding the request ({type(exc).__name__}: {exc})."]))
                return False
            return True
        if kind == "abort":
            self.core.abort_requests(msg[1])
            return True
        if kind == "remove_lora":
            self.core.remove_lora(int(msg[1]))
            return False
        if kind == "call":
            self.out_sock.send(pack(["call_result", msg[1], self._call(msg[2], *msg[3:])]))
            if self.cache_events is not None and self.cache_events.changed:
                self._send_outputs([])  # e.g. a reset (sleep, new weights): the balancer's view now
            return False
        if kind == "shutdown":
            self.shutdown = True
            return False
        raise ValueError(f"Unknown message {kind!r} from the API process.")

    def _call(self, method: str, args: Optional[list] = None):
        if method in ("stats", "ping"):
            stats = self._stats()
            if "load" not in stats:  # asked for: the load figures too (a Ray Serve replica's report)
                stats["load"] = core_load(self.core.scheduler, self.received, self.step_timer.ms)
            stats["load"]["waiting_blocks"] = waiting_kv_blocks(self.core.scheduler)
            return stats
        if method == "set_tokenizer":  # LLM(data_parallel_size=N).set_tokenizer: core_tokenizer.py
            return set_core_tokenizer(self.core, *(args or []))
        if method in _CORE_CALLS:  # sleep mode and weight updates (docs/sleep_mode.md)
            try:
                result = getattr(self.core, method)(*(args or []))
            except ValueError as exc:  # e.g. requests still running, a bad level or path
                return {"error": str(exc), **self._sleep_state()}
            return {"result": result, **self._sleep_state()}
        return {"error": f"unknown method {method!r}"}

    def _sleep_state(self) -> dict:
        return {"sleeping": self.core.is_sleeping(), "sleep_level": self.core.sleep_level()}

    def _step(self) -> list[EngineCoreOutput]:
        scheduler = self.core.scheduler
        before = scheduler.num_scheduled_tokens_total
        start = time.perf_counter()
        outputs = self.core.step()
        launched = scheduler.num_scheduled_tokens_total > before
        # timed when its result is back (a call that only launches a step returns at once)
        self.step_timer.step(start, time.perf_counter(), launched, len(self.core.in_flight))
        if launched:
            self.step_num_tokens.append(scheduler.num_scheduled_tokens_total - before)
        return outputs

    def _stats(self, step_num_tokens: Optional[list[int]] = None) -> dict:
        """The scheduler's stats plus the rest of ``EngineStats`` (the front end decodes it)."""
        used, total = self.memory.sample()
        stats = {**dataclasses.asdict(self.core.scheduler.stats()), "step_num_tokens": step_num_tokens or [],
                 "device_memory_used_bytes": used, "device_memory_total_bytes": total,
                 "triton_compilations_after_ready": (COMPILE_COUNTER.after_ready +
                                                     self.core.executor.worker_compilations_after_ready())}
        if self.report_load:
            stats["load"] = core_load(self.core.scheduler, self.received, self.step_timer.ms)
        return stats

    def _send_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        steps, self.step_num_tokens = self.step_num_tokens, []
        stats = self._stats(steps)
        stats["timestamp"] = time.monotonic()  # vLLM's EngineCoreOutputs.timestamp
        if self.core.kv.residency is not None:  # only here, as prefix_events: never lost to a call
            stats["kv_block_residency"] = self.core.kv.residency.drain()
        if self.cache_events is not None:
            stats["prefix_events"] = self.cache_events.drain()  # only here: never lost to a dev call
        self.out_sock.send(pack(["outputs", [encode_output(o) for o in outputs], stats]))


# -- the API side --------------------------------------------------------------------------

class EngineStartupError(RuntimeError):
    """The core process failed to build the engine (bad model path, no memory, ...)."""


class EngineDeadError(RuntimeError):
    """The core process crashed or exited; every request in flight fails with this."""


class EngineCoreClient:
    """Starts the core process and owns both sockets (API side).

    ``send_*`` are synchronous and never wait (ZeroMQ queues), so they are safe to call from a
    ``finally`` of a cancelled task. The output socket is read by whoever owns the event loop
    (``AsyncLLM``) through ``output_socket``.
    """

    def __init__(self, args: EngineArgs, startup_timeout: float = 1800.0, wait: bool = True,
                 serving: bool = True):
        """``wait=False``: return once the process is started; ``wait_ready`` does the handshake
        (a data-parallel group starts every core before waiting for any). ``serving``: the
        core's warm-up default (``run_engine_core``)."""
        self.closed = False
        self.info: Optional[EngineInfo] = None
        self.tmpdir = tempfile.mkdtemp(prefix="tessellm-")
        input_addr = f"ipc://{os.path.join(self.tmpdir, 'input')}"
        output_addr = f"ipc://{os.path.join(self.tmpdir, 'output')}"
        # Released by close(), or when garbage-collected without it (core process included).
        self._ipc = ParentEndpoints(self, self.tmpdir)
        self.input = self._ipc.socket(zmq.PUSH, bind=input_addr)
        self.output = self._ipc.socket(zmq.PULL, bind=output_addr)
        for key, value in envs.engine_process_env_defaults().items():
            os.environ.setdefault(key, value)  # the spawned core inherits the environment
        # A daemonic process may not start children, and a core over several devices starts its
        # workers; it exits by itself once this process is gone either way (see _CoreLoop.run).
        daemon = args.tensor_parallel_size * args.pipeline_parallel_size == 1
        # From a clean main: the user's script is never re-run in the core (distributed/spawn.py).
        name = "tessellm-engine-core" + (f"-{args.data_parallel_rank}" if args.data_parallel_size > 1 else "")
        self.proc = spawn_process(run_engine_core, name, (engine_args_to_dict(args), input_addr, output_addr,
                                                          os.getpid(), serving), daemon)
        self._ipc.adopt(self.proc)
        # Dropped without close (the program ends): the core stops as close() stops it.
        self._ipc.farewell([self.input], pack(["shutdown"]), CLOSE_WAIT_S)
        if wait:
            self.wait_ready(startup_timeout)

    def wait_ready(self, timeout: float = 1800.0) -> EngineInfo:
        """The handshake: the core's ``EngineInfo`` once it has loaded; EngineStartupError (the
        process stopped) if it failed."""
        try:
            self.info = self._handshake(timeout)
        except BaseException:
            self.close()
            raise
        return self.info

    def _handshake(self, timeout: float) -> EngineInfo:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.poll_ready(500):
                return self.info
        raise EngineStartupError(f"The engine core did not start within {timeout:.0f}s.")

    def poll_ready(self, timeout_ms: int) -> bool:
        """Wait up to ``timeout_ms`` for the core's first message: True once it said ``ready``
        (``self.info`` is set); EngineStartupError if it failed or exited."""
        if self.info is not None:
            return True
        if self.output.poll(timeout_ms):
            msg = unpack(self.output.recv())
            if msg[0] == "ready":
                self.info = EngineInfo(**msg[1])
                return True
            if msg[0] == "startup_failed":
                raise EngineStartupError(f"The engine failed to start: {msg[1]}")
            raise EngineStartupError(f"Unexpected first message {msg[0]!r} from the engine core.")
        if not self.proc.is_alive():
            raise EngineStartupError(f"The engine core process exited with code {self.proc.exitcode} "
                                     "while starting; see its log above.")
        return False

    def send_add(self, req: EngineCoreRequest) -> None:
        self.input.send(pack(["add", encode_request(req)]))

    def send_abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self.input.send(pack(["abort", list(request_ids)]))

    def send_remove_lora(self, lora_id: int) -> None:
        self.input.send(pack(["remove_lora", int(lora_id)]))

    def send_call(self, call_id: int, method: str, args: Optional[list] = None) -> None:
        self.input.send(pack(["call", call_id, method] + ([list(args)] if args else [])))

    def is_alive(self) -> bool:
        return self.proc.is_alive()

    def exit_code(self) -> Optional[int]:
        return self.proc.exitcode

    def request_stop(self) -> None:
        """Ask the core to stop, without waiting (``close`` waits); once."""
        if self.closed or getattr(self, "_stop_sent", False):
            return
        self._stop_sent = True
        self._ipc.stopping()  # close() waits its own bound: none again at exit
        if self.proc.is_alive():
            try:
                self.input.send(pack(["shutdown"]), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def close(self, timeout: float = CLOSE_WAIT_S) -> None:
        """Ask the core to stop, then make sure it has; remove the socket files. Idempotent.
        ``timeout``: how long the core may take to stop (its shutdown's bound and some: core_stop.py),
        after which it is terminated, then killed."""
        if self.closed:
            return
        self.request_stop()
        self.closed = True
        if self.proc.is_alive():
            self.proc.join(timeout)
        self._ipc.release()  # terminates, then kills, a core that did not stop by itself
