"""Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``) greedy tokens equal HF transformers'
(float32) on a tiny random checkpoint (tests/multimodal/tiny_qwen2_vl.py: Qwen3-VL's tower with
DeepStack, three MoE/dense/MoE text layers, the experts stacked as the Qwen checkpoints hold
them, an untied head): images of two sizes, two in one prompt and a text-only prompt in one
batch; chunked prefill through the images; the experts given per expert or in transformers'
orientation; images off (the tower never built), with an attention LoRA adapter; two
tensor-parallel ranks."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tests.multimodal.image_requests import generate
from tests.multimodal.test_text_only import (OFF, VISION_PARTS, _image_text_adapter,
                                             assert_text_lora_matches_peft, hf_text_greedy)
from tests.multimodal.tiny_qwen2_vl import IMAGE, IMAGE_PAD, PROMPT, hf_greedy, image

MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, ignore_eos=True)
TWO = f"<|im_start|>user\n{IMAGE} and {IMAGE}Compare them.<|im_end|>\n<|im_start|>assistant\n"
TEXT = "<|im_start|>user\nDescribe a cat.<|im_end|>\n<|im_start|>assistant\n"
KIND = "qwen3_vl_moe"


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def llm(qwen3_vl_moe_dir):
    with LLM(qwen3_vl_moe_dir, dtype="float32", num_kv_blocks=128, block_size=4,
             limit_mm_per_prompt={"image": 2}) as llm:
        yield llm


@pytest.fixture(scope="module")
def batch(qwen3_vl_moe_dir):
    """Prompts, their images and HF's tokens: merged grids 5x6, 4x3, then 3x4 and 5x6."""
    prompts = [PROMPT, PROMPT, TWO, TEXT]
    images = [[image(1)], [image(2, (32, 24))], [image(3, (24, 32)), image(4)], []]
    return prompts, images, hf_greedy(qwen3_vl_moe_dir, prompts, images, MAX_NEW, kind=KIND)


def test_batch_of_sizes_two_images_and_text_matches_hf(llm, batch):
    prompts, images, want = batch
    got, out = generate(llm, prompts, images, GREEDY)
    assert [o.prompt_token_ids.count(IMAGE_PAD) for o in out] == [30, 12, 42, 0]
    assert got == want
    assert len({tuple(w) for w in want[:3]}) == 3  # the images decide the outputs


def test_chunked_prefill_splits_image_and_deepstack_rows(qwen3_vl_moe_dir):
    """8-token chunks: each image's rows (and their DeepStack features) cross several steps."""
    prompts, images = [TWO, PROMPT], [[image(5, (24, 32)), image(6)], [image(7)]]
    with LLM(qwen3_vl_moe_dir, dtype="float32", num_kv_blocks=128, block_size=4,
             max_num_batched_tokens=8, enable_chunked_prefill=True,
             limit_mm_per_prompt={"image": 2}) as llm:
        got, _ = generate(llm, prompts, images, GREEDY)
    assert got == hf_greedy(qwen3_vl_moe_dir, prompts, images, MAX_NEW, kind=KIND)


