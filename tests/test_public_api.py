"""The names ``tessellm`` exports at the top level, and vLLM's module paths for them: each in
``__all__`` resolves (``from tessellm import *`` works), and the structured-output params
are the one class ``SamplingParams`` takes, wherever they are imported from."""

from __future__ import annotations

import subprocess
import sys

import tessellm


def test_every_name_in_all_resolves():
    for name in tessellm.__all__:
        assert getattr(tessellm, name) is not None, name
    ns: dict = {}
    exec("from tessellm import *", ns)
    assert set(tessellm.__all__) <= set(ns)


def test_structured_outputs_params_at_the_top_level_and_vllm_path():
    from tessellm import SamplingParams, StructuredOutputsParams
    from tessellm.sampling_params import SamplingParams as S2
    from tessellm.sampling_params import StructuredOutputsParams as P2
    from tessellm.structured_output import StructuredOutputsParams as P3

    assert StructuredOutputsParams is P2 is P3 and SamplingParams is S2
    assert "StructuredOutputsParams" in tessellm.__all__
    params = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="[ab]+"))
    assert params.structured_outputs.regex == "[ab]+"
    params = SamplingParams(max_tokens=4, structured_outputs={"choice": ["x", "y"]})
    assert isinstance(params.structured_outputs, StructuredOutputsParams)


def test_import_tessellm_stays_light():
    """The export costs no import of the model stack or xgrammar (``import tessellm`` is what
    a client that only builds params pays)."""
    code = ("import sys, tessellm; from tessellm import StructuredOutputsParams; "
            "print(sorted(m for m in ('xgrammar', 'tessellm.entrypoints.llm', "
            "'tessellm.structured_output.manager') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_vllm_module_paths_for_prompts_outputs_and_params():
    """``vllm.inputs`` / ``vllm.outputs`` / ``vllm.pooling_params`` / ``RequestOutputKind``'s
    paths, under tessellm's name: the same classes the engine takes and returns."""
    from tessellm.core.sampling_params import RequestOutputKind
    from tessellm.inputs import TextPrompt, TokensPrompt
    from tessellm.outputs import CompletionOutput, PoolingRequestOutput, RequestOutput, ScoringRequestOutput
    from tessellm.pooling.outputs import PoolingRequestOutput as P1
    from tessellm.pooling.outputs import ScoringRequestOutput as S1
    from tessellm.pooling.params import PoolingParams as PP1
    from tessellm.pooling_params import PoolingParams
    from tessellm.sampling_params import BeamSearchParams
    from tessellm.sampling_params import RequestOutputKind as K2

    assert RequestOutput is tessellm.RequestOutput and CompletionOutput is tessellm.CompletionOutput
    assert PoolingRequestOutput is P1 and ScoringRequestOutput is S1 and PoolingParams is PP1
    assert RequestOutputKind is K2 and K2.FINAL_ONLY == 2 and BeamSearchParams is tessellm.BeamSearchParams
    assert TokensPrompt(prompt_token_ids=[1, 2]) == {"prompt_token_ids": [1, 2]}
    assert TextPrompt(prompt="hi", cache_salt="a") == {"prompt": "hi", "cache_salt": "a"}
    assert TokensPrompt.__required_keys__ == {"prompt_token_ids"}


def test_vllm_engine_args_are_classes():
    """``tessellm.EngineArgs`` / ``AsyncEngineArgs`` as vLLM code uses them: classes (the async
    one a subclass) taking vLLM's argument names, whose objects every engine takes
    (``isinstance``, ``dataclasses.replace``) and built from the command line
    (``add_cli_args`` / ``from_cli_args``)."""
    import argparse
    import dataclasses

    from tessellm.config import EngineArgs

    args = tessellm.AsyncEngineArgs(model="m", num_gpu_blocks_override=32, swap_space=4, max_logprobs=5)
    assert isinstance(args, tessellm.EngineArgs) and isinstance(args, EngineArgs)
    assert issubclass(tessellm.AsyncEngineArgs, tessellm.EngineArgs)
    assert (args.model, args.num_kv_blocks) == ("m", 32)
    again = dataclasses.replace(args, max_num_seqs=4)
    assert type(again) is tessellm.AsyncEngineArgs and (again.num_kv_blocks, again.max_num_seqs) == (32, 4)
    parser = tessellm.EngineArgs.add_cli_args(argparse.ArgumentParser())
    cli = parser.parse_args(["--model", "m", "--max-num-seqs", "3", "--num-gpu-blocks-override", "16"])
    parsed = tessellm.EngineArgs.from_cli_args(cli)
    assert type(parsed) is tessellm.EngineArgs and (parsed.model, parsed.max_num_seqs, parsed.num_kv_blocks) == ("m", 3, 16)


def test_vllm_module_paths_for_engine_args_and_configs():
    """``vllm.engine.arg_utils``, ``vllm.config``, ``vllm.utils`` and ``vllm.lora.request`` paths
    the example scripts import from."""
    from tessellm.config import CompilationConfig, KVTransferConfig
    from tessellm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from tessellm.kv_transfer.config import KVTransferConfig as K1
    from tessellm.lora import LoRARequest as L1
    from tessellm.lora.request import LoRARequest
    from tessellm.utils import FlexibleArgumentParser
    from tessellm.utils.argparse_utils import FlexibleArgumentParser as F1

    assert EngineArgs is tessellm.EngineArgs and AsyncEngineArgs is tessellm.AsyncEngineArgs
    assert KVTransferConfig is K1 and LoRARequest is L1 and FlexibleArgumentParser is F1
    config = CompilationConfig(level=3, cudagraph_capture_sizes=[1, 2])
    assert config.level == 3 and config == {"level": 3, "cudagraph_capture_sizes": [1, 2]}


def test_vllm_top_level_prompt_and_output_names():
    """``from vllm import TokensPrompt, EmbeddingRequestOutput, ...`` (vLLM's top level)."""
    import tessellm.inputs
    import tessellm.outputs

    for name in ("TextPrompt", "TokensPrompt", "PromptType"):
        assert getattr(tessellm, name) is getattr(tessellm.inputs, name)
    for name in ("PoolingRequestOutput", "EmbeddingRequestOutput", "ClassificationOutput", "ScoringRequestOutput"):
        assert getattr(tessellm, name) is getattr(tessellm.outputs, name)
