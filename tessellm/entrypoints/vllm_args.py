"""vLLM's engine and server arguments that tessellm has no field of its own for, in one table.

A script written for ``vllm serve`` or ``vllm.LLM(...)`` runs unchanged: each name here is
either accepted with no effect (``noop``: a knob of vLLM's machinery that tessellm does not
have, e.g. ``--swap-space``), accepted only at the value that changes nothing (``neutral``:
``--cpu-offload-gb 0``; any other value is refused with one message naming the argument and
what to use instead), translated (``alias``: ``--num-gpu-blocks-override`` is
``--num-kv-blocks``; ``hf``: ``--rope-scaling`` goes into ``--hf-overrides``), or used to find
the model (``--download-dir``, ``--revision``). Names tessellm implements itself
(``--max-model-len``, ``--gpu-memory-utilization``, ...) are ``EngineArgs`` fields and server
flags, not here.

The same table serves three places: the engine flags of every command
(``add_vllm_engine_arguments``), ``tessellm serve``'s server flags (``add_vllm_server_arguments``)
and ``LLM(...)``'s keyword arguments (``pop_vllm_kwargs``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, Callable, Optional

_PREFIX = "vllm__"  # the namespace attributes of parsed vLLM arguments (engine_args_from reads them)


@dataclass(frozen=True)
class VllmArg:
    name: str  # vLLM's field name; the flag is --name-with-dashes
    kind: str  # noop | neutral | alias | hf | model
    why: str  # noop: why nothing changes; neutral: what to use instead
    type: Any = str  # bool, int, float, str or "json"
    neutral: tuple = ()  # neutral: the values accepted (None always is)
    target: str = ""  # alias: the tessellm field; hf: the config.json key
    nargs: Optional[str] = None
    short: Optional[str] = None
    # neutral: also accepted at the value of this tessellm flag (--data-parallel-size-local equal
    # to -dp: all ranks on this host); checked once the whole command line is parsed
    # (check_parsed_vllm_args), as that flag may come after it
    same_as: str = ""


_NO_DOWNLOAD = "tessellm never downloads; a model is a directory, a .gguf file or a repo in the local Hugging Face cache"
_GRAPHS = "tessellm captures decode graphs by batch size on its own; --enforce-eager turns them off"
_NO_LOGS = "requests are logged only with tessellm serve --enable-log-requests"
_ONE_HOST_DP = ("data parallelism here runs its engine cores on one host (-dp N); across hosts use "
                "Ray Serve replicas (tessellm serve --ray --num-replicas N, docs/ray_serve.md)")
_PARTIAL = "chunked prefill is scheduled by --max-num-batched-tokens alone"
_STATS = "engine statistics are on /metrics (LLM.get_metrics offline), not in the log"
_NUMA = "pin the process with numactl or taskset"
_ATTENTION = ("each backend plugin brings its own attention kernel; pick the device with --device "
              "(tessellm backends lists them and their kernels)")
_MULTI_NODE = ("runs across hosts go through Ray (--distributed-executor-backend ray, "
               "docs/parallelism.md)")
_NO_CP = "context parallelism is not supported; use --tensor-parallel-size or --pipeline-parallel-size"

ENGINE: tuple[VllmArg, ...] = (
    # accepted, no effect
    VllmArg("trust_remote_code", "noop", "tessellm runs no code from model repositories (an "
            "architecture it does not implement is refused)", bool),
    VllmArg("disable_log_stats", "noop", "engine statistics are on /metrics, not in the log (LLM(...) "
            "reads it itself: get_metrics needs disable_log_stats=False, as vLLM's)", bool),
    VllmArg("disable_log_requests", "noop", _NO_LOGS, bool),
    VllmArg("enable_log_requests", "serve", "tessellm serve: one INFO line (logger tessellm.requests) per "
            "request: its prompt, token ids and sampling parameters (no effect elsewhere)", bool),
    VllmArg("swap_space", "noop", "preempted requests are recomputed, never swapped to host memory "
            "(as in vLLM V1)", float),
    VllmArg("preemption_mode", "noop", "preempted requests are recomputed"),
    VllmArg("disable_custom_all_reduce", "noop", "tensor parallelism uses the backend's all-reduce", bool),
    VllmArg("max_seq_len_to_capture", "noop", _GRAPHS, int),
    VllmArg("cuda_graph_sizes", "noop", _GRAPHS, int, nargs="+"),
    VllmArg("compilation_config", "noop", "tessellm does not run torch.compile; " + _GRAPHS, short="-O"),
    VllmArg("disable_cascade_attn", "noop", "tessellm has no cascade attention", bool),
    VllmArg("hf_token", "noop", _NO_DOWNLOAD),
    VllmArg("max_parallel_loading_workers", "noop", "each rank loads its own shard in one pass", int),
    VllmArg("long_prefill_token_threshold", "noop", _PARTIAL, int),
    VllmArg("max_num_partial_prefills", "noop", _PARTIAL, int),
    VllmArg("max_long_partial_prefills", "noop", _PARTIAL, int),
    VllmArg("prefix_caching_hash_algo", "noop", "prefix-cache blocks are keyed by tessellm's own hash"),
    VllmArg("show_hidden_metrics_for_version", "noop", "every metric tessellm has is on /metrics"),
    VllmArg("lora_extra_vocab_size", "noop", "deprecated in vLLM; adapters add no vocabulary", int),
    VllmArg("use_tqdm_on_load", "noop", "loading logs its own progress", bool),
    VllmArg("ignore_patterns", "noop", "tessellm reads the checkpoint's safetensors (or .gguf) files only",
            nargs="+"),
    VllmArg("pt_load_map_location", "noop", "tensors load straight to their device"),
    VllmArg("disable_mm_preprocessor_cache", "noop", "images are processed per request, nothing cached", bool),
    VllmArg("mm_processor_cache_gb", "noop", "images are processed per request, nothing cached", float),
    VllmArg("tokenizer_pool_size", "noop", "removed in vLLM; prompts are tokenized in the API process", int),
    VllmArg("disable_async_output_proc", "noop", "outputs are always processed beside the next step", bool),
    # older vLLM releases' flags, still in many scripts
    VllmArg("enable_reasoning", "noop", "--reasoning-parser alone turns reasoning on (as in newer vLLM)", bool),
    VllmArg("use_v2_block_manager", "noop", "removed in vLLM; tessellm has one block manager", bool),
    VllmArg("num_scheduler_steps", "noop", "removed in vLLM (multi-step scheduling); tessellm schedules "
            "every step (--async-scheduling overlaps them)", int),
    VllmArg("multi_step_stream_outputs", "noop", "removed in vLLM; every step's tokens stream", bool),
    VllmArg("scheduler_delay_factor", "noop", "waiting requests are scheduled at the next step", float),
    VllmArg("max_context_len_to_capture", "noop", _GRAPHS, int),
    VllmArg("ray_workers_use_nsight", "noop", "profile with nsys around the whole command", bool),
    VllmArg("tokenizer_pool_type", "noop", "removed in vLLM; prompts are tokenized in the API process"),
    VllmArg("tokenizer_pool_extra_config", "noop", "removed in vLLM; prompts are tokenized in the API process"),
    VllmArg("speculative_model", "neutral", "give speculative decoding as --speculative-config "
            "'{\"method\": \"draft_model\", \"model\": DIR, \"num_speculative_tokens\": 3}' (or "
            "\"ngram\", \"eagle\", ...; docs/speculative_decoding.md)"),
    VllmArg("num_speculative_tokens", "neutral", "give it inside --speculative-config "
            "'{\"method\": ..., \"num_speculative_tokens\": N}' (docs/speculative_decoding.md)", int),
    VllmArg("worker_use_ray", "neutral", "use --distributed-executor-backend ray", bool, neutral=(False,)),
    VllmArg("enable_lora_bias", "neutral", "adapters train no biases here; use adapters without "
            "lora_bias", bool, neutral=(False,)),
    # only the value that changes nothing
    VllmArg("tokenizer_mode", "neutral", "tessellm loads the model's Hugging Face tokenizer; give "
            "--tokenizer DIR for another one", neutral=("auto", "hf", "slow")),
    VllmArg("skip_tokenizer_init", "neutral", "tessellm loads the tokenizer; a prompt may still be "
            "token ids ({\"prompt_token_ids\": [...]})", bool, neutral=(False,)),
    VllmArg("tokenizer_revision", "neutral", "the tokenizer comes from the model's directory or --tokenizer DIR"),
    VllmArg("code_revision", "neutral", "tessellm runs no code from model repositories"),
    VllmArg("hf_config_path", "neutral", "change the model's config.json with --hf-overrides JSON"),
    VllmArg("config_format", "neutral", "tessellm reads the Hugging Face config.json",
            neutral=("auto", "hf")),
    VllmArg("cpu_offload_gb", "neutral", "all weights stay on the device; use --quantization, a "
            "smaller --dtype or --tensor-parallel-size", float, neutral=(0,)),
    VllmArg("kv_cache_memory", "neutral", "size the KV cache with --num-kv-blocks N or "
            "--gpu-memory-utilization", int),
    VllmArg("kv_cache_memory_bytes", "neutral", "size the KV cache with --num-kv-blocks N or "
            "--gpu-memory-utilization", int),
    VllmArg("calculate_kv_scales", "neutral", "--kv-cache-dtype fp8 uses per-tensor scales of 1.0 "
            "(docs/quantization.md); leave it out", bool, neutral=(False,)),
    VllmArg("disable_sliding_window", "neutral", "sliding-window models run with their window; cap "
            "the context with --max-model-len", bool, neutral=(False,)),
    VllmArg("model_impl", "neutral", "tessellm runs its own model implementations (transformers' "
            "modeling code is not used)", neutral=("auto", "vllm")),
    VllmArg("guided_decoding_backend", "neutral", "xgrammar is tessellm's structured-output backend",
            neutral=("auto", "xgrammar")),
    VllmArg("structured_outputs_config", "neutral", "xgrammar is tessellm's structured-output "
            "backend; per request, structured_outputs.disable_any_whitespace", "json"),
    VllmArg("logprobs_mode", "neutral", "logprobs are the model's raw ones (before temperature, "
            "penalties and top-k/p), as vLLM's default", neutral=("raw_logprobs",)),
    VllmArg("profiler_config", "neutral", "LLM.start_profile / stop_profile write torch profiler "
            "traces to TESSELLM_TORCH_PROFILER_DIR (or vLLM's VLLM_TORCH_PROFILER_DIR) or to "
            "stop_profile(trace_dir); set one of those instead", "json"),
    VllmArg("otlp_traces_endpoint", "neutral", "tessellm has no OpenTelemetry tracing; request "
            "latencies are histograms on /metrics"),
    VllmArg("collect_detailed_traces", "neutral", "tessellm has no OpenTelemetry tracing; request "
            "latencies are histograms on /metrics"),
    VllmArg("enable_eplb", "neutral", "experts stay where --enable-expert-parallel places them", bool,
            neutral=(False,)),
    VllmArg("worker_cls", "neutral", "workers are tessellm's (LLM.collective_rpc calls their methods)",
            neutral=("auto",)),
    VllmArg("worker_extension_cls", "neutral", "workers are tessellm's (LLM.collective_rpc calls "
            "their methods)", neutral=("",)),
    VllmArg("additional_config", "neutral", "tessellm's backends take no extra config", "json",
            neutral=({},)),
    VllmArg("mamba_cache_dtype", "neutral", "recurrent states keep the model's dtype", neutral=("auto",)),
    VllmArg("long_lora_scaling_factors", "neutral", "long-context LoRA is not supported"),
    VllmArg("media_io_kwargs", "neutral", "images are decoded with default settings", "json",
            neutral=({},)),
    VllmArg("kv_events_config", "neutral", "tessellm publishes no KV cache events", "json"),
    # newer vLLM releases' names (audited against vLLM's EngineArgs, docs/vllm_parity.md)
    VllmArg("cudagraph_capture_sizes", "noop", _GRAPHS, int, nargs="+"),
    VllmArg("max_cudagraph_capture_size", "noop", _GRAPHS, int),
    VllmArg("optimization_level", "noop", "tessellm does not run torch.compile; " + _GRAPHS),
    VllmArg("performance_mode", "noop", "tessellm has no presets; tune --max-num-seqs and "
            "--max-num-batched-tokens"),
    VllmArg("stream_interval", "noop", "outputs stream every step (the same text, in more pieces)", int),
    VllmArg("aggregate_engine_logging", "noop", _STATS, bool),
    VllmArg("cudagraph_metrics", "noop", _STATS, bool),
    VllmArg("enable_mfu_metrics", "noop", _STATS, bool),
    VllmArg("enable_logging_iteration_details", "noop", _STATS, bool),
    VllmArg("enable_mm_processor_stats", "noop", _STATS, bool),
    VllmArg("enable_layerwise_nvtx_tracing", "noop", "profile with LLM.start_profile / the /start_profile "
            "route (docs/metrics.md)", bool),
    VllmArg("distributed_timeout_seconds", "noop", "torch.distributed's default timeout applies", int),
    VllmArg("numa_bind", "noop", _NUMA, bool),
    VllmArg("numa_bind_nodes", "noop", _NUMA, int, nargs="+"),
    VllmArg("numa_bind_cpus", "noop", _NUMA, nargs="+"),
    VllmArg("safetensors_load_strategy", "noop", "safetensors files are memory-mapped and read once"),
    VllmArg("renderer_num_workers", "noop", "prompts are rendered in the API process", int),
    VllmArg("disable_hybrid_kv_cache_manager", "noop", "one KV cache manager serves every layer type", bool),
    VllmArg("skip_mm_profiling", "noop", "tessellm runs no multimodal memory-profiling pass", bool),
    VllmArg("mm_processor_cache_type", "noop", "images are processed per request, nothing cached"),
    VllmArg("mm_shm_cache_max_object_size_mb", "noop", "images are processed per request, nothing cached", int),
    VllmArg("specialize_active_lora", "noop", "adapters run through the same batched LoRA kernels", bool),
    VllmArg("allow_deprecated_quantization", "noop", "tessellm's quantization methods need no opt-in", bool),
    VllmArg("enable_flashinfer_autotune", "noop", "tessellm has no FlashInfer kernels", bool),
    VllmArg("fail_on_environ_validation", "noop", "tessellm reads its environment variables in one place "
            "(tessellm/envs.py) and refuses bad values there", bool),
    VllmArg("attention_backend", "neutral", _ATTENTION),
    VllmArg("attention_config", "neutral", _ATTENTION, "json", neutral=({},)),
    VllmArg("kernel_config", "neutral", _ATTENTION, "json", neutral=({},)),
    VllmArg("moe_backend", "neutral", "MoE layers run the backend's fused_moe (docs/plugins.md)",
            neutral=("auto",)),
    VllmArg("quantization_config", "neutral", "give a pre-quantized checkpoint, or --quantization "
            "METHOD (docs/quantization.md)", "json"),
    VllmArg("nnodes", "neutral", _MULTI_NODE, int, neutral=(1,)),
    VllmArg("node_rank", "neutral", _MULTI_NODE, int, neutral=(0,)),
    VllmArg("master_addr", "neutral", _MULTI_NODE),
    VllmArg("master_port", "neutral", _MULTI_NODE, int),
    VllmArg("prefill_context_parallel_size", "neutral", _NO_CP, int, neutral=(1,)),
    VllmArg("decode_context_parallel_size", "neutral", _NO_CP, int, neutral=(1,)),
    VllmArg("enable_dbo", "neutral", "tessellm runs each step as one batch (no dual-batch overlap)",
            bool, neutral=(False,)),
    VllmArg("enable_elastic_ep", "neutral", "restart with the new --data-parallel-size", bool,
            neutral=(False,)),
    VllmArg("eplb_config", "neutral", "experts stay where --enable-expert-parallel places them", "json",
            neutral=({},)),
    VllmArg("kv_sharing_fast_prefill", "neutral", "prefill computes every layer", bool, neutral=(False,)),
    VllmArg("language_model_only", "neutral", "text prompts never run the vision tower; "
            "--limit-mm-per-prompt '{\"image\": 0}' refuses images", bool, neutral=(False,)),
    VllmArg("enable_mm_embeds", "neutral", "image embeddings are not taken as input; send the images",
            bool, neutral=(False,)),
    VllmArg("interleave_mm_strings", "neutral", "a message's text parts are joined and its images "
            "placed by the chat template", bool, neutral=(False,)),
    VllmArg("mm_encoder_tp_mode", "neutral", "the vision tower's weights are sharded as the language "
            "model's", neutral=("weights",)),
    VllmArg("mm_encoder_attn_backend", "neutral", _ATTENTION),
    VllmArg("io_processor_plugin", "neutral", "pooling outputs come as vectors (docs/pooling.md)"),
    VllmArg("override_attention_dtype", "neutral", "attention runs in --dtype (the KV cache in "
            "--kv-cache-dtype)"),
    VllmArg("kv_cache_dtype_skip_layers", "neutral", "--kv-cache-dtype applies to every layer", nargs="+"),
    VllmArg("mamba_ssm_cache_dtype", "neutral", "recurrent states keep the model's dtype", neutral=("auto",)),
    VllmArg("mamba_block_size", "neutral", "recurrent states are kept per request", int),
    VllmArg("enable_return_routed_experts", "neutral", "tessellm does not return routed experts", bool,
            neutral=(False,)),
    VllmArg("ec_transfer_config", "neutral", "encoder caches are not transferred; KV caches are "
            "(--kv-transfer-config, docs/kv_transfer.md)", "json"),
    VllmArg("weight_transfer_config", "neutral", "update weights in place with LLM.load_weights "
            "(docs/sleep_mode.md)", "json"),
    VllmArg("offload_group_size", "neutral", "all weights stay on the device; use --quantization or "
            "--tensor-parallel-size", int, neutral=(0,)),
    VllmArg("cpu_offload_params", "neutral", "all weights stay on the device; use --quantization or "
            "--tensor-parallel-size", nargs="+"),
    VllmArg("lora_target_modules", "neutral", "adapters apply to the modules their "
            "adapter_config.json names", nargs="+"),
    VllmArg("default_mm_loras", "neutral", "give the adapter per request (lora_request / the "
            "adapter's model name)", "json", neutral=({},)),
    VllmArg("enable_tower_connector_lora", "neutral", "adapters apply to the language model only", bool,
            neutral=(False,)),
    VllmArg("scheduler_cls", "neutral", "tessellm's scheduler is built in (--scheduling-policy fcfs "
            "or priority)"),
    VllmArg("model_weights", "neutral", "give the weights' directory (or .gguf file) as the model"),
    VllmArg("tokens_only", "neutral", "the API process tokenizes and detokenizes; send token ids "
            "({\"prompt_token_ids\": [...]}) and read token_ids", bool, neutral=(False,)),
    # translated
    VllmArg("num_gpu_blocks_override", "alias", "--num-kv-blocks", int, target="num_kv_blocks"),
    VllmArg("rope_scaling", "hf", "--hf-overrides '{\"rope_scaling\": ...}'", "json", target="rope_scaling"),
    VllmArg("rope_theta", "hf", "--hf-overrides '{\"rope_theta\": ...}'", float, target="rope_theta"),
    # where the model is
    VllmArg("download_dir", "model", "the Hugging Face cache directory the model's repo is found in "
            "(default: the usual one); " + _NO_DOWNLOAD),
    VllmArg("revision", "model", "the branch, tag or commit of the model's repo in the local "
            "Hugging Face cache (default: main)"),
)

SERVER: tuple[VllmArg, ...] = (
    VllmArg("disable_frontend_multiprocessing", "noop", "the API server and the engine core are "
            "always separate processes", bool),
    VllmArg("enable_auto_tool_choice", "noop", "--tool-call-parser alone enables tool_choice "
            "'auto'", bool),
    VllmArg("max_log_len", "serve", "with --enable-log-requests / --enable-log-outputs: at most this "
            "many characters of text and token ids per logged field (default: all)", int),
    VllmArg("enable_log_outputs", "serve", "one INFO line (logger tessellm.requests) per finished "
            "request: its text, token ids and finish reason", bool),
    VllmArg("enable_log_deltas", "noop", "outputs are logged whole, when a request finishes", bool),
    VllmArg("log_error_stack", "noop", "an unhandled error is always logged with its traceback", bool),
    VllmArg("h11_max_incomplete_event_size", "noop", "the HTTP parser's limit follows --max-header-bytes", int),
    VllmArg("h11_max_header_count", "noop", "headers are limited by their size (--max-header-bytes)", int),
    VllmArg("enable_server_load_tracking", "noop", "the load is always counted: GET /load", bool),
    VllmArg("disable_fastapi_docs", "noop", "tessellm serves no /docs, /redoc or /openapi.json", bool),
    VllmArg("disable_uvicorn_access_log", "alias", "--no-access-log", bool, target="no_access_log"),
    VllmArg("api_server_count", "neutral", "one API process per server; scale out with -dp N (engine "
            "cores) or Ray Serve replicas (--ray --num-replicas N)", int, neutral=(1,)),
    VllmArg("headless", "neutral", _ONE_HOST_DP, bool, neutral=(False,)),
    VllmArg("data_parallel_size_local", "neutral", _ONE_HOST_DP, int, same_as="data_parallel_size"),
    VllmArg("data_parallel_address", "neutral", _ONE_HOST_DP),
    VllmArg("data_parallel_rpc_port", "neutral", _ONE_HOST_DP, int),
    VllmArg("data_parallel_start_rank", "neutral", _ONE_HOST_DP, int, neutral=(0,)),
    VllmArg("data_parallel_backend", "neutral", _ONE_HOST_DP, neutral=("mp",)),
    VllmArg("data_parallel_hybrid_lb", "neutral", _ONE_HOST_DP, bool, neutral=(False,)),
    VllmArg("data_parallel_external_lb", "neutral", _ONE_HOST_DP, bool, neutral=(False,)),
    VllmArg("tool_parser_plugin", "serve", "a Python file registering tool parsers written for vLLM "
            "(@ToolParserManager.register_module, imported from tessellm.entrypoints.openai.tool_parsers); "
            "--tool-call-parser then takes their names (docs/structured_output.md)"),
    VllmArg("tool_server", "neutral", "tessellm runs no tools itself; function calling returns the "
            "calls to the client"),
    VllmArg("enable_ssl_refresh", "neutral", "restart the server to load new certificates", bool,
            neutral=(False,)),
    VllmArg("enable_tokenizer_info_endpoint", "neutral", "use /tokenize and /detokenize", bool,
            neutral=(False,)),
    # newer vLLM releases' server flags (docs/vllm_parity.md)
    VllmArg("exclude_tools_when_tool_choice_none", "serve", "a request's tools are not shown to the "
            "chat template when its tool_choice is \"none\"", bool),
    VllmArg("enable_per_request_metrics", "neutral", "request latencies are histograms on /metrics", bool,
            neutral=(False,)),
    VllmArg("fingerprint_mode", "neutral", "responses carry no system_fingerprint",
            neutral=("none",)),
    VllmArg("fingerprint_value", "neutral", "responses carry no system_fingerprint"),
    VllmArg("cohere_is_reasoning_model", "noop", "tessellm serves no /cohere/v2/chat", bool),
    VllmArg("cohere_format", "noop", "tessellm serves no /cohere/v2/chat"),
    VllmArg("data_parallel_supervisor_port", "noop", _ONE_HOST_DP, int),
    VllmArg("dp_supervisor_probe_interval_s", "noop", _ONE_HOST_DP, float),
    VllmArg("dp_supervisor_probe_timeout_s", "noop", _ONE_HOST_DP, float),
    VllmArg("dp_supervisor_probe_failure_threshold", "noop", _ONE_HOST_DP, int),
    VllmArg("disable_access_log_for_endpoints", "noop", "the access log is all or nothing (--no-access-log)"),
    VllmArg("enable_offline_docs", "noop", "tessellm serves no /docs, /redoc or /openapi.json", bool),
    VllmArg("enable_flash_late_interaction", "noop", "scores are computed in the engine", bool),
)

_BY_NAME = {a.name: a for a in ENGINE + SERVER}
SERVER_BY_NAME = {a.name: a for a in SERVER}

# vLLM's server settings that tessellm serve takes as its own flags, by vLLM's name, whose
# ServerConfig field is spelled otherwise (a Ray Serve config's server section takes either
# spelling; the others, e.g. api_key, chat_template, response_role, tool_call_parser, are
# spelled alike). The CORS flags (allowed_origins, ...) become ServerConfig.cors.
SERVER_FIELDS = {
    "served_model_name": "served_model_names",
    "max_tokens_limit": "max_tokens",
    "max_request_body_bytes": "max_body_bytes",
    "enable_request_id_headers": "request_id_headers",
    "enable_prompt_tokens_details": "prompt_tokens_details",
    "enable_force_include_usage": "force_include_usage",
    "enable_log_requests": "log_requests",
    "enable_log_outputs": "log_outputs",
}
CORS_FLAGS = ("allowed_origins", "allowed_methods", "allowed_headers", "allow_credentials")


def _json(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {value!r}") from None


def _flag(arg: VllmArg) -> str:
    return _dashed(arg.name)


def _dashed(name: str) -> str:
    return "--" + name.replace("_", "-")


def refusal(arg: VllmArg, value, where: str) -> Optional[str]:
    """The message refusing ``value`` for ``arg`` (None: accepted); ``where`` starts it (e.g.
    ``"LLM(cpu_offload_gb=...): "``)."""
    if arg.kind != "neutral" or value is None or value in arg.neutral or arg.same_as:
        return None  # (same_as: check_parsed_vllm_args)
    if isinstance(value, (list, dict)) and not value and not arg.neutral:
        return None
    if arg.name == "structured_outputs_config" and isinstance(value, dict):
        backend = value.get("backend", "auto")
        rest = set(value) - {"backend", "disable_fallback"}
        if backend in ("auto", "xgrammar") and not rest:
            return None
    accepted = [v for v in arg.neutral if v not in ({}, [])]
    allowed = f"; accepted: {', '.join(map(repr, accepted))}" if accepted else ""
    return f"{where}{value!r} is not supported by tessellm (a vLLM setting{allowed}): {arg.why}."


class _VllmAction(argparse.Action):
    def __init__(self, option_strings, dest, vllm: VllmArg, **kwargs):
        self.vllm = vllm
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        arg = self.vllm
        if arg.type is bool:
            values = not (option_string or "").startswith("--no-")
        message = refusal(arg, values, "")  # argparse names the flag
        if message:
            raise argparse.ArgumentError(self, message)
        if arg.kind == "alias":
            setattr(namespace, arg.target, values)
        else:
            setattr(namespace, _PREFIX + arg.name, values)


def _add(group, arg: VllmArg) -> None:
    names = [_flag(arg)] + ([arg.short] if arg.short else [])
    if arg.type is bool:
        names.append("--no-" + _flag(arg)[2:])
    if arg.kind == "noop":
        help_text = f"vLLM's; accepted, no effect: {arg.why}"
    elif arg.same_as:
        help_text = f"vLLM's; only the value of {_dashed(arg.same_as)}: {arg.why}"
    elif arg.kind == "neutral":
        shown = [v for v in arg.neutral if v not in ({}, [])]
        help_text = (f"vLLM's; only {' or '.join(map(str, shown))}: " if shown else
                     "vLLM's; not supported: ") + arg.why
    elif arg.kind == "serve":
        help_text = f"vLLM's: {arg.why}"
    elif arg.kind in ("alias", "hf"):
        help_text = f"vLLM's name for {arg.why}"
    else:
        help_text = arg.why
    kwargs: dict = {"nargs": 0} if arg.type is bool else {
        "type": _json if arg.type == "json" else arg.type, "metavar": arg.name.upper(),
        **({"nargs": arg.nargs} if arg.nargs else {})}
    group.add_argument(*names, action=_VllmAction, vllm=arg, dest=_PREFIX + arg.name,
                       default=argparse.SUPPRESS, help=help_text, **kwargs)


def add_vllm_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "vLLM's engine arguments (scripts written for vLLM run unchanged; docs/openai_api.md)")
    taken = {s for a in parser._actions for s in a.option_strings}
    if "--config" not in taken:  # read before parsing (expand_argv); here for --help
        group.add_argument("--config", metavar="FILE.yaml", dest=_PREFIX + "config", default=argparse.SUPPRESS,
                           help="vLLM's: flags from a YAML mapping (e.g. 'max-model-len: 4096'); "
                                "flags on the command line win")
    for arg in ENGINE:
        if _flag(arg) not in taken:  # a command may define one itself
            _add(group, arg)


def add_vllm_server_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("vLLM's server arguments (scripts written for `vllm serve`)")
    for arg in SERVER:
        _add(group, arg)


def parsed_vllm_args(args: argparse.Namespace) -> dict:
    """The vLLM arguments a command line gave (name -> value)."""
    return {k[len(_PREFIX):]: v for k, v in vars(args).items() if k.startswith(_PREFIX)}


def check_parsed_vllm_args(args: argparse.Namespace) -> None:
    """The neutral arguments whose accepted value is another flag's (``same_as``), now that the
    whole command line is parsed: one ValueError naming both and the way to do it here."""
    for name, value in parsed_vllm_args(args).items():
        arg = _BY_NAME.get(name)
        if arg is None or not arg.same_as or value is None:
            continue
        other = getattr(args, arg.same_as, 1)
        if value != other:
            raise ValueError(f"{_flag(arg)} {value!r} is not supported by tessellm (a vLLM setting; "
                             f"accepted: the same as {_dashed(arg.same_as)}, {other!r} "
                             f"here, all ranks on this host): {arg.why}.")


def engine_overrides(values: dict, model: Optional[str], fields: dict) -> tuple[Optional[str], dict]:
    """From vLLM arguments (already checked) to the model to load and the EngineArgs fields they
    set: ``fields`` (the others given) is read for ``hf_overrides`` to lay the rope keys over."""
    out: dict = {}
    hf = {ENGINE_BY_NAME[n].target: v for n, v in values.items()
          if n in ENGINE_BY_NAME and ENGINE_BY_NAME[n].kind == "hf" and v is not None}
    if hf:
        base = fields.get("hf_overrides")
        if isinstance(base, str):
            base = _json(base)
        out["hf_overrides"] = {**(base or {}), **hf}
    for name, value in values.items():
        arg = ENGINE_BY_NAME.get(name)
        if arg is not None and arg.kind == "alias" and value is not None:
            out[arg.target] = value
    if values.get("download_dir") or values.get("revision"):
        model = locate_model(model, values.get("download_dir"), values.get("revision"))
    return model, out


ENGINE_BY_NAME = {a.name: a for a in ENGINE}


def locate_model(model: Optional[str], download_dir: Optional[str], revision: Optional[str]) -> Optional[str]:
    """A repo id's directory in ``download_dir`` (vLLM's --download-dir: the Hugging Face cache
    the weights were downloaded to) at ``revision``; a local directory, a .gguf file or the
    bundled model stays as given."""
    import os

    from tessellm.loader.default_model import BUNDLED_MODELS

    if model is None or model in BUNDLED_MODELS or os.path.exists(model):
        return model
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, cache_dir=download_dir, revision=revision, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        where = f"the Hugging Face cache in {download_dir}" if download_dir else "the local Hugging Face cache"
        at = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(f"Model {model!r}{at} is not in {where} (tessellm never downloads "
                                "weights); download it there first, or give its directory.") from exc


def pop_vllm_kwargs(kwargs: dict, model: Optional[str], warn: Callable[[str], None] = lambda _m: None
                    ) -> tuple[Optional[str], dict]:
    """``LLM(...)``: take vLLM's engine arguments out of ``kwargs`` (a refused value is a
    ValueError naming it); returns the model to load and ``kwargs`` with their tessellm
    equivalents in."""
    values = {}
    for name in [n for n in kwargs if n in ENGINE_BY_NAME]:
        value = kwargs.pop(name)
        message = refusal(ENGINE_BY_NAME[name], value, f"LLM({name}=...): ")
        if message:
            raise ValueError(message)
        values[name] = value
    model, extra = engine_overrides(values, model, kwargs)
    return model, {**kwargs, **extra}


def plain_names(kwargs: dict) -> dict:
    """``LLM(**vars(args))`` of a parser built by ``EngineArgs.add_cli_args`` (vLLM's example
    scripts): the vLLM flags given on its command line are parsed under ``vllm__NAME``; here they
    are ``NAME`` again, as ``LLM(...)`` takes them."""
    out = {k.removeprefix(_PREFIX): v for k, v in kwargs.items()}
    if "config" in out:
        raise ValueError("--config FILE.yaml was parsed but not read: parse the command line with "
                         "tessellm.utils.FlexibleArgumentParser (vLLM's parser), which reads the file.")
    return out


def vllm_engine_kwargs(model: Optional[str] = None, **kwargs) -> dict:
    """tessellm's ``EngineArgs`` keyword arguments for ``LLM(...)``'s (or vLLM's
    ``EngineArgs(...)``'s: ``tessellm.EngineArgs``, vllm_engine_args.py): vLLM's names translated,
    accepted or refused."""
    kwargs = plain_names(kwargs)
    kwargs.pop("max_logprobs", None)  # the server's limit (--max-logprobs); none in an engine
    # tessellm serve's own flags that vLLM's EngineArgs also has (serve.py defines them)
    kwargs.pop("fully_sharded_loras", None)  # no effect: adapters are sharded like their layers
    kwargs.pop("shutdown_timeout", None)  # the server's drain time; an LLM has no requests to drain
    if kwargs.pop("lora_dtype", None) not in (None, "auto"):
        raise ValueError("LLM(lora_dtype=...): adapters run in the model's dtype (set it with dtype=...); "
                         "give 'auto' or leave it out.")
    model, kwargs = pop_vllm_kwargs(kwargs, model)
    return dict(model=model, **_none_is_default(kwargs))


def _none_is_default(kwargs: dict) -> dict:
    """vLLM's ``None`` for an engine argument means "the engine's default" (``max_num_seqs=None``
    in its examples): an argument given as None takes tessellm's default where that is not None."""
    import dataclasses

    from tessellm.config import EngineArgs

    defaulted = {f.name for f in dataclasses.fields(EngineArgs)
                 if f.default is not None and f.default is not dataclasses.MISSING}
    return {k: v for k, v in kwargs.items() if not (v is None and k in defaulted)}


