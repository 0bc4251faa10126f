"""The engine's command-line flags, generated from the one definition: ``tessellm.config.EngineArgs``.

``tessellm serve``, ``tessellm generate``, ``bench throughput``, ``bench latency`` and
``bench serve --launch`` all call ``add_engine_arguments``; ``LLM(...)`` takes the same names as
keyword arguments and the Ray Serve config's ``engine`` section the same names as keys. A field
added to ``EngineArgs`` becomes a flag everywhere at once (a test checks every field has help).

Flags are the field names with dashes (``max_num_seqs`` -> ``--max-num-seqs``); booleans get a
``--no-`` form. Fields that are not engine flags (``model``, which each command takes its own way,
and the server's ``served_model_name`` / ``chat_template``) are left out.
"""

from __future__ import annotations

import argparse
import json
import dataclasses
from typing import Optional

from tessellm.config import EngineArgs
from tessellm.entrypoints.vllm_args import add_vllm_engine_arguments, engine_overrides, parsed_vllm_args
from tessellm.reasoning.parsers import REASONING_PARSERS
from tessellm.sample.logits_processor.load import spawn_names

DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"  # the bundled model's name when MODEL is omitted

# Fields set elsewhere than the engine group (the command's MODEL, the server group's flags).
NOT_FLAGS = frozenset({"model", "served_model_name", "chat_template",
                       "data_parallel_rank"})  # set by the front end for each core it starts

