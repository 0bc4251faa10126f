"""A tiny random LLaVA-NeXT (anyres: CLIP ViT tiles + base image, projector, image_newline,
Llama) with its processor, built and saved offline, and HF transformers' greedy tokens on it:
the reference for tests/multimodal/test_llava_next*.py.

Tiles are 28 px (16 patches of 7 px); the grid pinpoints allow 1x1, 1x2, 2x1 and 2x2 tiles, so
an image's placeholder count depends on its aspect ratio (the processor's count)::

    tokens = 16 (base image) + rows * (cols + 1)   rows x cols: the unpadded patch grid
"""

from __future__ import annotations

from tests.multimodal.tiny_llava import CHAT_TEMPLATE, PATCH, _tokenizer, tiny_configs
from tests.multimodal.tiny_llava import hf_greedy as llava_hf_greedy

TILE = 28
PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]
PROMPT = "USER: <image>\nWhat is this? ASSISTANT:"


def make_tiny_llava_next(path: str, seed: int = 0, feature_layer=-2) -> str:
    """Saves config, float32 safetensors, tokenizer (``<image>`` = id 3) and processor."""
    import torch
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    vision, text = tiny_configs(TILE)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=3,
                             image_grid_pinpoints=PINPOINTS, vision_feature_layer=feature_layer,
                             vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).to(torch.float32)
    with torch.no_grad():  # larger projector weights and newline: image content moves the logits
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(8.0)
        model.model.image_newline.mul_(8.0)
    model.save_pretrained(path)
    images = LlavaNextImageProcessor(size={"shortest_edge": TILE},
                                     crop_size={"height": TILE, "width": TILE},
                                     image_grid_pinpoints=PINPOINTS)
    LlavaNextProcessor(image_processor=images, tokenizer=_tokenizer(), patch_size=PATCH,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       chat_template=CHAT_TEMPLATE).save_pretrained(path)
    return path


def hf_greedy(path: str, prompts: list[str], images: list, max_new_tokens: int) -> list[list[int]]:
    """HF LlavaNextForConditionalGeneration's greedy tokens (``tiny_llava.hf_greedy``)."""
    return llava_hf_greedy(path, prompts, images, max_new_tokens, "LlavaNextForConditionalGeneration")
