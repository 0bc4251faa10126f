"""LoRA on a quantized base model (int8 weights): the adapters' products run in the model dtype
beside the packed base product. The checkpoint's linears are rounded to the int8 grid first, so
quantizing them loses nothing and HF transformers + peft on the same checkpoint is the oracle."""

from __future__ import annotations

import os
import shutil

import pytest

from tessellm import LLM, SamplingParams
from tessellm.lora import LoRARequest
from tests.lora.adapters import peft_greedy

MAX_NEW = 8
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def int8_grid_model(lora_setup, tmp_path_factory):
    """The tiny sharp Llama with every layer linear replaced by its int8 round trip."""
    import torch
    from safetensors.torch import load_file, save_file

    from tessellm.quantization.packed import quantize_int8

    model, _ = lora_setup
    out = str(tmp_path_factory.mktemp("int8-grid"))
    for name in os.listdir(model):
        if name != "model.safetensors":
            shutil.copy(os.path.join(model, name), out)
    tensors = load_file(os.path.join(model, "model.safetensors"))
    for name, t in tensors.items():
        if name.endswith(".weight") and name.split(".")[-2] in LINEARS:
            q = quantize_int8(t)
            tensors[name] = (q.qweight.float() * q.scales.t()).to(t.dtype).contiguous()
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out


def test_adapters_on_an_int8_base_match_peft(lora_setup, int8_grid_model):
    _, paths = lora_setup
    prompts = [[5, 17, 101, 250], [3, 9, 27, 81, 243, 300, 11]]
    names = [None, "qv8", "all32"]
    want = {n: peft_greedy(int8_grid_model, paths[n] if n else None, prompts, MAX_NEW) for n in names}
    assert want["qv8"] != want[None] and want["all32"] != want[None]  # the adapters matter
    llm = LLM(int8_grid_model, dtype="float32", quantization="int8", enable_lora=True,
              max_lora_rank=32)
    loras = {n: LoRARequest(n, i + 1, paths[n]) for i, n in enumerate(names) if n}
    jobs = [(p, n) for n in names for p in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": prompts[p]} for p, _ in jobs],
                        SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True),
                        use_tqdm=False, lora_request=[loras.get(n) for _, n in jobs])
    for (p, n), out in zip(jobs, outs):
        assert out.outputs[0].token_ids == want[n][p], (n, p)
