"""The layers through the cuda backend's Triton LoRA ops, emulated on the CPU (Triton's
interpreter): a mixed batch's greedy tokens equal HF with each adapter merged (float32)."""

from __future__ import annotations

import os

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.lora import LoRARequest
from tests.lora.adapters import merged_greedy, write_random_adapter

PROMPTS = [[5, 6, 7, 100], [9, 9, 200], list(range(1, 18))]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_triton_ops_mixed_batch(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama-sharp")
    write_random_adapter(str(tmp_path / "a"), model, 16, ["q_proj", "v_proj", "o_proj", "down_proj",
                                                           "gate_proj", "up_proj"], 32, 0)
    write_random_adapter(str(tmp_path / "b"), model, 8, ["k_proj", "up_proj"], 16, 1)
    names = ["a", None, "b"]
    llm = LLM(model, device="cuda", emulate=True, dtype="float32", enable_lora=True,
              max_lora_rank=16, max_loras=2)
    assert getattr(llm.engine.core.runner.lora.batch.ops, "supports_graph_capture", False)
    loras = {"a": LoRARequest("a", 1, str(tmp_path / "a")), "b": LoRARequest("b", 2, str(tmp_path / "b"))}
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), use_tqdm=False,
                        lora_request=[loras.get(n) for n in names])
    for out, prompt, name in zip(outs, PROMPTS, names):
        adapter = str(tmp_path / name) if name else None
        assert out.outputs[0].token_ids == merged_greedy(model, adapter, [prompt], 6, "cpu", torch.float32)[0]
