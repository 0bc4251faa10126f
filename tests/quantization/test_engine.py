"""Quantization through the whole engine: ``LLM(model, quantization=..., kv_cache_dtype=...)``
on the bundled SmolLM2, compared with the unquantized model by teacher-forced top-1 agreement
(the share of the unquantized greedy continuation the quantized model also ranks first)."""

from __future__ import annotations

import pytest
import torch

from tessellm.core.sampling_params import SamplingParams
from tessellm.entrypoints.llm import LLM
from tessellm.quantization.loading import quantized_linears, weight_bytes

ON_GPU = torch.cuda.is_available()
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time"]
KW = dict(dtype="float32", max_model_len=256, num_kv_blocks=64, max_num_seqs=4)


@pytest.fixture(scope="module")
def dense(bundled_model):
    llm = LLM(bundled_model, **KW)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    return llm, [(o.prompt_token_ids, o.outputs[0].token_ids) for o in outs]


def _top1_agreement(llm, continuations) -> float:
    score = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p + c} for p, c in continuations], score,
                        use_tqdm=False)
    hits = total = 0
    for (p, c), o in zip(continuations, outs):
        for j, tok in enumerate(c):
            hits += o.prompt_logprobs[len(p) + j][tok].rank == 1
            total += 1
    return hits / total


@pytest.mark.parametrize("scheme, min_agreement, max_linear_ratio", [
    ("int8", 0.95, 0.26), ("fp8", 0.75, 0.26), ("gguf", 1.0, 0.16)])
def test_quantized_engine_agrees_with_unquantized(dense, bundled_model, scheme, min_agreement,
                                                  max_linear_ratio):
    dense_llm, continuations = dense
    llm = LLM(bundled_model, quantization=scheme, **KW)
    model = llm.engine.core.runner.model
    layers = quantized_linears(model)
    assert layers and all(l.quant_method.name == scheme for l in layers.values())
    dense_linear = sum(l.input_size * l.output_size * 4 for l in layers.values())  # fp32
    held = sum(b.nbytes for l in layers.values() for b in l.segments.buffers())
    assert held <= dense_linear * max_linear_ratio
    assert weight_bytes(model) < weight_bytes(dense_llm.engine.core.runner.model)
    assert _top1_agreement(llm, continuations) >= min_agreement


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="the fp8 KV cache is served by the cuda backend")
def test_fp8_kv_cache_engine(dense, bundled_model):
    _, continuations = dense
    llm = LLM(bundled_model, kv_cache_dtype="fp8", **KW)
    core = llm.engine.core
    assert core.kv_dtype == torch.float8_e4m3fn
    assert core.runner.kv_bytes_per_block(core.kv_dtype) * 2 == \
        core.runner.kv_bytes_per_block(torch.bfloat16)
    assert _top1_agreement(llm, continuations) >= 0.9
