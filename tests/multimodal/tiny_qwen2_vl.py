"""A tiny random Qwen2-VL / Qwen2.5-VL (ViT with 4 px patches, 2x2 merge; Qwen2 language model
with M-RoPE) with its tokenizer and image processor, built and saved offline, and HF
transformers' greedy tokens on it: the reference for tests/multimodal/test_qwen2_vl*.py.

Images are resized to multiples of 8 px (patch 4 x merge 2) within 64..4096 pixels, so a
40x52 image is a 10x12 patch grid: 5x6 = 30 placeholder tokens.
"""

from __future__ import annotations

from tests.multimodal.tiny_llava import image  # noqa: F401 (the tests' random RGB images)
from tests.tiny_tokenizer import bpe_tokenizer

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]
IMAGE_PAD = 5  # SPECIAL's ids are their indices
VIDEO_PAD = 6
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPT = f"<|im_start|>user\n{IMAGE}What is this?<|im_end|>\n<|im_start|>assistant\n"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif p['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ARCHS = {"qwen2_vl": "Qwen2VLForConditionalGeneration",
         "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
         "qwen3_vl": "Qwen3VLForConditionalGeneration",
         "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}


def _tokenizer():
    return bpe_tokenizer(["user What is this? assistant a cat on a mat", "Describe the image."] * 20,
                         SPECIAL, 300, CHAT_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def config(kind: str = "qwen2_vl", num_layers: int = 2):
    """Two text layers (hidden 64, head 16: mrope_section [2, 3, 3]) and a depth-2 tower;
    Qwen2.5-VL's windows are 2x2 merge blocks (16 px), block 1 attends over the whole image,
    its videos' temporal positions step 2 a second, and its LM head is tied to the embeddings.
    Qwen3-VL: a Qwen3 text model (q/k norms) with interleaved M-RoPE, a 3-block tower with a
    4 x 4 position table and DeepStack mergers after blocks 0 and 1 (added after text layers 0 and 1). Qwen3-VL-MoE: that tower and a Qwen3-MoE
    text model of three layers, the middle one dense (``mlp_only_layers``), 4 experts of
    intermediate size 48 (H 64 and 2I 96 tell the stacked tensors' orientations apart), top 2,
    its head untied (the top-level flag; its text config's says tied)."""
    import transformers

    text = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=num_layers,
                intermediate_size=128, vocab_size=320, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3]},
                eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    common = dict(depth=2, num_heads=4, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    if kind == "qwen2_vl":
        vision = dict(common, embed_dim=32, hidden_size=64, mlp_ratio=2)
        cls = transformers.Qwen2VLConfig
    elif kind in ("qwen3_vl", "qwen3_vl_moe"):
        text.update(head_dim=16, rope_parameters={**text["rope_parameters"], "mrope_interleaved": True})
        vision = dict(common, depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48,
                      num_position_embeddings=16, deepstack_visual_indexes=[0, 1],
                      initializer_range=0.2)
        cls = transformers.Qwen3VLConfig
        if kind == "qwen3_vl_moe":
            text.update(num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=48, mlp_only_layers=[1])
            cls = transformers.Qwen3VLMoeConfig
    else:
        vision = dict(common, hidden_size=32, out_hidden_size=64, intermediate_size=48,
                      window_size=16, fullatt_block_indexes=[1], tokens_per_second=2)
        cls = transformers.Qwen2_5_VLConfig
    # Qwen2.5-VL's tied, as Qwen2.5-VL-3B's (and Qwen2-VL-2B's): the flag is on the top-level
    # config only, its text config has none
    return cls(text_config=text, vision_config=vision, image_token_id=IMAGE_PAD,
               video_token_id=VIDEO_PAD, vision_start_token_id=3, vision_end_token_id=4,
               eos_token_id=2, pad_token_id=0, bos_token_id=None, architectures=[ARCHS[kind]],
               tie_word_embeddings=kind not in ("qwen2_vl", "qwen3_vl_moe"))


def make_tiny_qwen2_vl(path: str, kind: str = "qwen2_vl", seed: int = 0, num_layers: int = 2) -> str:
    """Saves config, float32 safetensors, tokenizer (with the chat template) and the image
    processor (``preprocessor_config.json``)."""
    import torch
    import torch.nn as nn
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    model = getattr(transformers, ARCHS[kind])(config(kind, num_layers)).to(torch.float32)
    with torch.no_grad():  # larger merger weights: image content visibly moves the logits
        visual = model.model.visual
        for p in visual.merger.parameters():
            p.mul_(4.0)
        for p in getattr(visual, "deepstack_merger_list", nn.ModuleList()).parameters():
            p.mul_(4.0)
    model.save_pretrained(path)
    if kind == "qwen3_vl_moe":
        published_expert_layout(path)
    _tokenizer().save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=64, max_pixels=4096, patch_size=4, merge_size=2,
                             temporal_patch_size=2).save_pretrained(path)
    return path


def published_expert_layout(path: str) -> None:
    """Qwen3-VL-MoE's stacked experts as the Qwen checkpoints hold them, ``gate_up_proj
    [E, H, 2I]`` and ``down_proj [E, I, H]`` (transformers 5 saves its modules' ``[E, 2I, H]``
    / ``[E, H, I]`` and reads either)."""
    import os

    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    for name, tensor in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name] = tensor.transpose(1, 2).contiguous()
    save_file(tensors, file, metadata={"format": "pt"})


def hf_inputs(path: str, prompt: str, images: list, image_kwargs: dict | None = None):
    """What ``Qwen2VLProcessor`` gives (it needs torchvision for its video processor, so its
    two steps are done here): each ``<|image_pad|>`` of the text repeated for its image's
    ``t*h*w / 4`` tokens, then tokenized; the image processor's patches and grids."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    pad = "<|image_pad|>"
    inputs = {}
    if images:
        out = AutoImageProcessor.from_pretrained(path)(images=images, return_tensors="pt",
                                                       **(image_kwargs or {}))
        inputs = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
        parts = prompt.split(pad)
        assert len(parts) == len(images) + 1
        prompt = parts[0] + "".join(pad * int(g.prod() // 4) + rest
                                    for g, rest in zip(out["image_grid_thw"], parts[1:]))
    ids = torch.tensor([tok(prompt)["input_ids"]])
    inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids),
                  mm_token_type_ids=(ids == IMAGE_PAD).int())
    return inputs


def hf_greedy(path: str, prompts: list[str], images: list, max_new_tokens: int,
              kind: str = "qwen2_vl", image_kwargs: dict | None = None) -> list[list[int]]:
    """HF generate, float32, one prompt at a time; ``images[i]``: prompt i's list of images."""
    import torch
    import transformers

    model = getattr(transformers, ARCHS[kind]).from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    for prompt, imgs in zip(prompts, images):
        inputs = hf_inputs(path, prompt, imgs, image_kwargs)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        outs.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    return outs
