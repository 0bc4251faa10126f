"""DPLLMEngine: ``LLM(data_parallel_size=N)``'s engine, N engine cores behind one front end.

The same interface as ``LLMEngine`` (what ``LLM`` calls), but the cores run in their own
processes (``core_group.EngineCoreGroup``, as the server's): this process tokenizes, sends each
core request to the least-loaded core (``load_balance``: by the cores' reported queues, or by
tokens), or to the one whose prefix cache holds its prompt's longest prefix while that core is
close to the least loaded (the cores report their caches' changes: ``cache_view``), and
``step`` returns what the cores
have produced since the last call, waiting for at least one message. Outputs go through one
``OutputProcessor``, so ``LLM.generate`` keeps its input order whichever core ran a prompt.

A core that dies, or a core error, fails the engine: every later call raises the same
``EngineDeadError`` (the other cores are stopped), as ``LLMEngine`` does after a failed step.

``set_tokenizer`` reaches the cores by name (``core_tokenizer.py``): a blocking call to every
core (``_call_cores``), whose wait keeps the messages that arrive meanwhile for ``step``.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Iterable, Optional, Union

import zmq

from tessellm.config import EngineArgs
from tessellm.core.core_group import EngineCoreGroup, core_refusal, load_front_tokenizer
from tessellm.core.core_tokenizer import CoreTokenizer
from tessellm.core.engine_process import EngineDeadError, decode_output, unpack
from tessellm.core.engine_surface import EngineSurface, engine_metrics
from tessellm.core.input_processor import InputProcessor, PromptType
from tessellm.core.output_processor import OutputProcessor
from tessellm.core.outputs import RequestOutput
from tessellm.core.sampling_params import SamplingParams
from tessellm.core.submit import submit
from tessellm.lora.request import lora_off_error
from tessellm.metrics.stats import EngineStats, merge_engine_stats
from tessellm.pooling.front import POOLING_SAMPLING, check_generates, resolve_pooling_params

_POLL_MS = 500  # the cores' liveness is checked this often (their messages never say a core died)
_CALL_TIMEOUT_S = 120.0  # a call to the cores (set_tokenizer: each loads the tokenizer from disk)


class DPLLMEngine(EngineSurface):
    def __init__(self, args: EngineArgs, final_only: bool = False, log_stats: bool = True):
        self.args = args
        # serving=False: the cores warm up as LLM(...) does (off unless kernel_warmup=True).
        self.cores = EngineCoreGroup(args, serving=False)
        self.info = self.cores.info
        try:
            self.tokenizer = load_front_tokenizer(self.info, args)
        except BaseException:
            self.cores.close()
            raise
        self.inputs = InputProcessor(self.info, self.tokenizer)
        # what the cores compile grammars against
        self._core_tokenizer = CoreTokenizer(self.tokenizer, ", or use LLM(data_parallel_size=1), where "
                                             "grammars follow any set_tokenizer")
        self.outputs = OutputProcessor(self.tokenizer, final_only)
        # get_metrics() (engine_surface.py), with each core's engine="i" gauges
        self.metrics = engine_metrics(args, self.info, log_stats, num_engines=self.cores.size)
        self.failure: Optional[Exception] = None
        self._poller = zmq.Poller()
        for client in self.cores.clients:
            self._poller.register(client.output, zmq.POLLIN)
        self._core_of = {client.output: i for i, client in enumerate(self.cores.clients)}
        self._checked = time.monotonic()  # when the cores' liveness was last checked
        self._call_ids = itertools.count()
        self._pending: deque = deque()  # (core, message) that came during a call, for step()

    @property
    def core(self):
        """``LLMEngine.core`` is the in-process ``EngineCore``; here the cores are in other
        processes, so what reaches into one (sleep mode, ``load_weights``, ``collective_rpc``,
        ``apply_model``, the profiler) is refused with this error."""
        raise NotImplementedError("LLM(data_parallel_size=N) runs its engine cores in their own "
                                  "processes: sleep mode, load_weights, collective_rpc, apply_model and "
                                  "start_profile / stop_profile are not offered there yet (tessellm serve "
                                  "-dp N's routes reach every core).")

    def _set_grammar_tokenizer(self, tokenizer) -> None:
        """The cores (other processes) compile grammars against the tokenizer they hold; one of
        another vocabulary reaches them by name, each core loading it and answering with its
        vocabulary's digest. Where it has no name, or a core cannot load it or loads another
        vocabulary, constrained requests are refused at the edge until a tokenizer the cores
        hold is set again (``CoreTokenizer``)."""
        call = self._core_tokenizer.ask(tokenizer)
        answers = self._call_cores("set_tokenizer", call) if call is not None else None
        names = [self.cores.name(i) for i in range(self.cores.size)]
        self.inputs.structured_refusal = self._core_tokenizer.settle(tokenizer, answers, names)

    def _call_cores(self, method: str, args: list) -> list[dict]:
        """Every core's answer to ``method`` (engine_process ``_call``), in core order; one that
        does not answer in time reads as an error. What the cores send meanwhile waits in
        ``_pending`` for ``step``, in order; a core that dies fails the engine."""
        self._check_alive()
        calls = {next(self._call_ids): core for core in range(self.cores.size)}
        for call_id, core in calls.items():
            self.cores.send_call(core, call_id, method, args)
        answers: dict[int, dict] = {}
        deadline = time.monotonic() + _CALL_TIMEOUT_S
        while len(answers) < len(calls) and time.monotonic() < deadline:
            for core, msg in self._receive():
                if msg[0] == "call_result" and msg[1] in calls:
                    answers[calls[msg[1]]] = msg[2]
                elif msg[0] == "dead":
                    self._handle(core, msg)  # raises
                else:
                    self._pending.append((core, msg))
        late = {"error": f"no answer to {method!r} within {_CALL_TIMEOUT_S:.0f}s"}
        return [answers.get(core, late) for core in range(self.cores.size)]

    # -- requests (as LLMEngine) --------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptType, params: Optional[SamplingParams] = None,
                    lora_request=None, priority: int = 0) -> None:
        self._check_alive()
        check_generates(self.info)
        self._check_lora(lora_request)
        submit(self.inputs, self.outputs, request_id, prompt, params or self.default_sampling_params(),
               self.cores.send_add, lora_request=lora_request, abort=self.cores.send_abort,
               priority=priority)

    def add_pooling_request(self, request_id: str, prompt: PromptType, params=None, lora_request=None) -> None:
        self._check_alive()
        params = resolve_pooling_params(params, self.info)
        self._check_lora(lora_request)
        processed = self.inputs.process_prompt(prompt, params.truncate_prompt_tokens)
        submit(self.inputs, self.outputs, request_id, processed, POOLING_SAMPLING, self.cores.send_add,
               lora_request=lora_request, abort=self.cores.send_abort, pooling=params)

    def _check_lora(self, lora_request) -> None:
        if lora_request is not None and not self.args.enable_lora:
            raise lora_off_error(lora_request)

    def remove_lora(self, lora_id: int) -> None:
        """Every core frees the adapter's slot and cached weights."""
        self.cores.send_remove_lora(lora_id)

    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.info.default_sampling)

    def abort_request(self, request_id: Union[str, Iterable[str]]) -> None:
        """Abort a request (or several: vLLM's takes a list); counted in the metrics as the
        server's aborts. Unknown or finished ids are ignored."""
        ids = self._abort_outputs(request_id)
        if self.failure is None:
            self.cores.send_abort(ids)

    def has_unfinished_requests(self) -> bool:
        return bool(self.cores.balancer.owner)

    def shutdown(self) -> None:
        self.cores.close()

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise self.failure

    # -- the loop ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """What the cores produced since the last call (at least one message's worth, unless
        nothing is in flight)."""
        self._check_alive()
        results: list[RequestOutput] = []
        while True:
            while self._pending:  # one at a time: those after a refusal (it raises) stay
                results.extend(self._handle(*self._pending.popleft()))
            if results or not self.has_unfinished_requests():
                return results
            self._pending.extend(self._receive())

    def _receive(self) -> list[tuple[int, list]]:
        """The messages the cores sent (waiting up to ``_POLL_MS`` for one), with their core's
        index; a core found dead fails the engine."""
        ready = dict(self._poller.poll(_POLL_MS))
        now = time.monotonic()
        if not ready or now - self._checked > _POLL_MS / 1000:  # a silent core may be dead
            self._checked = now
            dead = self.cores.dead_core()
            if dead is not None:
                self._fail(dead)
        messages = []
        for sock in ready:
            while True:
                try:
                    messages.append((self._core_of[sock], unpack(sock.recv(zmq.NOBLOCK))))
                except zmq.Again:
                    break
        return messages

    def _handle(self, core: int, msg: list) -> list[RequestOutput]:
        kind = msg[0]
        if kind == "outputs":
            self.cores.note_stats(core, msg[2])
            outputs = [decode_output(v) for v in msg[1]]
            self.cores.note_outputs(outputs)
            results, to_abort = self._process_outputs(outputs, msg[2].get("step_num_tokens", []),
                                                      msg[2].get("timestamp"),
                                                      msg[2].get("kv_block_residency"))
            if to_abort:
                self.cores.send_abort(to_abort)
            for result in results:
                refusal = core_refusal(result)
                if refusal is not None:  # e.g. its LoRA adapter failed to load in the core
                    self.abort_request(result.request_id)
                    raise ValueError(refusal)
            return results
        if kind == "rejected":
            self.cores.release(msg[1])
            parent = self.outputs.core_to_parent.get(msg[1])
            if parent is not None:
                self.abort_request(parent[0])
            raise ValueError(msg[2])
        if kind == "dead":
            self._fail(f"{self.cores.name(core)}: {msg[1]}")
        if kind == "warm":
            self.cores.warm[core], self.cores.warmup_reports[core] = True, msg[1]
        return []

    def _fail(self, reason: str) -> None:
        self.failure = EngineDeadError(f"The engine is dead ({reason}); create a new LLM.")
        self.cores.close()
        raise self.failure

    def _engine_stats(self) -> EngineStats:
        """The cores' last stats as one engine's; their last steps' token counts left out (each
        reading would count them again)."""
        stats = merge_engine_stats([EngineStats.from_dict(s) for s in self.core_stats()])
        stats.step_num_tokens = []
        return stats

    def _cores_engine_stats(self) -> list[EngineStats]:
        return [EngineStats.from_dict(s) for s in self.core_stats()]

    def core_stats(self) -> list[dict]:
        """Each core's last ``EngineStats`` (as a dict), in core order."""
        return [dict(s) for s in self.cores.stats]

    def requests_sent(self) -> list[int]:
        """Core requests (one per sample) sent to each core so far."""
        return list(self.cores.balancer.sent)
