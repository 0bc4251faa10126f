"""AsyncLLM: the serving front end in the API process, one async stream per request.

It owns the text side (``InputProcessor`` in, ``OutputProcessor`` out) and talks to the engine
core in its own process through ``EngineCoreClient``: one core, or ``data_parallel_size`` of
them (``tessellm.core.core_group``: each request goes to one, the least loaded or the one
holding its prefix). One asyncio task per core, its *output handler*, reads everything that
core sends and routes each ``RequestOutput`` to its request's stream::

    add_request --tokenize/check--> core process --EngineCoreOutputs--> output handler
        |                                                                  | detokenize, stop strings
        '-> RequestStream <------------------ latest RequestOutput -------'

Outputs are cumulative by default (each holds the whole text so far), so a stream keeps only
the newest one: a slow consumer skips intermediate states instead of queueing them. A request
whose ``output_kind`` is DELTA (the OpenAI server's streams) gets only what is new in each, and
its stream folds the outputs not yet taken into one; FINAL_ONLY (the server's requests
answered whole) gets one output, at the end.

Everything here runs on the event loop thread, except tokenization and chat templating
(``process_prompt_async``, ``run_off_loop``: a small thread pool, so a huge prompt never stalls
other streams).
``abort`` never awaits, so it is safe in the ``finally`` of a task being cancelled (a client
that disconnected).

Metrics: stat loggers (``add_stat_logger``, e.g. ``tessellm.metrics.prometheus.EngineMetrics``)
are fed by the output handler: the core's ``EngineStats`` with each message, and the
``IterationStats`` (latencies, token counts, finished requests) of the outputs it processed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import AsyncIterator, Optional, Union

import zmq
import zmq.asyncio

from tessellm.config import EngineArgs
from tessellm.core.core_group import EngineCoreGroup, core_refusal as _core_refusal
from tessellm.core.core_group import load_front_tokenizer as _load_tokenizer
from tessellm.core.core_tokenizer import CoreTokenizer, use_front_tokenizer
from tessellm.core.engine_process import EngineDeadError, decode_output, unpack
from tessellm.core.input_processor import InputProcessor, ProcessedPrompt, PromptType
from tessellm.core.output_processor import OutputProcessor
from tessellm.core.outputs import RequestOutput
from tessellm.core.sampling_params import RequestOutputKind, SamplingParams
from tessellm.core.scheduler_config import ContextLengthError
from tessellm.core.submit import submit
from tessellm.lora.request import lora_off_error
from tessellm.metrics.stats import EngineStats, IterationStats, StatLogger, merge_engine_stats
from tessellm.pooling.front import check_generates

logger = logging.getLogger(__name__)

_POLL_MS = 500  # the output handler checks the core is alive after this much silence
_SET_TOKENIZER_TIMEOUT_S = 120.0  # each core loads the tokenizer from disk
_CANCEL_WAIT_S = 10  # shutdown() from another thread waits this long for the handlers to end
# readiness(): a busy core heard from this recently needs no ping; an idle core must answer a ping
# within _READY_WAIT_S; a busy one (requests or a core call in it) is stuck only once a ping has
# waited _STUCK_AFTER_S (a long step answers late, not never). Well under a probe's 1 s timeout.
_FRESH_S = 1.0
_READY_WAIT_S = 0.5
_STUCK_AFTER_S = 10.0


class RequestStream:
    """The newest output of one request, or its error. ``event`` may be shared by a group.
    ``delta`` (the request's ``output_kind`` is DELTA): outputs not yet taken are folded into
    one (``RequestOutput.add``), so a slow consumer loses no text."""

    def __init__(self, request_id: str, event: Optional[asyncio.Event] = None, delta: bool = False):
        self.request_id = request_id
        self.event = event or asyncio.Event()
        self.delta = delta
        self._latest: Optional[RequestOutput] = None
        self._error: Optional[BaseException] = None

    def put(self, output: RequestOutput) -> None:
        if self.delta and self._latest is not None:
            self._latest.add(output)
        else:
            self._latest = output
        self.event.set()

    def put_error(self, error: BaseException) -> None:
        self._error = error
        self.event.set()

    def get_nowait(self) -> Optional[RequestOutput]:
        """The newest output not yet taken, else None; raises the request's error once drained."""
        if self._latest is not None:
            out, self._latest = self._latest, None
            return out
        if self._error is not None:
            raise self._error
        return None


async def iterate_streams(streams: list[RequestStream], event: asyncio.Event,
                          heartbeat: Optional[float] = None):
    """Yield ``(index, RequestOutput)`` from several streams sharing ``event`` until all finish.

    With ``heartbeat``, yields ``None`` after each ``heartbeat`` seconds with nothing new (SSE
    keep-alive, disconnect checks).
    """
    live = dict(enumerate(streams))
    while live:
        event.clear()  # before the scan: a put during the scan's yields sets it again
        produced = False
        for i, stream in list(live.items()):
            out = stream.get_nowait()
            if out is None:
                continue
            produced = True
            if out.finished:
                del live[i]
            yield i, out
        if produced or not live:
            continue
        try:
            await asyncio.wait_for(event.wait(), heartbeat)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            yield None


async def _cancel_and_wait(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class _Done:
    """An awaitable that is already done (``await engine.shutdown()`` with nothing to wait on)."""

    def __await__(self):
        return iter(())


class AsyncLLM:
    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "AsyncLLM":
        """vLLM's constructor name (``AsyncLLMEngine.from_engine_args(AsyncEngineArgs(...))``)."""
        return cls(args)

    def __init__(self, args: EngineArgs):
        self.args = args
        self.cores = EngineCoreGroup(args)  # one engine core, or data_parallel_size of them
        self.info = self.cores.info
        try:
            self.tokenizer = _load_tokenizer(self.info, args)
        except BaseException:
            self.cores.close()
            raise
        self.inputs = InputProcessor(self.info, self.tokenizer)
        self.outputs = OutputProcessor(self.tokenizer)
        self._core_tokenizer = CoreTokenizer(self.tokenizer)  # what the cores compile grammars against
        self._set_tokenizer_turn = asyncio.Lock()  # set_tokenizer calls one at a time, in call order
        self.streams: dict[str, RequestStream] = {}
        self.stat_loggers: list[StatLogger] = []
        self.last_message_time = time.monotonic()
        self.heard = [0.0] * self.cores.size  # each core's last message (time.monotonic())
        self._pings: dict[int, tuple[float, int, asyncio.Future]] = {}  # core -> (sent, call id, answer)
        self.stuck_after_s = _STUCK_AFTER_S  # readiness(): a busy core silent this long is stuck
        self.dead_reason: Optional[str] = None
        self.sleeping = False  # sleep mode: the cores refuse requests until wake_up (core_call)
        self.sleep_level = 0  # 0 awake, else the level some core still sleeps at (core_call)
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._handlers: list[asyncio.Task] = []
        # Tokenization and chat templating run here, never on the event loop: a 2 MB prompt
        # takes seconds to tokenize, and other streams must not wait for it.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tessellm-tokenize")
        self._max_token_chars: Optional[int] = None

    # -- requests --------------------------------------------------------------------------

    @property
    def is_dead(self) -> bool:
        return self.dead_reason is not None

    @property
    def stats(self) -> dict:
        """The engine's ``EngineStats`` as of the cores' last messages (several cores: their
        sum, ``merge_engine_stats``); {} before any."""
        if not any(self.cores.stats):
            return {}
        return dataclasses.asdict(self.cores.merged_stats())

    @property
    def warm(self) -> bool:
        """Every core finished its warm-up ("warm" message): /ready may say 200."""
        return all(self.cores.warm)

    @property
    def warmup_report(self) -> dict:
        """The first core's warm-up report (the cores are alike)."""
        return self.cores.warmup_reports[0]

    def process_prompt(self, prompt: PromptType) -> ProcessedPrompt:
        """Tokenize and check a prompt (ValueError with the reason when it cannot run)."""
        return self.inputs.process_prompt(prompt)

    async def run_off_loop(self, fn, *args):
        """``fn(*args)`` on the tokenizer threads (tokenizing, chat templates), awaited."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def process_prompt_async(self, prompt: PromptType) -> ProcessedPrompt:
        """``process_prompt`` off the event loop; a text that cannot fit is refused untokenized."""
        text = prompt.get("prompt") if isinstance(prompt, dict) and "prompt_token_ids" not in prompt else prompt
        if isinstance(text, str):
            self.check_text_fits(len(text))
        return await self.run_off_loop(self.process_prompt, prompt)

    def check_text_fits(self, num_chars: int, what: str = "The prompt") -> None:
        """ValueError when ``num_chars`` of text are sure to exceed the context: no token of this
        vocabulary is longer than ``max_token_chars``, so the text has at least that many tokens."""
        if self.tokenizer is None:
            return
        per_token = self.max_token_chars()
        least = num_chars // per_token
        if least >= self.info.max_model_len:
            raise ContextLengthError(f"{what} is {num_chars} characters, at least {least} tokens for this "
                                     f"model (no token is longer than {per_token} characters), over its "
                                     f"maximum context length of {self.info.max_model_len} tokens; shorten it.")

    async def set_tokenizer(self, tokenizer) -> None:
        """``LLM.set_tokenizer``'s semantics: requests added from now on are tokenized and
        detokenized with ``tokenizer`` (its ids must be the model's: ValueError otherwise), a
        vision model's chat template is adopted by it, and structured outputs' grammars follow
        its vocabulary. The cores (other processes) load it by name and answer its vocabulary's
        digest; where it has no name, or a core cannot load it or loads another vocabulary,
        constrained requests are refused at the edge, naming why, until a tokenizer the cores
        hold is set again (``tessellm.core.core_tokenizer``), and while the cores load it
        (``_load_core_tokenizer``). Requests in flight keep theirs. Calls that overlap take
        turns (else one that finds its vocabulary held while an earlier call is still loading
        another in the cores would leave front end and cores apart)."""
        async with self._set_tokenizer_turn:
            use_front_tokenizer(self, tokenizer)
            self._max_token_chars = None  # check_text_fits: the new vocabulary's longest token
            call = self._core_tokenizer.ask(tokenizer)
            answers = None if call is None else await self._load_core_tokenizer(tokenizer, call)
            self.inputs.structured_refusal = self._core_tokenizer.settle(tokenizer, answers, self._core_names())

    def _core_names(self) -> list[str]:
        return [self.cores.name(i) for i in range(self.cores.size)]

    async def _load_core_tokenizer(self, tokenizer, call: list) -> list[dict]:
        """Each core's answer to ``set_tokenizer``. Meanwhile the front end tokenizes with the
        new tokenizer while the cores may still compile grammars against the old one, so
        constrained requests are refused (TokenizerLoadingError, 503: retry) rather than held:
        ``add_request`` is synchronous, and a hold could last the whole timeout. A call
        cancelled half-way leaves them refused, naming it, until set_tokenizer is called again."""
        self.inputs.structured_loading = True
        try:
            return await self.call_all("set_tokenizer", _SET_TOKENIZER_TIMEOUT_S, call)
        except asyncio.TimeoutError:
            return [{"error": f"no answer to 'set_tokenizer' within {_SET_TOKENIZER_TIMEOUT_S:.0f}s"}] * self.cores.size
        except asyncio.CancelledError:
            cancelled = {"error": "the set_tokenizer call was cancelled before it answered"}
            self.inputs.structured_refusal = self._core_tokenizer.settle(
                tokenizer, [cancelled] * self.cores.size, self._core_names())
            raise
        finally:
            self.inputs.structured_loading = False

    def max_token_chars(self) -> int:
        """An upper bound of characters per token: the longest vocabulary entry, x4 for
        normalizers that merge characters."""
        if self._max_token_chars is None:
            vocab = self.tokenizer.get_vocab()
            self._max_token_chars = 4 * max([len(t) for t in vocab] or [1])
        return self._max_token_chars

    def add_request(self, request_id: str, prompt: Union[PromptType, ProcessedPrompt],
                    params: SamplingParams, event: Optional[asyncio.Event] = None,
                    lora_request=None, pooling=None, priority: int = 0) -> RequestStream:
        """Queue a request in the core; raises ValueError (nothing queued) on bad input.
        ``lora_request``: its adapter (``tessellm.lora.LoRARequest``, checked by the caller);
        ``pooling``: an embedding request's resolved PoolingParams (tessellm.pooling.front);
        ``priority``: vLLM's (scheduling_policy "priority": lower first)."""
        self._check_alive()
        if pooling is None:
            check_generates(self.info)  # an embedding engine: the caller wants pooling=
        self._ensure_handler()
        processed = prompt if isinstance(prompt, ProcessedPrompt) else self.inputs.process_prompt(
            prompt, getattr(params, "truncate_prompt_tokens", None))  # vLLM's SamplingParams field
        submit(self.inputs, self.outputs, request_id, processed, params, self.cores.send_add,
               in_use=request_id in self.streams, lora_request=lora_request,
               abort=self.cores.send_abort, pooling=pooling, priority=priority)
        stream = RequestStream(request_id, event, params.output_kind == RequestOutputKind.DELTA)
        self.streams[request_id] = stream
        return stream

    async def generate(self, prompt: PromptType, params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None, lora_request=None,
                       priority: int = 0, *, sampling_params: Optional[SamplingParams] = None
                       ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (cumulative, or as ``params.output_kind`` says); cancelling
        the iteration aborts it. ``lora_request``: a ``tessellm.lora.LoRARequest`` (vLLM's
        keyword; needs ``enable_lora=True``). ``sampling_params``: vLLM's keyword for ``params``."""
        params = params if sampling_params is None else sampling_params
        if lora_request is not None and not self.args.enable_lora:
            raise lora_off_error(lora_request)
        request_id = request_id or os.urandom(12).hex()
        stream = self.add_request(request_id, prompt, params or SamplingParams(**self.info.default_sampling),
                                  lora_request=lora_request, priority=priority)
        try:
            async for item in iterate_streams([stream], stream.event):
                yield item[1]
        finally:
            self.abort(request_id)

    def remove_lora(self, lora_id: int) -> None:
        """The server unloaded an adapter: every core frees its slot and cached weights once no
        running request uses it (``EngineCore.remove_lora``)."""
        if not self.is_dead:
            self.cores.send_remove_lora(lora_id)

    def abort(self, request_id: str) -> None:
        """Forget a request here and free it in the core; a no-op once it has finished."""
        self.streams.pop(request_id, None)
        if not self.outputs.has_request(request_id):
            return
        core_ids = self.outputs.core_ids(request_id)
        iteration = IterationStats() if self.stat_loggers else None
        self.outputs.abort(request_id, iteration)
        if iteration is not None:
            self._notify("observe_outputs", iteration)
        if not self.is_dead:
            self.cores.send_abort(core_ids)

    # -- metrics ----------------------------------------------------------------------------

    def add_stat_logger(self, stat_logger: StatLogger) -> None:
        """Feed ``stat_logger`` from now on (see ``tessellm.metrics.stats.StatLogger``)."""
        self.stat_loggers.append(stat_logger)

    def _notify(self, method: str, arg) -> None:
        for stat_logger in list(self.stat_loggers):
            try:
                getattr(stat_logger, method)(arg)
            except Exception:  # noqa: BLE001 - metrics must not take the serving path down
                logger.exception("Stat logger %r failed in %s; it is dropped.", stat_logger, method)
                self.stat_loggers.remove(stat_logger)

    # -- queries to the core ----------------------------------------------------------------

    async def call(self, method: str, timeout: float = 10.0, args: Optional[list] = None):
        """Ask the engine something ("stats", "ping", a sleep-mode method) and wait for its
        answer. With several cores every core answers: stats are summed (``call_all`` gives
        each's); for another method, the first refusal, else the first core's answer."""
        answers = await self.call_all(method, timeout, args)
        if len(answers) == 1:
            return answers[0]
        if method in ("stats", "ping"):
            return dataclasses.asdict(merge_engine_stats([EngineStats.from_dict(a) for a in answers]))
        return next((a for a in answers if isinstance(a, dict) and "error" in a), answers[0])

    async def call_all(self, method: str, timeout: float = 10.0, args: Optional[list] = None) -> list:
        """``method``'s answer from each core, in core order."""
        self._check_alive()
        self._ensure_handler()
        loop = asyncio.get_running_loop()
        ids = []
        try:
            for core in range(self.cores.size):
                call_id = next(self._call_ids)
                self._calls[call_id] = loop.create_future()
                ids.append(call_id)
                self.cores.send_call(core, call_id, method, args)
            return list(await asyncio.wait_for(asyncio.gather(*(self._calls[i] for i in ids)), timeout))
        finally:
            for call_id in ids:
                self._calls.pop(call_id, None)

    async def core_call(self, method: str, *args, timeout: float = 600.0):
        """An ``EngineCore`` method in every core process (sleep mode's, engine_process._CORE_CALLS);
        its result, or ValueError with a core's refusal. ``sleeping`` is true while any core
        sleeps (a sleep that one core refused leaves the others asleep: requests are refused
        until ``wake_up``). Several cores: ``reset_prefix_cache`` is true if every core reset,
        ``is_sleeping`` if any sleeps, otherwise the first core's result."""
        answers = await self.call_all(method, timeout, list(args))
        self.sleeping = any(a.get("sleeping") for a in answers)
        level = max((a.get("sleep_level", self.sleep_level) for a in answers), default=0)
        if level != self.sleep_level:  # the engine_sleep_state metric
            self.sleep_level = level
            self._notify_optional("observe_sleep_state", level)
        for core, answer in enumerate(answers):
            if "error" in answer:
                prefix = f"{self.cores.name(core)}: " if self.cores.size > 1 else ""
                raise ValueError(prefix + answer["error"])
        results = [a["result"] for a in answers]
        if method == "reset_prefix_cache":
            return all(results)
        if method == "is_sleeping":
            return any(results)
        return results[0]

    # vLLM's AsyncLLM names for sleep mode (docs/sleep_mode.md); ValueError on a refusal.

    async def sleep(self, level: int = 1) -> None:
        await self.core_call("sleep", level)

    async def wake_up(self, tags: Optional[list[str]] = None) -> None:
        await self.core_call("wake_up", tags)

    async def is_sleeping(self) -> bool:
        return bool(await self.core_call("is_sleeping"))

    async def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """vLLM's: ``reset_running_requests`` preempts the cores' running requests first
        (``EngineCore.reset_prefix_cache``)."""
        return bool(await self.core_call("reset_prefix_cache", *([True] if reset_running_requests else [])))

    async def is_ready(self, timeout: float = _READY_WAIT_S) -> bool:
        """Every core is alive, warmed up and answers (``readiness``; ``timeout``: its wait)."""
        return await self.readiness(timeout) is None

    async def readiness(self, wait: float = _READY_WAIT_S) -> Optional[str]:
        """None when every core is alive, warm and answering, else why not; returns within
        ``wait`` seconds (/ready: a readiness probe's timeout is 1 s), never waiting out a step.

        A busy core heard from in the last second answers for itself. Any other is pinged (one ping
        in flight per core, kept across calls) and given ``wait`` seconds to answer. Unanswered
        then, an idle core is not ready (it answers between steps, at once when idle), a busy
        one (requests or a core call in it: a long step answers late) only once its ping has
        waited ``stuck_after_s`` (the core is stuck)."""
        if self.is_dead:
            return self.dead_reason
        if not self.cores.is_alive():
            return self.cores.dead_core() or "an engine core exited"
        if not self.warm:
            return "warming up"
        self._ensure_handler()
        now, loads = time.monotonic(), self.cores.loads()
        quiet = [core for core in range(self.cores.size)
                 if not loads[core] or now - self.heard[core] >= _FRESH_S]
        if not quiet:
            return None
        pending = [self._ping(core) for core in quiet]
        await asyncio.wait(pending, timeout=wait)
        if self.is_dead:  # it died meanwhile (the pings' futures hold the error)
            return self.dead_reason
        loads, calls = self.cores.loads(), len(self._calls) - len(self._pings)
        for core in quiet:
            ping = self._pings.get(core)
            if ping is None or ping[2].done():  # answered (its done callback may not have run yet)
                continue
            silent = time.monotonic() - ping[0]
            name = self.cores.name(core)
            if not loads[core] and calls <= 0:
                return f"the {name} is idle but did not answer a ping within {wait:g} s"
            if silent >= self.stuck_after_s:
                return f"the {name} is busy and has not answered for {silent:.0f} s"
        return None

    def _ping(self, core: int) -> asyncio.Future:
        """The core's ping in flight, or a new one; answered, it leaves ``_pings``."""
        if core in self._pings:
            return self._pings[core][2]
        call_id = next(self._call_ids)
        future = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        self._pings[core] = (time.monotonic(), call_id, future)

        def answered(f: asyncio.Future) -> None:
            self._calls.pop(call_id, None)
            if self._pings.get(core, (0, None))[1] == call_id:
                del self._pings[core]
            if not f.cancelled():
                f.exception()  # retrieved: a dead engine's error is readiness()'s dead_reason
        future.add_done_callback(answered)
        self.cores.send_call(core, call_id, "ping")
        return future

    async def wait_until_warm(self, timeout: Optional[float] = None) -> None:
        """Return once every core has finished its warm-up (e.g. before a Ray Serve replica says it
        is up); EngineDeadError if it died, asyncio.TimeoutError after ``timeout`` seconds."""
        self._ensure_handler()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.warm:
            self._check_alive()
            if deadline is not None and time.monotonic() > deadline:
                raise asyncio.TimeoutError(f"the engine core did not finish its warm-up in {timeout}s")
            await asyncio.sleep(0.05)

    # -- the output handler -----------------------------------------------------------------

    def _check_alive(self) -> None:
        if self.is_dead:
            raise EngineDeadError(f"The engine core is dead ({self.dead_reason}); restart the server.")

    def start(self) -> None:
        """Read the core's messages from now on, not from the first request (metrics of an idle
        server, an early notice of a dead core). Needs a running event loop."""
        self._ensure_handler()

    def _ensure_handler(self) -> None:
        if not self._handlers:
            loop = asyncio.get_running_loop()
            self._handlers = [loop.create_task(self._output_handler(core)) for core in range(self.cores.size)]

    async def _output_handler(self, core: int) -> None:
        client = self.cores.clients[core]
        sock = zmq.asyncio.Socket.from_socket(client.output)
        try:
            while not self.is_dead:
                if not await sock.poll(_POLL_MS):
                    if not client.is_alive():
                        self._mark_dead(f"the {self.cores.name(core)} process exited with code "
                                        f"{client.exit_code()}")
                    continue
                while True:
                    try:
                        raw = client.output.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.last_message_time = self.heard[core] = time.monotonic()
                    self._handle(core, unpack(raw))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug here must not hang every request
            logger.exception("The output handler failed")
            self._mark_dead(f"output handler error: {type(exc).__name__}: {exc}")

    def _handle(self, core: int, msg: list) -> None:
        kind = msg[0]
        if kind == "outputs":
            self.cores.note_stats(core, msg[2])
            if self.stat_loggers:
                self._observe_stats(core, msg[2])
            outputs = [decode_output(v) for v in msg[1]]
            self.cores.note_outputs(outputs)
            self._route(outputs, msg[2].get("timestamp"))
        elif kind == "warm":
            self.cores.warm[core], self.cores.warmup_reports[core] = True, msg[1]
            logger.info("The %s is warm: %s", self.cores.name(core), msg[1] or "warm-up off")
        elif kind == "call_result":
            future = self._calls.get(msg[1])
            if future is not None and not future.done():
                future.set_result(msg[2])
        elif kind == "rejected":
            self.cores.release(msg[1])
            self._reject(msg[1], msg[2])
        elif kind == "dead":
            self._mark_dead(f"{self.cores.name(core)}: {msg[1]}" if self.cores.size > 1 else msg[1])
        else:
            logger.warning("Ignoring unknown message %r from the engine core.", kind)

    def _observe_stats(self, core: int, message_stats: dict) -> None:
        """The engine's stats for the stat loggers: with several cores the sum of each one's
        latest, with only this message's step token counts (each step is observed once)."""
        stats = EngineStats.from_dict(message_stats)
        if self.cores.size > 1:
            own = stats
            stats = self.cores.merged_stats()
            stats.step_num_tokens, stats.kv_block_residency = own.step_num_tokens, own.kv_block_residency
            self._notify_engine(core, EngineStats.from_dict(message_stats))
        self._notify("observe_stats", stats)

    def _notify_engine(self, core: int, stats: EngineStats) -> None:
        """One core's stats, for the loggers that label them by engine (``observe_engine_stats``)."""
        self._notify_optional("observe_engine_stats", core, stats)

    def _notify_optional(self, method: str, *args) -> None:
        """``method`` of the stat loggers that have it (``observe_engine_stats``,
        ``observe_sleep_state``: not in the ``StatLogger`` protocol)."""
        for stat_logger in list(self.stat_loggers):
            observe = getattr(stat_logger, method, None)
            if observe is not None:
                try:
                    observe(*args)
                except Exception:  # noqa: BLE001 - metrics must not take the serving path down
                    logger.exception("Stat logger %r failed in %s; it is dropped.", stat_logger, method)
                    self.stat_loggers.remove(stat_logger)

    def _route(self, core_outputs, core_timestamp: Optional[float] = None) -> None:
        if not core_outputs:
            return
        iteration = IterationStats() if self.stat_loggers else None
        results, to_abort = self.outputs.process(core_outputs, iteration, core_timestamp)
        if iteration is not None and not iteration.is_empty:
            self._notify("observe_outputs", iteration)
        for result in results:
            stream = self.streams.get(result.request_id)
            if stream is None:
                continue
            refusal = _core_refusal(result)
            if refusal is not None:  # e.g. its LoRA adapter failed to load in the core
                self.abort(result.request_id)  # the other samples too
                stream.put_error(ValueError(refusal))
                continue
            stream.put(result)
            if result.finished:
                del self.streams[result.request_id]
        if to_abort:  # stop strings found here: free those requests in the core too
            self.cores.send_abort(to_abort)

    def _reject(self, core_id: str, message: str) -> None:
        parent = self.outputs.core_to_parent.get(core_id)
        if parent is None:
            return
        stream = self.streams.get(parent[0])
        self.abort(parent[0])
        if stream is not None:
            stream.put_error(ValueError(message))

    def _mark_dead(self, reason: str) -> None:
        if self.is_dead:
            return
        logger.error("The engine is dead: %s", reason)
        self.dead_reason = reason
        error = EngineDeadError(f"The engine core is dead ({reason}); restart the server.")
        for stream in self.streams.values():
            stream.put_error(error)
        self.streams.clear()
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)

    # -- shutdown ---------------------------------------------------------------------------

    def shutdown(self):
        """Stop the engine: its output handlers cancelled, the core processes stopped (``close``).
        Synchronous, as vLLM's ``AsyncLLM.shutdown()``; it returns an awaitable too, so
        ``await engine.shutdown()`` also waits until the handlers have ended."""
        handlers, self._handlers = self._handlers, []
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop here (a script after asyncio.run): nothing to wait on
            loop = None
        for owner in {h.get_loop() for h in handlers}:
            own = [h for h in handlers if h.get_loop() is owner]
            if owner is not loop and owner.is_running():
                # A loop another thread runs: its tasks are cancelled there (Task.cancel is not
                # thread-safe), and they end before their sockets close.
                try:
                    asyncio.run_coroutine_threadsafe(_cancel_and_wait(own), owner).result(_CANCEL_WAIT_S)
                except FutureTimeout:
                    logger.warning("AsyncLLM.shutdown: the output handlers did not end within %ss",
                                   _CANCEL_WAIT_S)
            elif not owner.is_closed():
                for handler in own:
                    handler.cancel()
        self.close()
        if handlers and loop is not None and all(h.get_loop() is loop for h in handlers):
            return asyncio.gather(*handlers, return_exceptions=True)  # CancelledError included
        return _Done()

    def close(self) -> None:
        """Stop the core processes (synchronous; safe when no event loop runs)."""
        self.dead_reason = self.dead_reason or "shut down"
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.cores.close()