# -- vLLM's command-line conventions: --config FILE.yaml and --flag_with_underscores ----------

def expand_argv(argv: list, parser: argparse.ArgumentParser) -> list:
    """vLLM's command-line conventions before argparse sees them: ``--max_model_len`` (an
    underscore form) is ``--max-model-len``; ``--config FILE`` (a YAML mapping of flag names,
    dashes or underscores, to values) puts its flags right after the sub-command (and its MODEL
    when that comes first, as vLLM's parser does), so a flag on the command line wins. A ``model`` key is the MODEL unless the command line gives one."""
    path, rest = _split_config([_dashes(a) for a in argv])
    if path is None:
        return rest
    command = next((i for i, a in enumerate(rest) if a in ("serve", "generate", "bench", "backends")), None)
    if command is None:
        raise SystemExit("tessellm: --config goes with a command, e.g. tessellm serve --config FILE.yaml.")
    if rest[command] == "bench":
        command += 1  # after the bench command's own name
    known = _options(parser, rest[:command + 1])
    flags = config_flags(path, known)
    if "--model" in flags and rest[0:command + 1] and _has_model(parser, rest):
        i = flags.index("--model")
        del flags[i:i + 2]
    at = command + 1
    if at < len(rest) and not rest[at].startswith("-"):
        at += 1  # after the command's positional (MODEL): a list flag last would take it as a value
    return rest[:at] + flags + rest[at:]