HELP = {
    "device": "auto, cpu, cuda, rocm, xpu, tpu or a plugin's backend name",
    "dtype": "auto, float32, bfloat16 or float16",
    "max_model_len": "context length (default: the model's)",
    "block_size": "tokens per KV cache block",
    "num_kv_blocks": "KV cache blocks (default: sized from free memory)",
    "gpu_memory_utilization": "fraction of device memory the engine may use",
    "max_num_seqs": "running requests at most",
    "max_num_batched_tokens": "tokens per step at most (default: 2048 on the cpu, else 16384)",
    "enable_prefix_caching": "share KV blocks of equal prompt prefixes",
    "kv_offloading_size": "GiB of host memory (over all ranks) that keeps KV blocks evicted from "
                          "the device cache for later prefix-cache hits, copied back instead of "
                          "recomputed (default: off; docs/kv_offload.md)",
    "kv_transfer_config": "a KV connector as JSON (docs/kv_transfer.md), e.g. '{\"kv_connector\": "
                          "\"SharedStorageConnector\", \"kv_role\": \"kv_both\", "
                          "\"kv_connector_extra_config\": {\"shared_storage_path\": \"/tmp/kv\"}}'",
    "kv_offloading_backend": "native: tessellm's own host tier (the only one; needs "
                             "--kv-offloading-size)",
    "recurrent_state_snapshots": "models with Mamba / gated DeltaNet layers: recurrent states kept "
                                 "at cached block boundaries for prefix-cache hits, out of the KV "
                                 "cache memory (default: a quarter of it; 0: no prefix caching "
                                 "for them; docs/state_space.md)",
    "recurrent_state_snapshot_interval": "with those snapshots: a prefill also stops a chunk and "
                                         "keeps the state every N blocks, so the second request "
                                         "sharing a prefix hits it (more steps per prompt; 0: off; "
                                         "docs/state_space.md)",
    "enable_chunked_prefill": "split long prompts over several steps",
    "seed": "random seed (sampling without a per-request seed)",
    "load_format": "auto, safetensors, gguf, dummy (random weights) or sharded_state (each "
                   "rank's own files, written by save_sharded_state; docs/parallelism.md)",
    "enforce_eager": "no graph capture",
    "tokenizer": "a directory with tokenizer files (default: the model's)",
    "kv_cache_dtype": "auto | fp8 (e4m3 cache with per-tensor scales; cuda)",
    "quantization": "int8 | fp8 | awq | gptq | gguf; unset: the checkpoint's own",
    "tensor_parallel_size": "split each layer over this many devices",
    "pipeline_parallel_size": "split the layers into this many stages, one device group each",
    "data_parallel_size": "run this many engine cores on this host, each on its own "
                          "tensor x pipeline parallel devices, requests balanced over them "
                          "(docs/parallelism.md)",
    "data_parallel_balance": "with -dp N: load (the cores' reported waiting and running requests, "
                             "free slots and KV blocks; waiting weighs 4x running) or tokens (the "
                             "prompt + generated tokens the front end has seen per core) "
                             "(default: load; docs/parallelism.md)",
    "enable_expert_parallel": "MoE: split the routed experts by expert over the tensor-parallel "
                              "ranks (each holds E/T whole experts) instead of slicing every "
                              "expert (docs/parallelism.md)",
    "distributed_executor_backend": "mp: worker processes on this host (default); ray: Ray actors, across nodes",
    "async_scheduling": "schedule step N+1 while step N runs (default: on for GPUs, off on the cpu and with a speculative_config)",
    "scheduling_policy": "fcfs (first come, first served; a request's priority must be 0) or "
                         "priority (waiting requests by their priority, lower first, then arrival; "
                         "the lowest-priority running request is the one preempted)",
    "enable_decode_overlap": "cuda: split steps with at least --decode-overlap-min-batch decode "
                             "rows into two micro-batches, one's attention on a side stream beside "
                             "the other's GEMMs (default: TESSELLM_DECODE_OVERLAP, off; "
                             "docs/architecture.md)",
    "decode_overlap_steps": "with --enable-decode-overlap: which steps split: mixed (decodes | "
                            "prefill chunks of a chunked-prefill step), decode (pure-decode steps "
                            "in halves) or all (default: mixed)",
    "decode_overlap_min_batch": "with --enable-decode-overlap: the fewest decode rows (graph steps: "
                                "the padded size) a step splits at (default 128)",
    "decode_overlap_min_prefill": "with --enable-decode-overlap: a mixed split's fewest prefill "
                                  "tokens beside the decodes (default 512)",
    "decode_overlap_sm_carveout": "with --enable-decode-overlap: multiprocessors the GEMMs of a "
                                  "split step leave to the attention beside them (cuBLASLt's SM "
                                  "count target; default: unset, cuBLAS's own grid)",
    "kernel_warmup": "run every kernel variant serving can hit before ready "
                     "(default: on when serving, off for LLM(...) and the benches)",
    "speculative_config": "speculative decoding as JSON, e.g. '{\"method\": \"ngram\", "
                          "\"num_speculative_tokens\": 3}' (methods: ngram, draft_model, eagle, eagle3, "
                          "replay; docs/speculative_decoding.md)",
    "emulate": "run --device's backend on CPU tensors, its device absent (log lines and "
               "/version say emulated; for plugin authors and the CI lanes)",
    "enable_lora": "serve LoRA adapters (PEFT) on the model, several in one batch (docs/lora.md)",
    "max_loras": "LoRA adapters on the device at once (requests for others wait)",
    "max_cpu_loras": "LoRA adapters cached in host memory (default: max(max_loras, 8))",
    "max_lora_rank": "the largest LoRA rank served; slots are this wide",
    "generation_config": "default sampling (temperature, top_p, top_k, min_p, repetition_penalty, "
                         "max_new_tokens) for fields a request leaves unset: auto (the model's "
                         "generation_config.json, as vLLM), vllm (none) or a directory holding one",
    "override_generation_config": "JSON laid over those defaults, e.g. '{\"temperature\": 0.5}'",
    "limit_mm_per_prompt": "images per prompt at most, as JSON, e.g. '{\"image\": 2}' "
                           "(default: 1 for a model that takes images; '{\"image\": 0}' serves "
                           "an image-text checkpoint text-only, without its vision tower; "
                           "docs/multimodal.md)",
    "mm_processor_kwargs": "the image processor settings every request starts from, as JSON, e.g. "
                           "'{\"max_pixels\": 200704}' (the keys each family takes: docs/multimodal.md); "
                           "a request's own mm_processor_kwargs are laid over them",
    "disable_chunked_mm_input": "never end a prefill chunk inside an image's placeholder tokens: "
                                "the chunk stops before the image, which comes whole in a later "
                                "step (each image must fit --max-num-batched-tokens)",
    "allowed_local_media_path": "a directory whose images chat messages may name as file:// URLs "
                                "(default: none; file:// URLs are refused)",
    "allowed_media_domains": "hosts that http(s) image URLs may name, e.g. 'example.com,cdn.example.org' "
                             "(default: any; docs/multimodal.md)",
    "reasoning_parser": "split a thinking model's reasoning from its answer (reasoning_content) and "
                        "apply structured output to the answer only: " + ", ".join(sorted(REASONING_PARSERS)) +
                        " (openai_gptoss: gpt-oss's harmony channels, the default for a gpt-oss model), or a "
                        "name --reasoning-parser-plugin registers (docs/reasoning.md)",
    "reasoning_parser_plugin": "a Python file registering reasoning parsers written to vLLM's interface "
                               "(@ReasoningParserManager.register_module(\"NAME\"), imported from "
                               "tessellm.reasoning.plugins); name one with --reasoning-parser NAME",
    "reasoning_config": "vLLM's reasoning config as JSON: the markers a request's thinking_token_budget "
                        "counts after and forces, e.g. '{\"reasoning_start_str\": \"<think>\", "
                        "\"reasoning_end_str\": \"</think>\"}' (default: the --reasoning-parser's own; "
                        "docs/reasoning.md)",
    "runner": "auto, generate or pooling (embedding models, /v1/embeddings; *ForSequenceClassification: "
              "/classify, /score, /rerank; auto: a bare *Model or a classifier pools, others generate; "
              "docs/pooling.md)",
    "task": "vLLM's older spelling: embed, classify or score (= --runner pooling), or generate",
    "convert": "embed: serve a *ForCausalLM checkpoint as an embedding model; classify: as its family's "
               "*ForSequenceClassification (the score head from the checkpoint's score.weight, or from "
               "LM-head rows with --hf-overrides classifier_from_token); both mean --runner pooling",
    "model_loader_extra_config": "vLLM's loader settings as JSON; only '{\"pattern\": "
                                 "\"NAME-{rank}-{part}.safetensors\"}': the file name a sharded "
                                 "state was saved under (--load-format sharded_state; "
                                 "docs/parallelism.md)",
    "hf_overrides": "JSON laid over the checkpoint's config.json, e.g. '{\"architectures\": "
                    "[\"Qwen3ForSequenceClassification\"], \"classifier_from_token\": [\"no\", \"yes\"], "
                    "\"is_original_qwen3_reranker\": true}' (docs/pooling.md)",
    "pooler_config": "pooling as JSON, e.g. '{\"pooling_type\": \"MEAN\", \"normalize\": true}' "
                     "(LAST, MEAN or CLS; default: the checkpoint's sentence-transformers config, else LAST); "
                     "a classifier's '{\"use_activation\": false}' gives logits instead of probabilities",
    "override_pooler_config": "vLLM's older name for --pooler-config (laid over it)",
    "enable_prompt_embeds": "accept prompts given as embeddings: {\"prompt_embeds\": tensor[tokens, hidden]} "
                            "offline, base64 torch.save bytes in /v1/completions' prompt_embeds",
    "metrics_names": "the Prometheus names of /metrics and LLM.get_metrics(): tessellm "
                     "(tessellm:NAME), vllm (vLLM's vllm:NAME names and labels, for dashboards, "
                     "autoscalers and routers written for vLLM) or both (unset: "
                     "TESSELLM_METRICS_NAMES, else tessellm; docs/metrics.md)",
    "kv_cache_metrics": "export vLLM's sampled KV block residency histograms: kv_block_lifetime_seconds, "
                        "kv_block_idle_before_evict_seconds, kv_block_reuse_gap_seconds (docs/metrics.md)",
    "kv_cache_metrics_sample": "with --kv-cache-metrics: the fraction of KV blocks followed, in (0, 1]",
    "logits_processors": "custom logits processors (vLLM's interface): module:Class or "
                         "package.module.Class names of tessellm.sample.logits_processor."
                         "LogitsProcessor subclasses; per-request arguments in a request's "
                         "vllm_xargs (docs/logits_processors.md)",
    "enable_sleep_mode": "allow sleep / wake_up: free the device memory of the weights and KV cache "
                         "between generation phases (RLHF; server: /sleep, /wake_up and /is_sleeping "
                         "with TESSELLM_SERVER_DEV_MODE=1; docs/sleep_mode.md)",
}
NARGS = {"logits_processors": "+"}  # flags that take several values
SHORT = {"tensor_parallel_size": "-tp", "pipeline_parallel_size": "-pp", "data_parallel_size": "-dp",
         "quantization": "-q"}
