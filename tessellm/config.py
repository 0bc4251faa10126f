"""Engine configuration: what the user asked for, resolved against the model and the backend."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from tessellm.kv_transfer.config import KVTransferConfig  # noqa: F401 - vLLM's vllm.config path

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


class CompilationConfig(dict):
    """vLLM's ``vllm.config.CompilationConfig(level=3, cudagraph_capture_sizes=[1, 2, 4])``, so
    scripts that build one run: its fields are kept (as a dict, also read as attributes), and
    ``LLM(compilation_config=...)`` has no effect, as ``-O``: tessellm does not run torch.compile
    and captures decode graphs by batch size on its own (``enforce_eager=True`` turns them off)."""

    def __init__(self, **fields):
        super().__init__(fields)

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"CompilationConfig has no {name!r}") from None


@dataclass
class EngineArgs:
    """Everything a user can set; the same names as ``LLM(...)`` and ``tessellm serve`` flags."""

    model: Optional[str] = None  # directory, .gguf file, HF cache repo id; None: bundled SmolLM2
    device: str = "auto"
    dtype: str = "auto"  # also a torch.dtype (torch.bfloat16), kept as its name (__post_init__)
    max_model_len: Optional[int] = None
    block_size: int = 16
    num_kv_blocks: Optional[int] = None  # overrides sizing from free memory
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None
    enable_prefix_caching: bool = True
    # The host tier of the prefix cache (docs/kv_offload.md): GiB of host memory, over all
    # ranks, that keeps KV blocks evicted from the device for later prefix hits; None: off.
    kv_offloading_size: Optional[float] = None
    kv_offloading_backend: Optional[str] = None  # "native" (the only one); None: native
    # A KV connector (docs/kv_transfer.md, vLLM's flag): a dict or its JSON, e.g.
    # {"kv_connector": "SharedStorageConnector", "kv_role": "kv_both",
    #  "kv_connector_extra_config": {"shared_storage_path": "/tmp/kv"}}; None: off.
    kv_transfer_config: Optional[object] = None
    # Prefix caching for models with Mamba / gated DeltaNet layers (core/state_prefix.py): how
    # many recurrent-state snapshots (one per cached block boundary) the cache keeps; their
    # memory comes out of the KV cache budget. None: those fitting in a quarter of it.
    recurrent_state_snapshots: Optional[int] = None
    # With them: a prefill also ends a chunk, and keeps the state, every N blocks (so the second
    # request sharing a prefix hits it, up to a multiple of N blocks); 0: only at the last full
    # block of a prompt and where a chunk ends anyway. More steps per prompt, more snapshots.
    recurrent_state_snapshot_interval: int = 0
    enable_chunked_prefill: bool = True
    seed: int = 0
    load_format: str = "auto"  # auto, safetensors, gguf, dummy, sharded_state (loader/sharded_state.py)
    # vLLM's: a dict or its JSON; only {"pattern": "..."} (load_format="sharded_state": the file
    # name save_sharded_state(pattern=...) wrote; loader/sharded_state.extra_config_pattern).
    model_loader_extra_config: Optional[object] = None
    enforce_eager: bool = False
    tokenizer: Optional[str] = None  # a directory with tokenizer files; default: the model's
    served_model_name: Optional[str] = None
    chat_template: Optional[str] = None  # a file path or the template text
    kv_cache_dtype: str = "auto"
    quantization: Optional[str] = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Data parallelism on one host (tessellm/core/core_group.py): this many engine cores, each a
    # whole engine on its own tensor_parallel_size x pipeline_parallel_size devices, behind one
    # front end that balances requests over them.
    data_parallel_size: int = 1
    # Which of them this engine is (set by the front end for each core it starts; the core of
    # rank r runs on devices r*world .. r*world+world-1, world = tensor x pipeline parallel size).
    data_parallel_rank: int = 0
    # How the front end picks a core for each request (core/load_balance.py): "load", the
    # cores' reported queues (waiting weighs 4x running, as vLLM's DP client), or "tokens", the
    # prompt + generated tokens the front end has seen per core.
    data_parallel_balance: str = "load"
    # Expert parallelism for MoE models (docs/parallelism.md): the routed experts are split by
    # expert over the tensor-parallel group (rank r holds experts [r*E/T, (r+1)*E/T) whole)
    # instead of each rank holding a slice of every expert; attention stays tensor-parallel.
    enable_expert_parallel: bool = False
    distributed_executor_backend: Optional[str] = None  # uni, mp, ray; None: uni for one device, else mp
    # Schedule step N+1 while step N runs on the device (its sampled ids fed on the device).
    # None: on for GPU backends without pipeline stages.
    async_scheduling: Optional[bool] = None
    # vLLM's --scheduling-policy (core/request_queue.py): "fcfs", first come, first served
    # (a request's priority must be 0), or "priority": waiting requests by (priority, arrival
    # time), lower first, and the lowest-priority running request preempted when blocks run out.
    scheduling_policy: str = "fcfs"
    # Decode micro-batch overlap (core/decode_overlap.py, cuda; vLLM's --enable-dbo in spirit):
    # a step with at least decode_overlap_min_batch decode rows runs as two micro-batches, one's
    # attention on a side stream beside the other's GEMMs: "mixed" steps (decodes + at least
    # decode_overlap_min_prefill prefill tokens) split into their decodes and their prefill,
    # "decode" steps (pure decode) into halves, "all" both. The carve-out: multiprocessors the
    # split step's GEMMs leave to the attention. None: TESSELLM_DECODE_OVERLAP (off),
    # TESSELLM_DECODE_OVERLAP_STEPS (mixed), _MIN_ROWS (128), _MIN_PREFILL (512), _SM_CARVEOUT
    # (unset: cuBLAS's own grid).
    enable_decode_overlap: Optional[bool] = None
    decode_overlap_steps: Optional[str] = None
    decode_overlap_min_batch: Optional[int] = None
    decode_overlap_min_prefill: Optional[int] = None
    decode_overlap_sm_carveout: Optional[int] = None
    # Run every kernel variant serving can hit before the engine says ready (core/warmup.py).
    # None: on in the serving engine process, off for LLM(...) (a batch job pays it once anyway).
    kernel_warmup: Optional[bool] = None
    # Run ``device``'s backend on host tensors, its device absent (tessellm.backends.emulation).
    emulate: bool = False
    # Speculative decoding (tessellm.spec_decode): a JSON string or a dict, e.g.
    # {"method": "ngram", "num_speculative_tokens": 3}; None: off.
    speculative_config: Optional[object] = None
    # Multi-LoRA (docs/lora.md): serve PEFT adapters on this model, batched in one step.
    enable_lora: bool = False
    max_loras: int = 4  # adapters in device slots at once (a step holds at most this many)
    max_cpu_loras: Optional[int] = None  # adapters cached in host memory; None: max(max_loras, 8)
    max_lora_rank: int = 64  # the largest adapter rank served (slots are this wide)
    # Default sampling from the model's generation_config.json (tessellm/generation_config.py):
    # "auto" (the model's), "vllm" (none: neutral defaults) or a directory holding one.
    generation_config: str = "auto"
    # Laid over those defaults: a dict or its JSON, e.g. {"temperature": 0.5}.
    override_generation_config: Optional[object] = None
    # Image inputs (docs/multimodal.md): items per prompt at most, e.g. {"image": 2} or its
    # JSON (vLLM's flag); None: 1 image for a model that takes images.
    limit_mm_per_prompt: Optional[object] = None
    # vLLM's engine-wide image processor settings, a dict or its JSON (e.g. {"max_pixels": 200704}
    # for the Qwen2-VL family); a request's own mm_processor_kwargs are laid over them.
    mm_processor_kwargs: Optional[object] = None
    # file:// image URLs in chat messages are read only under this directory; None: refused.
    allowed_local_media_path: Optional[str] = None
    # http(s) image URLs are fetched only from these hosts (a list, its JSON or "a.com,b.org";
    # vLLM's --allowed-media-domains); None: from any host.
    allowed_media_domains: Optional[object] = None
    # Never end a prefill chunk inside an image's placeholder tokens (vLLM's flag): a chunk
    # that would stops before the image, which comes whole in a later step.
    disable_chunked_mm_input: bool = False
    # Reasoning models (tessellm/reasoning/): deepseek_r1 or qwen3 splits the thinking out of the
    # answer at the server, and structured output constrains only the answer; None: off.
    reasoning_parser: Optional[str] = None
    # A Python file registering vLLM-style reasoning parsers (tessellm/reasoning/plugins.py),
    # loaded in the server and the engine core; its names join --reasoning-parser's.
    reasoning_parser_plugin: Optional[str] = None
    # vLLM's ReasoningConfig (a dict or its JSON): {"reasoning_start_str": "<think>",
    # "reasoning_end_str": "</think>", "reasoning_parser": NAME}, the markers a request's
    # thinking_token_budget counts after and forces (tessellm/reasoning/budget.py); unset keys
    # come from the reasoning parser. None: the parser's markers.
    reasoning_config: Optional[object] = None
    # Embedding models (tessellm.pooling, docs/pooling.md): "generate", "pooling", or "auto"
    # (a bare *Model architecture pools); task="embed" and convert="embed" are vLLM's older
    # spellings of runner="pooling"; convert="classify" serves a *ForCausalLM as a classifier.
    runner: str = "auto"
    task: Optional[str] = None
    convert: str = "auto"
    # How a pooling engine pools: a dict or its JSON, {"pooling_type": "LAST" | "MEAN" | "CLS",
    # "normalize": bool}, laid over the checkpoint's sentence-transformers config.
    pooler_config: Optional[object] = None
    override_pooler_config: Optional[object] = None  # vLLM's older name, laid over pooler_config
    # config.json values laid over the checkpoint's, a dict or its JSON (vLLM's hf_overrides), e.g.
    # {"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["no", "yes"],
    # "is_original_qwen3_reranker": true}: tessellm.pooling.convert.
    hf_overrides: Optional[object] = None
    # Sleep mode (docs/sleep_mode.md): LLM.sleep / wake_up free and restore the device memory of
    # the weights and the KV cache between generation phases (RLHF).
    enable_sleep_mode: bool = False
    # Prompts given as embeddings ({"prompt_embeds": tensor[tokens, hidden]}; the completions
    # API's base64 torch.save bytes), vLLM's flag (tessellm/core/prompt_embeds.py).
    enable_prompt_embeds: bool = False
    # The Prometheus names of /metrics and LLM.get_metrics() (tessellm/metrics/names.py):
    # "tessellm" (tessellm:NAME), "vllm" (vLLM's vllm:NAME names and labels, for dashboards,
    # autoscalers and routers written for vLLM) or "both"; None: TESSELLM_METRICS_NAMES, else
    # tessellm.
    metrics_names: Optional[str] = None
    # vLLM's KV block residency histograms (kv_block_lifetime_seconds, ...; docs/metrics.md):
    # off by default; on, a fraction kv_cache_metrics_sample of the KV blocks is followed.
    kv_cache_metrics: bool = False
    kv_cache_metrics_sample: float = 0.01
    # Custom logits processors (docs/logits_processors.md; vLLM's): classes of
    # tessellm.sample.logits_processor.LogitsProcessor or their names ("module:Class"), built
    # in the process that samples; those installed under the entry point groups
    # tessellm.logits_processors and vllm.logits_processors are added. None: only those.
    logits_processors: Optional[list] = None

    def __post_init__(self) -> None:
        if isinstance(self.dtype, torch.dtype):  # vLLM's LLM(dtype=torch.bfloat16)
            self.dtype = str(self.dtype).removeprefix("torch.")

    def validate(self) -> None:
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"dtype {self.dtype!r} is not supported; use auto, float32, bfloat16 or "
                             "float16 (or torch.float32, torch.bfloat16, torch.float16).")
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy", "sharded_state"):
            raise ValueError(f"load_format {self.load_format!r} is not supported; "
                             "use auto, safetensors, gguf, dummy or sharded_state.")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two up to 128, got {self.block_size}.")
        if self.distributed_executor_backend not in (None, "uni", "mp", "ray"):
            raise ValueError(f"distributed_executor_backend {self.distributed_executor_backend!r} is "
                             "not supported; use mp (processes on this host) or ray.")
        for name in ("max_num_seqs", "max_num_batched_tokens", "num_kv_blocks", "max_model_len",
                     "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "max_loras",
                     "max_cpu_loras", "max_lora_rank"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        least = {"decode_overlap_min_batch": 2, "decode_overlap_min_prefill": 1,
                 "decode_overlap_sm_carveout": 0}
        for name, low in least.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < low):
                raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}; leave "
                                 "it unset for the default.")
        from tessellm.core.request_queue import check_policy

        check_policy(self.scheduling_policy)
        if self.decode_overlap_steps not in (None, "mixed", "decode", "all"):
            raise ValueError(f"decode_overlap_steps {self.decode_overlap_steps!r} is not "
                             "supported; use mixed, decode or all.")
        snaps = self.recurrent_state_snapshots
        if snaps is not None and (not isinstance(snaps, int) or snaps < 0):
            raise ValueError(f"recurrent_state_snapshots must be an integer >= 0, got {snaps!r}.")
        every = self.recurrent_state_snapshot_interval
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise ValueError("recurrent_state_snapshot_interval must be an integer >= 0 (blocks; "
                             f"0: off), got {every!r}.")
        rank = self.data_parallel_rank
        if not isinstance(rank, int) or not 0 <= rank < self.data_parallel_size:
            raise ValueError(f"data_parallel_rank must be in 0..{self.data_parallel_size - 1}, got "
                             f"{self.data_parallel_rank!r}; leave it unset (the front end sets it).")
        if self.data_parallel_balance not in ("load", "tokens"):
            raise ValueError(f"data_parallel_balance {self.data_parallel_balance!r} is not supported; "
                             "use load (the cores' reported queues, the default) or tokens (the "
                             "tokens the front end has seen per core).")
        if self.data_parallel_size > 1 and self.distributed_executor_backend == "ray":
            raise ValueError("data_parallel_size > 1 runs its engine cores on this host; with "
                             "distributed_executor_backend='ray' scale out with Ray Serve replicas "
                             "instead (tessellm serve --ray --num-replicas N, docs/ray_serve.md).")
        if self.enable_expert_parallel and self.tensor_parallel_size == 1:
            raise ValueError("enable_expert_parallel splits the experts over the tensor-parallel "
                             "group, but tensor_parallel_size is 1; set tensor_parallel_size > 1 "
                             "or drop enable_expert_parallel.")
        if self.async_scheduling and self.pipeline_parallel_size > 1:
            raise ValueError("async_scheduling does not combine with pipeline_parallel_size > 1 "
                             "(stages already overlap batches); leave it unset.")
        if self.emulate and self.device == "auto":
            raise ValueError("emulate needs an explicit device (device='xpu', emulate=True): "
                             "'auto' picks only among available backends.")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        self._validate_speculative()
        self._validate_logits_processors()
        from tessellm.metrics.names import resolve_metrics_names

        resolve_metrics_names(self.metrics_names)
        from tessellm.metrics.kv_residency import check_sample_rate

        check_sample_rate(self.kv_cache_metrics_sample)
        if self.enable_prompt_embeds and self.speculative_config is not None:
            raise ValueError("enable_prompt_embeds does not combine with speculative decoding yet "
                             "(a drafter reads token ids); drop one of them.")
        from tessellm.core.kv_offload import check_kv_offloading_args

        check_kv_offloading_args(self.kv_offloading_size, self.kv_offloading_backend)
        if self.kv_offloading_size is not None and not self.enable_prefix_caching:
            raise ValueError("kv_offloading_size keeps evicted prefix-cache blocks in host memory, "
                             "but enable_prefix_caching is off; turn prefix caching on or drop "
                             "kv_offloading_size.")
        self._validate_kv_transfer()
        from tessellm.reasoning.parsers import check_reasoning_parser

        check_reasoning_parser(self.reasoning_parser, self.reasoning_parser_plugin)
        from tessellm.reasoning.budget import check_reasoning_config

        check_reasoning_config(self.reasoning_config, self.reasoning_parser, self.reasoning_parser_plugin)
        from tessellm.pooling.config import check_runner_args, parse_pooler_override

        check_runner_args(self.runner, self.task, self.convert)
        parse_pooler_override(self.pooler_config)
        parse_pooler_override(self.override_pooler_config)
        from tessellm.pooling.convert import parse_hf_overrides

        parse_hf_overrides(self.hf_overrides)
        from tessellm.loader.sharded_state import extra_config_pattern

        extra_config_pattern(self.model_loader_extra_config, self.load_format)
        from tessellm.generation_config import check_choice, parse_override

        check_choice(self.generation_config)
        parse_override(self.override_generation_config)
        from tessellm.multimodal.limits import check_media_path, parse_mm_limits

        parse_mm_limits(self.limit_mm_per_prompt)
        check_media_path(self.allowed_local_media_path)
        from tessellm.multimodal.fetch import parse_media_domains

        parse_media_domains(self.allowed_media_domains)

    def _validate_logits_processors(self) -> None:
        if self.logits_processors is None:
            return
        if isinstance(self.logits_processors, (str, type)):
            self.logits_processors = [self.logits_processors]  # one given alone
        if not isinstance(self.logits_processors, (list, tuple)):
            raise ValueError("logits_processors takes a list of LogitsProcessor classes or their names "
                             f"('module:Class'), got {type(self.logits_processors).__name__}.")
        from tessellm.sample.logits_processor.load import load_class

        for spec in self.logits_processors:
            load_class(spec)  # importable and a LogitsProcessor: refused here, with its name

    def spawn_dict(self) -> dict:
        """The fields for another process (worker ranks, the serving engine core): classes of
        ``logits_processors`` by name, as that process imports them."""
        from tessellm.sample.logits_processor.load import spawn_names

        return {**dataclasses.asdict(self), "logits_processors": spawn_names(self.logits_processors)}

    def _validate_kv_transfer(self) -> None:
        from tessellm.kv_transfer.config import parse_kv_transfer_config

        if parse_kv_transfer_config(self.kv_transfer_config) is None:
            return
        if not self.enable_prefix_caching:
            raise ValueError("kv_transfer_config keys KV blocks by their prefix hashes, but "
                             "enable_prefix_caching is off; turn prefix caching on or drop "
                             "kv_transfer_config.")
        if self.pipeline_parallel_size > 1:
            raise ValueError("kv_transfer_config does not combine with pipeline_parallel_size > 1 "
                             "yet; use tensor parallelism.")

    def _validate_speculative(self) -> None:
        from tessellm.spec_decode.config import parse_speculative_config

        if parse_speculative_config(self.speculative_config) is None:
            return
        if self.pipeline_parallel_size > 1:
            raise ValueError("speculative_config does not combine with pipeline_parallel_size > 1 "
                             "yet; use tensor parallelism.")


@dataclass
class ModelSource:
    """Where a model's pieces come from."""

    path: str  # a directory (config.json) or a .gguf file
    kind: str  # "dir" or "gguf"
    hf_config: object = field(repr=False)
    has_tokenizer: bool = True


