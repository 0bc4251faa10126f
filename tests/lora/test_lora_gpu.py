"""On a CUDA GPU: a mixed LoRA batch through the backend's ops (Triton on cuda), eager and with
graphs covering LoRA steps: fp32 greedy tokens equal HF with each adapter merged; in bf16 the
first 16 tokens agree. Adapters are written with safetensors (the GPU image has no peft)."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.lora import LoRARequest
from tests.lora.adapters import merged_greedy, write_random_adapter

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = [[(7 * i + j) % 384 for j in range(n)] for i, n in enumerate([1, 5, 17, 33, 9, 48])]
ADAPTERS = {"qv": (8, ["q_proj", "v_proj"], 16), "all": (16, list(
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), 32)}


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    model = tiny_model_dir("llama-sharp")
    root = tmp_path_factory.mktemp("gpu-adapters")
    paths = {}
    for i, (name, (rank, targets, alpha)) in enumerate(ADAPTERS.items()):
        paths[name] = str(root / name)
        write_random_adapter(paths[name], model, rank, targets, alpha, seed=i)
    return model, paths


def _run(model, paths, dtype, enforce_eager, max_new):
    names = [None, "qv", "all"] * 2
    loras = {n: LoRARequest(n, i + 1, p) for i, (n, p) in enumerate(paths.items())}
    llm = LLM(model, device="cuda", dtype=dtype, enforce_eager=enforce_eager, enable_lora=True,
              max_lora_rank=16, max_loras=2)
    runner = llm.engine.core.runner
    graphs = runner.graph_runner is not None and runner._lora_graphs
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True),
                        use_tqdm=False, lora_request=[loras.get(n) for n in names])
    llm.shutdown()
    return names, [o.outputs[0].token_ids for o in outs], graphs


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_fp32_mixed_batch_matches_merged_hf(setup, enforce_eager):
    model, paths = setup
    names, got, graphs = _run(model, paths, "float32", enforce_eager, 10)
    assert graphs == (not enforce_eager), "cuda's LoRA ops are capturable: graphs cover LoRA"
    for name, prompt, tokens in zip(names, PROMPTS, got):
        want = merged_greedy(model, paths.get(name), [prompt], 10, "cuda", torch.float32)[0]
        assert tokens == want, name


def test_bf16_first_16_tokens_agree(setup):
    model, paths = setup
    names, got, _ = _run(model, paths, "bfloat16", False, 16)
    agree = sum(tokens == merged_greedy(model, paths.get(name), [prompt], 16, "cuda", torch.bfloat16)[0]
                for name, prompt, tokens in zip(names, PROMPTS, got))
    assert agree >= len(PROMPTS) - 1, f"bf16: the first 16 tokens agree on {agree}/{len(PROMPTS)}"