CHOICES = {"distributed_executor_backend": ["uni", "mp", "ray"], "data_parallel_balance": ["load", "tokens"],
           "metrics_names": ["tessellm", "vllm", "both"],
           "decode_overlap_steps": ["mixed", "decode", "all"], "scheduling_policy": ["fcfs", "priority"],
           "runner": ["auto", "generate", "pooling"], "convert": ["auto", "none", "embed", "classify"]}


def engine_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(EngineArgs) if f.name not in NOT_FLAGS]


def _kind(f: dataclasses.Field) -> type:
    """The flag's type from the field's annotation (a string under postponed evaluation)."""
    annotation = str(f.type).replace("typing.", "")
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if annotation in (name, f"Optional[{name}]"):
            return kind
    return str


def add_engine_arguments(parser: argparse.ArgumentParser, **defaults) -> argparse.ArgumentParser:
    """Add every engine flag to ``parser`` (one group); ``defaults`` override EngineArgs' own."""
    group = parser.add_argument_group("engine (the same for serve, LLM(...), bench, Ray Serve)")
    base = EngineArgs()
    for f in engine_fields():
        names = [f"--{f.name.replace('_', '-')}"] + ([SHORT[f.name]] if f.name in SHORT else [])
        default = defaults.get(f.name, getattr(base, f.name))
        kind = _kind(f)
        kwargs = {"dest": f.name, "default": default, "help": f"{HELP[f.name]} (default: {default})"}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
        if f.name in CHOICES:
            kwargs["choices"] = CHOICES[f.name]
        if f.name in NARGS:
            kwargs["nargs"] = NARGS[f.name]
        group.add_argument(*names, **kwargs)
    add_vllm_engine_arguments(parser)  # vLLM's names tessellm has no field of its own for
    return parser


def engine_args_from(args: argparse.Namespace, model: Optional[str] = None, **overrides) -> EngineArgs:
    """EngineArgs from parsed flags (those a parser lacks keep EngineArgs' defaults)."""
    values = {f.name: getattr(args, f.name) for f in engine_fields() if hasattr(args, f.name)}
    served = getattr(args, "served_model_name", None)
    if served:
        values["served_model_name"] = served[0] if isinstance(served, list) else served
    if getattr(args, "chat_template", None) is not None:
        values["chat_template"] = args.chat_template
    model, vllm = engine_overrides(parsed_vllm_args(args), model, values)
    return EngineArgs(model=model, **{**values, **vllm, **overrides})


def engine_flags(args: EngineArgs) -> list[str]:
    """The command line that gives ``args`` back (``bench serve --launch`` starts a server with it)."""
    out: list[str] = []
    base = EngineArgs()
    for f in engine_fields():
        value = getattr(args, f.name)
        if value == getattr(base, f.name):
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{flag[2:]}")
        elif f.name in NARGS:
            out += [flag, *spawn_names(value)]
        elif isinstance(value, (dict, list)):
            out += [flag, json.dumps(value)]
        else:
            out += [flag, str(value)]
    return out