def text_config(hf_config):
    """The language model's config: ``text_config`` of a multimodal model (LLaVA), else the
    config itself. Vocabulary, heads and context length are read from it."""
    get = getattr(hf_config, "get_text_config", None)
    return hf_config if get is None else get()


def resolve_async_scheduling(args: EngineArgs, device_type: str) -> bool:
    """Whether the engine schedules one step ahead. Default: where it pays, on accelerators
    (a CPU step has no device to overlap with; the host does the whole step)."""
    if args.async_scheduling is not None:
        return args.async_scheduling
    if args.speculative_config is not None:
        # Opt-in with speculation (async_scheduling=True, core/spec_ahead.py): a step ahead
        # waits for the step before's tokens in the runner. On an H200 it keeps F at 0.96x of
        # plain (0.93x without); the cuda greedy-equality tests have not run with it yet.
        return False
    return device_type not in ("cpu", "xla") and args.pipeline_parallel_size == 1


def resolve_model(model: Optional[str]) -> ModelSource:
    """Find the model: the bundled default, a .gguf file, a directory, or a cached HF repo."""
    if model is None:
        from tessellm.loader.default_model import default_model_path

        model = default_model_path()
    from tessellm.loader.default_model import BUNDLED_MODELS, bundled_model_path

    if model in BUNDLED_MODELS:
        model = bundled_model_path(model)
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"GGUF file {model} does not exist.")
        from tessellm.loader.gguf_loader import load_gguf_config

        return ModelSource(model, "gguf", load_gguf_config(model))
    path = model if os.path.isdir(model) else _from_hf_cache(model)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json; give a model directory or a .gguf file.")
    from tessellm.loader.transformers_classes import auto_config

    config = auto_config(path)  # a model type newer than this transformers: one clear error
    has_tok = any(os.path.exists(os.path.join(path, f))
                  for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    return ModelSource(path, "dir", config, has_tok)


def _from_hf_cache(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise FileNotFoundError(
            f"Model {repo_id!r} is neither a local directory, a .gguf file, nor in the local "
            "Hugging Face cache (tessellm never downloads weights); download it first.") from exc


def resolve_dtype(requested: str, hf_config, device_type: str) -> torch.dtype:
    """'auto': float32 on the cpu; otherwise the checkpoint's dtype, with float32 -> bfloat16."""
    if requested != "auto":
        return _DTYPES[requested]
    if device_type == "cpu":
        return torch.float32
    dtype = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype, torch.bfloat16)
    if dtype in (torch.float16, torch.bfloat16):
        return dtype
    return torch.bfloat16


_PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta")  # learned positions start past padding_idx


def resolve_max_model_len(requested: Optional[int], hf_config) -> int:
    """Default and limit: max_position_embeddings (2048 without one), extended by a yarn
    rope scaling (``layers.rope_config.rope_max_positions``)."""
    from tessellm.layers.rope_config import rope_max_positions

    limit = 2048
    if getattr(hf_config, "max_position_embeddings", None):
        limit = rope_max_positions(hf_config)
    if getattr(hf_config, "model_type", None) in _PADDING_OFFSET_POSITIONS:
        # RoBERTa counts positions from padding_idx + 1 (models/bert.py): 514 rows hold 512.
        limit -= int(getattr(hf_config, "pad_token_id", None) or 0) + 1
    if requested is None:
        return int(limit)
    if requested > limit:
        raise ValueError(f"max_model_len {requested} exceeds the model's maximum length {limit} "
                         f"(max_position_embeddings, extended by yarn rope scaling); use at most "
                         f"{limit}.")
    return requested


def generation_eos_ids(source: ModelSource) -> list[int]:
    """EOS ids from config.json and generation_config.json (Llama 3 lists several)."""
    ids: list[int] = []
    for value in (getattr(source.hf_config, "eos_token_id", None),
                  getattr(text_config(source.hf_config), "eos_token_id", None), _gen_config_eos(source)):
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, (list, tuple)):
            ids.extend(int(v) for v in value)
    return sorted(set(ids))


def _gen_config_eos(source: ModelSource):
    if source.kind != "dir":
        return None
    path = os.path.join(source.path, "generation_config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("eos_token_id")
