"""LLMEngine: the synchronous, in-process engine (front end + core in one loop)."""

from __future__ import annotations

import dataclasses
import time
from typing import Iterable, Optional, Union

from tessellm.config import EngineArgs
from tessellm.core.engine_core import EngineCore
from tessellm.core.engine_surface import EngineSurface, engine_metrics
from tessellm.core.input_processor import InputProcessor, PromptType
from tessellm.core.output_processor import OutputProcessor
from tessellm.core.outputs import RequestOutput
from tessellm.core.sampling_params import SamplingParams
from tessellm.core.submit import submit
from tessellm.loader.model_loader import load_tokenizer
from tessellm.metrics.stats import EngineStats
from tessellm.pooling.front import POOLING_SAMPLING, check_generates, resolve_pooling_params


class LLMEngine(EngineSurface):
    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        """vLLM's constructor name (``LLMEngine.from_engine_args(EngineArgs(...))``)."""
        return cls(args)

    def __init__(self, args: EngineArgs, final_only: bool = False, log_stats: bool = True):
        if args.data_parallel_size > 1:
            raise ValueError("LLMEngine runs one engine core in this process; for "
                             "data_parallel_size > 1 use LLM(data_parallel_size=N) or "
                             "tessellm serve --data-parallel-size N.")
        self.args = args
        from tessellm.core.warmup import warm_up
        from tessellm.metrics.compile_counter import COUNTER

        COUNTER.install()
        self.core = EngineCore(args)
        try:
            self.warmup = warm_up(self.core, args, serving=False)  # off unless kernel_warmup=True
        except BaseException:
            self.core.shutdown()
            raise
        source = self.core.source
        self.tokenizer = None
        if source.has_tokenizer or args.tokenizer:
            self.tokenizer = load_tokenizer(source.path, source.kind, args.tokenizer)
        self.inputs = InputProcessor(self.core.info, self.tokenizer)
        self.outputs = OutputProcessor(self.tokenizer, final_only)
        self.metrics = engine_metrics(args, self.core.info, log_stats)  # get_metrics() (engine_surface.py)
        self.failure: Optional[Exception] = None  # what broke a step: raised again by every call

    def _set_grammar_tokenizer(self, tokenizer) -> None:
        self.core.structured.set_tokenizer(tokenizer)  # the core is in this process

    @property
    def engine_core(self) -> EngineCore:
        """vLLM v1's name for the engine core (``llm.llm_engine.engine_core.save_sharded_state``)."""
        return self.core

    @property
    def model_executor(self):
        """vLLM v0's name for the executor (``llm.llm_engine.model_executor.save_sharded_state``)."""
        return self.core.executor

    @property
    def info(self):
        """The engine's ``EngineInfo`` (model, context length, KV blocks, default sampling)."""
        return self.core.info

    def add_request(self, request_id: str, prompt: PromptType,
                    params: Optional[SamplingParams] = None, lora_request=None,
                    priority: int = 0) -> None:
        """Validate and queue a request. Raises ValueError (nothing queued) on bad input,
        a bad LoRA adapter included (``lora_request``: a ``tessellm.lora.LoRARequest``).
        ``priority``: vLLM's; non-zero only with ``scheduling_policy="priority"`` (lower first)."""
        self._check_alive()
        check_generates(self.core.info)
        if lora_request is not None:
            self.core.add_lora(lora_request)
        submit(self.inputs, self.outputs, request_id, prompt, params or self.default_sampling_params(),
               self.core.add_request, lora_request=lora_request, abort=self.core.abort_requests,
               priority=priority)

    def add_pooling_request(self, request_id: str, prompt: PromptType, params=None,
                            lora_request=None) -> None:
        """Queue a prompt to embed (``params``: a ``tessellm.pooling.PoolingParams``); its
        output is a ``PoolingRequestOutput``. Raises ValueError on bad input or a generating engine."""
        self._check_alive()
        params = resolve_pooling_params(params, self.core.info)
        if lora_request is not None:
            self.core.add_lora(lora_request)
        processed = self.inputs.process_prompt(prompt, params.truncate_prompt_tokens)
        submit(self.inputs, self.outputs, request_id, processed, POOLING_SAMPLING, self.core.add_request,
               lora_request=lora_request, abort=self.core.abort_requests, pooling=params)

    def remove_lora(self, lora_id: int) -> None:
        """Free an adapter's slot and cached weights (vLLM's ``remove_lora``); requests still
        using it finish with it. The id stays bound to its files (the prefix cache keys on it)."""
        self.core.remove_lora(lora_id)

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation-config defaults (tessellm/generation_config.py)."""
        return SamplingParams(**self.core.info.default_sampling)

    def abort_request(self, request_id: Union[str, Iterable[str]]) -> None:
        """Abort a request (or several: vLLM's takes a list); counted in the metrics as the
        server's aborts. Unknown or finished ids are ignored."""
        self.core.abort_requests(self._abort_outputs(request_id))

    def shutdown(self) -> None:
        self.core.shutdown()

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise self.failure

    def step(self) -> list[RequestOutput]:
        """One engine step. An exception from the core leaves its step half done (the batch's
        state is lost): the engine is finished then, and every later call raises the same
        exception (with a note saying so) instead of failing on the lost state."""
        self._check_alive()
        before = self.core.scheduler.num_scheduled_tokens_total
        try:
            core_outputs = self.core.step()
        except Exception as exc:
            exc.add_note("The engine failed in this step and cannot go on; create a new LLM.")
            self.failure = exc
            raise
        computed = self.core.scheduler.num_scheduled_tokens_total - before
        results, to_abort = self._process_outputs(core_outputs, [computed] if computed else [],
                                                  time.monotonic())
        if to_abort:
            self.core.abort_requests(to_abort)
        return results

    def _engine_stats(self) -> EngineStats:
        stats = EngineStats.from_dict(dataclasses.asdict(self.core.scheduler.stats()))
        if self.core.kv.residency is not None:
            stats.kv_block_residency = self.core.kv.residency.drain()
        return stats

    def _sleep_level(self) -> int:
        return self.core.sleep_level()

    def _hf_config(self):
        return self.core.source.hf_config

