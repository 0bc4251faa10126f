"""LoRA on a quantized base model: the adapters' products run in the model dtype beside the
packed base product.

int8: the checkpoint's linears are rounded to the int8 grid first, so quantizing them loses
nothing and HF transformers + peft on the same checkpoint is the oracle. gguf: the bundled
SmolLM2 Q4_1 with a peft adapter built for its architecture, served from its packed blocks,
against the engine's float32 path (the same blocks dequantized) with the same adapter."""

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


def test_adapters_on_a_bnb4_base_match_peft(lora_setup, tmp_path):
    """QLoRA's serving case: an NF4 (double quant) bitsandbytes checkpoint of the tiny sharp
    Llama, written by transformers + bitsandbytes, with the adapters: peft's greedy tokens on
    the dequantized checkpoint (``tests/quantization/bnb_checkpoint.py``)."""
    pytest.importorskip("bitsandbytes")
    from tests.quantization.bnb_checkpoint import write_bnb

    model, paths = lora_setup
    bnb_dir, deq_dir = write_bnb(model, str(tmp_path / "bnb"), str(tmp_path / "deq"),
                                 quant_type="nf4", double_quant=True)
    prompts = [[5, 17, 101, 250], [3, 9, 27, 81, 243, 300, 11]]
    names = [None, "all32"]
    want = {n: peft_greedy(deq_dir, paths[n] if n else None, prompts, MAX_NEW) for n in names}
    llm = LLM(bnb_dir, dtype="float32", enable_lora=True, max_lora_rank=32)
    jobs = [(p, n) for n in names for p in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": prompts[p]} for p, _ in jobs],
                        SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True),
                        use_tqdm=False,
                        lora_request=[LoRARequest(n, 1, paths[n]) if n else None for _, n in jobs])
    for (p, n), out in zip(jobs, outs):
        assert out.outputs[0].token_ids == want[n][p], (n, p)


GGUF_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]


@pytest.fixture(scope="module")
def smollm2_adapter(tmp_path_factory):
    """(the bundled GGUF, a rank-8 peft adapter on q/v/down/gate of its 30 layers)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tessellm.config import resolve_model
    from tessellm.loader.default_model import default_model_path

    pytest.importorskip("gguf")
    try:
        path = default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    torch.manual_seed(5)
    hf = AutoModelForCausalLM.from_config(resolve_model(path).hf_config, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                        init_lora_weights=False, lora_dropout=0.0)
    out = str(tmp_path_factory.mktemp("smollm2-lora"))
    get_peft_model(hf, config).save_pretrained(out)
    return path, out


def test_adapter_on_a_gguf_base_matches_the_float_path(smollm2_adapter):
    """Greedy tokens with the adapter on the float32 path; the packed Q4_1 path with the same
    adapter ranks every one of them first (teacher-forced), and the adapter changes them."""
    path, adapter = smollm2_adapter
    lora = LoRARequest("smol", 1, adapter)
    kw = dict(dtype="float32", max_model_len=128, num_kv_blocks=32, enable_lora=True, max_lora_rank=8)
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    with LLM(path, **kw) as dense:
        outs = dense.generate(GGUF_PROMPTS * 2, greedy, use_tqdm=False,
                              lora_request=[lora] * len(GGUF_PROMPTS) + [None] * len(GGUF_PROMPTS))
    adapted = [(o.prompt_token_ids, o.outputs[0].token_ids) for o in outs[:len(GGUF_PROMPTS)]]
    assert [c for _, c in adapted] != [o.outputs[0].token_ids for o in outs[len(GGUF_PROMPTS):]]
    score = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    with LLM(path, quantization="gguf", **kw) as packed:
        layers = packed.engine.core.runner.lora.layers
        assert all(l.base.quant_method.name == "gguf" for l in layers.values())
        scored = packed.generate([{"prompt_token_ids": p + c} for p, c in adapted], score,
                                 use_tqdm=False, lora_request=lora)
        decoded = packed.generate([{"prompt_token_ids": adapted[0][0]}], greedy, use_tqdm=False,
                                  lora_request=lora)  # and through the decode path
    assert decoded[0].outputs[0].token_ids == adapted[0][1]
    for (p, c), o in zip(adapted, scored):
        ranks = [o.prompt_logprobs[len(p) + j][tok].rank for j, tok in enumerate(c)]
        assert ranks == [1] * len(c), ranks


@pytest.mark.parametrize("scheme, backend", [
    ("int8", "cpu"), ("fp8", "cpu"), pytest.param("awq", "cuda", marks=pytest.mark.interpreted),
    pytest.param("gptq", "cuda", marks=pytest.mark.interpreted)])
def test_lora_linear_on_every_packed_scheme(scheme, backend):
    """One fused [q|k|v]-shaped layer and one row layer per scheme (awq/gptq: the cuda backend's
    Triton kernels, through the interpreter on a CPU; the cpu backend has none), adapters in two
    slots: each token row gets the packed product plus its own slot's ``s * x A^T B^T``."""
    import torch

    from tessellm.backends.registry import BackendRegistry
    from tessellm.backends.spec import QuantSpec
    from tessellm.layers.linear import ColumnParallelLinear, RowParallelLinear
    from tessellm.lora.layers import LoRABatch, LoRALinear
    from tessellm.lora.peft import ModuleLoRA

    if backend == "cuda":
        pytest.importorskip("triton")
    registry = BackendRegistry()
    spec = QuantSpec(scheme, {"group_size": 64} if scheme in ("awq", "gptq") else {}, torch.float32)
    method = lambda: registry.quant_method(registry.backends[backend], spec)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    layers = [ColumnParallelLinear(128, [64, 32, 32], quant_method=method()),
              RowParallelLinear(64, 128, quant_method=method())]
    x = {128: torch.randn(5, 128, generator=g), 64: torch.randn(5, 64, generator=g)}
    slots = torch.tensor([0, 1, 1, -1, 0], dtype=torch.int32)
    for layer in layers:
        layer.quant_method.init_dummy(layer, g, scale=0.1)
        layer.quant_method.process_weights_after_loading(layer)
        batch = LoRABatch(registry.lora_ops(registry.backends[backend], None), 2)
        wrapped = LoRALinear(layer, batch, 2, rank=8)
        adapters = [[ModuleLoRA(torch.randn(r, layer.input_size, generator=g),
                                torch.randn(n, r, generator=g), s) for n in layer.output_sizes]
                    for r, s in ((8, 0.5), (4, 2.0))]
        for slot, modules in enumerate(adapters):
            wrapped.set_slot(slot, modules)
        inp = x[layer.input_size]
        base = layer(inp)
        batch.set(slots)
        got = wrapped(inp)
        want = base.clone()
        for row, slot in enumerate(slots.tolist()):
            if slot >= 0:
                want[row] += torch.cat([m.scaling * (inp[row] @ m.a.t()) @ m.b.t()
                                        for m in adapters[slot]])
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (scheme, type(layer).__name__)
        assert not torch.allclose(got, base, atol=1e-2)