def flexible_argv(argv: list, known: set) -> list:
    """vLLM's conventions for a script's own parser (``tessellm.utils.FlexibleArgumentParser``,
    no sub-command): ``--max_model_len`` is ``--max-model-len``; ``--config FILE`` puts the
    file's flags first, so a flag on the command line wins. ``known``: the parser's options."""
    path, rest = _split_config([_dashes(a) for a in argv])
    return rest if path is None else config_flags(path, known) + rest


def _split_config(argv: list) -> tuple[Optional[str], list]:
    """``--config FILE`` (or ``--config=FILE``) taken out of ``argv``: (FILE or None, the rest)."""
    at = next((i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")), None)
    if at is None:
        return None, argv
    if argv[at] != "--config":
        return argv[at].split("=", 1)[1], argv[:at] + argv[at + 1:]
    if at + 1 >= len(argv):
        raise SystemExit("tessellm: --config needs a YAML file.")
    return argv[at + 1], argv[:at] + argv[at + 2:]


def _dashes(arg: str) -> str:
    if not arg.startswith("--") or "_" not in arg:
        return arg
    name, eq, value = arg.partition("=")
    return name.replace("_", "-") + eq + value


def _subparser(parser: argparse.ArgumentParser, path: list) -> argparse.ArgumentParser:
    for word in path:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) and word in action.choices:
                parser = action.choices[word]
                break
    return parser


def _options(parser: argparse.ArgumentParser, path: list) -> set:
    sub = _subparser(parser, [a for a in path if not a.startswith("-")])
    return {s for a in sub._actions for s in a.option_strings}


def _has_model(parser: argparse.ArgumentParser, argv: list) -> bool:
    """Whether the command line itself names the model (positional MODEL or --model)."""
    import contextlib
    import io

    try:  # a bad flag is argparse's error once, from the real parse after this one
        with contextlib.redirect_stderr(io.StringIO()):
            args, _ = parser.parse_known_args(argv)
    except SystemExit:
        return False
    return bool(getattr(args, "model", None) or getattr(args, "model_flag", None))


def config_flags(path: str, known: set) -> list:
    """A vLLM YAML config file as command-line flags (``known``: the command's options)."""
    try:
        import yaml
    except ImportError:
        raise SystemExit("tessellm: --config reads YAML; pip install pyyaml.") from None
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise SystemExit(f"tessellm: --config {path}: {exc.strerror}.") from None
    except yaml.YAMLError as exc:
        raise SystemExit(f"tessellm: --config {path} is not valid YAML: {exc}") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise SystemExit(f"tessellm: --config {path} must be a mapping of flag names to values "
                         "(e.g. 'max-model-len: 4096').")
    out: list = []
    for key, value in data.items():
        flag = "--" + str(key).lstrip("-").replace("_", "-")
        if flag not in known:
            raise SystemExit(f"tessellm: --config {path}: '{key}' is not an option of this command "
                             f"({flag}); see --help.")
        if isinstance(value, bool):
            if value:
                out.append(flag)
            elif "--no-" + flag[2:] in known:
                out.append("--no-" + flag[2:])
        elif isinstance(value, list):
            out += [flag, *(json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in value)]
        elif isinstance(value, dict):
            out += [flag, json.dumps(value)]
        elif value is not None:
            out += [flag, str(value)]
    return out