def _expert_layouts(path: str):
    """The checkpoint's stacked experts in the two other layouts: per expert
    (``experts.<e>.gate_proj.weight``, ...) and stacked as transformers' modules hold them
    (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)."""
    from safetensors.torch import load_file

    stacked = {n: t for n, t in load_file(f"{path}/model.safetensors").items()
               if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    per_expert, transformers = [], []
    for name, tensor in stacked.items():
        prefix, _, kind = name.rpartition(".")
        transformers.append((name, tensor.transpose(1, 2).contiguous()))
        for e, w in enumerate(tensor):
            if kind == "gate_up_proj":  # [H, 2I]: columns [gate | up]
                gate, up = w.t().chunk(2)
                per_expert += [(f"{prefix}.{e}.gate_proj.weight", gate),
                               (f"{prefix}.{e}.up_proj.weight", up)]
            else:
                per_expert.append((f"{prefix}.{e}.down_proj.weight", w.t()))
    zeros = [(n, torch.zeros_like(t)) for n, t in stacked.items()]
    return zeros, per_expert, transformers


def test_experts_per_expert_or_in_transformers_orientation(llm, batch, qwen3_vl_moe_dir):
    """The stacked checkpoint's experts (loaded at start-up) equal what either other layout
    loads over zeroed experts; HF's tokens after."""
    model = llm.engine.core.runner.model
    experts = {n: p for n, p in model.named_parameters() if ".experts." in n}
    assert len(experts) == 4  # w13 and w2 of layers 0 and 2; layer 1 is dense
    want = {n: p.detach().clone() for n, p in experts.items()}
    zeros, per_expert, transformers = _expert_layouts(qwen3_vl_moe_dir)
    for layout in (per_expert, transformers):
        assert llm.load_weights(zeros) == 4
        assert all(not p.any() for p in experts.values())
        llm.load_weights(layout)
        for name, p in experts.items():
            torch.testing.assert_close(p, want[name], rtol=0, atol=0, msg=name)
    prompts, images, want_tokens = batch
    got, _ = generate(llm, prompts[:2], images[:2], GREEDY)
    assert got == want_tokens[:2]


def test_stacked_experts_of_the_wrong_shape_are_refused(llm):
    bad = [("model.language_model.layers.0.mlp.experts.down_proj", torch.zeros(4, 48, 32))]
    with pytest.raises(ValueError, match=r"experts.down_proj has shape \(4, 48, 32\).*does not "
                                         r"match the weights"):
        llm.load_weights(bad)


def test_images_off_gives_hf_tokens_without_the_tower(qwen3_vl_moe_dir):
    """Served as Qwen3-MoE: the router renormalizes as HF's does, the head stays untied (the
    top-level flag, not the text config's), the experts load stacked."""
    prompts = ["hello there a cat", "What is this? a mat on the"]
    want, text_params = hf_text_greedy(qwen3_vl_moe_dir, prompts, MAX_NEW)
    with LLM(qwen3_vl_moe_dir, dtype="float32", num_kv_blocks=64, block_size=4,
             limit_mm_per_prompt=OFF) as llm:
        assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == want
        model = llm.engine.core.runner.model
        assert type(model).__name__ == "Qwen3MoeForCausalLM"
        assert not [n for n, _ in model.named_parameters() if set(n.split(".")) & set(VISION_PARTS)]
        assert sum(p.numel() for p in model.parameters()) == text_params
        assert llm.engine.core.scheduler.encoder is None


def test_images_off_attention_lora(qwen3_vl_moe_dir, tmp_path):
    """Attention-only LoRA (as the other MoE families): an adapter of the image-text model's
    q/k/v/o projections gives HF PEFT's tokens, next to the base model in one batch."""
    adapter = _image_text_adapter(qwen3_vl_moe_dir, str(tmp_path / "lora"),
                                  ["q_proj", "k_proj", "v_proj", "o_proj"])
    prompts = [[40, 41, 42, 43, 44], [50, 60, 70]]
    assert_text_lora_matches_peft(qwen3_vl_moe_dir, adapter, prompts)


def test_tensor_parallel_two_ranks_with_chunked_prefill(qwen3_vl_moe_dir):
    """Each rank reads its slice of every expert from the stacked tensors; the DeepStack
    features go into the residual stream, whole on both ranks; 16-token chunks."""
    prompts, images = [TWO, PROMPT], [[image(9, (24, 32)), image(10)], [image(11)]]
    with LLM(qwen3_vl_moe_dir, device="cpu", dtype="float32", num_kv_blocks=64, block_size=4,
             tensor_parallel_size=2, max_num_batched_tokens=16,
             limit_mm_per_prompt={"image": 2}) as llm:
        got, _ = generate(llm, prompts, images, GREEDY)
    assert got == hf_greedy(qwen3_vl_moe_dir, prompts, images, MAX_NEW, kind=KIND)
