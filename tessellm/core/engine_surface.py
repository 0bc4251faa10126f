"""vLLM's ``LLMEngine`` names that user code reaches through ``llm.llm_engine``:
``get_tokenizer()``, ``set_tokenizer()``, ``model_config``, ``vllm_config`` and ``get_metrics()``, on both offline
engines (``LLMEngine``, ``DPLLMEngine``). Read-only views built from the engine's ``args`` and
``info``; setting a field changes nothing (build a new ``LLM`` instead)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch
from prometheus_client import CollectorRegistry

from tessellm.core.core_tokenizer import use_front_tokenizer
from tessellm.metrics.names import engine_metrics_options
from tessellm.metrics.prometheus import EngineMetrics
from tessellm.metrics.reader import Metric, read_metrics
from tessellm.metrics.stats import EngineStats, IterationStats


@dataclass(frozen=True)
class ModelConfig:
    """vLLM's ``ModelConfig``: the fields its users read most."""

    model: str  # as given to LLM(...) (the resolved path when none was)
    tokenizer: Optional[str]
    served_model_name: str
    max_model_len: int
    dtype: torch.dtype
    runner_type: str  # "generate" or "pooling"
    hf_config: Optional[object]  # the transformers config (None in a data-parallel front end)
    vocab_size: int

    def get_vocab_size(self) -> int:
        return self.vocab_size

    def get_hidden_size(self) -> int:
        if self.hf_config is None:
            raise ValueError("get_hidden_size: the model's config is in the engine cores' processes "
                             "(data_parallel_size > 1); read config.json of the model instead.")
        return self.hf_config.hidden_size


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    num_gpu_blocks: int  # KV blocks (tessellm's num_kv_blocks)
    enable_prefix_caching: bool
    gpu_memory_utilization: float


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: Optional[int]
    max_model_len: int


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int


@dataclass(frozen=True)
class VllmConfig:
    """vLLM's ``VllmConfig``: its four most read parts."""

    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    parallel_config: ParallelConfig


def engine_model_config(args, model_path: str, max_model_len: int, dtype: torch.dtype, runner: str,
                        hf_config, vocab_size: int) -> ModelConfig:
    return ModelConfig(args.model or model_path, args.tokenizer,
                       args.served_model_name or args.model or model_path, max_model_len, dtype, runner,
                       hf_config, vocab_size)


def engine_vllm_config(args, model: ModelConfig, num_kv_blocks: int) -> VllmConfig:
    """An engine's ``VllmConfig``: the front end's ``vllm_config``, and a custom logits
    processor's first argument (built on a worker before the KV cache is sized: then
    ``num_kv_blocks`` is ``args.num_kv_blocks`` or 0)."""
    return VllmConfig(model, CacheConfig(args.block_size, num_kv_blocks, args.enable_prefix_caching,
                                         args.gpu_memory_utilization),
                      SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, model.max_model_len),
                      ParallelConfig(args.tensor_parallel_size, args.pipeline_parallel_size,
                                     args.data_parallel_size))


class EngineSurface:
    """Mixed into an offline engine that has ``args``, ``info``, ``tokenizer``, ``inputs``,
    ``outputs`` and ``metrics``."""

    def get_tokenizer(self):
        return self.tokenizer

    def set_tokenizer(self, tokenizer) -> None:
        """vLLM's: requests added from now on are tokenized and detokenized with ``tokenizer``
        (a Hugging Face tokenizer; its ids must be the model's), a vision model's chat template
        is adopted by it as by the model's own, and structured outputs' grammars are compiled
        against its vocabulary (``_set_grammar_tokenizer``)."""
        use_front_tokenizer(self, tokenizer)
        self._set_grammar_tokenizer(tokenizer)

    def _set_grammar_tokenizer(self, tokenizer) -> None:
        """Constrained requests added from now on follow ``tokenizer``'s vocabulary."""
        raise NotImplementedError

    @property
    def model_config(self) -> ModelConfig:
        args, info = self.args, self.info
        return engine_model_config(args, info.model_path, info.max_model_len, getattr(torch, info.dtype),
                                   info.runner, self._hf_config(), info.vocab_size)

    @property
    def vllm_config(self) -> VllmConfig:
        return engine_vllm_config(self.args, self.model_config, self.info.num_kv_blocks)

    def _hf_config(self):
        return None

    def get_metrics(self) -> list[Metric]:
        """The engine's metrics since it started (vLLM's ``LLM.get_metrics()``): counters,
        gauges and histograms, as the server's ``/metrics`` shows them (docs/metrics.md)."""
        if self.metrics is None:
            raise ValueError("get_metrics: this engine keeps no metrics (LLM(...) leaves them off, as "
                             "vLLM's does: they cost host time in every step); pass "
                             "LLM(..., disable_log_stats=False).")
        self.metrics.observe_stats(self._engine_stats())
        self.metrics.observe_sleep_state(self._sleep_level())
        for core, stats in enumerate(self._cores_engine_stats()):
            self.metrics.observe_engine_stats(core, stats)
        return read_metrics(self.metrics.view)

    def _engine_stats(self) -> EngineStats:
        raise NotImplementedError

    def _sleep_level(self) -> int:
        """Sleep mode's level now (0: awake; data-parallel engines refuse sleep mode)."""
        return 0

    def _cores_engine_stats(self) -> list[EngineStats]:
        """Each data-parallel core's own stats (its ``engine="i"`` gauges); none with one core."""
        return []

    def _abort_outputs(self, request_ids: Union[str, Iterable[str]]) -> list[str]:
        """Forget requests in the front end (``abort_request``: one id, or several as vLLM's);
        returns their core ids to free. Their unfinished samples count as finished with "abort"
        in the metrics, as the server's aborts do (``request_success_total{finished_reason=
        "abort"}``); a request finished already counts nothing."""
        ids: list[str] = []
        iteration = IterationStats() if self.metrics is not None else None
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            ids += self.outputs.core_ids(request_id)
            self.outputs.abort(request_id, iteration)
        if iteration is not None and not iteration.is_empty:
            self.metrics.observe_outputs(iteration)
        return ids

    def _process_outputs(self, core_outputs: list, step_num_tokens: list[int],
                         core_timestamp: Optional[float] = None,
                         residency: Optional[list] = None) -> tuple[list, list[str]]:
        """The output processor's (results, core ids to abort) for a step's core outputs (made
        by the core at ``core_timestamp``, its ``time.monotonic()``); their token counts and
        latencies, the tokens each step computed (``step_num_tokens``) and the KV blocks'
        residency events (``residency``, cores in other processes) go to ``metrics`` when the
        engine keeps them."""
        iteration = IterationStats()
        results, to_abort = self.outputs.process(core_outputs, iteration, core_timestamp)
        if self.metrics is not None:
            self.metrics.observe_outputs(iteration)
            for n in step_num_tokens:
                self.metrics.iteration_tokens.observe(n)
            self.metrics.observe_residency(residency)
        return results, to_abort


def engine_metrics(args, info, log_stats: bool, num_engines: int = 1) -> Optional[EngineMetrics]:
    """An offline engine's own metrics registry (never the process-wide one), labelled with the
    served model name as the server's are; None without ``log_stats`` (``LLM``'s default, as
    vLLM's: a histogram observation per running request per step is host time in the hot loop)."""
    if not log_stats:
        return None
    return EngineMetrics(args.served_model_name or args.model or info.model_path, CollectorRegistry(),
                         info.max_model_len, num_engines=num_engines, **engine_metrics_options(args, info))
