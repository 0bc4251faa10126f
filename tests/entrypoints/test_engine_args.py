"""One set of engine arguments: every command parses the same flags into the same EngineArgs."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from tessellm.config import EngineArgs
from tessellm.entrypoints.cli import build_parser
from tessellm.entrypoints.engine_args import HELP, NOT_FLAGS, engine_args_from, engine_flags

# A non-default value for every engine flag (the test fails when a field is added without one).
NON_DEFAULT = {
    "device": "cpu", "dtype": "float32", "max_model_len": 512, "block_size": 8, "num_kv_blocks": 64,
    "gpu_memory_utilization": 0.5, "max_num_seqs": 7, "max_num_batched_tokens": 333,
    "enable_prefix_caching": False, "enable_chunked_prefill": False, "seed": 11, "load_format": "dummy",
    "enforce_eager": True, "tokenizer": "/tmp/tok", "kv_cache_dtype": "fp8", "quantization": "int8",
    "tensor_parallel_size": 2, "pipeline_parallel_size": 2, "data_parallel_size": 2,
    "data_parallel_balance": "tokens",
    "distributed_executor_backend": "ray",
    "async_scheduling": True, "scheduling_policy": "priority", "kernel_warmup": False, "emulate": True,
    "speculative_config": '{"method": "ngram", "num_speculative_tokens": 2}',
    "enable_lora": True, "max_loras": 3, "max_cpu_loras": 9, "max_lora_rank": 16,
    "generation_config": "vllm", "override_generation_config": '{"temperature": 0.5}',
    "limit_mm_per_prompt": '{"image": 2}', "mm_processor_kwargs": '{"max_pixels": 1024}', "allowed_local_media_path": "/tmp",
    "allowed_media_domains": "example.com,cdn.example.org", "disable_chunked_mm_input": True,
    "reasoning_parser": "qwen3", "reasoning_parser_plugin": "/tmp/my_parsers.py",
    "reasoning_config": '{"reasoning_start_str": "<t>", "reasoning_end_str": "</t>"}',
    "runner": "pooling", "task": "embed", "convert": "embed",
    "pooler_config": '{"pooling_type": "MEAN"}', "override_pooler_config": '{"normalize": false}',
    "hf_overrides": '{"num_labels": 1}', "model_loader_extra_config": '{}',
    "kv_offloading_size": 2.5, "kv_offloading_backend": "native", "recurrent_state_snapshots": 5,
    "recurrent_state_snapshot_interval": 4,
    "kv_transfer_config": '{"kv_connector": "SharedStorageConnector"}',
    "enable_sleep_mode": True,
    "enable_prompt_embeds": True,
    "metrics_names": "vllm", "kv_cache_metrics": True, "kv_cache_metrics_sample": 0.5,
    "enable_expert_parallel": True,
    "enable_decode_overlap": True, "decode_overlap_steps": "all", "decode_overlap_min_batch": 64,
    "decode_overlap_min_prefill": 1024, "decode_overlap_sm_carveout": 16,
    "logits_processors": ["pkg.mod:Proc", "pkg.other.Proc2"],
}
COMMANDS = [["serve", "MODEL"], ["generate", "hi", "--model", "MODEL"],
            ["bench", "throughput", "--model", "MODEL"], ["bench", "latency", "--model", "MODEL"],
            ["bench", "serve", "--launch", "--model", "MODEL"]]


def test_every_field_is_a_documented_flag():
    names = {f.name for f in dataclasses.fields(EngineArgs)} - NOT_FLAGS
    assert names == set(HELP), "an EngineArgs field lacks help in engine_args.HELP (or help is stale)"
    assert names == set(NON_DEFAULT)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_commands_share_engine_arguments(command):
    expected = EngineArgs(model="MODEL", **NON_DEFAULT)
    flags = engine_flags(expected)
    args = build_parser().parse_args([*command, *flags])
    assert engine_args_from(args, args.model) == expected


def test_bench_latency_takes_quantization_and_kv_cache_dtype():
    args = build_parser().parse_args(["bench", "latency", "--quantization", "fp8", "--kv-cache-dtype", "fp8"])
    ea = engine_args_from(args, args.model)
    assert (ea.quantization, ea.kv_cache_dtype, ea.enable_prefix_caching) == ("fp8", "fp8", False)


def test_bench_latency_refuses_data_parallel_before_starting_cores():
    from tessellm.entrypoints.bench_latency import run

    args = build_parser().parse_args(["bench", "latency", "--model", "/nonexistent", "-dp", "2"])
    with pytest.raises(SystemExit, match="bench throughput -dp N"):
        run(args)


def test_ray_serve_does_not_import_the_serve_module():
    code = ("import sys, tessellm.entrypoints.ray_serve.config, tessellm.entrypoints.ray_serve.launch;"
            "print('tessellm.entrypoints.serve' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_vllm_serve_command_lines_parse():
    """Flags scripts written for `vllm serve` carry: --model and the no-effect ones."""
    from tessellm.entrypoints.serve import resolve_model_flag

    args = build_parser().parse_args(["serve", "--model", "/m", "--trust-remote-code",
                                      "--disable-log-requests", "--disable-log-stats"])
    resolve_model_flag(args)
    assert engine_args_from(args, args.model).model == "/m"
    both = build_parser().parse_args(["serve", "/a", "--model", "/b"])
    with pytest.raises(SystemExit, match="given twice"):
        resolve_model_flag(both)


def test_bench_sampling_params_go_over_greedy_and_bad_ones_fail_before_the_load():
    """``--sampling-params`` (bench throughput / latency): SamplingParams fields over greedy,
    the workload's lengths kept; bad JSON, a fixed field or an unknown one: one ValueError,
    raised before any model loads (the model path does not exist)."""
    from tessellm.entrypoints.bench_latency import run as latency
    from tessellm.entrypoints.bench_throughput import sampling_params

    args = build_parser().parse_args(["bench", "throughput", "--sampling-params",
                                      '{"temperature": 0.7, "top_p": 0.9}'])
    p = sampling_params(args, 5)
    assert (p.temperature, p.top_p, p.max_tokens, p.ignore_eos) == (0.7, 0.9, 5, True)
    assert sampling_params(build_parser().parse_args(["bench", "latency"]), 3).temperature == 0
    for bad, message in [("{temperature", "not valid JSON"), ('{"max_tokens": 3}', "sets max_tokens"),
                         ('{"tempurature": 1}', "tempurature")]:
        args = build_parser().parse_args(["bench", "latency", "--model", "/nonexistent",
                                          "--sampling-params", bad])
        with pytest.raises(ValueError, match=message):
            latency(args)
